"""Mixture-of-Experts feed-forward: softmax top-k routing, dropless grouped matmuls, shared experts.

One token ``x`` (D) goes through::

  logits = x W_r                     (float32, W_r: D x E, no bias)
  p      = softmax(logits)           top-k experts e_1..e_K of p (ties: the lower expert id)
  g_k    = p_{e_k} / sum_j p_{e_j}   (renormalised top-k weights, float32)
  y      = sum_k g_k SwiGLU_{e_k}(x) + SwiGLU_shared(x)

Dispatch is dropless by default: the N*K (token, expert) pairs are stably sorted by expert and the
experts' SwiGLU runs as three ``jax.lax.ragged_dot`` grouped matmuls, then the rows are unsorted
and combined with the weights in float32. ``capacity_factor > 0`` instead gives every expert
``C = ceil(capacity_factor * N * K / E)`` slots (the first pairs in token order win; the rest are
dropped, contributing 0) and runs a batched matmul over the [E, C, D] buffer.

Sharding (``expert_sharding``):

* ``"fsdp"``: the expert weights are sharded like every weight (``embed`` over ``fsdp``, expert
  width over ``tensor``); the routed block runs in ``jax.shard_map`` on the local tokens, the
  weights entering whole along ``embed`` (GSPMD all-gathers them at the boundary, as FSDP does).
* ``"expert"``: expert parallelism. The ``expert`` logical axis is mapped onto the ``fsdp`` mesh
  axis; each device holds E/fsdp experts. Tokens travel by a ring of experts: all-gathered over
  ``fsdp``, each device runs its own experts on every token routed to them, and a
  ``psum_scatter`` over ``fsdp`` sums the experts' contributions back onto the tokens' devices.
  It uses only all-gather and reduce-scatter, so it runs on every backend (``ragged_all_to_all``
  does not run on CPU).

In both, tensor parallelism splits the expert width and ends in a ``psum`` over ``tensor``.
Routing statistics are computed outside the ``shard_map`` on the global batch, so load balance is
measured over the global batch (every routed token, padding included). Each MoE application sows them into the ``intermediates``
collection; :func:`collect_stats` averages them over applications (layers and loop iterations)
and the train step adds :func:`auxiliary_loss` to the loss.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from yocou_jax.config import ModelConfig
from yocou_jax.layers import SwiGLU, param_init

Array = jax.Array

# Sown per MoE application, averaged over applications by :func:`collect_stats`.
STAT_NAMES = ("load_balance", "router_z", "dropped_fraction", "max_load")
_SOW_PREFIX = "moe_"
# Parameter names of the layer (yocou_jax.accounting counts the routed ones at K/E).
ROUTER_PARAM = "router"
EXPERT_PARAMS = ("gate", "up", "down")  # [E, D, F], [E, D, F], [E, F, D].


def feed_forward(cfg: ModelConfig, name: str = "mlp") -> nn.Module:
  """The feed-forward block of a layer: the dense SwiGLU or the MoE, per ``cfg.ffn``."""
  return MoE(cfg, name=name) if cfg.ffn == "moe" else SwiGLU(cfg, name=name)


# --- routing -----------------------------------------------------------------------------------

def route(logits_NxE: Array, k: int) -> tuple[Array, Array, Array]:
  """(probabilities [N, E], top-k expert ids [N, K], renormalised weights [N, K]), float32.

  ``lax.top_k`` returns equal values in index order, so ties go to the lower expert id.
  """
  probs_NxE = jax.nn.softmax(logits_NxE.astype(jnp.float32), axis=-1)
  top_NxK, experts_NxK = jax.lax.top_k(probs_NxE, k)
  weights_NxK = top_NxK / jnp.sum(top_NxK, axis=-1, keepdims=True)
  return probs_NxE, experts_NxK, weights_NxK


def load_balance_loss(probs_NxE: Array, experts_NxK: Array) -> Array:
  """Switch load-balancing loss ``E * sum_e f_e P_e`` (top-k form; K at perfect balance).

  ``f_e`` is the fraction of tokens routed to expert e (sums to K), ``P_e`` the mean router
  probability of e (Switch arXiv 2101.03961 eq. 4; the Hugging Face / MaxText normalisation).
  """
  n, e = probs_NxE.shape
  counts_E = jnp.zeros((e,), jnp.float32).at[experts_NxK.reshape(-1)].add(1.0)
  return e * jnp.sum(counts_E / n * jnp.mean(probs_NxE, axis=0))


def router_z_loss(logits_NxE: Array) -> Array:
  """ST-MoE router z-loss ``mean_t logsumexp(logits_t)^2`` (arXiv 2202.08906)."""
  return jnp.mean(jnp.square(jax.nn.logsumexp(logits_NxE.astype(jnp.float32), axis=-1)))


def capacity(cfg: ModelConfig, num_tokens: int) -> int:
  """Slots per expert, ``ceil(capacity_factor * N * K / E)``; 0 means dropless."""
  if not cfg.capacity_factor:
    return 0
  slots = cfg.capacity_factor * num_tokens * cfg.num_experts_per_token / cfg.num_experts
  return max(1, math.ceil(slots))


# --- the routed experts on one shard -------------------------------------------------------------

def _swiglu_grouped(xs_MxD: Array, group_sizes_G: Array, wg_GxDxF: Array, wu_GxDxF: Array,
                    wo_GxFxD: Array, out_dtype) -> Array:
  """Every row through its group's SwiGLU by three grouped matmuls (rows sorted by group)."""
  acc = jnp.promote_types(out_dtype, jnp.float32)
  dot = lambda a, w: jax.lax.ragged_dot(a, w, group_sizes_G, preferred_element_type=acc)
  h_MxF = (nn.silu(dot(xs_MxD, wg_GxDxF)) * dot(xs_MxD, wu_GxDxF)).astype(out_dtype)
  return dot(h_MxF, wo_GxFxD)


def _swiglu_buffered(xs_GxCxD: Array, wg_GxDxF: Array, wu_GxDxF: Array, wo_GxFxD: Array,
                     out_dtype) -> Array:
  """Every expert's SwiGLU on its [C, D] slot buffer (the capacity path)."""
  acc = jnp.promote_types(out_dtype, jnp.float32)
  dot = lambda eq, a, w: jnp.einsum(eq, a, w, preferred_element_type=acc)
  h = nn.silu(dot("gcd,gdf->gcf", xs_GxCxD, wg_GxDxF)) * dot("gcd,gdf->gcf", xs_GxCxD, wu_GxDxF)
  return dot("gcf,gfd->gcd", h.astype(out_dtype), wo_GxFxD)


def routed_experts(x_NxD: Array, experts_NxK: Array, weights_NxK: Array, wg_GxDxF: Array,
                   wu_GxDxF: Array, wo_GxFxD: Array, *, first_expert: Array | int = 0,
                   capacity_per_expert: int = 0) -> tuple[Array, Array]:
  """``sum_k weights[n, k] * SwiGLU_{experts[n, k]}(x[n])`` over the G experts held here.

  The experts here are ``first_expert .. first_expert + G - 1``; pairs routed elsewhere contribute
  0 (expert parallelism). A token picks an expert at most once, so at most ``N * min(K, G)``
  pairs are local: only those rows are gathered and computed. Returns (y [N, D] float32, the
  number of local pairs dropped for capacity).
  """
  n, k = experts_NxK.shape
  g = wg_GxDxF.shape[0]
  local_NK = experts_NxK.reshape(n * k) - first_expert
  key_NK = jnp.where((local_NK >= 0) & (local_NK < g), local_NK, g)  # Elsewhere: group g, last.
  m = n * min(k, g)
  order_M = jnp.argsort(key_NK, stable=True)[:m]
  key_M = key_NK[order_M]
  token_M = order_M // k
  group_sizes_G = jnp.bincount(key_NK, length=g + 1)[:g].astype(jnp.int32)
  xs_MxD = x_NxD[token_M]
  dtype = x_NxD.dtype
  if capacity_per_expert:
    c = capacity_per_expert
    starts_G = jnp.cumsum(group_sizes_G) - group_sizes_G
    rank_M = jnp.arange(m) - starts_G[jnp.minimum(key_M, g - 1)]
    kept_M = (key_M < g) & (rank_M < c)
    slot_M = jnp.where(kept_M, key_M * c + rank_M, g * c)  # g * c: out of bounds, dropped.
    buffer_GCxD = jnp.zeros((g * c, x_NxD.shape[1]), dtype).at[slot_M].set(xs_MxD, mode="drop")
    out_GxCxD = _swiglu_buffered(buffer_GCxD.reshape(g, c, -1), wg_GxDxF, wu_GxDxF, wo_GxFxD,
                                 dtype)
    ys_MxD = jnp.take(out_GxCxD.reshape(g * c, -1), slot_M, axis=0, mode="fill", fill_value=0)
    dropped = jnp.sum((key_M < g) & ~kept_M)
  else:
    kept_M = key_M < g
    ys_MxD = _swiglu_grouped(xs_MxD, group_sizes_G, wg_GxDxF, wu_GxDxF, wo_GxFxD, dtype)
    dropped = jnp.zeros((), jnp.int32)
  # Rows past sum(group_sizes) are undefined for grouped-matmul kernels: mask, never multiply.
  w_M = weights_NxK.reshape(n * k)[order_M].astype(jnp.float32)
  contrib_MxD = jnp.where(kept_M[:, None], ys_MxD.astype(jnp.float32) * w_M[:, None], 0.0)
  y_NxD = jnp.zeros((n, x_NxD.shape[1]), jnp.float32).at[token_M].add(contrib_MxD)
  return y_NxD, dropped


# --- the sharded routed block --------------------------------------------------------------------

def _mesh_axes(names: tuple) -> PartitionSpec:
  """The PartitionSpec the active logical rules give to ``names``."""
  return nn.logical_to_mesh_axes(names)


def _axis_tuple(spec_entry) -> tuple[str, ...]:
  if spec_entry is None:
    return ()
  return (spec_entry,) if isinstance(spec_entry, str) else tuple(spec_entry)


def sharded_routed_experts(cfg: ModelConfig, x_NxD: Array, experts_NxK: Array,
                           weights_NxK: Array, wg: Array, wu: Array, wo: Array):
  """:func:`routed_experts` on the active mesh (``jax.set_mesh``), else on one device.

  Tokens stay on their batch shards; experts are whole on every device (``fsdp`` mode) or split
  over the ``expert`` axis with a ring (all-gather tokens, reduce-scatter outputs).
  """
  mesh = jax.sharding.get_abstract_mesh()
  batch_axes = _axis_tuple(_mesh_axes(("activation_batch",))[0]) if not mesh.empty else ()
  batch_size = math.prod(mesh.shape[a] for a in batch_axes) if batch_axes else 1
  n = x_NxD.shape[0]
  if mesh.empty or math.prod(mesh.shape.values()) == 1 or n % batch_size:
    # No mesh (or tokens that do not split evenly, e.g. one decode token): let GSPMD place it.
    return routed_experts(x_NxD, experts_NxK, weights_NxK, wg, wu, wo,
                          capacity_per_expert=capacity(cfg, n))
  expert_axes = (_axis_tuple(_mesh_axes(("expert",))[0])
                 if cfg.expert_sharding == "expert" else ())
  tensor_axes = _axis_tuple(_mesh_axes(("mlp",))[0])
  mlp = tensor_axes or None
  tokens = PartitionSpec(batch_axes or None, None)
  experts = PartitionSpec(expert_axes or None, None, mlp)
  experts_out = PartitionSpec(expert_axes or None, mlp, None)
  ep = math.prod(mesh.shape[a] for a in expert_axes)
  # Capacity is per device and expert, over the tokens that device routes.
  local_tokens = n // batch_size * ep

  def body(x, e, w, wg_, wu_, wo_):
    first = 0
    if expert_axes:
      x, e, w = (jax.lax.all_gather(a, expert_axes, axis=0, tiled=True) for a in (x, e, w))
      first = jax.lax.axis_index(expert_axes) * wg_.shape[0]
    y, dropped = routed_experts(x, e, w, wg_, wu_, wo_, first_expert=first,
                                capacity_per_expert=capacity(cfg, local_tokens))
    if tensor_axes:
      y = jax.lax.psum(y, tensor_axes)
    if expert_axes:
      y = jax.lax.psum_scatter(y, expert_axes, scatter_dimension=0, tiled=True)
    dropped = jax.lax.psum(dropped, batch_axes)
    if expert_axes and set(expert_axes) - set(batch_axes):
      dropped = jax.lax.psum(dropped, tuple(set(expert_axes) - set(batch_axes)))
    return y, dropped

  return jax.shard_map(
      body, in_specs=(tokens, tokens, tokens, experts, experts, experts_out),
      out_specs=(tokens, PartitionSpec()), check_vma=False,
  )(x_NxD, experts_NxK, weights_NxK, wg, wu, wo)


# --- the layer -----------------------------------------------------------------------------------

class MoE(nn.Module):
  """Routed experts (top-k of ``num_experts``) plus ``num_shared_experts`` always-on experts."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxNxD: Array) -> Array:
    cfg = self.cfg
    b, n, d = x_BxNxD.shape
    e, f = cfg.num_experts, cfg.expert_d_ff
    expert_dim = "expert" if cfg.expert_sharding == "expert" else None
    embed_dim = None if cfg.expert_sharding == "expert" else "embed"
    router_DxE = self.param(ROUTER_PARAM, param_init(cfg, ("embed", None)), (d, e), jnp.float32)
    wg = self.param("gate", param_init(cfg, (expert_dim, embed_dim, "mlp")), (e, d, f),
                    jnp.float32)
    wu = self.param("up", param_init(cfg, (expert_dim, embed_dim, "mlp")), (e, d, f),
                    jnp.float32)
    wo = self.param("down", param_init(cfg, (expert_dim, "mlp", embed_dim)), (e, f, d),
                    jnp.float32)

    x_NxD = x_BxNxD.reshape(b * n, d)
    logits_NxE = jnp.einsum("nd,de->ne", x_NxD.astype(jnp.float32), router_DxE)
    probs_NxE, experts_NxK, weights_NxK = route(logits_NxE, cfg.num_experts_per_token)
    dtype = cfg.compute_dtype
    y_NxD, dropped = sharded_routed_experts(
        cfg, x_NxD.astype(dtype), experts_NxK, weights_NxK, wg.astype(dtype), wu.astype(dtype),
        wo.astype(dtype))

    pairs = b * n * cfg.num_experts_per_token
    counts_E = jnp.zeros((e,), jnp.float32).at[experts_NxK.reshape(-1)].add(1.0)
    stats = {
        "load_balance": load_balance_loss(probs_NxE, experts_NxK),
        "router_z": router_z_loss(logits_NxE),
        "dropped_fraction": dropped.astype(jnp.float32) / pairs,
        "max_load": jnp.max(counts_E) / (pairs / e),
    }
    for name, value in stats.items():
      self.sow("intermediates", _SOW_PREFIX + name, value)

    y_BxNxD = y_NxD.reshape(b, n, d)
    if cfg.num_shared_experts:
      shared_cfg = cfg.replace(d_ff=cfg.num_shared_experts * cfg.shared_width)
      y_BxNxD = y_BxNxD + SwiGLU(shared_cfg, name="shared")(x_BxNxD).astype(jnp.float32)
    return y_BxNxD.astype(dtype)


# --- statistics and the auxiliary loss -------------------------------------------------------------

def collect_stats(intermediates: Mapping[str, Any]) -> dict[str, Array]:
  """Each statistic averaged over every MoE application sown in ``intermediates``.

  Applications are the MoE layers times their loop iterations (the scans stack them).
  """
  sums = {name: [] for name in STAT_NAMES}
  flat = jax.tree_util.tree_flatten_with_path(intermediates)[0]
  for path, leaf in flat:
    keys = [str(getattr(p, "key", "")) for p in path]
    for name in STAT_NAMES:
      if _SOW_PREFIX + name in keys:
        sums[name].append(jnp.ravel(leaf))
  if not sums[STAT_NAMES[0]]:
    raise ValueError("no MoE statistics were sown: the model has no MoE layer, or apply() was "
                     "called without mutable=['intermediates']")
  return {name: jnp.mean(jnp.concatenate(values)) for name, values in sums.items()}


def auxiliary_loss(cfg: ModelConfig, stats: Mapping[str, Array]) -> Array:
  """``router_aux_loss * load_balance + router_z_loss * router_z`` (per token)."""
  return cfg.router_aux_loss * stats["load_balance"] + cfg.router_z_loss * stats["router_z"]
