"""Exports of every arch agree with the JAX model: logits, greedy generation, cached decoding."""

import importlib.util
import inspect
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # pylint: disable=g-import-not-at-top
import numpy as np
import pytest
import torch
import transformers

from experiments.configs import default
from yocou_jax import sharding as sharding_lib
from yocou_jax.config import ModelConfig
from yocou_jax.data import tokenizers as tokenizers_lib
from yocou_jax.export import exporter, hf, verify
from yocou_jax.model import Model
from yocou_jax.train import checkpoint as checkpoint_lib
from yocou_jax.train import optimizer as optimizer_lib
from yocou_jax.train import step as step_lib

torch.set_num_threads(1)  # Tiny models on shared cores: threads only add contention.

# init_std 0.1 (with d 32) gives logits of a few units: spread enough that greedy decoding has no
# near-ties to flip, small enough that float32 rounding stays far below the tolerances.
TINY = dict(num_layers=4, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=64,
            vocab_size=64, window=4, num_iterations=2, num_recursive_layers=2,
            attention_block_size=32, init_std=0.1)
# case -> (model overrides, export options). One case also covers bfloat16 and sharding.
CASES = {
    "transformer": (dict(arch="transformer"), {}),
    "yoco_tied_cross_rope": (dict(arch="yoco", tie_embeddings=True, cross_rope=True), {}),
    "yocou_T3": (dict(arch="yocou", num_iterations=3), {}),
    "rins_bf16_sharded": (dict(arch="rins"), dict(dtype="bfloat16", max_shard_size="20KB")),
    "looped": (dict(arch="looped"), {}),
}
PROMPT, NEW_TOKENS = 5, 64
SEQ_LEN = PROMPT + NEW_TOKENS  # > 2 x window; one JAX compilation serves logits and generation.


def random_params(cfg: ModelConfig, seed: int):
  """Random weights, norm scales included (ones would hide a dropped or misplaced scale)."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    noise = rng.standard_normal(leaf.shape).astype(np.float32)
    return 1.0 + 0.2 * noise if path[-1].key == "scale" else cfg.init_std * noise

  return jax.tree_util.tree_map_with_path(draw, hf.abstract_params(cfg))


def save_random_checkpoint(workdir, step=3, **model_overrides) -> ModelConfig:
  """A trainer-layout checkpoint of random weights, saved sharded over a (2, 2, 2) mesh."""
  config = default.get_config()
  config.model.update(**{**TINY, **model_overrides})
  config.mesh.update(data=2, fsdp=2, tensor=2)
  cfg = ModelConfig.from_config(config.model)
  tx = optimizer_lib.make_optimizer(config.train)
  mesh = sharding_lib.make_mesh(config.mesh, jax.devices()[:8])
  _, shardings = step_lib.state_shardings(Model(cfg), tx, mesh, 8)
  params = random_params(cfg, step)
  state = step_lib.TrainState(step=np.int32(step), params=params, opt_state=tx.init(params))
  state = jax.device_put(state, shardings)
  assert state.params["embedding"].sharding.spec == jax.P("tensor", "fsdp")
  checkpointer = checkpoint_lib.Checkpointer(str(workdir), keep=5, use_async=False)
  checkpointer.save(step, state, config=config.to_dict())
  checkpointer.wait_until_finished()
  checkpointer.close()
  return cfg


def check_directory(cfg, model, export_dir, params, export_options):
  """The files, the config and every stored tensor (bit-exact after the dtype cast)."""
  files = sorted(os.listdir(export_dir))
  config = json.loads((export_dir / "config.json").read_text())
  if cfg.arch == "transformer":
    assert type(model) is transformers.LlamaForCausalLM
    assert config["rope_parameters"]["rope_theta"] == cfg.rope_theta
  else:
    assert type(model).__name__ == "YocouForCausalLM"
    assert hf.MODELING_FILE in files and config["arch"] == cfg.arch
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_yocou.YocouForCausalLM"
  if "max_shard_size" in export_options:
    index = json.loads((export_dir / exporter.INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and set(shards) < set(files) and "model.safetensors" not in files
  else:
    assert "model.safetensors" in files and exporter.INDEX_FILE not in files
  stored = exporter.read_safetensors(export_dir)
  want = hf.params_to_tensors(cfg, params)
  assert list(stored) == list(want)
  for name, x in want.items():
    np.testing.assert_array_equal(stored[name], x, err_msg=name)
  assert sum(p.numel() for p in model.parameters()) == sum(x.size for x in jax.tree.leaves(params))


def check_logits(cfg, params, model) -> float:
  """3 random batches longer than twice the window; returns the max |difference|."""
  rng = np.random.default_rng(0)
  worst = 0.0
  for _ in range(3):
    tokens = rng.integers(0, cfg.vocab_size, size=(2, SEQ_LEN))
    want = verify.jax_logits(cfg, params, tokens)
    got = verify.torch_logits(model, tokens)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    worst = max(worst, float(np.abs(got - want).max()))
  assert np.abs(want).max() > 1.0  # Logits of a real spread, not a near-uniform model.
  return worst


def check_greedy_generation(cfg, params, model):
  prompt = np.random.default_rng(1).integers(0, cfg.vocab_size, size=(2, PROMPT))
  want = verify.jax_greedy(cfg, params, prompt, NEW_TOKENS)
  with torch.no_grad():
    out = model.generate(torch.as_tensor(prompt), max_new_tokens=NEW_TOKENS, do_sample=False)
  assert out.shape == (2, SEQ_LEN)
  np.testing.assert_array_equal(out[:, PROMPT:].numpy(), want)
  assert len(np.unique(want)) > 4  # Not a constant continuation.


def _forward_with_cache(model, tokens, cache, **kwargs):
  """(logits, cache) for either cache keyword name of the installed transformers."""
  name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
  out = model(tokens, use_cache=True, **{name: cache}, **kwargs)
  return out.logits, out.get("cache", None) if name == "cache" else out.past_key_values


def check_cached_decoding(cfg, model):
  """Prefill (last position only), 25 single steps and a chunk of 8 == one full forward."""
  tokens = torch.as_tensor(np.random.default_rng(2).integers(0, cfg.vocab_size, size=(2, 40)))
  with torch.no_grad():
    full = model(tokens, use_cache=False).logits
    logits, cache = _forward_with_cache(model, tokens[:, :7], None, logits_to_keep=1)
    pieces = [logits]
    for i in range(7, 32):
      logits, cache = _forward_with_cache(model, tokens[:, i:i + 1], cache)
      pieces.append(logits)
    pieces.append(_forward_with_cache(model, tokens[:, 32:], cache)[0])
  torch.testing.assert_close(torch.cat(pieces, 1), full[:, 6:], rtol=0, atol=1e-4)
  if cfg.arch == "transformer":
    return
  per_layer = [kv[0].shape[1] for kv in cache.layers]
  assert len(per_layer) == len(model.config.layer_schedule())
  if cfg.is_decoder_decoder:  # YOCO-U's cache: W tokens per (layer, iteration), global K/V once.
    assert len(per_layer) == cfg.iterations * cfg.num_layers // 2
    assert per_layer == [cfg.window] * len(per_layer)
    assert cache.global_kv[0].shape == (2, 40, cfg.num_kv_heads, cfg.head_dim)
  else:  # A full cache for every layer application.
    assert per_layer == [40] * len(per_layer) and cache.global_kv is None


@pytest.mark.parametrize("case", list(CASES))
def test_export_agrees_with_jax(case, tmp_path):
  """Through a checkpoint saved on 8 devices: files, logits, greedy generation, cached decoding."""
  model_overrides, export_options = CASES[case]
  cfg = save_random_checkpoint(tmp_path, **model_overrides)
  ckpt = exporter.export_checkpoint(str(tmp_path), str(tmp_path / "export"), **export_options)
  assert ckpt.step == 3 and ckpt.model_cfg == cfg
  if cfg.arch == "transformer":  # Native Llama: no custom code at all.
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "export")).eval()
  else:
    model = verify.load_torch_model(tmp_path / "export")  # float32 compute, even for bf16 files.
  params = verify.round_params(ckpt.params, export_options.get("dtype", "float32"))
  check_directory(cfg, model, tmp_path / "export", params, export_options)
  max_diff = check_logits(cfg, params, model)
  check_greedy_generation(cfg, params, model)
  check_cached_decoding(cfg, model)
  print(f"{case}: max |torch - jax| logit difference {max_diff:.2e}")


def _train_bpe(directory):
  texts = ["def f(x):\n    return x + 1\n", "print('héllo wörld')\n"] * 20
  return tokenizers_lib.train_tokenizer("bpe", texts, 300, str(directory))


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_tokenizer_and_generation_config(tmp_path, kind):
  """AutoTokenizer loads the exported tokenizer and gives the training tokenizer's ids."""
  save_random_checkpoint(tmp_path, arch="yoco", vocab_size=384)
  if kind == "byte":
    tokenizer = tokenizers_lib.ByteTokenizer()
    tokenizer.save(str(tmp_path / "tokenizer"))
  else:
    tokenizer = _train_bpe(tmp_path / "tokenizer")
  exporter.export_checkpoint(str(tmp_path), str(tmp_path / "export"))
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "export"))
  text = "def héllo(x):\n\treturn x  # 日本 😀\n"
  assert hf_tokenizer(text)["input_ids"] == tokenizer.encode(text)
  assert hf_tokenizer.decode(tokenizer.encode(text)) == text
  assert (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id, hf_tokenizer.pad_token_id) == (
      tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
  generation = transformers.GenerationConfig.from_pretrained(str(tmp_path / "export"))
  assert (generation.eos_token_id, generation.pad_token_id) == (tokenizer.eos_id,
                                                                tokenizer.pad_id)
  config = json.loads((tmp_path / "export" / "config.json").read_text())
  assert config["eos_token_id"] == tokenizer.eos_id


def test_tokenizer_larger_than_the_model_is_refused(tmp_path):
  save_random_checkpoint(tmp_path, arch="yoco")  # vocab_size 64 < the byte tokenizer's 259.
  tokenizers_lib.ByteTokenizer().save(str(tmp_path / "tokenizer"))
  with pytest.raises(exporter.ExportError, match="has 259 tokens, more than the model's "
                                                 "vocab_size=64"):
    exporter.export_checkpoint(str(tmp_path), str(tmp_path / "export"))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "tokenizer"]


def test_modeling_file_imports_as_a_plain_module(tmp_path):
  """No trust_remote_code: import modeling_yocou.py from the export and load with it."""
  cfg = save_random_checkpoint(tmp_path, arch="yocou")
  exporter.export_checkpoint(str(tmp_path), str(tmp_path / "export"))
  spec = importlib.util.spec_from_file_location("plain_modeling_yocou",
                                                tmp_path / "export" / hf.MODELING_FILE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  model = module.YocouForCausalLM.from_pretrained(str(tmp_path / "export")).eval()
  assert type(model).__module__ == "plain_modeling_yocou"
  tokens = np.random.default_rng(3).integers(0, cfg.vocab_size, size=(1, SEQ_LEN))
  np.testing.assert_array_equal(verify.torch_logits(model, tokens), verify.torch_logits(
      verify.load_torch_model(tmp_path / "export"), tokens))  # The remote-code load.
