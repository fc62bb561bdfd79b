"""Pure-JAX references for the attention kernels (dense score matrix; tests and short inputs only).

One masked softmax covers every kernel in this package:

* ``attention_reference``: causal self attention (local-window with ``window=W``, full causal
  with ``window=None``; also the cross-decoder's attention over the shared K/V), GQA, segment ids,
  optional logit soft-cap ``c * tanh(s / c)``.
* ``decode_reference``: a few query tokens at absolute positions against a K/V cache.

Query t (absolute position ``p_t``) sees key j iff ``j <= p_t``, ``p_t - j < window`` (if set),
``j < kv_length`` (if set) and the segment ids are equal (if given). Rows without a visible key
give zeros. The softmax runs in float32, or float64 when the inputs are float64 (the high-precision
reference the tests compare kernels against).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

Array = jax.Array


def _masked_attention(q_BxTxHxD: Array, k_BxSxKxD: Array, v_BxSxKxD: Array, mask_BxTxS: Array,
                      softcap: Optional[float]) -> Array:
  b, t, h, d = q_BxTxHxD.shape
  kv_heads = k_BxSxKxD.shape[2]
  if h % kv_heads:
    raise ValueError(f"query heads {h} are not a multiple of kv heads {kv_heads}")
  acc = jnp.promote_types(q_BxTxHxD.dtype, jnp.float32)
  q_BxTxKxGxD = q_BxTxHxD.reshape(b, t, kv_heads, h // kv_heads, d)
  s_BxKxGxTxS = jnp.einsum("btkgd,bskd->bkgts", q_BxTxKxGxD.astype(acc), k_BxSxKxD.astype(acc))
  s_BxKxGxTxS = s_BxKxGxTxS * d ** -0.5
  if softcap is not None:
    s_BxKxGxTxS = softcap * jnp.tanh(s_BxKxGxTxS / softcap)
  mask = mask_BxTxS[:, None, None]
  s_BxKxGxTxS = jnp.where(mask, s_BxKxGxTxS, -jnp.inf)
  m = jnp.max(s_BxKxGxTxS, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(s_BxKxGxTxS - m)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(denom == 0.0, 1.0, denom)
  out = jnp.einsum("bkgts,bskd->btkgd", p, v_BxSxKxD.astype(acc))
  return out.reshape(b, t, h, d).astype(q_BxTxHxD.dtype)


def attention_mask(q_positions_BxT: Array, num_keys: int, *, window: Optional[int] = None,
                   q_segment_ids_BxT: Optional[Array] = None,
                   kv_segment_ids_BxS: Optional[Array] = None,
                   kv_length_B: Optional[Array] = None) -> Array:
  """Boolean [B, T, S] visibility of key j (index = position) to query t."""
  qi = q_positions_BxT[:, :, None]
  kj = jnp.arange(num_keys)[None, None, :]
  mask = kj <= qi
  if window is not None:
    mask &= qi - kj < window
  if kv_length_B is not None:
    mask &= kj < kv_length_B[:, None, None]
  if q_segment_ids_BxT is not None:
    mask &= q_segment_ids_BxT[:, :, None] == kv_segment_ids_BxS[:, None, :]
  return mask


def attention_reference(q_BxNxHxD: Array, k_BxNxKxD: Array, v_BxNxKxD: Array, *,
                        window: Optional[int] = None, segment_ids: Optional[Array] = None,
                        softcap: Optional[float] = None) -> Array:
  """Causal (``window=None``) or sliding-window self/cross attention over N positions."""
  b, n = q_BxNxHxD.shape[:2]
  positions = jnp.broadcast_to(jnp.arange(n), (b, n))
  mask = attention_mask(positions, k_BxNxKxD.shape[1], window=window,
                        q_segment_ids_BxT=segment_ids, kv_segment_ids_BxS=segment_ids)
  return _masked_attention(q_BxNxHxD, k_BxNxKxD, v_BxNxKxD, mask, softcap)


def decode_reference(q_BxTxHxD: Array, k_cache_BxSxKxD: Array, v_cache_BxSxKxD: Array, *,
                     q_positions_BxT: Array, kv_length_B: Optional[Array] = None,
                     window: Optional[int] = None, softcap: Optional[float] = None) -> Array:
  """T query tokens at absolute positions against cache entries ``0 .. min(pos, kv_length-1)``."""
  mask = attention_mask(q_positions_BxT, k_cache_BxSxKxD.shape[1], window=window,
                        kv_length_B=kv_length_B)
  return _masked_attention(q_BxTxHxD, k_cache_BxSxKxD, v_cache_BxSxKxD, mask, softcap)
