"""Attention against inference caches, in plain XLA (jnp), for C >= 1 new query tokens.

Two kinds, matching the two cache kinds of :mod:`yocou_jax.inference.cache`:

* :func:`window_attention`: sliding-window attention of a chunk to a ring buffer of the last W'
  tokens plus the chunk itself; it also returns the updated ring buffer. Decode (C = 1) writes
  the token into its slot and attends to the ring alone.
* :func:`cache_attention`: causal attention to a full buffer (a Transformer layer's cache or
  YOCO's global K/V), as an online softmax over key blocks that stops at the furthest query
  position, so a chunk at offset n reads n + C keys, not the whole buffer; one decode token
  reads the whole buffer in a single keys-major pass (the fastest read of it in XLA).

Shapes: B batch, C query tokens, H query heads, K kv heads, G = H // K, D head dim, W' ring length,
S buffer length, M = G * C query rows of one kv head. Caches are ``[B, K, S, D]``. ``lengths_B``
is how many tokens each sequence already has in the cache (the chunk's first token sits at
position ``lengths_B``), ``counts_B`` how many of the chunk's C tokens are real (right padding).
Padding queries produce garbage that nothing reads; padding keys are never visible to real ones.

**Kernels.** Both functions take ``impl`` (``config.model.attention_impl``) and resolve it with
:func:`kernel_impl`: ``pallas``, and ``auto`` on TPU/GPU, run the Pallas kernels of ``kernels/``
(Mosaic on TPU, Triton on GPU, interpret mode on CPU); ``xla``, ``cudnn`` (no cache kernel) and
``auto`` on CPU run the XLA code here. So a checkpoint trained with any ``attention_impl`` is
served on any backend. The kernels:

* the window over a chunk: ``kernels.ops.local_attention`` on the (ring, chunk) run, with the
  chunk's queries placed at the end of the run and kv segment ids masking empty and padding keys;
* the window of one decode token: ``kernels.ops.decode_attention`` on the ring itself;
* the full/global cache, chunk or decode: ``kernels.ops.cache_attention`` (the decode kernel).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from yocou_jax import attention as attention_lib
from yocou_jax.config import ATTENTION_IMPLS
from yocou_jax.inference import cache as cache_lib

Array = jax.Array


def _fold(q_BxCxHxD: Array, kv_heads: int) -> Array:
  """[B, C, H, D] -> [B, K, G*C, D]: a kv head's G query heads and C tokens as one row axis.

  XLA's CPU dots run far faster on this layout than on separate (G, C) free dimensions.
  """
  b, c, h, d = q_BxCxHxD.shape
  q = q_BxCxHxD.reshape(b, c, kv_heads, h // kv_heads, d)
  return jnp.transpose(q, (0, 2, 3, 1, 4)).reshape(b, kv_heads, -1, d)


def _unfold(out_BxKxMxD: Array, c: int) -> Array:
  b, k, m, d = out_BxKxMxD.shape
  out = out_BxKxMxD.reshape(b, k, m // c, c, d)
  return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, c, -1, d)


def _scores(q_BxKxMxD: Array, k_BxKxSxD: Array) -> Array:
  acc = jnp.promote_types(q_BxKxMxD.dtype, jnp.float32)
  scale = q_BxKxMxD.shape[-1] ** -0.5
  return jnp.einsum("bkmd,bksd->bkms", q_BxKxMxD, k_BxKxSxD, preferred_element_type=acc) * scale


def _weighted_values(p_BxKxMxS: Array, v_BxKxSxD: Array) -> Array:
  acc = jnp.promote_types(v_BxKxSxD.dtype, jnp.float32)
  return jnp.einsum("bkms,bksd->bkmd", p_BxKxMxS.astype(v_BxKxSxD.dtype), v_BxKxSxD,
                    preferred_element_type=acc)


def _masked_attention(q_BxKxMxD: Array, k_BxKxSxD: Array, v_BxKxSxD: Array,
                      mask_BxMxS: Array) -> Array:
  """Dense softmax attention restricted to ``mask`` (rows with no visible key give zeros)."""
  out = attention_lib.attend(q_BxKxMxD[:, :, None], k_BxKxSxD, v_BxKxSxD,
                             mask_BxMxS[:, None, None], q_BxKxMxD.shape[-1] ** -0.5)
  return out[:, :, 0]


def heads_first(x_BxCxKxD: Array) -> Array:
  """[B, C, K, D] (projection output) -> [B, K, C, D] (cache layout)."""
  return jnp.swapaxes(x_BxCxKxD, 1, 2)


def kernel_impl(impl: str) -> str:
  """``"pallas"`` when ``attention_impl=impl`` serves through the Pallas kernels here, else
  ``"xla"`` (``auto`` resolves per backend as in training: pallas on TPU/GPU, xla on CPU)."""
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"attention_impl={impl!r} is not available; allowed: {ATTENTION_IMPLS}")
  if impl == "xla":
    return "xla"
  from kernels import ops  # pylint: disable=g-import-not-at-top  # Pallas loads lazily.
  return "pallas" if ops.resolve_impl(impl) == "pallas" else "xla"


def window_attention(q_BxCxHxD: Array, k_BxKxCxD: Array, v_BxKxCxD: Array, ring_k_BxKxWxD: Array,
                     ring_v_BxKxWxD: Array, lengths_B: Array, counts_B: Array, *, window: int,
                     block_size: int, impl: str = "xla") -> tuple[Array, Array, Array]:
  """Sliding-window attention of the chunk to (ring buffer, chunk); returns (out, ring k, ring v).

  The ring is unrolled into position order and the chunk appended, giving a contiguous run of
  keys at positions ``lengths - W' + j``. Query sub-blocks of ``block_size`` then each read the
  W' + block keys before and inside them, so the work is C * (W' + block), not C * (W' + C).
  """
  use_kernel = kernel_impl(impl) == "pallas"
  if q_BxCxHxD.shape[1] == 1:
    return _window_decode(q_BxCxHxD, k_BxKxCxD, v_BxKxCxD, ring_k_BxKxWxD, ring_v_BxKxWxD,
                          lengths_B, counts_B, use_kernel)
  c, w = q_BxCxHxD.shape[1], ring_k_BxKxWxD.shape[2]
  j_1xR = jnp.arange(w + c)[None, :]
  # Key j of the unrolled run: position lengths - W' + j; real if >= 0 and not chunk padding.
  key_valid_BxR = (j_1xR >= w - lengths_B[:, None]) & (j_1xR < w + counts_B[:, None])
  unroll_Bx1xWx1 = ((lengths_B[:, None] + jnp.arange(w)[None, :]) % w)[:, None, :, None]

  def run(ring, new):
    return jnp.concatenate([jnp.take_along_axis(ring, unroll_Bx1xWx1, axis=2), new], axis=2)

  k_run, v_run = run(ring_k_BxKxWxD, k_BxKxCxD), run(ring_v_BxKxWxD, v_BxKxCxD)
  if use_kernel:
    out = _kernel_window(q_BxCxHxD, k_run, v_run, key_valid_BxR, window)
  else:
    out = _blocked_window(q_BxCxHxD, k_run, v_run, key_valid_BxR, w, window, block_size)
  # New slot s holds position p = n' - 1 - ((n' - 1 - s) mod W'), run index W' + p - lengths.
  new_len = lengths_B + counts_B
  pos_BxW = new_len[:, None] - 1 - (new_len[:, None] - 1 - jnp.arange(w)[None, :]) % w
  src_Bx1xWx1 = (w + pos_BxW - lengths_B[:, None])[:, None, :, None]
  return (out, jnp.take_along_axis(k_run, src_Bx1xWx1, axis=2),
          jnp.take_along_axis(v_run, src_Bx1xWx1, axis=2))


def _kernel_window(q_BxCxHxD, k_BxKxRxD, v_BxKxRxD, key_valid_BxR, window: int) -> Array:
  """The local-window kernel over the run: query i of the chunk is run query W' + i.

  The W' run queries before the chunk are zeros whose outputs are dropped; keys that are empty
  ring slots or chunk padding get kv segment 0, every query segment 1, so no real query sees them
  (a real query always sees itself).
  """
  from kernels import ops  # pylint: disable=g-import-not-at-top
  b, c = q_BxCxHxD.shape[:2]
  w = k_BxKxRxD.shape[2] - c
  q_run = jnp.pad(q_BxCxHxD, ((0, 0), (w, 0), (0, 0), (0, 0)))
  out = ops.local_attention(q_run, heads_first(k_BxKxRxD), heads_first(v_BxKxRxD), window=window,
                            segment_ids=jnp.ones((b, w + c), jnp.int32),
                            kv_segment_ids=key_valid_BxR.astype(jnp.int32))
  return out[:, w:]


def _blocked_window(q_BxCxHxD, k_BxKxRxD, v_BxKxRxD, key_valid_BxR, w: int, window: int,
                    block_size: int) -> Array:
  """Query sub-block l (run queries W' + l*Q ..) attends to run keys [l*Q, l*Q + W' + Q)."""
  b, c, h, d = q_BxCxHxD.shape
  kv_heads = k_BxKxRxD.shape[1]
  qb = block_size if 0 < block_size < c and c % block_size == 0 else c
  nb, m = c // qb, w + qb

  def blocks(x, axis):
    parts = [jax.lax.slice_in_dim(x, l * qb, l * qb + m, axis=axis) for l in range(nb)]
    stacked = jnp.stack(parts, axis=1)
    return stacked.reshape(b * nb, *stacked.shape[2:])

  # Query i of a sub-block is index W' + i of its key slice: it sees i < j <= W' + i, within
  # the window.
  i, j = jnp.arange(qb)[:, None], jnp.arange(m)[None, :]
  near_QxM = (j <= w + i) & (w + i - j < window)
  rows_mask = jnp.tile(near_QxM, (h // kv_heads, 1))[None] & blocks(key_valid_BxR, 1)[:, None, :]
  q = _fold(q_BxCxHxD.reshape(b * nb, qb, h, d), kv_heads)
  out = _masked_attention(q, blocks(k_BxKxRxD, 2), blocks(v_BxKxRxD, 2), rows_mask)
  return _unfold(out, qb).reshape(b, c, h, d).astype(q_BxCxHxD.dtype)


def _window_decode(q_Bx1xHxD, k_BxKx1xD, v_BxKx1xD, ring_k_BxKxWxD, ring_v_BxKxWxD, lengths_B,
                   counts_B, use_kernel: bool):
  """One token: write it into slot ``n % W'``, then attend to the ring's non-empty slots.

  After the write the ring holds exactly positions (n - W', n]: the window of the new token.
  """
  b, kv_heads, w = ring_k_BxKxWxD.shape[:3]
  slot_Bx1 = jnp.where(counts_B > 0, lengths_B % w, w)[:, None]  # Slot w: dropped, not written.
  ring_k = cache_lib.write(ring_k_BxKxWxD, slot_Bx1, k_BxKx1xD)
  ring_v = cache_lib.write(ring_v_BxKxWxD, slot_Bx1, v_BxKx1xD)
  if use_kernel:  # Slot s is visible when s <= min(n, W' - 1): the filled ones.
    from kernels import ops  # pylint: disable=g-import-not-at-top
    def attend(q, positions, k, v):
      return ops.decode_attention(q, k, v, q_positions_BxT=positions, cache_layout="BKSD")

    out = ops.shard_cache_op(attend, q_Bx1xHxD, jnp.minimum(lengths_B, w - 1)[:, None], ring_k,
                             ring_v)
    return out.astype(q_Bx1xHxD.dtype), ring_k, ring_v
  q = _fold(q_Bx1xHxD, kv_heads)
  filled_BxW = jnp.arange(w)[None, :] <= lengths_B[:, None]  # Slot s is empty while s > n.
  mask = jnp.broadcast_to(filled_BxW[:, None, :], (b, q.shape[2], w))
  out = _masked_attention(q, ring_k, ring_v, mask)
  return _unfold(out, 1).astype(q_Bx1xHxD.dtype), ring_k, ring_v


def xla_cache_attention(q_BxCxHxD: Array, positions_BxC: Array, k_BxKxSxD: Array,
                        v_BxKxSxD: Array, *, block_size: int) -> Array:
  """Causal attention of queries at ``positions`` to a full buffer: key j visible when j <= p.

  A chunk (C > 1) runs an online softmax over key blocks of ``block_size`` that stops at the
  largest query position, so the unwritten tail of the buffer is never read. One decode token
  (C = 1) reads the buffer in a single pass (:func:`_decode_cache_attention`).
  """
  if q_BxCxHxD.shape[1] == 1:
    return _decode_cache_attention(q_BxCxHxD, positions_BxC, k_BxKxSxD, v_BxKxSxD)
  b, c, h, d = q_BxCxHxD.shape
  kv_heads, s = k_BxKxSxD.shape[1:3]
  # A block never spans the whole buffer: XLA then copies the buffer on every call (measured).
  bk = min(block_size, max(1, (s + 1) // 2))
  acc_dtype = jnp.promote_types(q_BxCxHxD.dtype, jnp.float32)
  q_BxKxMxD = _fold(q_BxCxHxD, kv_heads)
  rows = q_BxKxMxD.shape[2]
  pos_BxM = jnp.tile(positions_BxC, (1, h // kv_heads))  # Row r = g * C + c.
  extent = jnp.minimum(jnp.max(positions_BxC) + 1, s)

  def body(i, carry):
    m_BxKxM, l_BxKxM, acc = carry
    start = jnp.minimum(i * bk, s - bk)  # The last block may overlap the one before it.
    k_blk = jax.lax.dynamic_slice_in_dim(k_BxKxSxD, start, bk, axis=2)
    v_blk = jax.lax.dynamic_slice_in_dim(v_BxKxSxD, start, bk, axis=2)
    key_pos = start + jnp.arange(bk)
    mask_BxMxS = ((key_pos[None, None, :] <= pos_BxM[:, :, None])
                  & (key_pos >= i * bk)[None, None, :])
    s_f32 = jnp.where(mask_BxMxS[:, None], _scores(q_BxKxMxD, k_blk), -jnp.inf)
    m_new = jnp.maximum(m_BxKxM, jnp.max(s_f32, axis=-1))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    p = jnp.exp(s_f32 - m_safe[..., None])
    correction = jnp.exp(m_BxKxM - m_safe)
    l_new = l_BxKxM * correction + jnp.sum(p, axis=-1)
    return m_new, l_new, acc * correction[..., None] + _weighted_values(p, v_blk)

  init = (jnp.full((b, kv_heads, rows), -jnp.inf, acc_dtype),
          jnp.zeros((b, kv_heads, rows), acc_dtype),
          jnp.zeros((b, kv_heads, rows, d), acc_dtype))
  _, l_sum, acc = jax.lax.fori_loop(0, (extent + bk - 1) // bk, body, init)
  out = acc / jnp.where(l_sum == 0.0, 1.0, l_sum)[..., None]
  return _unfold(out, c).astype(q_BxCxHxD.dtype)


def _decode_cache_attention(q_Bx1xHxD: Array, positions_Bx1: Array, k_BxKxSxD: Array,
                            v_BxKxSxD: Array) -> Array:
  """One token per sequence against the whole buffer, keys-major: each K/V row is read once.

  Decode is bound by reading the cache, so the two matmuls take the cache as their large
  operand in its stored layout ([S, D] per (sequence, kv head)) and the G query rows as the
  small one: scores ``[B, K, S, G]`` and ``p^T V`` contract over S without moving the cache.
  The blocked loop of the chunk path copies every key block it slices (the matmul cannot read
  a dynamic slice in place), and the copies grow with the batch: at 32K it read the cache at a
  third to a sixth of this single pass's rate (batch 1 to 26, ``experiments.bench_inference``
  measures both against a plain reduction over the same bytes). The price is that positions
  past the longest sequence are read too, so the buffer should be sized to what is served.
  """
  d = q_Bx1xHxD.shape[-1]
  kv_heads, s = k_BxKxSxD.shape[1:3]
  acc_dtype = jnp.promote_types(q_Bx1xHxD.dtype, jnp.float32)
  q_BxKxGxD = _fold(q_Bx1xHxD, kv_heads)
  s_BxKxSxG = jnp.einsum("bksd,bkgd->bksg", k_BxKxSxD, q_BxKxGxD,
                         preferred_element_type=acc_dtype) * d ** -0.5
  visible_Bx1xSx1 = (jnp.arange(s)[None, :] <= positions_Bx1)[:, None, :, None]
  s_BxKxSxG = jnp.where(visible_Bx1xSx1, s_BxKxSxG, -jnp.inf)
  p_BxKxSxG = jnp.exp(s_BxKxSxG - jnp.max(s_BxKxSxG, axis=2, keepdims=True))  # Key 0 is visible.
  out_BxKxGxD = jnp.einsum("bksd,bksg->bkgd", v_BxKxSxD, p_BxKxSxG.astype(v_BxKxSxD.dtype),
                           preferred_element_type=acc_dtype)
  out_BxKxGxD = out_BxKxGxD / jnp.sum(p_BxKxSxG, axis=2)[..., None]
  return _unfold(out_BxKxGxD, 1).astype(q_Bx1xHxD.dtype)


def cache_attention(q_BxCxHxD: Array, positions_BxC: Array, k_BxKxSxD: Array, v_BxKxSxD: Array,
                    *, block_size: int, impl: str = "xla") -> Array:
  """The dispatch point of every cached full/global attention (see the module docstring)."""
  if kernel_impl(impl) == "pallas":
    from kernels import ops  # pylint: disable=g-import-not-at-top
    return ops.cache_attention(q_BxCxHxD, positions_BxC, k_BxKxSxD, v_BxKxSxD,
                               block_size=block_size).astype(q_BxCxHxD.dtype)
  return xla_cache_attention(q_BxCxHxD, positions_BxC, k_BxKxSxD, v_BxKxSxD,
                             block_size=block_size)
