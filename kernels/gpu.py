"""GPU path: Pallas-Triton kernels for banded causal attention, and the cuDNN fallback.

The Triton kernels keep the model layout ``[B, N, H, D]`` (strided loads are free on GPU) and
walk the band with in-kernel loops instead of grid axes (Triton programs cannot carry
scratch across grid steps). Each loop is split into masked edges (window edge, diagonal) and an
unmasked interior (:meth:`kernels.blocks.Band.kv_full_range`), and the softmax runs in base 2
(``exp2``, log2(e) folded into the scale), as in FlashAttention's Triton kernels:

* forward and dq: one program per (query block, batch, query head); it loops over the key
  blocks ``kv_lo(i) .. kv_hi(i)`` of :class:`kernels.blocks.Band`, so the work is O(N * W).
* dk/dv: one program per (key block, batch, kv head); it loops over the G query heads of the
  group and the query blocks ``q_lo(j) .. q_hi(j)`` that reach the key block, accumulating
  dk/dv in registers (GQA without repeating K/V or materialising per-head dk).

Triton needs power-of-two tiles of at least 16: blocks are powers of two and D is zero-padded
to one (the softmax scale stays ``D ** -0.5`` of the real D). The same kernels run on CPU with
``interpret=True``, which is how the tests check their numerics; on a GPU they lower through
``jax.experimental.pallas.triton`` (deprecated from jax 0.11 in favour of Mosaic GPU, still
shipped). ``cudnn_attention`` is the fallback and the speed reference: cuDNN flash attention
through ``jax.nn.dot_product_attention`` (bfloat16/float16 only).

Verified without a GPU: the kernels' numerics (interpret mode) and their lowering to Triton IR
for CUDA (``jax.export``, ``tests/kernels/test_ops.py``). Unverified until run on a GPU: the
Triton compile, speed, and cuDNN; ``experiments/gpu_check.py`` checks and times all of them in
one run.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels import blocks
from kernels.blocks import MASK_VALUE, Band

Array = jax.Array
F32 = jnp.float32
NT_DIMS = (((1,), (1,)), ((), ()))
NN_DIMS = (((1,), (0,)), ((), ()))
MIN_TILE = 16  # tl.dot needs every tile dimension >= 16.


def _dot(a: Array, b: Array, dims=NN_DIMS) -> Array:
  return lax.dot_general(a, b, dims, preferred_element_type=F32)


def _compiler_params(head_dim: int, num_stages: int):
  """Triton launch parameters; None where the Triton backend is gone (interpret mode only)."""
  try:
    from jax.experimental.pallas import triton as pl_triton  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return pl_triton.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=num_stages)


LOG2E = math.log2(math.e)


def _scores(a: Array, b: Array, scale: float, softcap: Optional[float]):
  """(base-2 logits for exp2, natural capped logits for the soft-cap gradient or None)."""
  if softcap is None:
    return _dot(a, b, NT_DIMS) * (scale * LOG2E), None  # One multiply: log2(e) folded in.
  capped = blocks.softcap_logits(_dot(a, b, NT_DIMS) * scale, softcap)
  return capped * LOG2E, capped


def _block_mask(band: Band, with_band: bool, q_start, kv_start, shape, q_seg, kv_seg,
                transposed=False):
  """Mask of a block, or None for a fully visible block without segment ids."""
  mask = None
  if with_band:
    mask = blocks.band_mask(q_start, kv_start, shape, band.window, transposed=transposed)
  if q_seg is not None:
    seg = (kv_seg[:, None] == q_seg[None, :]) if transposed else (q_seg[:, None] ==
                                                                    kv_seg[None, :])
    mask = seg if mask is None else mask & seg
  return mask


def _masked(mask, x, fill):
  return x if mask is None else jnp.where(mask, x, fill)


def _band_loop(lo, full_range, hi_excl, body, carry):
  """Runs body(masked, index, carry) over [lo, hi): masked edges, unmasked interior."""
  start, end = full_range
  carry = lax.fori_loop(lo, start, functools.partial(body, True), carry)
  carry = lax.fori_loop(start, end, functools.partial(body, False), carry)
  return lax.fori_loop(end, hi_excl, functools.partial(body, True), carry)


def _fwd_kernel(q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, o_ref, lse_ref, *, band: Band,
                scale: float, softcap: Optional[float]):
  i = pl.program_id(0)
  bq, bk = band.block_q, band.block_kv
  q = q_ref[...]
  q_seg = None if qseg_ref is None else qseg_ref[pl.ds(i * bq, bq)]

  def body(with_band, j, carry):
    acc, m, l = carry  # Base-2 running max and sum.
    k = k_ref[pl.ds(j * bk, bk), :]
    v = v_ref[pl.ds(j * bk, bk), :]
    s, _ = _scores(q, k, scale, softcap)
    kv_seg = None if kvseg_ref is None else kvseg_ref[pl.ds(j * bk, bk)]
    mask = _block_mask(band, with_band, i * bq, j * bk, (bq, bk), q_seg, kv_seg)
    s = _masked(mask, s, MASK_VALUE)
    m_next = jnp.maximum(m, jnp.max(s, axis=1))
    p = _masked(mask, jnp.exp2(s - m_next[:, None]), 0.0)
    alpha = jnp.exp2(m - m_next)
    acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v)
    return acc, m_next, alpha * l + jnp.sum(p, axis=1)

  init = (jnp.zeros(q.shape, F32), jnp.full((bq,), MASK_VALUE, F32), jnp.zeros((bq,), F32))
  acc, m, l = _band_loop(band.kv_lo(i), band.kv_full_range(i), band.kv_hi(i) + 1, body, init)
  empty = l == 0.0  # No visible key: output 0, never NaN.
  safe_l = jnp.where(empty, 1.0, l)
  o_ref[...] = (acc / safe_l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(empty, 0.0, m + jnp.log2(safe_l))  # Base 2, for this module only.


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, qseg_ref, kvseg_ref, dq_ref, *,
               band: Band, scale: float, softcap: Optional[float]):
  i = pl.program_id(0)
  bq, bk = band.block_q, band.block_kv
  q, do = q_ref[...], do_ref[...]
  lse, di = lse_ref[...], di_ref[...]
  q_seg = None if qseg_ref is None else qseg_ref[pl.ds(i * bq, bq)]

  def body(with_band, j, dq):
    k = k_ref[pl.ds(j * bk, bk), :]
    v = v_ref[pl.ds(j * bk, bk), :]
    s, capped = _scores(q, k, scale, softcap)
    kv_seg = None if kvseg_ref is None else kvseg_ref[pl.ds(j * bk, bk)]
    mask = _block_mask(band, with_band, i * bq, j * bk, (bq, bk), q_seg, kv_seg)
    p = _masked(mask, jnp.exp2(s - lse[:, None]), 0.0)
    dp = _dot(do, v, NT_DIMS)
    ds = blocks.softcap_grad(p * (dp - di[:, None]), capped, softcap)
    return dq + _dot(ds.astype(k.dtype), k)

  dq = _band_loop(band.kv_lo(i), band.kv_full_range(i), band.kv_hi(i) + 1, body,
                  jnp.zeros(q.shape, F32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, qseg_ref, kvseg_ref, dk_ref,
                dv_ref, *, band: Band, scale: float, softcap: Optional[float], groups: int):
  j = pl.program_id(0)
  bq, bk = band.block_q, band.block_kv
  k, v = k_ref[...], v_ref[...]
  kv_seg = None if kvseg_ref is None else kvseg_ref[pl.ds(j * bk, bk)]

  def query_block(g, with_band, i, carry):
    dk, dv = carry
    rows = pl.ds(i * bq, bq)
    q, do = q_ref[rows, g, :], do_ref[rows, g, :]
    lse, di = lse_ref[g, rows], di_ref[g, rows]
    s_t, capped_t = _scores(k, q, scale, softcap)  # [bk, bq]
    q_seg = None if qseg_ref is None else qseg_ref[rows]
    mask_t = _block_mask(band, with_band, i * bq, j * bk, (bk, bq), q_seg, kv_seg,
                         transposed=True)
    p_t = _masked(mask_t, jnp.exp2(s_t - lse[None, :]), 0.0)
    dv = dv + _dot(p_t.astype(do.dtype), do)
    dp_t = _dot(v, do, NT_DIMS)
    ds_t = blocks.softcap_grad(p_t * (dp_t - di[None, :]), capped_t, softcap)
    return dk + _dot(ds_t.astype(q.dtype), q), dv

  def head(g, carry):
    return _band_loop(band.q_lo(j), band.q_full_range(j), band.q_hi(j) + 1,
                      functools.partial(query_block, g), carry)

  zeros = jnp.zeros(k.shape, F32)
  dk, dv = lax.fori_loop(0, groups, head, (zeros, zeros))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _pow2_block(block: int, n: int) -> int:
  if block < MIN_TILE or block & (block - 1):
    raise ValueError(f"Triton blocks must be powers of two >= {MIN_TILE}, got {block}")
  return min(block, max(MIN_TILE, pl.next_power_of_2(n)))


def plan(n: int, cfg: blocks.FlashConfig) -> tuple[Band, Band]:
  fwd_q, fwd_kv = _pow2_block(cfg.block_q, n), _pow2_block(cfg.block_kv, n)
  bwd_q, bwd_kv = (_pow2_block(b, n) for b in cfg.backward_blocks)
  length = blocks.padded_length(n, math.lcm(fwd_q, bwd_q), math.lcm(fwd_kv, bwd_kv))
  return Band(length, fwd_q, fwd_kv, cfg.window), Band(length, bwd_q, bwd_kv, cfg.window)


def _segments_specs(segment_ids: Optional[Array], length: int, index_map) -> list:
  spec = None if segment_ids is None else pl.BlockSpec((None, length), index_map)
  return [spec, spec]


def flash_forward(q_BxNxHxD: Array, k_BxNxKxD: Array, v_BxNxKxD: Array,
                  q_seg_BxN: Optional[Array], kv_seg_BxN: Optional[Array], *, band: Band,
                  scale: float,
                  softcap: Optional[float], interpret) -> tuple[Array, Array]:
  """Output [B, N, H, D] and logsumexp [B, H, N] (float32) on padded inputs."""
  b, n, h, d = q_BxNxHxD.shape
  groups = h // k_BxNxKxD.shape[2]
  bq = band.block_q
  q_spec = pl.BlockSpec((None, bq, None, d), lambda i, bi, hi: (bi, i, hi, 0))
  kv_spec = pl.BlockSpec((None, n, None, d), lambda i, bi, hi: (bi, 0, blocks.div(hi, groups), 0))
  return pl.pallas_call(
      functools.partial(_fwd_kernel, band=band, scale=scale, softcap=softcap),
      grid=(band.num_q_blocks, b, h),
      in_specs=[q_spec, kv_spec, kv_spec,
                *_segments_specs(q_seg_BxN, n, lambda i, bi, hi: (bi, 0))],
      out_specs=[q_spec, pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, i))],
      out_shape=[jax.ShapeDtypeStruct(q_BxNxHxD.shape, q_BxNxHxD.dtype),
                 jax.ShapeDtypeStruct((b, h, n), F32)],
      compiler_params=_compiler_params(d, num_stages=3),
      interpret=interpret,
      name="local_attention_fwd_triton",
  )(q_BxNxHxD, k_BxNxKxD, v_BxNxKxD, q_seg_BxN, kv_seg_BxN)


def flash_backward(q_BxNxHxD: Array, k_BxNxKxD: Array, v_BxNxKxD: Array,
                   q_seg_BxN: Optional[Array], kv_seg_BxN: Optional[Array], o_BxNxHxD: Array,
                   lse_BxHxN: Array,
                   do_BxNxHxD: Array, *, band: Band, scale: float, softcap: Optional[float],
                   interpret) -> tuple[Array, Array, Array]:
  b, n, h, d = q_BxNxHxD.shape
  kv_heads = k_BxNxKxD.shape[2]
  groups = h // kv_heads
  bq, bk = band.block_q, band.block_kv
  di_BxHxN = jnp.einsum("bnhd,bnhd->bhn", o_BxNxHxD.astype(F32), do_BxNxHxD.astype(F32))

  q_spec = pl.BlockSpec((None, bq, None, d), lambda i, bi, hi: (bi, i, hi, 0))
  row_spec = pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, i))
  kv_spec = pl.BlockSpec((None, n, None, d), lambda i, bi, hi: (bi, 0, blocks.div(hi, groups), 0))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, band=band, scale=scale, softcap=softcap),
      grid=(band.num_q_blocks, b, h),
      in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec,
                *_segments_specs(q_seg_BxN, n, lambda i, bi, hi: (bi, 0))],
      out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct(q_BxNxHxD.shape, q_BxNxHxD.dtype),
      compiler_params=_compiler_params(d, num_stages=2),
      interpret=interpret,
      name="attention_bwd_dq_triton",
  )(q_BxNxHxD, k_BxNxKxD, v_BxNxKxD, do_BxNxHxD, lse_BxHxN, di_BxHxN, q_seg_BxN, kv_seg_BxN)

  group_spec = pl.BlockSpec((None, n, groups, d), lambda j, bi, ki: (bi, 0, ki, 0))
  group_rows = pl.BlockSpec((None, groups, n), lambda j, bi, ki: (bi, ki, 0))
  kv_block = pl.BlockSpec((None, bk, None, d), lambda j, bi, ki: (bi, j, ki, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, band=band, scale=scale, softcap=softcap, groups=groups),
      grid=(band.num_kv_blocks, b, kv_heads),
      in_specs=[group_spec, kv_block, kv_block, group_spec, group_rows, group_rows,
                *_segments_specs(q_seg_BxN, n, lambda j, bi, ki: (bi, 0))],
      out_specs=[kv_block, kv_block],
      out_shape=[jax.ShapeDtypeStruct(k_BxNxKxD.shape, k_BxNxKxD.dtype),
                 jax.ShapeDtypeStruct(v_BxNxKxD.shape, v_BxNxKxD.dtype)],
      compiler_params=_compiler_params(d, num_stages=2),
      interpret=interpret,
      name="attention_bwd_dkv_triton",
  )(q_BxNxHxD, k_BxNxKxD, v_BxNxKxD, do_BxNxHxD, lse_BxHxN, di_BxHxN, q_seg_BxN, kv_seg_BxN)
  return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# Model layout: pad N to the blocks and D to a power of two. Used by kernels.ops.


def _pad(x_BxNxHxD: Array, length: int, head_dim: int) -> Array:
  return blocks.pad_axis(blocks.pad_axis(x_BxNxHxD, length, axis=1), head_dim, axis=3)


def forward(q_BxNxHxD: Array, k_BxNxKxD: Array, v_BxNxKxD: Array,
            segment_ids_BxN: Optional[Array], kv_segment_ids_BxN: Optional[Array],
            cfg: blocks.FlashConfig):
  n, d = q_BxNxHxD.shape[1], q_BxNxHxD.shape[3]
  fwd_band, _ = plan(n, cfg)
  d_pad = max(MIN_TILE, pl.next_power_of_2(d))
  q, k, v = (_pad(x, fwd_band.length, d_pad) for x in (q_BxNxHxD, k_BxNxKxD, v_BxNxKxD))
  q_seg, kv_seg = blocks.pad_segments(segment_ids_BxN, kv_segment_ids_BxN, fwd_band.length)
  o, lse = flash_forward(q, k, v, q_seg, kv_seg, band=fwd_band, scale=d ** -0.5,
                         softcap=cfg.softcap, interpret=cfg.interpret)
  return o[:, :n, :, :d], (q, k, v, q_seg, kv_seg, o, lse)


def backward(cfg: blocks.FlashConfig, residuals, do_BxNxHxD: Array):
  q, k, v, q_seg, kv_seg, o, lse = residuals
  n, d = do_BxNxHxD.shape[1], do_BxNxHxD.shape[3]
  _, bwd_band = plan(n, cfg)
  do = _pad(do_BxNxHxD.astype(q.dtype), bwd_band.length, q.shape[3])
  grads = flash_backward(q, k, v, q_seg, kv_seg, o, lse, do, band=bwd_band, scale=d ** -0.5,
                         softcap=cfg.softcap, interpret=cfg.interpret)
  return tuple(g[:, :n, :, :d] for g in grads)


# ----------------------------------------------------------------------------------------------
# cuDNN fallback.


def cudnn_attention(q_BxNxHxD: Array, k_BxNxKxD: Array, v_BxNxKxD: Array, *,
                    window: Optional[int], segment_ids_BxN: Optional[Array] = None) -> Array:
  """cuDNN flash attention (causal, sliding window ``(W - 1, 0)``), differentiable by XLA.

  Segment ids become a dense [B, 1, N, N] mask (cuDNN reads it as a bias): fine for the
  training lengths of this project's tests, O(N^2) memory at long N, where the Pallas kernels
  are the better choice.
  """
  mask = None
  if segment_ids_BxN is not None:
    mask = segment_ids_BxN[:, None, :, None] == segment_ids_BxN[:, None, None, :]
  return jax.nn.dot_product_attention(
      q_BxNxHxD, k_BxNxKxD, v_BxNxKxD, mask=mask, is_causal=True,
      local_window_size=None if window is None else (window - 1, 0), implementation="cudnn")
