"""The experiments binaries (``python -m experiments.NAME``): thin absl front ends to yocou_jax."""

import yocou_jax  # pylint: disable=unused-import  # Chooses the JAX platforms (yocou_jax.platforms).
