"""Banded causal flash attention in Pallas for TPU (Mosaic), forward and backward.

One kernel family serves both attentions of YOCO-U:

* the self-decoder's sliding window (``window=W``: query i sees keys i-W+1 .. i);
* the cross-decoder's causal attention over the shared global K/V (``window=None``),
  wrapped by :mod:`kernels.cross_attention`.

Layout: heads-major, ``q [B, H, N, D]``, ``k, v [B, K, N, D]`` with H = G * K (GQA: query head
``h`` reads kv head ``h // G``; K/V are never repeated in memory). N is already padded to the
blocks (:mod:`kernels.ops` pads). Grids (see :class:`kernels.blocks.Band`):

* forward and dq: ``(B, H, q blocks, kv steps)``; step s of query block i reads key block
  ``kv_lo(i) + s``, so the work is O(N * (W + block)), not O(N^2). Softmax statistics live in
  VMEM scratch across the (sequential, "arbitrary") kv-step axis, flash-attention style.
* dk/dv: ``(B, K, kv blocks, G, q steps)``; the G query heads of a kv head and the query
  blocks that reach a key block are both reduction axes, so dk/dv accumulate in scratch and
  are written once (no [B, H, N, D] dk intermediate). Scores are computed transposed (keys on
  rows), so no matrix is transposed in the kernel.

Blocks inside the band skip the mask arithmetic; only window-edge and diagonal blocks (and
every block when segment ids are given) compute it. Per-row data (logsumexp, ``di = rowsum(o *
do)``, segment ids) is stored compactly as rows ``[B, (H,) 1, N]``: a kernel reads a ``(1, block)``
row and turns it into a column where it needs one. Running max and sum are ``[rows, 128]``
lane-replicated scratch, as in jax's splash attention.

On a TPU the kernels compile with Mosaic (blocks multiples of 128); ``interpret=True`` runs
them anywhere (the CPU test path) and ``interpret=pltpu.InterpretParams()`` simulates TPU
memory (out-of-bounds reads, races). ``python -m kernels.tpu_compile_check`` compiles them for
a TPU topology ahead of time on a machine without TPUs.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels import blocks
from kernels.blocks import MASK_VALUE, Band

Array = jax.Array

LANES = 128
NT_DIMS = (((1,), (1,)), ((), ()))  # x @ y.T
NN_DIMS = (((1,), (0,)), ((), ()))  # x @ y
F32 = jnp.float32


def _to_width(x_RxL: Array, width: int) -> Array:
  """A lane-replicated column statistic [rows, 128] as [rows, width]."""
  lanes = x_RxL.shape[-1]
  if width <= lanes:
    return x_RxL[:, :width]
  if width % lanes == 0:
    return jnp.tile(x_RxL, (1, width // lanes))
  return jnp.broadcast_to(x_RxL[:, :1], (x_RxL.shape[0], width))


def _column(row_ref) -> Array:
  """A (1, n) row block as an (n, 1) column."""
  return row_ref[0][:, None]


def _compiler_params(num_parallel: int, num_arbitrary: int):
  return pltpu.CompilerParams(
      dimension_semantics=("parallel",) * num_parallel + ("arbitrary",) * num_arbitrary)


def _scores(a: Array, b: Array, scale: float, softcap: Optional[float]) -> Array:
  s = lax.dot_general(a, b, NT_DIMS, preferred_element_type=F32) * scale
  return blocks.softcap_logits(s, softcap)


def _block_mask(band: Band, with_band: bool, q_start, kv_start, shape, rows_seg_ref,
                cols_seg_ref, transposed: bool = False) -> Optional[Array]:
  """Mask of a [rows, cols] block, or None for a fully visible block without segment ids.

  The segment refs are (1, rows) and (1, cols) rows: queries on rows, keys on columns (the
  other way round when ``transposed``).
  """
  mask = None
  if with_band:
    mask = blocks.band_mask(q_start, kv_start, shape, band.window, transposed=transposed)
  if rows_seg_ref is not None:
    seg = _column(rows_seg_ref) == cols_seg_ref[...]
    mask = seg if mask is None else mask & seg
  return mask


def _masked(mask: Optional[Array], x: Array, fill) -> Array:
  return x if mask is None else jnp.where(mask, x, fill)


def _when_visible(visible, full, body) -> None:
  """Runs ``body(with_band)``: without the band mask on fully visible blocks (the interior of
  the band), with it on edge blocks (the window edge and the diagonal)."""
  pl.when(visible & full)(functools.partial(body, False))
  pl.when(visible & jnp.logical_not(full))(functools.partial(body, True))


def _without_segments(kernel, num_inputs: int):
  """Adapts a kernel taking (..., rows_seg_ref, cols_seg_ref, ...) to calls without them."""

  def wrapped(*refs):
    return kernel(*refs[:num_inputs], None, None, *refs[num_inputs:])

  return wrapped


def _row_spec(block: int, index_map) -> pl.BlockSpec:
  """(1, block) blocks of a [B, 1, N] array of per-token ids."""
  return pl.BlockSpec((None, 1, block), index_map)


# ----------------------------------------------------------------------------------------------
# Forward.


def _fwd_kernel(q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr,
                *, band: Band, scale: float, softcap: Optional[float]):
  i, step = pl.program_id(2), pl.program_id(3)
  bq, bk = band.block_q, band.block_kv
  head_dim = acc_scr.shape[-1]

  @pl.when(step == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, MASK_VALUE, F32)
    l_scr[...] = jnp.zeros(l_scr.shape, F32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, F32)

  j = band.kv_block(i, step)

  def accumulate(with_band: bool):
    v = v_ref[...]
    s = _scores(q_ref[...], k_ref[...], scale, softcap)
    mask = _block_mask(band, with_band, i * bq, j * bk, (bq, bk), qseg_ref, kvseg_ref)
    s = _masked(mask, s, MASK_VALUE)
    m_prev, l_prev = m_scr[...], l_scr[...]
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    p = _masked(mask, jnp.exp(s - _to_width(m_next, bk)), 0.0)
    alpha = jnp.exp(m_prev - m_next)
    l_scr[...] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
    m_scr[...] = m_next
    pv = lax.dot_general(p.astype(v.dtype), v, NN_DIMS, preferred_element_type=F32)
    acc_scr[...] = _to_width(alpha, head_dim) * acc_scr[...] + pv

  _when_visible(band.kv_visible(i, step), band.fully_visible(i, j), accumulate)

  @pl.when(step == band.kv_steps - 1)
  def _finish():
    l = l_scr[...]
    empty = l == 0.0  # A row with no visible key: output 0, never NaN.
    safe_l = jnp.where(empty, 1.0, l)
    o_ref[...] = (acc_scr[...] * _to_width(1.0 / safe_l, head_dim)).astype(o_ref.dtype)
    lse_col = jnp.where(empty, 0.0, m_scr[...] + jnp.log(safe_l))  # [bq, 128], lanes equal.
    lse_ref[...] = jnp.transpose(lse_col)[:1, :]  # Stored as a (1, bq) row.


def flash_forward(q_BxHxNxD: Array, k_BxKxNxD: Array, v_BxKxNxD: Array,
                  q_seg_Bx1xN: Optional[Array], kv_seg_Bx1xN: Optional[Array], *, band: Band,
                  softcap: Optional[float] = None, interpret: Any = False) -> tuple[Array, Array]:
  """Returns the output [B, H, N, D] and the logsumexp [B, H, 1, N] (float32)."""
  b, h, n, d = q_BxHxNxD.shape
  groups = h // k_BxKxNxD.shape[1]
  bq, bk = band.block_q, band.block_kv

  def kv_index(bi, hi, i, s):
    return bi, blocks.div(hi, groups), band.kv_block(i, s), 0

  q_spec = pl.BlockSpec((None, None, bq, d), lambda bi, hi, i, s: (bi, hi, i, 0))
  in_specs = [q_spec, pl.BlockSpec((None, None, bk, d), kv_index),
              pl.BlockSpec((None, None, bk, d), kv_index)]
  args = [q_BxHxNxD, k_BxKxNxD, v_BxKxNxD]
  kernel = functools.partial(_fwd_kernel, band=band, scale=d ** -0.5, softcap=softcap)
  if q_seg_Bx1xN is None:
    kernel = _without_segments(kernel, num_inputs=3)
  else:
    in_specs += [_row_spec(bq, lambda bi, hi, i, s: (bi, 0, i)),
                 _row_spec(bk, lambda bi, hi, i, s: (bi, 0, band.kv_block(i, s)))]
    args += [q_seg_Bx1xN, kv_seg_Bx1xN]
  return pl.pallas_call(
      kernel,
      grid=(b, h, band.num_q_blocks, band.kv_steps),
      in_specs=in_specs,
      out_specs=[q_spec,
                 pl.BlockSpec((None, None, 1, bq), lambda bi, hi, i, s: (bi, hi, 0, i))],
      out_shape=[jax.ShapeDtypeStruct(q_BxHxNxD.shape, q_BxHxNxD.dtype),
                 jax.ShapeDtypeStruct((b, h, 1, n), F32)],
      scratch_shapes=[pltpu.VMEM((bq, LANES), F32), pltpu.VMEM((bq, LANES), F32),
                      pltpu.VMEM((bq, d), F32)],
      compiler_params=_compiler_params(3, 1),
      interpret=interpret,
      name="local_attention_fwd" if band.window else "causal_attention_fwd",
  )(*args)


# ----------------------------------------------------------------------------------------------
# Backward: dq.


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, qseg_ref, kvseg_ref, dq_ref, dq_scr,
               *, band: Band, scale: float, softcap: Optional[float]):
  i, step = pl.program_id(2), pl.program_id(3)
  bq, bk = band.block_q, band.block_kv

  @pl.when(step == 0)
  def _init():
    dq_scr[...] = jnp.zeros(dq_scr.shape, F32)

  j = band.kv_block(i, step)

  def accumulate(with_band: bool):
    k, v = k_ref[...], v_ref[...]
    s = _scores(q_ref[...], k, scale, softcap)
    mask = _block_mask(band, with_band, i * bq, j * bk, (bq, bk), qseg_ref, kvseg_ref)
    p = _masked(mask, jnp.exp(s - _column(lse_ref)), 0.0)
    dp = lax.dot_general(do_ref[...], v, NT_DIMS, preferred_element_type=F32)
    ds = blocks.softcap_grad(p * (dp - _column(di_ref)), s, softcap)
    dq_scr[...] += lax.dot_general(ds.astype(k.dtype), k, NN_DIMS, preferred_element_type=F32)

  _when_visible(band.kv_visible(i, step), band.fully_visible(i, j), accumulate)

  @pl.when(step == band.kv_steps - 1)
  def _finish():
    dq_ref[...] = (dq_scr[...] * scale).astype(dq_ref.dtype)


# ----------------------------------------------------------------------------------------------
# Backward: dk, dv (scores transposed: keys on rows, queries on lanes).


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, kvseg_ref, qseg_ref, dk_ref, dv_ref,
                dk_scr, dv_scr, *, band: Band, scale: float, softcap: Optional[float],
                groups: int):
  j, g, step = pl.program_id(2), pl.program_id(3), pl.program_id(4)
  bq, bk = band.block_q, band.block_kv

  @pl.when((g == 0) & (step == 0))
  def _init():
    dk_scr[...] = jnp.zeros(dk_scr.shape, F32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, F32)

  i = band.q_block(j, step)

  def accumulate(with_band: bool):
    q, do = q_ref[...], do_ref[...]
    s_t = _scores(k_ref[...], q, scale, softcap)  # [bk, bq]
    mask_t = _block_mask(band, with_band, i * bq, j * bk, (bk, bq), kvseg_ref, qseg_ref,
                         transposed=True)
    p_t = _masked(mask_t, jnp.exp(s_t - lse_ref[...]), 0.0)
    dv_scr[...] += lax.dot_general(p_t.astype(do.dtype), do, NN_DIMS, preferred_element_type=F32)
    dp_t = lax.dot_general(v_ref[...], do, NT_DIMS, preferred_element_type=F32)
    ds_t = blocks.softcap_grad(p_t * (dp_t - di_ref[...]), s_t, softcap)
    dk_scr[...] += lax.dot_general(ds_t.astype(q.dtype), q, NN_DIMS, preferred_element_type=F32)

  _when_visible(band.q_visible(j, step), band.fully_visible(i, j), accumulate)

  @pl.when((g == groups - 1) & (step == band.q_steps - 1))
  def _finish():
    dk_ref[...] = (dk_scr[...] * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def flash_backward(q_BxHxNxD: Array, k_BxKxNxD: Array, v_BxKxNxD: Array,
                   q_seg_Bx1xN: Optional[Array], kv_seg_Bx1xN: Optional[Array],
                   o_BxHxNxD: Array, lse_BxHx1xN: Array, do_BxHxNxD: Array, *, band: Band,
                   softcap: Optional[float] = None,
                   interpret: Any = False) -> tuple[Array, Array, Array]:
  """Gradients (dq, dk, dv) from the saved output and logsumexp (flash-attention backward)."""
  b, h, n, d = q_BxHxNxD.shape
  kv_heads = k_BxKxNxD.shape[1]
  groups = h // kv_heads
  bq, bk = band.block_q, band.block_kv
  scale = d ** -0.5
  di_BxHx1xN = jnp.sum(o_BxHxNxD.astype(F32) * do_BxHxNxD.astype(F32), axis=-1)[:, :, None]
  with_segments = q_seg_Bx1xN is not None

  # dq: same grid as the forward.
  def kv_index(bi, hi, i, s):
    return bi, blocks.div(hi, groups), band.kv_block(i, s), 0

  q_spec = pl.BlockSpec((None, None, bq, d), lambda bi, hi, i, s: (bi, hi, i, 0))
  stat_spec = pl.BlockSpec((None, None, 1, bq), lambda bi, hi, i, s: (bi, hi, 0, i))
  kv_spec = pl.BlockSpec((None, None, bk, d), kv_index)
  in_specs = [q_spec, kv_spec, kv_spec, q_spec, stat_spec, stat_spec]
  args = [q_BxHxNxD, k_BxKxNxD, v_BxKxNxD, do_BxHxNxD, lse_BxHx1xN, di_BxHx1xN]
  kernel = functools.partial(_dq_kernel, band=band, scale=scale, softcap=softcap)
  if with_segments:
    in_specs += [_row_spec(bq, lambda bi, hi, i, s: (bi, 0, i)),
                 _row_spec(bk, lambda bi, hi, i, s: (bi, 0, band.kv_block(i, s)))]
    args += [q_seg_Bx1xN, kv_seg_Bx1xN]
  else:
    kernel = _without_segments(kernel, num_inputs=6)
  dq = pl.pallas_call(
      kernel,
      grid=(b, h, band.num_q_blocks, band.kv_steps),
      in_specs=in_specs,
      out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct(q_BxHxNxD.shape, q_BxHxNxD.dtype),
      scratch_shapes=[pltpu.VMEM((bq, d), F32)],
      compiler_params=_compiler_params(3, 1),
      interpret=interpret,
      name="attention_bwd_dq",
  )(*args)

  # dk, dv: grid (B, K, kv blocks, G, q steps).
  def q_index(bi, ki, j, g, t):
    return bi, ki * groups + g, band.q_block(j, t), 0

  def stat_index(bi, ki, j, g, t):
    return bi, ki * groups + g, 0, band.q_block(j, t)

  q_spec = pl.BlockSpec((None, None, bq, d), q_index)
  stat_spec = pl.BlockSpec((None, None, 1, bq), stat_index)
  kv_spec = pl.BlockSpec((None, None, bk, d), lambda bi, ki, j, g, t: (bi, ki, j, 0))
  in_specs = [q_spec, kv_spec, kv_spec, q_spec, stat_spec, stat_spec]
  args = [q_BxHxNxD, k_BxKxNxD, v_BxKxNxD, do_BxHxNxD, lse_BxHx1xN, di_BxHx1xN]
  kernel = functools.partial(_dkv_kernel, band=band, scale=scale, softcap=softcap, groups=groups)
  if with_segments:
    in_specs += [_row_spec(bk, lambda bi, ki, j, g, t: (bi, 0, j)),
                 _row_spec(bq, lambda bi, ki, j, g, t: (bi, 0, band.q_block(j, t)))]
    args += [kv_seg_Bx1xN, q_seg_Bx1xN]
  else:
    kernel = _without_segments(kernel, num_inputs=6)
  dk, dv = pl.pallas_call(
      kernel,
      grid=(b, kv_heads, band.num_kv_blocks, groups, band.q_steps),
      in_specs=in_specs,
      out_specs=[kv_spec, kv_spec],
      out_shape=[jax.ShapeDtypeStruct(k_BxKxNxD.shape, k_BxKxNxD.dtype),
                 jax.ShapeDtypeStruct(v_BxKxNxD.shape, v_BxKxNxD.dtype)],
      scratch_shapes=[pltpu.VMEM((bk, d), F32), pltpu.VMEM((bk, d), F32)],
      compiler_params=_compiler_params(3, 2),
      interpret=interpret,
      name="attention_bwd_dkv",
  )(*args)
  return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# Model layout ([B, N, H, D]): padding, transposes, residuals. Used by kernels.ops.


def plan(n: int, cfg: blocks.FlashConfig) -> tuple[Band, Band]:
  """Forward and backward bands for N tokens (Mosaic needs 128-multiples; interpret mode 8)."""
  align = 8 if cfg.interpret else LANES
  fwd_q, fwd_kv = (blocks.fit_block(x, n, align) for x in (cfg.block_q, cfg.block_kv))
  bwd_q, bwd_kv = (blocks.fit_block(x, n, align) for x in cfg.backward_blocks)
  length = blocks.padded_length(n, math.lcm(fwd_q, bwd_q), math.lcm(fwd_kv, bwd_kv))
  return (Band(length, fwd_q, fwd_kv, cfg.window), Band(length, bwd_q, bwd_kv, cfg.window))


def _heads_major(x_BxNxHxD: Array, length: int) -> Array:
  return blocks.pad_axis(x_BxNxHxD, length, axis=1).transpose(0, 2, 1, 3)


def _model_layout(x_BxHxNxD: Array, n: int) -> Array:
  return x_BxHxNxD[:, :, :n].transpose(0, 2, 1, 3)


def _rows(seg_BxN: Optional[Array]) -> Optional[Array]:
  return None if seg_BxN is None else seg_BxN[:, None, :]


def forward(q_BxNxHxD: Array, k_BxNxKxD: Array, v_BxNxKxD: Array,
            segment_ids_BxN: Optional[Array], kv_segment_ids_BxN: Optional[Array],
            cfg: blocks.FlashConfig):
  """Output [B, N, H, D] and the residuals :func:`backward` needs."""
  n = q_BxNxHxD.shape[1]
  fwd_band, _ = plan(n, cfg)
  q, k, v = (_heads_major(x, fwd_band.length) for x in (q_BxNxHxD, k_BxNxKxD, v_BxNxKxD))
  q_seg, kv_seg = blocks.pad_segments(segment_ids_BxN, kv_segment_ids_BxN, fwd_band.length)
  o, lse = flash_forward(q, k, v, _rows(q_seg), _rows(kv_seg), band=fwd_band,
                         softcap=cfg.softcap, interpret=cfg.interpret)
  return _model_layout(o, n), (q, k, v, q_seg, kv_seg, o, lse)


def backward(cfg: blocks.FlashConfig, residuals, do_BxNxHxD: Array):
  """(dq, dk, dv) in model layout."""
  q, k, v, q_seg, kv_seg, o, lse = residuals
  n = do_BxNxHxD.shape[1]
  _, bwd_band = plan(n, cfg)
  do = _heads_major(do_BxNxHxD.astype(q.dtype), bwd_band.length)
  dq, dk, dv = flash_backward(q, k, v, _rows(q_seg), _rows(kv_seg), o, lse, do, band=bwd_band,
                              softcap=cfg.softcap, interpret=cfg.interpret)
  return tuple(_model_layout(x, n) for x in (dq, dk, dv))
