"""Cross-decoder attention: training kernel over the shared K/V, and a split-K decode kernel.

Training / prefill
  Every cross-decoder layer attends causally with its own queries to the one global K/V:
  ``cross_attention(q [B, N, H, D], k/v [B, N, K, D], segment_ids)``. This is the banded
  flash kernel of :mod:`kernels.local_attention` (TPU) / :mod:`kernels.gpu` (Triton) with an
  unbounded band (``window=None``): query block i visits key blocks 0..i, forward and backward.
  Use :func:`kernels.ops.cross_attention`, which pads, dispatches and differentiates.

Decode (inference; forward only)
  ``decode_attention(q [B, T, H, D], k_cache/v_cache [B, S, K, D] (or [B, K, S, D] with
  cache_layout="BKSD"), q_positions [B, T], kv_length [B] | None, window | None)``: T new query
  tokens (T = 1 for plain decoding, more for speculative / chunked steps) at absolute positions
  ``q_positions`` attend to cache entries ``j`` with ``max(0, pos - window + 1) <= j <= pos`` and
  ``j < kv_length``. The cache holds keys at their absolute positions (entry j = token j);
  entries past ``kv_length`` are ignored.
  Flash-decoding: the S axis is cut into ``num_splits`` chunks processed in parallel, each
  producing a partial output and its logsumexp; the partials are combined exactly in JAX.
  Chunks outside the batch's key range (past the filled part of the cache, before the window)
  are skipped: no compute, and on TPU no DMA (their block index is clamped through a
  scalar-prefetched range), so a long, mostly empty cache costs what its filled part costs.
  The T * G query rows of a kv head (G = H / K) share one K/V read: GQA costs no extra
  cache traffic. A ``[B, S, K, D]`` cache is read as ``[B, S, K * D]`` (a free reshape), so a
  (block, D) tile of kv head k is a plain 2-D block on TPU and a strided tile on GPU.
  Reference: :func:`kernels.reference.decode_reference`.

The same decode kernel body runs on TPU (Mosaic), GPU (Triton: rows padded to 16, powers of
two) and CPU (``interpret=True``).
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels import blocks
from kernels.blocks import MASK_VALUE

Array = jax.Array
F32 = jnp.float32
NT_DIMS = (((1,), (1,)), ((), ()))
NN_DIMS = (((1,), (0,)), ((), ()))


def _decode_kernel(bounds_ref, q_ref, k_ref, v_ref, lo_ref, hi_ref, o_ref, lse_ref, *,
                   block_kv: int, num_blocks: int, scale: float, softcap: Optional[float],
                   prefetched: bool):
  """One (batch, kv head, split): online softmax of all query rows over the split's keys.

  ``bounds_ref`` holds the batch's key range [first, last] over all rows: the loop runs only
  over the split's blocks that meet it (none for splits past the filled part of the cache).
  """
  split = pl.program_id(2)
  if prefetched:  # TPU: the whole [2 * B] array in SMEM (scalar prefetch).
    b = pl.program_id(0)
    first_key, last_key = bounds_ref[2 * b], bounds_ref[2 * b + 1]
  else:  # Triton / interpret: this batch's (2,) block.
    first_key, last_key = bounds_ref[0], bounds_ref[1]
  q = q_ref[...]
  lo, hi = lo_ref[...], hi_ref[...]  # [R, 1]: the visible key range of each row.
  rows = q.shape[0]
  base = split * (num_blocks * block_kv)
  first_block = jnp.minimum(blocks.div(jnp.maximum(first_key - base, 0), block_kv), num_blocks)
  last_block = jnp.minimum(
      blocks.div(jnp.maximum(last_key + 1 - base, 0) + block_kv - 1, block_kv), num_blocks)

  def body(c, carry):
    acc, m, l = carry
    start = pl.multiple_of(c * block_kv, block_kv)
    k = k_ref[pl.ds(start, block_kv), :]
    v = v_ref[pl.ds(start, block_kv), :]
    s = lax.dot_general(q, k, NT_DIMS, preferred_element_type=F32) * scale
    s = blocks.softcap_logits(s, softcap)
    k_pos = base + start + lax.broadcasted_iota(jnp.int32, (rows, block_kv), 1)
    mask = (k_pos >= lo) & (k_pos <= hi)
    s = jnp.where(mask, s, MASK_VALUE)
    m_next = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    p = jnp.where(mask, jnp.exp(s - m_next), 0.0)
    alpha = jnp.exp(m - m_next)
    acc = alpha * acc + lax.dot_general(p.astype(v.dtype), v, NN_DIMS, preferred_element_type=F32)
    return acc, m_next, alpha * l + jnp.sum(p, axis=1, keepdims=True)

  init = (jnp.zeros(q.shape, F32), jnp.full((rows, 1), MASK_VALUE, F32),
          jnp.zeros((rows, 1), F32))
  acc, m, l = lax.fori_loop(first_block, jnp.maximum(last_block, first_block), body, init)
  empty = l == 0.0
  safe_l = jnp.where(empty, 1.0, l)
  o_ref[...] = acc / safe_l
  lse_ref[...] = jnp.where(empty, MASK_VALUE, m + jnp.log(safe_l))


def _largest_divisor_at_most(n: int, limit: int) -> int:
  return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def _row_tile(rows: int, kernel: str) -> int:
  if kernel == "triton":
    return max(16, pl.next_power_of_2(rows))
  return blocks.round_up(rows, 8)


def _compiler_params(kernel: str, head_dim: int):
  if kernel == "tpu":
    return pltpu.CompilerParams(dimension_semantics=("parallel",) * 3)
  try:
    from jax.experimental.pallas import triton as pl_triton  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return pl_triton.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)


def decode_attention(q_BxTxHxD: Array, k_cache: Array, v_cache: Array, *,
                     q_positions_BxT: Array, kv_length_B: Optional[Array] = None,
                     window: Optional[int] = None, softcap: Optional[float] = None,
                     block_kv: int = 512, num_splits: int = 16, cache_layout: str = "BSKD",
                     kernel: str = "tpu", interpret: Any = False) -> Array:
  """Attention of T query tokens to a K/V cache (see the module docstring). Returns [B, T, H, D].

  Args:
    q_BxTxHxD: queries (RoPE already applied at their positions if the layer uses RoPE).
    k_cache, v_cache: the cache, ``[B, S, K, D]`` (``cache_layout="BSKD"``) or ``[B, K, S, D]``
      (``"BKSD"``); entry j holds the token at position j.
    q_positions_BxT: absolute position of each query token (int).
    kv_length_B: number of valid cache entries per sequence (default: all S).
    window: sliding window W (keys ``pos - W + 1 .. pos``), or None for causal.
    softcap: optional logit soft-cap.
    block_kv: keys per inner tile (a multiple of 128 on TPU, a power of two >= 16 on GPU).
    num_splits: maximum number of parallel chunks of the key axis (flash-decoding).
    cache_layout: "BSKD" or "BKSD" (no transpose of the cache either way).
    kernel: "tpu" (Mosaic; also the CPU interpret path) or "triton" (GPU).
    interpret: False, True or ``pltpu.InterpretParams(...)``.
  """
  if cache_layout not in ("BSKD", "BKSD"):
    raise ValueError(f"cache_layout={cache_layout!r}; allowed: BSKD, BKSD")
  seq_axis = 1 if cache_layout == "BSKD" else 2
  b, t, h, d = q_BxTxHxD.shape
  s, kv_heads = k_cache.shape[seq_axis], k_cache.shape[3 - seq_axis]
  if h % kv_heads:
    raise ValueError(f"query heads {h} are not a multiple of kv heads {kv_heads}")
  block_kv = min(block_kv, blocks.round_up(s, 8 if kernel == "tpu" else 16))
  d_pad = d
  if kernel == "triton":  # Power-of-two tiles; padding D copies the cache (use D = 64, 128).
    block_kv, d_pad = pl.next_power_of_2(block_kv), max(16, pl.next_power_of_2(d))
  s_pad = blocks.round_up(s, block_kv)  # Pads (copies) the cache only when S is not a multiple.
  k_cache, v_cache = (blocks.pad_axis(blocks.pad_axis(x, s_pad, axis=seq_axis), d_pad, axis=3)
                      for x in (k_cache, v_cache))
  if cache_layout == "BSKD":  # [B, S, K * D]: kv head k is the k-th D-wide column block.
    k_cache, v_cache = (x.reshape(b, s_pad, kv_heads * d_pad) for x in (k_cache, v_cache))
  splits = _largest_divisor_at_most(s_pad // block_kv, num_splits)

  r_pad = _row_tile(t * (h // kv_heads), kernel)
  q_rows = blocks.pad_axis(_query_rows(q_BxTxHxD, kv_heads, r_pad), d_pad, axis=3)
  bounds_Bx2, lo_BxRx1, hi_BxRx1 = _key_ranges(q_positions_BxT, kv_length_B, window,
                                               h // kv_heads, r_pad)
  kernel_fn = functools.partial(_decode_kernel, block_kv=block_kv,
                                num_blocks=s_pad // splits // block_kv, scale=d ** -0.5,
                                softcap=softcap, prefetched=kernel == "tpu")
  grid_spec = _grid_spec(b, kv_heads, splits, s_pad // splits, r_pad, d_pad, cache_layout,
                         prefetched=kernel == "tpu")
  o_part, lse_part = pl.pallas_call(
      kernel_fn,
      grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct((b, kv_heads, splits, r_pad, d_pad), F32),
                 jax.ShapeDtypeStruct((b, kv_heads, splits, r_pad, 1), F32)],
      compiler_params=_compiler_params(kernel, d),
      interpret=interpret,
      name="decode_attention",
  )(bounds_Bx2.reshape(-1) if kernel == "tpu" else bounds_Bx2, q_rows, k_cache, v_cache,
    lo_BxRx1, hi_BxRx1)
  return _combine_splits(o_part[..., :d], lse_part, b, t, h, d).astype(q_BxTxHxD.dtype)


def _query_rows(q_BxTxHxD: Array, kv_heads: int, r_pad: int) -> Array:
  """[B, T, H, D] -> [B, K, R, D]: the T * G query rows of each kv head (row r = t * G + g)."""
  b, t, h, d = q_BxTxHxD.shape
  q = q_BxTxHxD.reshape(b, t, kv_heads, h // kv_heads, d).transpose(0, 2, 1, 3, 4)
  return blocks.pad_axis(q.reshape(b, kv_heads, t * (h // kv_heads), d), r_pad, axis=2)


def _key_ranges(q_positions_BxT: Array, kv_length_B: Optional[Array], window: Optional[int],
                groups: int, r_pad: int):
  """Visible keys [lo, hi] per batch ([B, 2]) and per query row ([B, R, 1] each)."""
  pos = q_positions_BxT.astype(jnp.int32)
  hi = pos if kv_length_B is None else jnp.minimum(pos, kv_length_B[:, None] - 1)
  lo = jnp.zeros_like(pos) if window is None else jnp.maximum(pos - (window - 1), 0)
  bounds_Bx2 = jnp.stack([jnp.min(lo, axis=1), jnp.max(hi, axis=1)], axis=1)
  # Padded rows get an empty range (lo > hi).
  lo_BxRx1, hi_BxRx1 = (blocks.pad_axis(jnp.repeat(x, groups, axis=1), r_pad, axis=1, value=v)
                        [..., None] for x, v in ((lo, 1), (hi, 0)))
  return bounds_Bx2, lo_BxRx1, hi_BxRx1


def _grid_spec(b: int, kv_heads: int, splits: int, chunk: int, r_pad: int, d_pad: int,
               cache_layout: str, prefetched: bool):
  """Grid (B, K, splits). With ``prefetched`` (TPU) the [2 * B] key ranges are scalar-prefetched
  and splits outside a batch's range re-point at the nearest needed chunk: the block index does
  not change, so Mosaic skips their DMA (and the kernel their compute)."""

  def chunk_index(bi, c, *bounds):
    if not prefetched:
      return c
    first = blocks.div(bounds[0][2 * bi], chunk)
    last = blocks.div(jnp.maximum(bounds[0][2 * bi + 1], 0), chunk)
    return jnp.minimum(jnp.maximum(c, first), last)

  if cache_layout == "BSKD":
    cache_spec = pl.BlockSpec((None, chunk, d_pad),
                              lambda bi, ki, c, *p: (bi, chunk_index(bi, c, *p), ki))
  else:
    cache_spec = pl.BlockSpec((None, None, chunk, d_pad),
                              lambda bi, ki, c, *p: (bi, ki, chunk_index(bi, c, *p), 0))
  row_spec = pl.BlockSpec((None, r_pad, 1), lambda bi, ki, c, *_: (bi, 0, 0))
  in_specs = [pl.BlockSpec((None, None, r_pad, d_pad), lambda bi, ki, c, *_: (bi, ki, 0, 0)),
              cache_spec, cache_spec, row_spec, row_spec]
  out_specs = [pl.BlockSpec((None, None, None, r_pad, d_pad),
                            lambda bi, ki, c, *_: (bi, ki, c, 0, 0)),
               pl.BlockSpec((None, None, None, r_pad, 1), lambda bi, ki, c, *_: (bi, ki, c, 0, 0))]
  grid = (b, kv_heads, splits)
  if prefetched:
    return pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=1, grid=grid, in_specs=in_specs,
                                        out_specs=out_specs)
  bounds_spec = pl.BlockSpec((None, 2), lambda bi, ki, c: (bi, 0))
  return pl.GridSpec(grid=grid, in_specs=[bounds_spec, *in_specs], out_specs=out_specs)


def _combine_splits(o_BxKxSxRxD: Array, lse_BxKxSxRx1: Array, b: int, t: int, h: int,
                    d: int) -> Array:
  """Exact merge of per-split softmaxes (weights exp(lse_s - max_s lse)), back to [B, T, H, D]."""
  weights = jnp.exp(lse_BxKxSxRx1 - jnp.max(lse_BxKxSxRx1, axis=2, keepdims=True))
  o_BxKxRxD = jnp.sum(weights * o_BxKxSxRxD, axis=2) / jnp.sum(weights, axis=2)
  kv_heads = o_BxKxRxD.shape[1]
  o = o_BxKxRxD[:, :, :t * (h // kv_heads)].reshape(b, kv_heads, t, h // kv_heads, d)
  return o.transpose(0, 2, 1, 3, 4).reshape(b, t, h, d)
