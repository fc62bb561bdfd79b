"""Tests for yocou_jax.accounting and experiments/plan.py.

Parameter counts are checked against a real ``Model.init`` and a hand count, FLOPs against XLA's
cost analysis of the compiled forward pass, KV-cache bytes against architecture.md section 2.
"""

from __future__ import annotations

import json
import os
from unittest import mock

import jax
import jax.numpy as jnp
import pytest

from experiments.configs import yocou_1p3b
from tests import cpu_env
from yocou_jax import accounting
from yocou_jax.config import ARCHS, ModelConfig
from yocou_jax.model import Model

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Small enough to initialise in a blink, large enough that attention is a modest share of FLOPs.
_SMALL = dict(num_layers=4, d_model=128, num_heads=4, num_kv_heads=2, head_dim=32, d_ff=384,
              vocab_size=256, window=64, num_iterations=3, num_recursive_layers=2,
              attention_block_size=32)


# The cost analysis and the params do not depend on it; compile time drops 2-4x.
_FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _small(arch: str, **overrides) -> ModelConfig:
  return ModelConfig(arch=arch, **{**_SMALL, **overrides})


# --- parameters ------------------------------------------------------------------------------

def _tiny(arch: str) -> ModelConfig:
  return _small(arch, d_model=32, head_dim=8, d_ff=64, vocab_size=64)


@pytest.fixture(scope="module")
def initialised_params():
  """{arch: params} of a real ``Model.init`` of every arch, in one compile (saves ~10 s)."""
  models = {arch: Model(_tiny(arch)) for arch in ARCHS}
  key, tokens = jax.random.key(0), jnp.zeros((1, 8), jnp.int32)

  def init_all(key, tokens):
    return {arch: model.init(key, tokens)["params"] for arch, model in models.items()}

  return jax.jit(init_all).lower(key, tokens).compile(_FAST_COMPILE)(key, tokens)


@pytest.mark.parametrize("arch", ARCHS)
def test_param_counts_match_initialised_params(arch, initialised_params):
  params = initialised_params[arch]
  counts = accounting.param_counts(_tiny(arch))
  assert counts["total"] == sum(x.size for x in jax.tree_util.tree_leaves(params))
  assert set(counts) - {"total"} == set(params)
  for name, tree in params.items():
    assert counts[name] == sum(x.size for x in jax.tree_util.tree_leaves(tree)), name


def test_yocou_params_do_not_depend_on_iterations():
  counts = [accounting.param_counts(_small("yocou", num_iterations=t)) for t in (1, 2, 3, 5)]
  assert all(c == counts[0] for c in counts)
  assert counts[0] == accounting.param_counts(_small("yoco"))


@pytest.mark.parametrize("tied", [False, True])
def test_transformer_params_closed_form(tied):
  v, d, h, k, dh, f, l = 256, 128, 4, 2, 32, 384, 4
  per_layer = d * h * dh * 2 + 2 * d * k * dh + 3 * d * f + 2 * d
  expected = v * d * (1 if tied else 2) + l * per_layer + d
  cfg = _small("transformer", tie_embeddings=tied)
  assert accounting.param_counts(cfg)["total"] == expected


def test_1p3b_config_params():
  config = yocou_1p3b.get_config()
  cfg = ModelConfig.from_config(config.model)
  d, f, v, l = 2048, 5632, 100352, 20
  attn_q_o, kv = 2 * d * 16 * 128, 2 * d * 4 * 128
  self_layer = attn_q_o + kv + 3 * d * f + 2 * d
  cross_layer = attn_q_o + 3 * d * f + 2 * d
  expected = 2 * v * d + (l // 2) * (self_layer + cross_layer) + (kv + d) + d
  assert accounting.param_counts(cfg)["total"] == expected
  assert cfg.arch == "yocou" and cfg.num_recursive_layers == 10 and config.data.seq_len == 8192


# --- FLOPs against XLA -----------------------------------------------------------------------

def _unrolled_scan(*args, **kwargs):
  kwargs["unroll"] = True
  return _LAX_SCAN(*args, **kwargs)


_LAX_SCAN = jax.lax.scan


def _xla_forward_flops(cfg: ModelConfig, seq_len: int) -> float:
  """XLA's FLOPs of one forward pass over a [1, seq_len] row, every scan unrolled.

  XLA's cost analysis counts a while loop's body once, not times its trip count (a 5-step scan
  of a matmul reports one matmul), so the layer and iteration scans (flax's nn.scan calls
  ``jax.lax.scan``) are unrolled while lowering. Params are abstract: nothing is initialised.
  """
  model = Model(cfg)
  params = {"params": accounting.abstract_params(cfg)}
  tokens = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
  with mock.patch.object(jax.lax, "scan", _unrolled_scan):
    lowered = jax.jit(lambda p, t: model.apply(p, t)).lower(params, tokens)
  cost = lowered.compile(_FAST_COMPILE).cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return cost["flops"]


def _implementation_keys(cfg: ModelConfig, kind: str, seq_len: int) -> float:
  """Keys per query that yocou_jax.attention's XLA path computes, masked ones included.

  Blocked SWA: every query block of C reads (P + 1) * C keys, P = ceil((W - 1) / C).
  Chunked causal: chunk i reads (i + 1) * C keys (its diagonal block in full): (N + C) / 2.
  """
  c = min(cfg.attention_block_size, seq_len)
  blocks = -(-seq_len // c)
  if kind == accounting.WINDOW:
    return (min(-(-(cfg.window - 1) // c), blocks - 1) + 1) * c
  return c * (blocks + 1) / 2


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_flops_match_xla(arch):
  # seq 256, W 64, C 32: attention is 9-14% of the analytic count. XLA counts more than the
  # analytic rule: the masked keys the blocked kernels compute (SWA reads 96 keys per query for an
  # average of 56 visible; causal chunks average 144 keys against N/2 = 128) and elementwise
  # work (softmax, SiLU, norms, RoPE, residuals: about 2%). Measured XLA/analytic on CPU:
  # transformer 1.036, yoco 1.050, yocou 1.057, rins 1.037, looped 1.037, parscale (P=2, 48
  # prefix keys) 1.037, yoco_upper_loop 1.043, yoco_upper_loop_nokv 1.043.
  seq_len = 256
  cfg = _small(arch)
  analytic = accounting.flops_per_token(cfg, seq_len)
  xla = _xla_forward_flops(cfg, seq_len)
  assert abs(xla / (analytic["forward"] * seq_len) - 1) < 0.10

  # The same count with the implementation's keys is XLA's up to elementwise work only.
  implementation = analytic["matmul"]
  for part in accounting.model_parts(cfg):
    if part.attention_layers:
      implementation += (part.attention_layers * part.applications * 4 * cfg.num_heads
                         * cfg.head_dim * (_implementation_keys(cfg, part.attention, seq_len)
                                           + part.prefix_keys))
  assert 1.0 <= xla / (implementation * seq_len) < 1.03


def test_flops_closed_form_yocou():
  cfg = _small("yocou")
  n, t, half = 256, 3, 2
  counts = accounting.param_counts(cfg)
  norms = 2 * 128
  self_matmul = counts["self_decoder"] - half * norms
  cross_matmul = counts["cross_decoder"] - half * norms
  kv_matmul = counts["global_kv"] - 128
  per_key = 4 * 4 * 32
  swa_keys = 64 - 64 ** 2 / (2 * n)
  expected = (2 * (t * self_matmul + kv_matmul + cross_matmul + 128 * 256)
              + t * half * per_key * swa_keys + half * per_key * n / 2)
  flops = accounting.flops_per_token(cfg, n)
  assert flops["forward"] == pytest.approx(expected, rel=1e-12)
  assert flops["train"] == pytest.approx(3 * expected, rel=1e-12)
  assert accounting.train_flops_per_step(cfg, n, 8) == pytest.approx(3 * expected * n * 8)
  # Short rows: SWA averages N/2 keys like causal attention.
  short = accounting.flops_per_token(cfg, 32)
  assert short["attention"] == pytest.approx((t * half + half) * per_key * 16)


def test_tied_head_still_counts():
  untied = accounting.flops_per_token(_small("transformer"), 256)
  tied = accounting.flops_per_token(_small("transformer", tie_embeddings=True), 256)
  assert tied["forward"] == untied["forward"]


def test_prefill_linear_for_yocou_quadratic_for_transformer():
  def second_difference(cfg, n):
    return (accounting.prefill_flops(cfg, n) - 2 * accounting.prefill_flops(cfg, 2 * n)
            + accounting.prefill_flops(cfg, 3 * n))

  yocou, transformer = _small("yocou"), _small("transformer")
  n = 1024  # >= W: every SWA query block is full.
  assert second_difference(yocou, n) == pytest.approx(0, abs=1e-3)
  # Transformer: L N (4 N/2 H Dh) = 2 L H Dh N^2 attention FLOPs; second difference 4 L H Dh n^2.
  assert second_difference(transformer, n) == pytest.approx(4 * 4 * 128 * n ** 2)


def test_prefill_early_exit():
  cfg, n = _small("yocou"), 1024
  parts = {p.name: p for p in accounting.model_parts(cfg)}
  per_token = accounting.flops_per_token(cfg, n)["by_part"]
  last_token = (accounting.decode_part_flops(cfg, parts["cross_decoder"], n)
                + accounting.decode_part_flops(cfg, parts["lm_head"], n))
  expected = n * (per_token["self_decoder"] + per_token["global_kv"]) + last_token
  assert accounting.prefill_flops(cfg, n) == pytest.approx(expected)
  assert last_token == 2 * (parts["cross_decoder"].matmul_params + 128 * 256) + 2 * 4 * 128 * n


def test_decode_flops():
  per_key = 4 * 4 * 32
  yocou, transformer = _small("yocou"), _small("transformer")
  weights = 2 * sum(p.matmul_params * p.applications for p in accounting.model_parts(yocou))
  # 6 SWA layer applications read min(W, N) keys, 2 cross layers N keys.
  assert accounting.decode_flops_per_token(yocou, 1000) == weights + per_key * (6 * 64 + 2 * 1000)
  assert accounting.decode_flops_per_token(yocou, 10) == weights + per_key * 8 * 10
  grow = (accounting.decode_flops_per_token(transformer, 2000)
          - accounting.decode_flops_per_token(transformer, 1000))
  assert grow == 4 * per_key * 1000


# --- KV cache --------------------------------------------------------------------------------

@pytest.mark.parametrize("context", [32, 64, 32768])
def test_kv_cache_closed_forms(context):
  bpt = 2 * 2 * 32 * 4  # K and V, 2 kv heads of 32, float32.
  l, t, r, w = 4, 3, 2, 64
  ring = min(w, context)
  expected = {
      "transformer": l * context,
      "looped": l * t * context,
      "rins": (r * t + l - r) * context,
      "yoco": context + (l // 2) * ring,
      "yocou": context + t * (l // 2) * ring,
  }
  for arch, tokens in expected.items():
    assert accounting.kv_cache_bytes(_small(arch), context) == tokens * bpt, arch
    assert accounting.kv_cache_bytes(_small(arch), context, batch=3) == 3 * tokens * bpt, arch
  breakdown = accounting.kv_cache_breakdown(_small("yocou"), context)
  assert breakdown == {"global": context * bpt, "local": t * (l // 2) * ring * bpt,
                       "total": expected["yocou"] * bpt, "bytes_per_token": bpt}


def test_kv_cache_grows_by_one_ring_per_iteration():
  cfg = _small("yocou", dtype="bfloat16")
  sizes = [accounting.kv_cache_bytes(cfg.replace(num_iterations=t), 4096) for t in (1, 2, 3, 4)]
  step = (4 // 2) * 64 * (2 * 2 * 32 * 2)
  assert [b - a for a, b in zip(sizes, sizes[1:])] == [step] * 3
  assert sizes[0] == accounting.kv_cache_bytes(cfg.replace(arch="yoco"), 4096)


def test_kv_cache_1p3b():
  cfg = ModelConfig.from_config(yocou_1p3b.get_config().model)
  bpt = 2 * 4 * 128 * 2  # bfloat16.
  n = 32768
  yocou = accounting.kv_cache_bytes(cfg, n)
  transformer = accounting.kv_cache_bytes(cfg.replace(arch="transformer"), n)
  assert yocou == (n + 3 * 10 * 512) * bpt  # 94 MiB.
  assert transformer == 20 * n * bpt  # 1.25 GiB.
  assert yocou < 0.08 * transformer


def test_decode_traffic_closed_forms():
  # _SMALL: d 128, 4 heads / 2 kv heads of 32, d_ff 384, vocab 256, W 64, T 3, float32 params.
  d, q, kv, ff, v = 128, 4 * 32, 2 * 32, 384, 256
  layer = d * q + 2 * d * kv + q * d + 3 * d * ff  # Q, K, V, out, SwiGLU.
  cross = d * q + q * d + 3 * d * ff  # No K/V of its own.
  weights = {"transformer": 4 * layer + d * v, "looped": 3 * 4 * layer + d * v,
             "yocou": 3 * 2 * layer + 2 * d * kv + 2 * cross + d * v,
             "yoco_upper_loop_nokv": 2 * layer + 3 * 2 * d * kv + 3 * 2 * cross + d * v}
  for arch, params in weights.items():
    assert accounting.decode_weight_read_bytes(_small(arch)) == 4 * params, arch
  bpt, n = 2 * 2 * 32 * 4, 4096  # K and V of one token in one cache, float32.
  tokens = {"transformer": 4 * n, "yocou": 3 * 2 * 64 + 2 * n,  # Global K/V once per cross layer.
            "yoco_upper_loop_nokv": 2 * 64 + 3 * 2 * n}
  for arch, count in tokens.items():
    assert accounting.decode_cache_read_bytes(_small(arch), n, batch=2) == 2 * count * bpt, arch


# --- the plan and its binary -----------------------------------------------------------------

_PLAN_KEYS = {"arch", "params", "params_by_part", "train_flops_per_token", "train_flops_per_step",
              "kv_cache_bytes", "prefill_flops", "decode_flops_per_token"}


def test_plan_and_table():
  plans = {arch: accounting.plan(_small(arch), 256, 8, [128, 4096]) for arch in ARCHS}
  yocou = plans["yocou"]
  assert _PLAN_KEYS <= set(yocou)
  assert yocou["params"] == accounting.param_counts(_small("yocou"))["total"]
  assert yocou["kv_cache_bytes"]["4096"] == accounting.kv_cache_bytes(_small("yocou"), 4096)
  assert yocou["train_flops_per_step"] == pytest.approx(
      accounting.train_flops_per_step(_small("yocou"), 256, 8))
  table = accounting.format_table(plans)
  assert "KV cache @ 4096" in table and "self_decoder" in table
  assert all(arch in table.splitlines()[0] for arch in ARCHS)


def _run_plan_binary(*args: str) -> str:
  """Runs experiments.plan in a child process; returns its stdout."""
  run = cpu_env.run_module("experiments.plan", *args)
  assert run.returncode == 0, run.stderr[-3000:]
  return run.stdout


def test_plan_binary_writes_json_per_arch(tmp_path):
  path = tmp_path / "plan.json"
  out = _run_plan_binary(f"--config={_REPO}/experiments/configs/yocou_1p3b.py",
                         "--archs=yoco,yocou", "--contexts=8192,32768", f"--json_out={path}")
  result = json.loads(path.read_text())
  assert set(result) == {"yoco", "yocou"}
  for arch, entry in result.items():
    assert _PLAN_KEYS <= set(entry) and entry["arch"] == arch
    assert set(entry["kv_cache_bytes"]) == {"8192", "32768"}
  assert result["yocou"]["kv_cache_bytes"]["32768"] == (32768 + 3 * 10 * 512) * 2048
  assert result["yocou"]["params"] == result["yoco"]["params"]
  assert "KV cache @ 32768" in out


def test_plan_binary_single_arch_override(tmp_path):
  path = tmp_path / "plan.json"
  _run_plan_binary(f"--config={_REPO}/experiments/configs/default.py",
                   "--config.model.arch=rins", "--contexts=1024", f"--json_out={path}")
  result = json.loads(path.read_text())
  assert _PLAN_KEYS <= set(result) and result["arch"] == "rins"
  assert set(result["params_by_part"]) == {"embedding", "recursive", "decoder", "final_norm",
                                           "lm_head"}
