"""ModelConfig validation: every bad value fails at construction with one line naming the field."""

import ml_collections
import pytest

from experiments.configs import default
from yocou_jax.config import ConfigError, ModelConfig, maybe_window


@pytest.mark.parametrize("arch", ["transformer", "yoco", "yocou", "rins", "looped"])
def test_every_arch_is_accepted(arch):
  cfg = ModelConfig(arch=arch)
  assert cfg.arch == arch


@pytest.mark.parametrize("field,value,arch,extra", [
    ("arch", "gpt", "yocou", {}),
    ("window", 0, "yoco", {}),
    ("window", -3, "yocou", {}),
    ("window", None, "yocou", {}),
    ("num_heads", 4, "yocou", {"d_model": 30}),  # 4 heads do not divide d_model 30.
    ("num_kv_heads", 3, "yocou", {"num_heads": 4}),  # 3 kv heads do not divide 4 heads.
    ("num_layers", 3, "yoco", {}),
    ("num_layers", 5, "yocou", {}),
    ("num_layers", 0, "transformer", {}),
    ("d_model", -8, "transformer", {}),
    ("num_iterations", 0, "yocou", {}),
    ("vocab_size", 1.5, "transformer", {}),
    ("head_dim", True, "transformer", {}),  # Booleans are not sizes.
    ("head_dim", 31, "transformer", {}),  # Rotate-half RoPE needs an even head_dim.
    ("num_recursive_layers", 5, "rins", {"num_layers": 4}),
    ("num_recursive_layers", 0, "rins", {}),
    ("dtype", "float16", "yocou", {}),
    ("remat", "some", "yocou", {}),
    ("unroll_loops", "yes", "yocou", {}),
    ("unroll_layers", 1, "yocou", {}),
    ("attention_impl", "flash", "yocou", {}),
    ("rope_theta", 0.0, "yocou", {}),
    ("loss_chunk_size", -2, "yocou", {}),
    ("loss_chunk_size", 2.5, "yocou", {}),
])
def test_bad_value_is_rejected_naming_the_field(field, value, arch, extra):
  kwargs = {"arch": arch, **extra, field: value}
  with pytest.raises(ConfigError, match=rf"^config\.model\.{field}=") as err:
    ModelConfig(**kwargs)
  message = str(err.value)
  assert "\n" not in message
  assert repr(value) in message
  assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("arch", ["transformer", "rins", "looped"])
def test_window_is_ignored_outside_yoco(arch):
  cfg = ModelConfig(arch=arch, window=0)
  assert maybe_window(cfg) is None


def test_odd_layers_are_fine_outside_yoco():
  assert ModelConfig(arch="transformer", num_layers=3).num_layers == 3


def test_from_config_rejects_an_unknown_field():
  values = default.get_config().model
  values.n_layers = 4  # A typo for num_layers.
  with pytest.raises(ConfigError, match=r"^config\.model\.n_layers is not a model field") as err:
    ModelConfig.from_config(values)
  assert "\n" not in str(err.value)


def test_from_config_rejects_an_unknown_override():
  with pytest.raises(ConfigError, match=r"config\.model\.windw "):
    ModelConfig.from_config({"arch": "yoco"}, windw=8)


def test_from_config_reads_the_default_config_and_overrides():
  config = default.get_config()
  cfg = ModelConfig.from_config(config.model, arch="yoco", window=16)
  assert cfg.arch == "yoco" and cfg.window == 16
  assert cfg.d_model == config.model.d_model
  assert cfg.vocab_size == config.model.vocab_size
  assert ModelConfig.from_config(ml_collections.ConfigDict({"arch": "rins"})).arch == "rins"


def test_from_config_validates_values():
  with pytest.raises(ConfigError, match=r"config\.model\.num_kv_heads=3"):
    ModelConfig.from_config({"num_heads": 4, "num_kv_heads": 3})


def test_replace_validates_again():
  with pytest.raises(ConfigError, match=r"config\.model\.window=0"):
    ModelConfig(arch="yocou").replace(window=0)


@pytest.mark.parametrize("arch,iterations,self_layers,cross_layers,window", [
    ("yocou", 3, 2, 2, 64),
    ("yoco", 1, 2, 2, 64),
    ("rins", 3, 2, 2, None),
    ("looped", 3, 2, 2, None),
    ("transformer", 1, 2, 2, None),
])
def test_derived_fields(arch, iterations, self_layers, cross_layers, window):
  cfg = ModelConfig(arch=arch, num_layers=4, num_iterations=3, window=64)
  assert cfg.iterations == iterations
  assert cfg.num_self_layers == self_layers
  assert cfg.num_cross_layers == cross_layers
  assert maybe_window(cfg) == window
  assert cfg.is_decoder_decoder == (arch in ("yoco", "yocou"))
