"""The paper's remaining baselines: the upper loop (with and without shared KV) and ParScale.

Each is checked against an explicit Python composition of the existing layers, against the arch
it reduces to (upper loop at T = 1 == yoco; ParScale at P = 1 without prefix == transformer),
for parameters stored once, for training, and for cached inference (prefill + decode == the full
forward, live cache bytes == the planner's).
"""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.inference import reference as ref_lib
from tests.test_model import (_layer, assert_adamw_memorises_a_fixed_batch, forward_fn, jit,
                              random_params, single_documents)
from yocou_jax import accounting
from yocou_jax import aot
from yocou_jax import attention as attention_lib
from yocou_jax import moe as moe_lib
from yocou_jax.config import ConfigError, ModelConfig
from yocou_jax.inference import cache as cache_lib
from yocou_jax.inference import engine as engine_lib
from yocou_jax.layers import RMSNorm
from yocou_jax.model import CrossDecoderLayer, DecoderLayer, GlobalKV, Model

UPPER_LOOPS = ("yoco_upper_loop", "yoco_upper_loop_nokv")
NEW_ARCHS = (*UPPER_LOOPS, "parscale")
PARSCALE = dict(num_streams=3, prefix_length=2)


def _config(tiny_config, arch, **overrides):
  """Two layers (one self-, one cross-decoder layer for the upper loops) unless overridden."""
  defaults = {"num_layers": 2, **(PARSCALE if arch == "parscale" else {})}
  return tiny_config(arch, **{**defaults, **overrides})


# --- the upper loop ---------------------------------------------------------------------------

def _upper_loop_reference(cfg, params, tokens, seg, pos):
  """self-decoder once, then T x (cross layers), K/V once or per iteration; float32."""
  x = params["embedding"][tokens]
  stacked = params["self_decoder"]["stack"]["layers"]
  for i in range(cfg.num_layers // 2):
    x, _ = DecoderLayer(cfg, cfg.window).apply({"params": _layer(stacked, i)}, x, seg, pos)
  kv = GlobalKV(cfg).apply({"params": params["global_kv"]}, x, pos)
  cross = params["cross_decoder"]["layers"]
  for _ in range(cfg.num_iterations):
    if cfg.arch == "yoco_upper_loop_nokv":
      kv = GlobalKV(cfg).apply({"params": params["global_kv"]}, x, pos)
    for i in range(cfg.num_layers // 2):
      x, _ = CrossDecoderLayer(cfg).apply({"params": _layer(cross, i)}, x, *kv, seg, pos)
  h = RMSNorm(cfg).apply({"params": params["final_norm"]}, x)
  return h @ params["lm_head"]


@pytest.mark.parametrize("arch", UPPER_LOOPS)
def test_upper_loop_matches_explicit_layer_composition(tiny_config, arch):
  cfg = tiny_config(arch, num_iterations=3)
  params = random_params(cfg)
  batch = single_documents()
  got = np.asarray(forward_fn(cfg)(params, *batch))
  want = np.asarray(jit(lambda p, *b: _upper_loop_reference(cfg, p, *b))(params, *batch))
  assert want.std() > 0.1
  np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("arch", UPPER_LOOPS)
def test_upper_loop_with_one_iteration_is_yoco_and_params_do_not_depend_on_t(tiny_config, arch):
  yoco = _config(tiny_config, "yoco")
  shapes = jax.tree.map(lambda x: x.shape, accounting.abstract_params(yoco))
  for t in (1, 2, 5):
    cfg = _config(tiny_config, arch, num_iterations=t)
    assert jax.tree.map(lambda x: x.shape, accounting.abstract_params(cfg)) == shapes
    assert accounting.param_counts(cfg) == accounting.param_counts(yoco)
  params = random_params(yoco)
  batch = single_documents()
  np.testing.assert_array_equal(
      np.asarray(forward_fn(_config(tiny_config, arch, num_iterations=1))(params, *batch)),
      np.asarray(forward_fn(yoco)(params, *batch)))


def test_upper_loop_accounting_closed_forms(tiny_config):
  t, n, bpt = 3, 1000, 2 * 2 * 8 * 4
  yoco = tiny_config("yoco")
  shared, nokv = (tiny_config(a, num_iterations=t) for a in UPPER_LOOPS)
  by_part = {c.arch: accounting.flops_per_token(c, 256)["by_part"] for c in (yoco, shared, nokv)}
  assert by_part[shared.arch]["cross_decoder"] == pytest.approx(t * by_part["yoco"]["cross_decoder"])
  assert by_part[shared.arch]["global_kv"] == by_part["yoco"]["global_kv"]
  assert by_part[nokv.arch]["global_kv"] == pytest.approx(t * by_part["yoco"]["global_kv"])
  # One global cache for the shared K/V, one per iteration without; L/2 rings of W either way.
  assert accounting.kv_cache_bytes(shared, n) == (n + 2 * 4) * bpt
  assert accounting.kv_cache_bytes(nokv, n) == (t * n + 2 * 4) * bpt
  # Prefill: the shared loop exits early for all T iterations, nokv for the last one only (its
  # first T - 1 iterations and their K/V run over every prompt token).
  yoco_parts = {p.name: p for p in accounting.model_parts(yoco)}
  cross_last_token = accounting.decode_part_flops(yoco, yoco_parts["cross_decoder"], n)
  yoco_per_token = accounting.flops_per_token(yoco, n)["by_part"]
  extra = (t - 1) * (n * (yoco_per_token["cross_decoder"] + yoco_per_token["global_kv"])
                     - cross_last_token)
  assert accounting.prefill_flops(nokv, n) - accounting.prefill_flops(shared, n) == (
      pytest.approx(extra))
  parts = {p.name: p for p in accounting.model_parts(nokv)}
  assert parts["cross_decoder"].applications == t and parts["global_kv"].applications == t


def test_upper_loop_sows_per_iteration_and_layer_next_to_the_self_decoder(tiny_config):
  # The residual stream and the MoE statistics of the looped cross-decoder stack to [T, L/2, ...]
  # beside the self-decoder's [L/2, ...] (representation analysis, router losses).
  cfg = tiny_config("yoco_upper_loop_nokv", num_iterations=3, ffn="moe", num_experts=4,
                    expert_d_ff=16)
  params = random_params(cfg)
  tokens = single_documents()[0]
  sown = jit(lambda p, t: Model(cfg).apply({"params": p}, t, mutable=["intermediates"])[1])(
      params, tokens)["intermediates"]
  assert sown["cross_decoder"]["layers"]["residual"][0].shape == (3, 2, 2, 16, 32)
  assert sown["self_decoder"]["stack"]["layers"]["residual"][0].shape == (2, 2, 16, 32)
  stats = moe_lib.collect_stats(sown)
  assert float(stats["max_load"]) >= 1.0 and 0.0 < float(stats["load_balance"])
  cross = jax.tree.leaves(sown["cross_decoder"]["layers"]["mlp"])
  assert cross and all(leaf.shape[:2] == (3, 2) for leaf in cross)


# --- ParScale ---------------------------------------------------------------------------------

def test_parscale_one_stream_without_prefix_is_the_transformer(tiny_config):
  transformer = _config(tiny_config, "transformer")
  cfg = _config(tiny_config, "parscale", num_streams=1, prefix_length=0)
  assert jax.tree.map(lambda x: x.shape, accounting.abstract_params(cfg)) == jax.tree.map(
      lambda x: x.shape, accounting.abstract_params(transformer))
  params = random_params(transformer)
  batch = single_documents()
  np.testing.assert_allclose(np.asarray(forward_fn(cfg)(params, *batch)),
                             np.asarray(forward_fn(transformer)(params, *batch)), atol=1e-6,
                             rtol=1e-6)


def test_parscale_params_stored_once(tiny_config):
  # Only the prefixes (2 x L x P x kv_heads x M x head_dim) and the aggregation MLP
  # (P d x d + d, then d x P + P) depend on P: the transformer is stored once.
  base = accounting.param_counts(tiny_config("transformer"))["total"]
  d, l, kv, dh = 32, 4, 2, 8
  for p, m in ((2, 0), (3, 2), (4, 5)):
    counts = accounting.param_counts(tiny_config("parscale", num_streams=p, prefix_length=m))
    prefix = 2 * l * p * kv * m * dh
    assert counts["stream_aggregation"] == p * d * d + d + d * p + p
    assert counts["total"] == base + prefix + counts["stream_aggregation"]


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_parscale_matches_streams_run_alone_and_official_aggregation(tiny_config):
  # Stream p of the P-stream model is the one-stream model holding prefix p; the streams are
  # then combined by the official formula, re-implemented here in float64 numpy.
  cfg = _config(tiny_config, "parscale", num_layers=4)
  p, m = cfg.num_streams, cfg.prefix_length
  params = random_params(cfg)
  batch = single_documents()
  got = np.asarray(forward_fn(cfg)(params, *batch))

  one = cfg.replace(num_streams=1)
  streams = []
  for s in range(p):
    alone = jax.tree_util.tree_map_with_path(
        lambda path, w, s=s: w[:, s:s + 1] if "prefix" in jax.tree_util.keystr(path) else w,
        {k: v for k, v in params.items() if k != "stream_aggregation"})
    normed = jit(lambda q, *b: Model(one).apply(
        {"params": q}, Model(one).apply({"params": q}, b[0], method=Model.embed),
        method=lambda mdl, x: mdl.final_norm(mdl.decoder(x, b[1], b[2]))))(alone, *batch)
    streams.append(np.asarray(normed, np.float64))
  h = np.stack(streams, axis=-1)  # [B, N, D, P]: the official "(h n)" concatenation order.
  agg = {k: jax.tree.map(lambda w: np.asarray(w, np.float64), v)
         for k, v in params["stream_aggregation"].items()}
  hidden = h.reshape(*h.shape[:2], -1) @ agg["hidden"]["linear"]["kernel"] + agg["hidden"]["bias"]
  hidden = hidden / (1 + np.exp(-hidden))
  weights = _softmax(hidden @ agg["weights"]["linear"]["kernel"] + agg["weights"]["bias"])
  weights = weights * (1 - cfg.stream_weight_smoothing) + cfg.stream_weight_smoothing / p
  want = np.einsum("bndp,bnp->bnd", h, weights) @ np.asarray(params["lm_head"], np.float64)
  assert want.std() > 0.1 and m > 0
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


def test_parscale_prefix_is_seen_by_every_document_of_a_packed_row(tiny_config):
  # Packed documents each see the prefix and nothing of the other documents.
  cfg = _config(tiny_config, "parscale")
  params = random_params(cfg)
  tokens = np.random.default_rng(3).integers(0, 64, (1, 16)).astype(np.int32)
  seg = np.array([[1] * 9 + [2] * 7], np.int32)
  pos = np.array([list(range(9)) + list(range(7))], np.int32)
  packed = np.asarray(forward_fn(cfg)(params, tokens, seg, pos))
  ones = np.ones((1, 16), np.int32)
  first = np.asarray(forward_fn(cfg)(params, tokens, ones, np.arange(16)[None].astype(np.int32)))
  second_tokens = np.concatenate([tokens[:, 9:], tokens[:, :9]], axis=1)
  second = np.asarray(forward_fn(cfg)(params, second_tokens, ones,
                                      np.arange(16)[None].astype(np.int32)))
  np.testing.assert_allclose(packed[:, :9], first[:, :9], atol=1e-5)
  np.testing.assert_allclose(packed[:, 9:], second[:, :7], atol=1e-5)


def test_parscale_accounting_closed_forms(tiny_config):
  cfg = _config(tiny_config, "parscale", num_layers=4)
  transformer = tiny_config("transformer")
  p, m, n, bpt = cfg.num_streams, cfg.prefix_length, 256, 2 * 2 * 8 * 4
  flops = accounting.flops_per_token(cfg, n)["by_part"]
  base = accounting.flops_per_token(transformer, n)["by_part"]
  per_key = 4 * 4 * 8
  assert flops["decoder"] == pytest.approx(p * base["decoder"] + p * 4 * per_key * m)
  assert flops["stream_aggregation"] == 2 * (p * 32 * 32 + 32 * p)
  assert flops["lm_head"] == base["lm_head"]
  # P caches of L layers, each with the M prefix tokens in front.
  assert accounting.kv_cache_bytes(cfg, 1000, batch=2) == 2 * p * 4 * (1000 + m) * bpt


def test_prefix_attention_matches_float64_softmax():
  # Every query sees the M prefix keys, then its own document's causal keys (chunks of 4).
  rng = np.random.default_rng(0)
  b, n, h, k, d, m = 2, 11, 4, 2, 8, 3
  q, keys, values = (rng.standard_normal(s) for s in ((b, n, h, d), (b, n, k, d), (b, n, k, d)))
  prefix = tuple(rng.standard_normal((b, m, k, d)) for _ in range(2))
  seg = np.array([[1] * 6 + [2] * 5, [1] * 11])
  attend = jax.jit(functools.partial(attention_lib.causal_attention, block_size=4))
  got = attend(*(jnp.asarray(x, jnp.float32) for x in (q, keys, values)),
               segment_ids=jnp.asarray(seg),
               prefix=tuple(jnp.asarray(x, jnp.float32) for x in prefix))
  want = np.zeros((b, n, h, d))
  for bi in range(b):
    for i in range(n):
      visible = [j for j in range(i + 1) if seg[bi, j] == seg[bi, i]]
      kk = np.concatenate([prefix[0][bi], keys[bi, visible]])
      vv = np.concatenate([prefix[1][bi], values[bi, visible]])
      for hi in range(h):
        scores = kk[:, hi // (h // k)] @ q[bi, i, hi] / math.sqrt(d)
        want[bi, i, hi] = _softmax(scores) @ vv[:, hi // (h // k)]
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


@pytest.mark.parametrize("field,value,message", [
    ("num_streams", 0, "config.model.num_streams=0 is invalid: must be a positive integer"),
    ("prefix_length", -1, "config.model.prefix_length=-1 is invalid: must be a non-negative"),
    ("stream_weight_smoothing", 1.0, "config.model.stream_weight_smoothing=1.0 is invalid: "
                                     "must be in [0, 1)"),
    ("attention_impl", "pallas", "config.model.attention_impl='pallas' is invalid: parscale "
                                 "with prefix_length > 0 runs xla attention"),
])
def test_parscale_bad_fields_name_the_field(field, value, message):
  with pytest.raises(ConfigError, match=re.escape(message)):
    ModelConfig(arch="parscale", **{field: value})


def test_aot_flops_basis_counts_loops_not_streams():
  # XLA counts a scan body once: ParScale's P streams are batch rows (all counted), the upper
  # loop's T iterations are a scan only when not unrolled (and so is nokv's global K/V).
  # Materialised logits (loss_chunk_size=-1): the fused loss's basis is tested in test_aot.
  cfg = ModelConfig(arch="parscale", num_layers=4, num_streams=3, prefix_length=2,
                    loss_chunk_size=-1)
  by_part = accounting.flops_per_token(cfg, 128)["by_part"]
  once = aot.train_flops(cfg, 128, 8, 1)["analytic_loops_once"]
  rest = sum(v for k, v in by_part.items() if k != "decoder")
  assert once == pytest.approx(3 * 128 * 8 * (by_part["decoder"] / 4 + rest))
  nokv = ModelConfig(arch="yoco_upper_loop_nokv", num_layers=4, num_iterations=3,
                     unroll_loops=False, loss_chunk_size=-1)
  by_part = accounting.flops_per_token(nokv, 128)["by_part"]
  once = aot.train_flops(nokv, 128, 8, 1)["analytic_loops_once"]
  expected = (by_part["self_decoder"] / 2 + by_part["cross_decoder"] / 6
              + by_part["global_kv"] / 3 + by_part["lm_head"])
  assert once == pytest.approx(3 * 128 * 8 * expected)


# --- training and cached inference --------------------------------------------------------------

@pytest.mark.parametrize("arch", NEW_ARCHS)
def test_adamw_memorises_a_fixed_batch(tiny_config, arch):
  assert_adamw_memorises_a_fixed_batch(_config(tiny_config, arch))


@pytest.mark.parametrize("arch", NEW_ARCHS)
def test_cached_inference_matches_forward_and_planned_cache_bytes(arch):
  # Two right-padded prompts (5 and 11 tokens) in chunks of 3, then 6 decoded tokens; W = 4.
  cfg = ref_lib.tiny(arch, num_layers=2, num_iterations=3,
                     **(PARSCALE if arch == "parscale" else {}))
  params = ref_lib.random_params(cfg)
  tokens = np.random.default_rng(1).integers(0, 64, (2, 24)).astype(np.int32)
  lengths, steps, max_len = [5, 11], 6, 20
  opts = engine_lib.Options(chunk_size=3, kv_block=4, decode_kv_block=8, window_block=4)
  got, state = ref_lib.cached_logits(engine_lib.Engine(cfg, opts), params, tokens, lengths,
                                     steps, max_len)
  want = ref_lib.reference_at(ref_lib.reference_logits(cfg, params, tokens), lengths, steps)
  assert np.abs(want).max() > 1.0
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
  assert cache_lib.cache_bytes(state.cache) == accounting.kv_cache_bytes(cfg, max_len, 2)
  # The scoring path (evaluation): features at every position of a chunk, from an empty cache.
  score = jax.jit(functools.partial(engine_lib.chunk_features, cfg=cfg, opts=opts))
  features, _ = score(params, engine_lib.init_state(cfg, 2, max_len), tokens[:, :8],
                      np.array([8, 8], np.int32))
  chunk = Model(cfg).apply({"params": params}, features, method=Model.logits)
  np.testing.assert_allclose(np.asarray(chunk), ref_lib.reference_logits(cfg, params, tokens)[:, :8],
                             rtol=0, atol=1e-5)
  expected_global = {"yoco_upper_loop": 1, "yoco_upper_loop_nokv": 3}
  if arch in expected_global:
    assert len(state.cache["global_kv"]) == expected_global[arch]
  else:
    assert state.cache["decoder"][0]["k"].shape == (3 * 2, 2, 2 + max_len, 8)


# --- the paper's line-up -------------------------------------------------------------------------

def test_table3_lineup_and_the_deeper_config():
  from experiments import plan as plan_binary  # pylint: disable=g-import-not-at-top
  from experiments.configs import yoco_deep_1p3b, yocou_1p3b  # pylint: disable=g-import-not-at-top
  config = yocou_1p3b.get_config()
  plans = plan_binary.build_plans(config, ["transformer", "rins", "looped:2", "parscale:2",
                                           "yocou", "parscale"], [8192])
  flops = {item: p["train_flops_per_token"] for item, p in plans.items()}
  # 10 layers x 3 + 10 and 20 layers x 2: the same 40 layer applications of the same shapes.
  assert flops["looped:2"] == flops["rins"]
  assert flops["parscale:2"] == flops["parscale"]  # The config's P is already 2.
  for item in ("rins", "looped:2", "parscale:2"):
    assert 1.8 < flops[item] / flops["transformer"] < 2.0, item
  with pytest.raises(ConfigError, match="'transformer:2' is invalid: ARCH:K takes a positive K"):
    plan_binary.build_plans(config, ["transformer:2"], [8192])
  deep = ModelConfig.from_config(yoco_deep_1p3b.get_config().model)
  assert (deep.arch, deep.num_layers, deep.d_model) == ("yoco", 40, 1792)
  ratio = accounting.flops_per_token(deep, 8192)["train"] / flops["yocou"]
  assert ratio == pytest.approx(10.987 / 13.314, abs=1e-3)  # The figures its docstring quotes.
