"""yocou_jax: pretraining YOCO-U (Universal YOCO) language models with JAX and Flax."""

__version__ = "0.1.0"
