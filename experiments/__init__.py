"""The experiments binaries (``python -m experiments.NAME``): thin absl front ends to yocou_jax."""

from yocou_jax import platforms as _platforms

_platforms.select()  # Before any binary initialises a backend: no TPU probing without a TPU.
