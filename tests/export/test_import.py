"""Hugging Face Llama -> yocou_jax checkpoint -> Hugging Face Llama, and what the import refuses."""

import json
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # pylint: disable=g-import-not-at-top
import pytest
import safetensors.numpy
import torch
import transformers

from experiments.configs import default
from yocou_jax.export import exporter, importer, verify
from yocou_jax.export.hf import ExportError

torch.set_num_threads(1)


def save_tiny_llama(directory, tie: bool = False) -> transformers.LlamaForCausalLM:
  """A random 2-layer Llama (GQA, head_dim != d/H, non-default theta and eps, random norms)."""
  config = transformers.LlamaConfig(
      vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
      rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
      max_position_embeddings=128, initializer_range=0.1, tie_word_embeddings=tie)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
  model.save_pretrained(directory)
  return model


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_llama_round_trip(tmp_path, tie):
  llama = save_tiny_llama(tmp_path / "llama", tie)
  cfg = importer.import_llama(tmp_path / "llama", tmp_path / "run", default.get_config())
  assert (cfg.arch, cfg.num_kv_heads, cfg.head_dim, cfg.tie_embeddings) == (
      "transformer", 2, 16, tie)
  assert (cfg.rope_theta, cfg.norm_eps) == (5000.0, 1e-5)

  ckpt = exporter.load_checkpoint(str(tmp_path / "run"))
  assert ckpt.step == 0 and ckpt.config["train"] == default.get_config().train.to_dict()
  tokens = np.random.default_rng(0).integers(0, 64, size=(2, 40))
  want = verify.torch_logits(llama, tokens)
  np.testing.assert_allclose(verify.jax_logits(cfg, ckpt.params, tokens), want, rtol=0,
                             atol=1e-5)

  exporter.export_checkpoint(str(tmp_path / "run"), str(tmp_path / "back"))
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "back")).eval()
  assert type(back) is transformers.LlamaForCausalLM
  np.testing.assert_allclose(verify.torch_logits(back, tokens), want, rtol=0, atol=1e-5)
  original = {k: v.numpy() for k, v in llama.state_dict().items()}
  for name, x in back.state_dict().items():
    np.testing.assert_array_equal(x.numpy(), original[name], err_msg=name)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("llama")
  save_tiny_llama(directory)
  return directory


def _variant(llama_dir, tmp_path, config_changes=None, edit_tensors=None):
  """A copy of the tiny Llama with config.json and/or its tensors edited."""
  directory = tmp_path / "variant"
  shutil.copytree(llama_dir, directory)
  config = json.loads((directory / "config.json").read_text())
  config.update(config_changes or {})
  (directory / "config.json").write_text(json.dumps(config))
  if edit_tensors:
    path = str(directory / "model.safetensors")
    tensors = safetensors.numpy.load_file(path)
    edit_tensors(tensors)
    safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})
  return directory


@pytest.mark.parametrize("changes, message", [
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}},
     "rope_parameters.rope_type='linear'"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling="),
    ({"attention_bias": True}, "attention_bias=true"),
    ({"mlp_bias": True}, "mlp_bias=true"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"model_type": "mistral"}, "model_type='mistral'"),
], ids=["rope_type", "rope_scaling", "attention_bias", "mlp_bias", "hidden_act", "model_type"])
def test_import_refuses_unsupported_llama_features(llama_dir, tmp_path, changes, message):
  with pytest.raises(ExportError, match=f"config.json: {message}.* not supported"):
    importer.import_llama(_variant(llama_dir, tmp_path, changes), tmp_path / "run",
                          default.get_config())
  assert not (tmp_path / "run").exists()


def _transpose(name):
  def edit(tensors):
    tensors[name] = tensors[name].T.copy()
  return edit


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
     "tensor model.layers.1.mlp.up_proj.weight is missing"),
    (lambda t: t.update({"model.layers.2.mlp.up_proj.weight": np.zeros((48, 32), np.float32)}),
     "unexpected tensor model.layers.2.mlp.up_proj.weight"),
    (_transpose("model.layers.0.mlp.gate_proj.weight"),
     r"tensor model.layers.0.mlp.gate_proj.weight has shape \(32, 48\), the config expects "
     r"\(48, 32\)"),
], ids=["missing", "unexpected", "wrong_shape"])
def test_import_refuses_tensors_that_do_not_match_the_config(llama_dir, tmp_path, edit, message):
  with pytest.raises(ExportError, match=message):
    importer.read_llama(_variant(llama_dir, tmp_path, edit_tensors=edit))


@pytest.mark.parametrize("corrupt", ["truncated", "garbage_header"])
def test_import_refuses_corrupted_safetensors(llama_dir, tmp_path, corrupt):
  directory = _variant(llama_dir, tmp_path)
  path = directory / "model.safetensors"
  data = bytearray(path.read_bytes())
  if corrupt == "truncated":
    data = data[:len(data) // 2]
  else:
    data[8:24] = b"\xff" * 16
  path.write_bytes(bytes(data))
  with pytest.raises(ExportError, match="model.safetensors is not a readable safetensors file"):
    importer.import_llama(directory, tmp_path / "run", default.get_config())


def test_import_refuses_existing_checkpoints_unless_overwrite(llama_dir, tmp_path):
  importer.import_llama(llama_dir, tmp_path / "run", default.get_config())
  with pytest.raises(ExportError, match="already holds checkpoints; pass --overwrite"):
    importer.import_llama(llama_dir, tmp_path / "run", default.get_config())
  importer.import_llama(llama_dir, tmp_path / "run", default.get_config(), step=5,
                        overwrite=True)
  assert exporter.load_checkpoint(str(tmp_path / "run")).step == 5
