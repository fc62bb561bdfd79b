"""MoE in every k-th layer (``moe_layers`` = k): an explicit layer-by-layer composition, closed-form
parameter and FLOP counts, the cached inference engine and the Hugging Face exports."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import flax.linen as nn  # pylint: disable=g-import-not-at-top
import jax
import numpy as np
import pytest

from yocou_jax import accounting
from yocou_jax import moe
from yocou_jax.config import ConfigError, ModelConfig
from yocou_jax.model import (CrossDecoderLayer, DecoderLayer, GlobalKV, Model,
                             default_segments)

MOE = dict(ffn="moe", num_experts=4, num_experts_per_token=2, expert_d_ff=16,
           num_shared_experts=1, shared_expert_d_ff=24)
TINY = dict(d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=64, vocab_size=64,
            window=4, num_iterations=2, attention_block_size=32)


def explicit_layer(cfg, stack, i):
  """(config, params) of layer i of a stack, written out: blocks of k = dense_0.. then moe."""
  k = cfg.moe_layers
  name = "moe" if (i + 1) % k == 0 else f"dense_{i % k}"
  layer_cfg = cfg if name == "moe" else cfg.replace(ffn="dense")
  return layer_cfg, jax.tree.map(lambda w: w[i // k], stack[name])


def test_interleaved_yocou_equals_an_explicit_layer_by_layer_composition(k=2):
  cfg = ModelConfig(arch="yocou", num_layers=8, moe_layers=k, **TINY, **MOE)
  tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, cfg.vocab_size)
  params = nn.meta.unbox(jax.jit(Model(cfg).init)(jax.random.key(1), tokens)["params"])
  params = jax.tree.map(lambda w: w * 3.0, params)  # Larger weights: routing and logits O(1).
  self_stack = params["self_decoder"]["stack"]["layers"]
  assert set(self_stack) == {f"dense_{j}" for j in range(k - 1)} | {"moe"}
  assert self_stack["dense_0"]["mlp"]["gate"]["kernel"].shape == (4 // k, 32, 64)  # d_ff.
  assert self_stack["moe"]["mlp"]["gate"].shape == (4 // k, 4, 32, 16)  # [blocks, E, D, F].

  logits, sown = jax.jit(lambda p, t: Model(cfg).apply(
      {"params": p}, t, mutable=["intermediates"]))(params, tokens)

  @jax.jit
  def explicit(params, tokens):
    seg, pos = default_segments(tokens, None, None)
    x = Model(cfg).apply({"params": params}, tokens, method=Model.embed)
    for _ in range(cfg.num_iterations):
      for i in range(4):
        layer_cfg, lp = explicit_layer(cfg, params["self_decoder"]["stack"]["layers"], i)
        x, _ = DecoderLayer(layer_cfg, cfg.window).apply({"params": lp}, x, seg, pos)
    kv = GlobalKV(cfg).apply({"params": params["global_kv"]}, x, pos)
    for i in range(4):
      layer_cfg, lp = explicit_layer(cfg, params["cross_decoder"]["layers"], i)
      x, _ = CrossDecoderLayer(layer_cfg).apply({"params": lp}, x, *kv, seg, pos)
    return Model(cfg).apply({"params": params}, x, method=Model.logits)

  want = explicit(params, tokens)
  assert np.abs(want).max() > 1.0
  np.testing.assert_allclose(logits, want, atol=1e-5, rtol=1e-5)
  # Statistics of every MoE application: (4/k self layers) x T, plus 4/k cross layers.
  z = sown["intermediates"]["self_decoder"]["stack"]["layers"]["moe"]["mlp"]["moe_router_z"][0]
  assert z.shape == (cfg.num_iterations, 4 // k)
  assert float(moe.collect_stats(sown["intermediates"])["router_z"]) > 0


def test_interleaved_param_counts_and_flops_equal_the_closed_form():
  cfg = ModelConfig(arch="transformer", num_layers=6, moe_layers=3, **TINY, **MOE)
  d, v, hd, f, fs = cfg.d_model, cfg.vocab_size, cfg.head_dim, cfg.expert_d_ff, 24
  attn = d * hd * (cfg.num_heads * 2 + cfg.num_kv_heads * 2)
  dense_ffn = 3 * d * cfg.d_ff
  moe_total = d * 4 + 3 * 4 * d * f + 3 * d * fs
  moe_active = d * 4 + 3 * 2 * d * f + 3 * d * fs
  # Layers 2 and 5 are MoE (the last of each block of 3), the other 4 dense.
  total = 2 * v * d + d + 6 * (attn + 2 * d) + 4 * dense_ffn + 2 * moe_total
  assert accounting.param_counts(cfg)["total"] == total
  assert accounting.active_params(cfg) == total - 2 * (moe_total - moe_active)
  dense = cfg.replace(ffn="dense")
  delta = (accounting.flops_per_token(cfg, 64)["forward"]
           - accounting.flops_per_token(dense, 64)["forward"])
  assert delta == 2 * 2 * (moe_active - dense_ffn)
  plan = accounting.plan(cfg, 64, 2, [64])
  assert plan["moe"]["moe_layers"] == 3 and "1 in 3" in accounting.format_table({"t": plan})
  assert [cfg.is_moe_layer(i) for i in range(6)] == [False, False, True] * 2


def test_moe_layers_that_do_not_divide_a_stack_fail_with_one_line():
  with pytest.raises(ConfigError, match=r"config.model.moe_layers=3 is invalid: .*\(4, 4\)"):
    ModelConfig(arch="yocou", num_layers=8, moe_layers=3, **TINY, **MOE)


@pytest.mark.parametrize("arch,k", [("transformer", 4), ("yocou", 2)])
def test_interleaved_moe_export_agrees_with_jax(arch, k, tmp_path):
  """Qwen2-MoE's decoder_sparse_step (native class) and the remote-code model place the MoE
  layers as the JAX model does (transformer: layers 0-2 dense, 3 MoE; yocou: the second layer
  of each 2-layer stack); every parameter is exported once."""
  import json  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  from tests.export import test_export as dense  # pylint: disable=g-import-not-at-top
  from yocou_jax.export import exporter, hf, verify  # pylint: disable=g-import-not-at-top

  cfg = ModelConfig(arch=arch, **{**dense.TINY, **MOE, "moe_layers": k})
  params = dense.random_params(cfg, seed=3)
  tensors = hf.params_to_tensors(cfg, params)
  assert "model.layers.0.mlp.gate_proj.weight" in tensors  # Dense layer 0, MoE layer k - 1.
  assert f"model.layers.{k - 1}.mlp.experts.3.up_proj.weight" in tensors
  exporter.write_safetensors(tensors, tmp_path, dtype="float32", max_shard_size="5GB",
                             metadata={})
  config = hf.hf_config(cfg)
  (tmp_path / "config.json").write_text(json.dumps(config))
  if arch != "transformer":
    shutil.copy(exporter.MODELING_PATH, tmp_path / hf.MODELING_FILE)
  model = verify.load_torch_model(tmp_path)
  assert config["decoder_sparse_step"] == k
  assert type(model).__name__ == ("Qwen2MoeForCausalLM" if arch == "transformer"
                                  else "YocouForCausalLM")
  extra = sum(x.size for x in hf.constant_tensors(cfg).values())
  assert sum(p.numel() for p in model.parameters()) == (
      sum(np.size(x) for x in jax.tree.leaves(params)) + extra)
  dense.check_logits(cfg, params, model)
  back = hf.tensors_to_params(cfg, tensors)
  jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, params))
