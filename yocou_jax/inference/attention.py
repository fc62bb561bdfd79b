"""Attention against inference caches, in plain XLA (jnp), for C >= 1 new query tokens.

Two kinds, matching the two cache kinds of :mod:`yocou_jax.inference.cache`:

* :func:`window_attention`: sliding-window attention of a chunk to a ring buffer of the last W'
  tokens plus the chunk itself; it also returns the updated ring buffer. Decode is C = 1.
* :func:`cache_attention`: causal attention to a full buffer (a Transformer layer's cache or
  YOCO's global K/V), as an online softmax over key blocks that stops at the furthest query
  position, so a chunk at offset n reads n + C keys, not the whole buffer.

Shapes: B batch, C query tokens, H query heads, K kv heads, G = H // K, D head dim, W' ring length,
S buffer length, M keys of one query sub-block. ``lengths_B`` is how many tokens each sequence
already has in the cache (the chunk's first token sits at position ``lengths_B``), ``counts_B`` how
many of the chunk's C tokens are real (right padding). Padding queries produce garbage that
nothing reads; padding keys are never visible to real queries.

**Kernel hook.** :func:`cache_attention` dispatches on ``impl``: ``"xla"`` is the function
below; a Pallas decode kernel registers itself with :func:`register_cache_attention` under its
``config.model.attention_impl`` name and receives exactly the arguments of
:func:`xla_cache_attention`.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from yocou_jax import attention as attention_lib

Array = jax.Array


def window_attention(q_BxCxHxD: Array, k_BxCxKxD: Array, v_BxCxKxD: Array, ring_k_BxWxKxD: Array,
                     ring_v_BxWxKxD: Array, lengths_B: Array, counts_B: Array, *, window: int,
                     block_size: int) -> tuple[Array, Array, Array]:
  """Sliding-window attention of the chunk to (ring buffer, chunk); returns (out, ring k, ring v).

  The ring is unrolled into position order and the chunk appended, giving a contiguous run of
  keys at positions ``lengths - W' + j``. Query sub-blocks of ``block_size`` then each read the
  W' + block keys before and inside them (the masked dense attention of the model's reference
  path), so the work is C * (W' + block), not C * (W' + C).
  """
  b, c = q_BxCxHxD.shape[:2]
  w = ring_k_BxWxKxD.shape[1]
  j_BxM = jnp.arange(w + c)[None, :]
  # Key j of the unrolled run: position lengths - W' + j; real if >= 0 and not chunk padding.
  key_valid = ((j_BxM >= w - lengths_B[:, None]) & (j_BxM < w + counts_B[:, None]))
  unroll_BxW = (lengths_B[:, None] + jnp.arange(w)[None, :]) % w

  def run(ring, new):
    return jnp.concatenate([jnp.take_along_axis(ring, unroll_BxW[:, :, None, None], axis=1), new],
                           axis=1)

  k_run, v_run = run(ring_k_BxWxKxD, k_BxCxKxD), run(ring_v_BxWxKxD, v_BxCxKxD)
  out = _blocked_window(q_BxCxHxD, k_run, v_run, key_valid.astype(jnp.int32), w, window,
                        block_size)
  # New slot s holds position p = n' - 1 - ((n' - 1 - s) mod W'), run index W' + p - lengths.
  new_len = lengths_B + counts_B
  slots = jnp.arange(w)[None, :]
  pos_BxW = new_len[:, None] - 1 - (new_len[:, None] - 1 - slots) % w
  src_BxW = (w + pos_BxW - lengths_B[:, None])[:, :, None, None]
  return (out, jnp.take_along_axis(k_run, src_BxW, axis=1),
          jnp.take_along_axis(v_run, src_BxW, axis=1))


def _blocked_window(q_BxCxHxD, k_BxRxKxD, v_BxRxKxD, key_seg_BxR, w: int, window: int,
                    block_size: int) -> Array:
  """Query sub-block l (queries W'+l*Q.. of the run) attends to run keys [l*Q, l*Q + W' + Q)."""
  b, c, h, d = q_BxCxHxD.shape
  qb = block_size if 0 < block_size < c and c % block_size == 0 else c
  nb = c // qb
  m = w + qb

  def blocks(x):
    return jnp.stack([x[:, l * qb:l * qb + m] for l in range(nb)], axis=1).reshape(
        b * nb, m, *x.shape[2:])

  q = q_BxCxHxD.reshape(b * nb, qb, h, d)
  seg_q = jnp.ones((b * nb, qb), jnp.int32)
  out = attention_lib.dense_attention(
      q, blocks(k_BxRxKxD), blocks(v_BxRxKxD), window=window, q_segment_ids=seg_q,
      kv_segment_ids=blocks(key_seg_BxR), q_offset=w)
  return out.reshape(b, c, h, d)


def xla_cache_attention(q_BxCxHxD: Array, positions_BxC: Array, k_cache: Array, v_cache: Array,
                        index: tuple[Array, ...], *, block_size: int) -> Array:
  """Causal attention of queries at ``positions`` to ``k_cache[index]`` ([B, S, K, D]).

  ``index`` addresses leading (iteration, layer) axes of a stacked cache (empty for a
  [B, S, K, D] buffer): blocks are sliced straight from the stacked array, never copying a
  layer's whole buffer. Key j is visible to a query at position p when j <= p. Blocks run up to
  the largest query position, so the unwritten tail of the buffer is never read.
  """
  b, c, h, d = q_BxCxHxD.shape
  s, kv_heads = k_cache.shape[-3], k_cache.shape[-2]
  g = h // kv_heads
  bk = min(block_size, s)
  acc_dtype = jnp.promote_types(q_BxCxHxD.dtype, jnp.float32)
  q_BxCxKxGxD = q_BxCxHxD.reshape(b, c, kv_heads, g, d)
  scale = d ** -0.5
  extent = jnp.minimum(jnp.max(positions_BxC) + 1, s)
  num_blocks = (extent + bk - 1) // bk
  lead = len(index)

  def body(i, carry):
    m_BxKxGxC, l_BxKxGxC, acc = carry
    start = jnp.minimum(i * bk, s - bk)  # The last block may overlap the one before it.
    corner = (*index, 0, start, 0, 0)
    size = (1,) * lead + (b, bk, kv_heads, d)
    k_blk = jax.lax.dynamic_slice(k_cache, corner, size).reshape(b, bk, kv_heads, d)
    v_blk = jax.lax.dynamic_slice(v_cache, corner, size).reshape(b, bk, kv_heads, d)
    key_pos = start + jnp.arange(bk)
    mask_BxCxS = ((key_pos[None, None, :] <= positions_BxC[:, :, None])
                  & (key_pos >= i * bk)[None, None, :])
    s_f32 = jnp.einsum("bckgd,bskd->bkgcs", q_BxCxKxGxD, k_blk,
                       preferred_element_type=acc_dtype) * scale
    s_f32 = jnp.where(mask_BxCxS[:, None, None], s_f32, -jnp.inf)
    m_new = jnp.maximum(m_BxKxGxC, jnp.max(s_f32, axis=-1))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    p = jnp.exp(s_f32 - m_safe[..., None])
    correction = jnp.exp(m_BxKxGxC - m_safe)
    l_new = l_BxKxGxC * correction + jnp.sum(p, axis=-1)
    pv = jnp.einsum("bkgcs,bskd->bkgcd", p.astype(v_blk.dtype), v_blk,
                    preferred_element_type=acc_dtype)
    return m_new, l_new, acc * correction[..., None] + pv

  init = (jnp.full((b, kv_heads, g, c), -jnp.inf, acc_dtype),
          jnp.zeros((b, kv_heads, g, c), acc_dtype),
          jnp.zeros((b, kv_heads, g, c, d), acc_dtype))
  _, l_sum, acc = jax.lax.fori_loop(0, num_blocks, body, init)
  out = acc / jnp.where(l_sum == 0.0, 1.0, l_sum)[..., None]
  return jnp.einsum("bkgcd->bckgd", out).reshape(b, c, h, d).astype(q_BxCxHxD.dtype)


CacheAttention = Callable[..., Array]
_CACHE_ATTENTION: dict[str, CacheAttention] = {"xla": xla_cache_attention}


def register_cache_attention(impl: str, fn: CacheAttention) -> None:
  """Makes ``fn`` (same signature as :func:`xla_cache_attention`) the cache attention of ``impl``."""
  _CACHE_ATTENTION[impl] = fn


def cache_attention(q_BxCxHxD: Array, positions_BxC: Array, k_cache: Array, v_cache: Array,
                    index: tuple[Array, ...] = (), *, block_size: int, impl: str = "xla") -> Array:
  """The dispatch point of every cached full/global attention (see the module docstring)."""
  if impl not in _CACHE_ATTENTION:
    raise ValueError(f"no cache attention registered for attention_impl={impl!r}; "
                     f"registered: {sorted(_CACHE_ATTENTION)}")
  return _CACHE_ATTENTION[impl](q_BxCxHxD, positions_BxC, k_cache, v_cache, index,
                                block_size=block_size)
