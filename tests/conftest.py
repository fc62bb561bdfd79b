"""Test-wide setup: 8 fake CPU devices and parsed absl flags, before anything imports jax.

Pytest imports this file before any test module, so the XLA flag below takes effect for every
test (the sharding tests build a (2, 2, 2) mesh from ``jax.devices("cpu")``).
"""

import os

_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count=8"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICE_COUNT_FLAG}".strip()

from absl import flags  # pylint: disable=g-import-not-at-top

flags.FLAGS.mark_as_parsed()  # grain worker processes read absl flags.

import pytest  # pylint: disable=g-import-not-at-top

from yocou_jax.config import ModelConfig  # pylint: disable=g-import-not-at-top

TINY_MODEL = dict(
    num_layers=4, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=64,
    vocab_size=64, window=4, num_iterations=2, num_recursive_layers=2,
    attention_block_size=8)


@pytest.fixture
def tiny_config():
  """Factory for tiny ``ModelConfig``s (d 32, 4 layers, vocab 64): ``tiny_config("yoco", ...)``."""

  def make(arch: str = "yocou", **overrides) -> ModelConfig:
    return ModelConfig(arch=arch, **{**TINY_MODEL, **overrides})

  return make
