"""yocou_jax: pretraining YOCO-U (Universal YOCO) language models with JAX and Flax."""

from yocou_jax import platforms as _platforms

__version__ = "0.1.0"

_platforms.select()  # Before a backend starts: on a host without a TPU, no TPU runtime probing.
