"""Float64 NumPy attention with closed-form gradients: the high-precision test reference.

Independent of JAX (no x64 flag, no autodiff): softmax attention with a boolean mask and the
textbook backward pass

    P = softmax(S),  O = P V,  dV = P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(P * dP)),

through the soft-cap ``c tanh(s / c)`` (derivative ``1 - tanh^2``) and the scale ``D^-1/2``.
Rows with no visible key give zeros (output and gradients).
"""

from __future__ import annotations

from typing import Optional

import numpy as np


def mask(q_positions_BxT, num_keys: int, *, window=None, q_segment_ids=None,
         kv_segment_ids=None, kv_length=None) -> np.ndarray:
  qi = np.asarray(q_positions_BxT)[:, :, None]
  kj = np.arange(num_keys)[None, None, :]
  m = kj <= qi
  if window is not None:
    m &= qi - kj < window
  if kv_length is not None:
    m &= kj < np.asarray(kv_length)[:, None, None]
  if q_segment_ids is not None:
    kv_ids = q_segment_ids if kv_segment_ids is None else kv_segment_ids
    m &= np.asarray(q_segment_ids)[:, :, None] == np.asarray(kv_ids)[:, None, :]
  return m


def attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, mask_BxTxS, do_BxTxHxD=None,
              softcap: Optional[float] = None):
  """Returns the output, or (o, dq, dk, dv) when ``do`` is given, all float64."""
  q, k, v = (np.asarray(x, np.float64) for x in (q_BxTxHxD, k_BxSxKxD, v_BxSxKxD))
  b, t, h, d = q.shape
  kv_heads = k.shape[2]
  qg = q.reshape(b, t, kv_heads, h // kv_heads, d)
  scale = d ** -0.5
  s = np.einsum("btkgd,bskd->bkgts", qg, k) * scale
  capped = s if softcap is None else softcap * np.tanh(s / softcap)
  visible = np.broadcast_to(mask_BxTxS[:, None, None], capped.shape)
  logits = np.where(visible, capped, -np.inf)
  m = np.max(logits, axis=-1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  p = np.exp(logits - m)
  denom = p.sum(-1, keepdims=True)
  p = p / np.where(denom == 0, 1.0, denom)
  o = np.einsum("bkgts,bskd->btkgd", p, v).reshape(b, t, h, d)
  if do_BxTxHxD is None:
    return o
  do = np.asarray(do_BxTxHxD, np.float64).reshape(b, t, kv_heads, h // kv_heads, d)
  dv = np.einsum("bkgts,btkgd->bskd", p, do)
  dp = np.einsum("btkgd,bskd->bkgts", do, v)
  ds = p * (dp - np.sum(p * dp, axis=-1, keepdims=True))
  if softcap is not None:
    ds = ds * (1.0 - (capped / softcap) ** 2)
  ds = ds * scale
  dq = np.einsum("bkgts,bskd->btkgd", ds, k).reshape(b, t, h, d)
  dk = np.einsum("bkgts,btkgd->bskd", ds, qg)
  return o, dq, dk, dv
