"""Attention in plain XLA: blocked sliding-window attention and query-chunked causal attention.

These are the CPU path and the reference the Pallas kernels (``kernels/``) are checked against.

Shapes use suffixes: B batch, N query length, S key length, H query heads, K kv heads,
G = H // K query heads per kv head (GQA: queries are grouped, K/V are never repeated in memory),
D head dim, C block length, M key-window length of a query block.

Masking is index based: query i sees key j when ``j <= i`` (causal), ``i - j < window``
(sliding window) and ``segment_ids[i] == segment_ids[j]`` (packed documents). Within one
document indices and per-document positions differ by a constant, so index masks are exact.
A query whose every key is masked (it cannot happen for real tokens, which see themselves)
gets a zero output, never NaN.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

Array = jax.Array

ATTENTION_IMPLS = ("xla", "pallas", "cudnn", "auto")
MAX_CAUSAL_CHUNKS = 32  # causal_attention unrolls at most this many query chunks.


def _group_queries(q_BxNxHxD: Array, num_kv_heads: int) -> Array:
  b, n, h, d = q_BxNxHxD.shape
  if h % num_kv_heads:
    raise ValueError(f"num_heads={h} is not a multiple of num_kv_heads={num_kv_heads}")
  return q_BxNxHxD.reshape(b, n, num_kv_heads, h // num_kv_heads, d)


def _acc_dtype(x: Array):
  """Softmax and accumulation dtype: float32, or float64 for float64 inputs (references)."""
  return jnp.promote_types(x.dtype, jnp.float32)


def _visible(s: Array, lse: Array, mask: Array) -> Array:
  """Softmax probabilities exp(s - lse) on visible keys, exactly 0 elsewhere."""
  lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
  return jnp.where(mask, jnp.exp(s - lse[..., None]), 0.0)


def _scores(q: Array, k: Array, scale: float) -> Array:
  return jnp.einsum("...kgnd,...ksd->...kgns", q, k, preferred_element_type=_acc_dtype(q)) * scale


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def attend(q: Array, k: Array, v: Array, mask: Array, scale: float) -> Array:
  """softmax(scale * q k^T, restricted to ``mask``) v for grouped-query layouts.

  q: [..., K, G, N, D]; k, v: [..., K, S, D]; mask broadcastable to [..., K, G, N, S].
  Returns [..., K, G, N, D]. Rows with no visible key give zeros (not NaN).

  The gradient is written by hand the way flash attention does it: the forward keeps only the
  output and the per-row log-sum-exp (O(N), not O(N S)), and the backward recomputes the scores
  once and uses ``dS = P * (dP - rowsum(dO * O))``. That saves the score tensor a training step
  would otherwise keep, and about half the elementwise passes over it that autodiff of
  max/exp/sum/divide produces (those passes, not the matmuls, dominate attention on CPUs).
  """
  return _attend_fwd(q, k, v, mask, scale)[0]


def _attend_fwd(q, k, v, mask, scale):
  s = jnp.where(mask, _scores(q, k, scale), -jnp.inf)
  m = jnp.max(s, axis=-1)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(s - m[..., None])  # exp(-inf) = 0 on masked entries.
  denom = jnp.sum(p, axis=-1)
  safe = jnp.where(denom == 0.0, 1.0, denom)
  out = jnp.einsum("...kgns,...ksd->...kgnd", p.astype(v.dtype), v,
                   preferred_element_type=_acc_dtype(v)) / safe[..., None]
  lse = jnp.where(denom == 0.0, -jnp.inf, m + jnp.log(safe))
  out = out.astype(jnp.result_type(q.dtype, v.dtype))
  return out, (q, k, v, mask, out, lse)


def _attend_bwd(scale, res, d_out):
  q, k, v, mask, out, lse = res
  acc = _acc_dtype(q)
  s = _scores(q, k, scale)
  p = _visible(s, lse, mask)
  d_out = d_out.astype(acc)
  dv = jnp.einsum("...kgns,...kgnd->...ksd", p.astype(v.dtype), d_out.astype(v.dtype),
                  preferred_element_type=acc)
  dp = jnp.einsum("...kgnd,...ksd->...kgns", d_out.astype(v.dtype), v,
                  preferred_element_type=acc)
  row = jnp.sum(d_out * out.astype(acc), axis=-1)  # rowsum(dO * O) = rowsum(P * dP).
  ds = p * (dp - row[..., None]) * scale
  dq = jnp.einsum("...kgns,...ksd->...kgnd", ds.astype(k.dtype), k, preferred_element_type=acc)
  dk = jnp.einsum("...kgns,...kgnd->...ksd", ds.astype(q.dtype), q, preferred_element_type=acc)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


attend.defvjp(_attend_fwd, _attend_bwd)


def dense_attention(
    q_BxNxHxD: Array,
    k_BxSxKxD: Array,
    v_BxSxKxD: Array,
    *,
    window: Optional[int] = None,
    q_segment_ids: Optional[Array] = None,
    kv_segment_ids: Optional[Array] = None,
    q_offset: int = 0,
    num_prefix: int = 0,
) -> Array:
  """Materialises the full score matrix. For tests and short inputs only.

  Query i (absolute index ``q_offset + i``) sees key j when ``j <= q_offset + i`` and, with a
  window, ``q_offset + i - j < window``. The first ``num_prefix`` keys are a prefix that every
  query sees (ParScale's learned prefix); key indices (and ``kv_segment_ids``) start after it.
  """
  n, s = q_BxNxHxD.shape[1], k_BxSxKxD.shape[1]
  q_BxKxGxNxD = _group_queries(q_BxNxHxD, k_BxSxKxD.shape[2]).transpose(0, 2, 3, 1, 4)
  qi = q_offset + jnp.arange(n)[:, None]
  kj = jnp.arange(s)[None, :] - num_prefix
  mask_NxS = kj <= qi
  if window is not None:
    mask_NxS &= (qi - kj < window) | (kj < 0)
  mask = mask_NxS[None, None, None]
  if q_segment_ids is not None:
    seg = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    seg = jnp.pad(seg, ((0, 0), (0, 0), (num_prefix, 0)), constant_values=True)
    mask = mask & seg[:, None, None]
  out_BxKxGxNxD = attend(q_BxKxGxNxD, k_BxSxKxD.transpose(0, 2, 1, 3),
                          v_BxSxKxD.transpose(0, 2, 1, 3), mask, q_BxNxHxD.shape[-1] ** -0.5)
  return out_BxKxGxNxD.transpose(0, 3, 1, 2, 4).reshape(q_BxNxHxD.shape).astype(q_BxNxHxD.dtype)


def _pad_to(x: Array, length: int, axis: int = 1, value=0) -> Array:
  pad = length - x.shape[axis]
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def local_attention(
    q_BxNxHxD: Array,
    k_BxNxKxD: Array,
    v_BxNxKxD: Array,
    *,
    window: int,
    segment_ids: Optional[Array] = None,
    block_size: int = 128,
) -> Array:
  """Causal sliding-window self-attention in O(N * (W + C)) time and memory.

  The sequence is cut into query blocks of C tokens. Query block i can only reach keys in
  ``[i*C - (W-1), i*C + C - 1]``, i.e. its own key block and the ``P = ceil((W-1)/C)`` blocks
  before it. Those P+1 key blocks are gathered into an M = (P+1)*C window per query block, so
  scores are [B, K, G, nblocks, C, M] instead of [.., N, N].
  """
  if window <= 0:
    raise ValueError(f"window={window} must be positive")
  b, n, h, d = q_BxNxHxD.shape
  kv_heads = k_BxNxKxD.shape[2]
  c = max(1, min(block_size, n))
  nblocks = -(-n // c)
  n_pad = nblocks * c
  prev = min(-(-(window - 1) // c), nblocks - 1)  # Key blocks before the diagonal one.
  m = (prev + 1) * c

  if segment_ids is None:
    segment_ids = jnp.ones((b, n), jnp.int32)
  q = _group_queries(_pad_to(q_BxNxHxD, n_pad), kv_heads)
  q_BxLxCxKxGxD = q.reshape(b, nblocks, c, kv_heads, h // kv_heads, d)
  seg_q = _pad_to(segment_ids, n_pad, value=-1).reshape(b, nblocks, c)

  def key_windows(x: Array, fill) -> Array:
    """[B, N, ...] -> [B, nblocks, M, ...]: the prev+1 key blocks each query block reaches."""
    x = _pad_to(x, n_pad, value=fill)
    x = jnp.pad(x, [(0, 0), (prev * c, 0)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    x = x.reshape(b, nblocks + prev, c, *x.shape[2:])
    blocks = [x[:, j:j + nblocks] for j in range(prev + 1)]
    return jnp.concatenate(blocks, axis=2)

  k_BxLxMxKxD = key_windows(k_BxNxKxD, 0)
  v_BxLxMxKxD = key_windows(v_BxNxKxD, 0)
  seg_k = key_windows(segment_ids, -2)

  # Absolute indices: query (l, c) is l*C + c; key (l, m) is (l - prev)*C + m.
  qi = jnp.arange(c)[:, None]
  kj = jnp.arange(m)[None, :] - prev * c
  delta = qi - kj  # Independent of the block index l.
  mask_CxM = (delta >= 0) & (delta < window)
  mask = mask_CxM[None, None, None, None] & (
      seg_q[:, :, None, None, :, None] == seg_k[:, :, None, None, None, :])
  out = attend(q_BxLxCxKxGxD.transpose(0, 1, 3, 4, 2, 5), k_BxLxMxKxD.transpose(0, 1, 3, 2, 4),
                v_BxLxMxKxD.transpose(0, 1, 3, 2, 4), mask, d ** -0.5)
  out = out.transpose(0, 1, 4, 2, 3, 5)  # [B, L, K, G, C, D] -> [B, L, C, K, G, D].
  out = out.reshape(b, n_pad, h, d)[:, :n]
  return out.astype(q_BxNxHxD.dtype)


def causal_attention(
    q_BxNxHxD: Array,
    k_BxNxKxD: Array,
    v_BxNxKxD: Array,
    *,
    segment_ids: Optional[Array] = None,
    block_size: int = 512,
    prefix: Optional[tuple[Array, Array]] = None,
) -> Array:
  """Full causal attention that never materialises an N x N score matrix.

  ``prefix``: optional (keys, values) [B, M, K, D] that every query sees before its causal keys
  (ParScale's per-stream prefix; no RoPE, no segment).

  Queries are processed in chunks of C; chunk i only reads keys ``[0, (i+1)*C)`` (the causal
  prefix), so the work is about N^2/2 and the largest score tensor is C x N. The gradient of
  each chunk recomputes its scores (see :func:`attend`), so training keeps O(N * D) per layer.
  The chunk loop is unrolled with static shapes, so C grows past ``block_size`` when needed to
  keep it at most ``MAX_CAUSAL_CHUNKS`` chunks.
  """
  b, n, h, d = q_BxNxHxD.shape
  c = max(1, min(max(block_size, -(-n // MAX_CAUSAL_CHUNKS)), n))
  if segment_ids is None:
    segment_ids = jnp.ones((b, n), jnp.int32)

  num_prefix = 0 if prefix is None else prefix[0].shape[1]

  def chunk(q, k, v, seg_q, seg_k, offset):
    if num_prefix:
      k, v = jnp.concatenate([prefix[0], k], axis=1), jnp.concatenate([prefix[1], v], axis=1)
    return dense_attention(q, k, v, q_segment_ids=seg_q, kv_segment_ids=seg_k, q_offset=offset,
                           num_prefix=num_prefix)

  outs = []
  for start in range(0, n, c):
    end = min(start + c, n)
    outs.append(chunk(q_BxNxHxD[:, start:end], k_BxNxKxD[:, :end], v_BxNxKxD[:, :end],
                      segment_ids[:, start:end], segment_ids[:, :end], start))
  return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


def self_attention(q, k, v, *, window: Optional[int], segment_ids, impl: str = "xla",
                   block_size: int = 128, prefix: Optional[tuple[Array, Array]] = None) -> Array:
  """The dispatch point for every attention in the model (``config.model.attention_impl``).

  ``window=None`` is full causal attention (Transformer layers and the cross-decoder, whose
  queries attend to the one global K/V over the same positions); otherwise sliding-window.

  ``impl``: ``xla`` (this module), ``pallas`` (the kernels in ``kernels/``: Mosaic on TPU,
  Triton on GPU, and on a CPU backend the same TPU kernels in Pallas interpret mode, so
  ``pallas`` runs the real kernel code in CPU tests), ``cudnn`` (GPU), or ``auto`` (pallas on
  TPU and GPU, xla on CPU). See ``kernels.ops``.

  ``prefix`` (ParScale's learned per-stream K/V, see :func:`causal_attention`) runs the xla
  causal path whatever ``impl`` (``auto``) is; the kernels have no prefix.
  """
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"attention_impl={impl!r} is not available; allowed: {ATTENTION_IMPLS}")
  if prefix is not None:
    if window is not None or impl not in ("xla", "auto"):
      raise ValueError(f"a prefix needs full causal attention with impl xla or auto, not "
                       f"window={window}, impl={impl!r}")
    return causal_attention(q, k, v, segment_ids=segment_ids, block_size=block_size,
                            prefix=prefix)
  if impl != "xla":
    from kernels import ops  # pylint: disable=g-import-not-at-top  # Pallas loads lazily.
    impl = ops.resolve_impl(impl)
    if impl != "xla":
      return ops.self_attention(q, k, v, window=window, segment_ids=segment_ids, impl=impl,
                                block_size=block_size)
  if window is None:
    return causal_attention(q, k, v, segment_ids=segment_ids, block_size=block_size)
  return local_attention(q, k, v, window=window, segment_ids=segment_ids, block_size=block_size)
