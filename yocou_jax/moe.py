"""Mixture-of-Experts feed-forward: softmax top-k routing, dropless grouped matmuls, shared experts.

One token ``x`` (D) goes through::

  logits = x W_r                     (float32, W_r: D x E, no bias)
  p      = softmax(logits)           top-k experts e_1..e_K of p (ties: the lower expert id)
  g_k    = p_{e_k} / sum_j p_{e_j}   (renormalised top-k weights, float32)
  y      = sum_k g_k SwiGLU_{e_k}(x) + SwiGLU_shared(x)

Dispatch is dropless by default: the N*K (token, expert) pairs are stably sorted by expert and the
experts' SwiGLU runs as three grouped matmuls (:func:`grouped_matmul`, ``moe_matmul``: megablox
on TPU, ``jax.lax.ragged_dot`` on GPU, a blocked matmul on CPU), then the rows are unsorted and
combined with the weights in float32. ``capacity_factor > 0`` instead gives every expert
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

import functools
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from yocou_jax.config import MOE_MATMULS, ModelConfig
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


# --- grouped matmuls ------------------------------------------------------------------------------

def resolve_matmul(name: str) -> str:
  """``auto`` -> the grouped matmul for the backend the step compiles for; other names pass.

  TPU: the megablox Pallas kernel (``ragged_dot`` if it does not import); GPU: ``ragged_dot``
  (XLA's native lowering); CPU: ``blocked``, since CPU ``ragged_dot`` masks the rows into one
  [G, M, K] operand and does every group's work. The backend is read from ``kernels.ops``, which
  AOT compiles for a TPU on this host override.
  """
  if name != "auto":
    return name
  from kernels import ops  # pylint: disable=g-import-not-at-top  # Pallas loads lazily.
  family, interpret = ops.default_kernel()
  if family == "tpu" and not interpret:
    try:
      # pylint: disable-next=g-import-not-at-top,unused-import
      from jax.experimental.pallas.ops.tpu import megablox
    except ImportError:
      return "ragged_dot"
    return "megablox"
  return "ragged_dot" if family == "triton" else "blocked"


def _block_layout(group_sizes_G: Array, m: int, b: int):
  """Each group's rows padded to a multiple of ``b`` rows, in ``ceil(m / b) + G`` blocks of b.

  Returns (expert id per block [B], source row per padded row [B*b] (m: a padding row), padded
  row per row [m] (B*b: a row past sum(group_sizes))).
  """
  g = group_sizes_G.shape[0]
  blocks = -(-m // b) + g  # Static: sum_g ceil(n_g / b) <= ceil(m / b) + G.
  padded_G = (group_sizes_G + b - 1) // b * b
  padded_end_G = jnp.cumsum(padded_G)
  padded_start_G = padded_end_G - padded_G
  end_G = jnp.cumsum(group_sizes_G)
  start_G = end_G - group_sizes_G
  block_group = jnp.searchsorted(padded_end_G, jnp.arange(blocks) * b, side="right")
  block_group = jnp.minimum(block_group, g - 1).astype(jnp.int32)  # Trailing blocks: empty rows.
  p = jnp.arange(blocks * b)
  p_group = block_group[p // b]
  rank = p - padded_start_G[p_group]
  source = jnp.where(rank < group_sizes_G[p_group], start_G[p_group] + rank, m)
  i = jnp.arange(m)
  i_group = jnp.minimum(jnp.searchsorted(end_G, i, side="right"), g - 1)
  target = jnp.where(i < end_G[-1], padded_start_G[i_group] + i - start_G[i_group], blocks * b)
  return block_group, source, target


def _take_rows(a: Array, rows: Array) -> Array:
  """``a[rows]``, 0 for out-of-range rows."""
  return jnp.take(a, rows, axis=0, mode="fill", fill_value=0)


def _per_block_matmul(xs_BxbxK: Array, w_GxKxN: Array, group_B: Array, acc) -> Array:
  """``xs[j] @ w[group[j]]`` per block: one [b, K] x [K, N] matmul each."""
  dot = lambda xg: jnp.dot(xg[0], w_GxKxN[xg[1]], preferred_element_type=acc)
  return jax.lax.map(dot, (xs_BxbxK, group_B))


def _per_group_outer(xs_BxbxK: Array, dy_BxbxN: Array, group_B: Array, g: int) -> Array:
  """``sum_{j in group} xs[j]^T dy[j]`` per group [G, K, N] (the weight gradient), float32."""
  def add_block(acc_GxKxN, xdg):
    x, dy, group = xdg
    return acc_GxKxN.at[group].add(jnp.dot(x.T, dy, preferred_element_type=jnp.float32)), None
  init = jnp.zeros((g, xs_BxbxK.shape[-1], dy_BxbxN.shape[-1]), jnp.float32)
  return jax.lax.scan(add_block, init, (xs_BxbxK, dy_BxbxN, group_B))[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _blocked_matmul(lhs_MxK: Array, rhs_GxKxN: Array, group_sizes_G: Array, block_rows: int,
                    acc) -> Array:
  return _blocked_fwd(lhs_MxK, rhs_GxKxN, group_sizes_G, block_rows, acc)[0]


def _blocked_fwd(lhs_MxK, rhs_GxKxN, group_sizes_G, block_rows, acc):
  m, b = lhs_MxK.shape[0], block_rows
  group_B, source, target = _block_layout(group_sizes_G, m, b)
  xs_BxbxK = _take_rows(lhs_MxK, source).reshape(-1, b, lhs_MxK.shape[1])
  ys = _per_block_matmul(xs_BxbxK, rhs_GxKxN, group_B, acc).reshape(-1, rhs_GxKxN.shape[2])
  return _take_rows(ys, target), (xs_BxbxK, rhs_GxKxN, group_B, source, target, group_sizes_G)


def _blocked_bwd(block_rows, acc, residuals, dy_MxN):
  xs_BxbxK, rhs_GxKxN, group_B, source, target, group_sizes_G = residuals
  dy_BxbxN = _take_rows(dy_MxN.astype(rhs_GxKxN.dtype), source).reshape(
      -1, block_rows, dy_MxN.shape[1])
  dxs = _per_block_matmul(dy_BxbxN, jnp.swapaxes(rhs_GxKxN, 1, 2), group_B, acc)
  dlhs = _take_rows(dxs.reshape(-1, xs_BxbxK.shape[2]), target).astype(xs_BxbxK.dtype)
  drhs = _per_group_outer(xs_BxbxK, dy_BxbxN, group_B, rhs_GxKxN.shape[0])
  return dlhs, drhs.astype(rhs_GxKxN.dtype), np.zeros(group_sizes_G.shape, jax.dtypes.float0)


_blocked_matmul.defvjp(_blocked_fwd, _blocked_bwd)


def grouped_matmul(lhs_MxK: Array, rhs_GxKxN: Array, group_sizes_G: Array, *, impl: str,
                   block_rows: int = 128, preferred_element_type=jnp.float32) -> Array:
  """``lhs[i] @ rhs[g]`` for the rows i of group g, rows sorted by group; rows past
  ``sum(group_sizes)`` give 0.

  ``impl`` (after :func:`resolve_matmul`): ``ragged_dot`` (``jax.lax.ragged_dot``), ``blocked``
  (each group padded to a multiple of ``block_rows`` rows, one [block_rows, K] x [K, N] matmul
  per block with its group's weights: the ideal FLOPs plus at most ``block_rows - 1`` padding
  rows per group, on any backend) or ``megablox`` (the TPU Pallas kernel, ``block_rows`` its row
  tile; interpreted off TPU).
  """
  impl = resolve_matmul(impl)
  acc = preferred_element_type
  if impl == "blocked":
    return _blocked_matmul(lhs_MxK, rhs_GxKxN, group_sizes_G.astype(jnp.int32), block_rows, acc)
  # Kernels leave rows past sum(group_sizes) undefined (NaN in megablox interpret mode): zero them
  # on the way in (so that their gradient is dropped) and out.
  m = lhs_MxK.shape[0]
  valid_M = (jnp.arange(m) < jnp.sum(group_sizes_G))[:, None]
  lhs_MxK = jnp.where(valid_M, lhs_MxK, 0)
  if impl == "ragged_dot":
    out = jax.lax.ragged_dot(lhs_MxK, rhs_GxKxN, group_sizes_G, preferred_element_type=acc)
  elif impl == "megablox":
    from jax.experimental.pallas.ops.tpu.megablox import gmm  # pylint: disable=g-import-not-at-top
    from kernels import ops  # pylint: disable=g-import-not-at-top
    pad = -m % block_rows  # gmm takes whole row tiles.
    out = gmm(jnp.pad(lhs_MxK, ((0, pad), (0, 0))), rhs_GxKxN, group_sizes_G.astype(jnp.int32),
              preferred_element_type=acc,
              tiling=(block_rows, min(128, rhs_GxKxN.shape[1]), min(128, rhs_GxKxN.shape[2])),
              interpret=ops.default_kernel() != ("tpu", False))[:m]
  else:
    raise ValueError(f"moe_matmul={impl!r}: allowed: {', '.join(MOE_MATMULS)}")
  return jnp.where(valid_M, out, 0)


# --- the routed experts on one shard -------------------------------------------------------------

def _swiglu_grouped(xs_MxD: Array, group_sizes_G: Array, wg_GxDxF: Array, wu_GxDxF: Array,
                    wo_GxFxD: Array, out_dtype, matmul: str, block_rows: int) -> Array:
  """Every row through its group's SwiGLU by three grouped matmuls (rows sorted by group)."""
  acc = jnp.promote_types(out_dtype, jnp.float32)
  dot = functools.partial(grouped_matmul, group_sizes_G=group_sizes_G, impl=matmul,
                          block_rows=block_rows, preferred_element_type=acc)
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
                   capacity_per_expert: int = 0, matmul: str = "auto",
                   block_rows: int = 128) -> tuple[Array, Array]:
  """``sum_k weights[n, k] * SwiGLU_{experts[n, k]}(x[n])`` over the G experts held here.

  The experts here are ``first_expert .. first_expert + G - 1``; pairs routed elsewhere contribute
  0 (expert parallelism). A token picks an expert at most once, so at most ``N * min(K, G)``
  pairs are local: only those rows are gathered and computed, by :func:`grouped_matmul` with
  ``matmul`` and ``block_rows`` (dropless). Returns (y [N, D] float32, the
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
    ys_MxD = _swiglu_grouped(xs_MxD, group_sizes_G, wg_GxDxF, wu_GxDxF, wo_GxFxD, dtype, matmul,
                             block_rows)
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
  grouped = dict(matmul=resolve_matmul(cfg.moe_matmul), block_rows=cfg.moe_block_rows)
  if mesh.empty or math.prod(mesh.shape.values()) == 1 or n % batch_size:
    # No mesh (or tokens that do not split evenly, e.g. one decode token): let GSPMD place it.
    return routed_experts(x_NxD, experts_NxK, weights_NxK, wg, wu, wo,
                          capacity_per_expert=capacity(cfg, n), **grouped)
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
                                capacity_per_expert=capacity(cfg, local_tokens), **grouped)
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
