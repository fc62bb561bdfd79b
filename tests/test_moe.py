"""The MoE feed-forward against a per-token Python-loop reference, numpy formulas and closed forms.

The reference routes every token by numpy (softmax, top-k with ties to the lower expert id,
renormalised weights) and runs it through its experts one at a time; gradients come from the same
per-token loop written with ``jnp`` and differentiated by JAX.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from yocou_jax import moe
from yocou_jax import sharding
from yocou_jax.config import ConfigError, ModelConfig
from yocou_jax.model import Model

E, K, D, F = 4, 2, 16, 8


def moe_config(**overrides) -> ModelConfig:
  base = dict(arch="transformer", num_layers=2, d_model=D, num_heads=2, num_kv_heads=1,
              head_dim=8, d_ff=32, vocab_size=64, ffn="moe", num_experts=E,
              num_experts_per_token=K, expert_d_ff=F, num_shared_experts=1, shared_expert_d_ff=12)
  return ModelConfig(**{**base, **overrides})


def init_layer(cfg, seed=0, b=2, n=6, scale=1.0):
  x = jax.random.normal(jax.random.key(seed + 1), (b, n, cfg.d_model), jnp.float32) * scale
  params = nn.meta.unbox(moe.MoE(cfg).init(jax.random.key(seed), x)["params"])
  # Larger weights than init_std: well separated, varied routing and O(1) expert outputs.
  params = jax.tree.map(lambda w: w * 10.0, params)
  params["router"] = params["router"] * 5.0
  return params, x


def numpy_routing(params, x_NxD, k):
  logits = np.asarray(x_NxD, np.float64) @ np.asarray(params["router"], np.float64)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  experts = np.argsort(-probs, axis=-1, kind="stable")[:, :k]  # Ties: lower id first.
  top = np.take_along_axis(probs, experts, -1)
  return logits, probs, experts, top / top.sum(-1, keepdims=True)


def swiglu(x, wg, wu, wo):
  return (jax.nn.silu(x @ wg) * (x @ wu)) @ wo


def reference_moe(params, x_BxNxD, experts, weights, kept=None):
  """Every token through its top-k experts in a Python loop, plus the shared expert."""
  b, n, d = x_BxNxD.shape
  x_NxD = x_BxNxD.reshape(b * n, d)
  rows = []
  for t in range(b * n):
    y = jnp.zeros((d,), jnp.float32)
    for j in range(experts.shape[1]):
      if kept is not None and not kept[t, j]:
        continue
      e = int(experts[t, j])
      y = y + weights[t, j] * swiglu(x_NxD[t], params["gate"][e], params["up"][e],
                                     params["down"][e])
    rows.append(y)
  s = params["shared"]
  shared = swiglu(x_NxD, s["gate"]["kernel"], s["up"]["kernel"], s["down"]["kernel"])
  return (jnp.stack(rows) + shared).reshape(b, n, d)


def test_dropless_moe_equals_per_token_reference_forward_and_gradients():
  cfg = moe_config()
  params, x = init_layer(cfg)
  _, _, experts, weights = numpy_routing(params, x.reshape(-1, D), K)
  assert len(np.unique(experts)) == E  # Every expert is used.

  def layer_loss(p, x_):
    return jnp.sum(jnp.sin(moe.MoE(cfg).apply({"params": p}, x_)))

  def reference_loss(p, x_):
    # Weights are recomputed from p (differentiable); the expert choice is fixed by numpy.
    logits = x_.reshape(-1, D) @ p["router"]
    probs = jax.nn.softmax(logits, -1)
    top = jnp.take_along_axis(probs, jnp.asarray(experts), -1)
    return jnp.sum(jnp.sin(reference_moe(p, x_, experts, top / top.sum(-1, keepdims=True))))

  y = moe.MoE(cfg).apply({"params": params}, x)
  np.testing.assert_allclose(y, reference_moe(params, x, experts, weights), atol=1e-5, rtol=0)
  grads = jax.jit(jax.grad(layer_loss, argnums=(0, 1)))(params, x)
  ref_grads = jax.jit(jax.grad(reference_loss, argnums=(0, 1)))(params, x)
  jax.tree.map(lambda a, r: np.testing.assert_allclose(a, r, atol=1e-5, rtol=1e-5),
               grads, ref_grads)
  assert float(jnp.abs(grads[0]["router"]).max()) > 1e-3  # The router is trained.


def test_router_ties_go_to_the_lowest_expert_ids_deterministically():
  logits = jnp.zeros((5, 6)).at[0, 3].set(1.0).at[1].set(jnp.array([0., 2., 2., 2., 1., 2.]))
  _, experts, weights = moe.route(logits, 3)
  np.testing.assert_array_equal(experts[0], [3, 0, 1])  # Then ties among the rest: 0, 1.
  np.testing.assert_array_equal(experts[1], [1, 2, 3])
  np.testing.assert_array_equal(experts[2:], np.tile([0, 1, 2], (3, 1)))
  np.testing.assert_allclose(weights[2:], 1 / 3, rtol=1e-6)
  # A model with an all-zero router sends every token to experts 0..K-1 with weight 1/K.
  cfg = moe_config()
  params, x = init_layer(cfg)
  params["router"] = jnp.zeros_like(params["router"])
  experts = np.tile(np.arange(K), (x.shape[0] * x.shape[1], 1))
  y = moe.MoE(cfg).apply({"params": params}, x)
  np.testing.assert_allclose(y, reference_moe(params, x, experts, np.full(experts.shape, 1 / K)),
                             atol=1e-5, rtol=0)


def test_load_balance_and_z_loss_equal_numpy_formulas_and_closed_forms():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(40, 8)) * 2
  _, probs, experts, _ = numpy_routing({"router": np.eye(8)}, logits, 3)
  f = np.bincount(experts.ravel(), minlength=8) / 40  # Sums to K.
  expected = 8 * np.sum(f * probs.mean(0))
  p, e, _ = moe.route(jnp.asarray(logits, jnp.float32), 3)
  np.testing.assert_allclose(moe.load_balance_loss(p, e), expected, rtol=1e-5)
  lse = np.log(np.exp(logits).sum(-1))
  np.testing.assert_allclose(moe.router_z_loss(jnp.asarray(logits, jnp.float32)),
                             np.mean(lse ** 2), rtol=1e-5)
  # Closed forms: uniform probabilities with balanced counts give K; zero logits (log E)^2.
  balanced = jnp.asarray(np.arange(16).reshape(8, 2) % 8)
  np.testing.assert_allclose(moe.load_balance_loss(jnp.full((8, 8), 1 / 8), balanced), 2.0,
                             rtol=1e-6)
  np.testing.assert_allclose(moe.router_z_loss(jnp.zeros((3, 8))), math.log(8) ** 2, rtol=1e-6)


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0])
def test_capacity_drops_the_later_pairs_of_full_experts_like_the_reference(capacity_factor):
  cfg = moe_config(capacity_factor=capacity_factor)
  params, x = init_layer(cfg, seed=3, n=8)
  n = x.shape[0] * x.shape[1]
  _, _, experts, weights = numpy_routing(params, x.reshape(-1, D), K)
  slots = math.ceil(capacity_factor * n * K / E)
  used, kept = np.zeros(E, int), np.zeros_like(experts, bool)
  for t in range(n):  # Pairs in token order, then top-k order: first come, first served.
    for j in range(K):
      kept[t, j] = used[experts[t, j]] < slots
      used[experts[t, j]] += 1
  assert 0 < (~kept).sum() < kept.size
  y, sown = moe.MoE(cfg).apply({"params": params}, x, mutable=["intermediates"])
  stats = moe.collect_stats(sown["intermediates"])
  np.testing.assert_allclose(stats["dropped_fraction"], (~kept).sum() / kept.size, rtol=1e-6)
  np.testing.assert_allclose(stats["max_load"], np.bincount(experts.ravel()).max() / (n * K / E),
                             rtol=1e-6)
  np.testing.assert_allclose(y, reference_moe(params, x, experts, weights, kept), atol=1e-5,
                             rtol=0)


def test_statistics_are_sown_per_layer_and_iteration_and_join_the_loss():
  cfg = moe_config(arch="yocou", num_layers=4, num_iterations=3, window=4, router_z_loss=0.5)
  tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 64)
  params = jax.jit(Model(cfg).init)(jax.random.key(1), tokens)["params"]
  _, sown = jax.jit(lambda p, t: Model(cfg).apply({"params": p}, t, mutable=["intermediates"]))(
      params, tokens)
  sown = sown["intermediates"]
  z_self = sown["self_decoder"]["stack"]["layers"]["mlp"]["moe_router_z"][0]
  z_cross = sown["cross_decoder"]["layers"]["mlp"]["moe_router_z"][0]
  assert z_self.shape == (3, 2) and z_cross.shape == (2,)  # [T, layers] and [layers].
  stats = moe.collect_stats(sown)
  expected = np.concatenate([np.ravel(z_self), np.ravel(z_cross)]).mean()
  np.testing.assert_allclose(stats["router_z"], expected, rtol=1e-6)
  assert float(stats["router_z"]) > 0 and float(stats["load_balance"]) >= 1.0
  np.testing.assert_allclose(moe.auxiliary_loss(cfg, stats),
                             0.01 * stats["load_balance"] + 0.5 * stats["router_z"], rtol=1e-6)


@pytest.mark.parametrize("field,value,match", [
    ("ffn", "sparse", "allowed: dense, moe"),
    ("num_experts_per_token", 5, "must be <= num_experts=4"),
    ("capacity_factor", -1.0, "must be >= 0"),
    ("expert_sharding", "tensor", "allowed: fsdp, expert"),
])
def test_bad_moe_fields_fail_with_one_line_naming_the_field(field, value, match):
  with pytest.raises(ConfigError, match=f"config.model.{field}=.*{match}"):
    moe_config(**{field: value})


def test_total_and_active_params_and_flops_equal_the_closed_form():
  from yocou_jax import accounting  # pylint: disable=g-import-not-at-top

  e, k, f, fs, ns = 8, 2, 24, 40, 2
  cfg = moe_config(arch="yocou", num_layers=4, num_iterations=3, window=8, num_heads=4,
                   num_kv_heads=2, num_experts=e, num_experts_per_token=k, expert_d_ff=f,
                   shared_expert_d_ff=fs, num_shared_experts=ns)
  d, v, hd = cfg.d_model, cfg.vocab_size, cfg.head_dim
  attn = d * hd * (cfg.num_heads * 2 + cfg.num_kv_heads * 2)  # q, out, k, v
  cross_attn = d * hd * cfg.num_heads * 2  # q, out
  routed, router, shared = 3 * e * d * f, d * e, 3 * d * fs * ns
  moe_total, moe_active = router + routed + shared, router + 3 * k * d * f + shared
  global_kv = d + 2 * d * cfg.num_kv_heads * hd
  fixed = 2 * v * d + d + global_kv  # embedding, head, final norm, global K/V
  total = fixed + 2 * (attn + 2 * d + moe_total) + 2 * (cross_attn + 2 * d + moe_total)
  active = total - 4 * (moe_total - moe_active)
  assert accounting.param_counts(cfg)["total"] == total
  assert accounting.active_params(cfg) == active
  # FLOPs count active weights only: each MoE application 2 (D E + 3 D F K + 3 D Fs Ns), and
  # yocou runs its 2 self-decoder layers T = 3 times (8 MoE applications in all).
  dense = cfg.replace(ffn="dense", d_ff=32)
  delta = (accounting.flops_per_token(cfg, 64)["forward"]
           - accounting.flops_per_token(dense, 64)["forward"])
  assert delta == 2 * (2 * 3 + 2) * (moe_active - 3 * d * 32)
  plan = accounting.plan(cfg, 64, 2, [64])
  assert plan["active_params"] == active and plan["params"] == total
  assert "active params" in accounting.format_table({"yocou": plan})


def test_expert_shards_sum_to_all_experts_with_fewer_local_experts_than_k():
  """Expert parallelism's local step: each shard of G < K experts computes only its pairs."""
  e, k, g = 8, 3, 2
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(10, D)), jnp.float32)
  w = [jnp.asarray(rng.normal(size=shape), jnp.float32) * 0.3
       for shape in ((e, D, F), (e, D, F), (e, F, D))]
  _, experts, weights = moe.route(jnp.asarray(rng.normal(size=(10, e)) * 3, jnp.float32), k)
  full, _ = moe.routed_experts(x, experts, weights, *w)
  shards = [moe.routed_experts(x, experts, weights, *(a[s:s + g] for a in w), first_expert=s)[0]
            for s in range(0, e, g)]
  np.testing.assert_allclose(sum(shards), full, atol=1e-5, rtol=0)
  ref = np.zeros((10, D), np.float32)
  for t in range(10):
    for j in range(k):
      i = int(experts[t, j])
      ref[t] += float(weights[t, j]) * np.asarray(swiglu(x[t], w[0][i], w[1][i], w[2][i]))
  np.testing.assert_allclose(full, ref, atol=1e-5, rtol=0)
