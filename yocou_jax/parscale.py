"""ParScale (parallel scaling, arXiv 2505.10475): P streams of one transformer, aggregated.

The official implementation (QwenLM/ParScale, ``modeling_qwen2_parscale.py``) is followed:

* **Input transformation.** The embedded input is copied P times and run as one batch of P x B
  rows, stream-major (row ``p * B + b`` is stream p of sequence b). Streams differ only by a
  learned **prefix** of ``prefix_length`` key/value tokens per stream and attention layer
  (``prefix_k``/``prefix_v`` of shape [P, kv_heads, prefix_length, head_dim]): every query of
  stream p attends to stream p's prefix (no RoPE on it, never masked) before its causal keys.
  At inference the prefix sits at the front of each layer's K/V cache, as in the official cache.
* **Output aggregation.** After the final RMSNorm (applied to each stream), a two-layer MLP
  ``Linear(P * D -> D), SiLU, Linear(D -> P)`` (with biases) reads the streams' concatenated
  states (interleaved ``(D, P)``-major, the official ``"b s (h n)"`` order), a float32 softmax
  gives P weights per token, the weights are label-smoothed ``w (1 - s) + s / P``
  (``stream_weight_smoothing``, official default 0.01) and the weighted sum of the streams goes
  to the output projection. P = 1 has no aggregation and, with ``prefix_length = 0``, is the
  transformer with the same parameters.

Departures: (1) the prefix and aggregation weights are initialised Normal(init_std) like every
other weight here (the official release leaves the prefix to its training code); (2) attention
projections have no biases (Llama-style, like the rest of this framework; Qwen2 has q/k/v
biases); (3) packed rows see the prefix in every document (the official code has no packing).
The parameter count is the transformer's plus ``2 * L * P * kv_heads * prefix_length *
head_dim`` prefix values and the aggregation MLP; FLOPs per token are about P times the
transformer's (every stream runs the whole stack) plus the aggregation.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from yocou_jax.config import ModelConfig
from yocou_jax.layers import Projection, param_init

Array = jax.Array


def replicate_streams(num_streams: int, *arrays_BxN: Array) -> tuple[Array, ...]:
  """[B, N, ...] -> [P * B, N, ...], stream-major (official ``"b s h -> (n b) s h"``)."""
  return tuple(jnp.concatenate([x] * num_streams, axis=0) for x in arrays_BxN)


class StreamPrefix(nn.Module):
  """One attention layer's learned prefix K/V per stream, expanded to the P x B rows."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, rows: int) -> tuple[Array, Array]:
    """(keys, values) [rows, prefix_length, kv_heads, head_dim] for stream-major rows."""
    cfg = self.cfg
    shape = (cfg.num_streams, cfg.num_kv_heads, cfg.prefix_length, cfg.head_dim)
    axes = (None, "kv_heads", None, "head_dim")
    out = []
    for name in ("key", "value"):
      prefix_PxKxMxD = self.param(name, param_init(cfg, axes), shape, jnp.float32)
      prefix_PxMxKxD = prefix_PxKxMxD.transpose(0, 2, 1, 3).astype(cfg.compute_dtype)
      out.append(jnp.repeat(prefix_PxMxKxD, rows // cfg.num_streams, axis=0))
    return out[0], out[1]


class _Dense(nn.Module):
  """x W + b (the aggregation MLP's layers; official ``torch.nn.Linear``)."""

  cfg: ModelConfig
  features: int
  axes: tuple[str, ...]

  @nn.compact
  def __call__(self, x: Array) -> Array:
    y = Projection(self.cfg, (self.features,), self.axes, name="linear")(x)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[1:]),
                      (self.features,), jnp.float32)
    return y + bias.astype(y.dtype)


class StreamAggregation(nn.Module):
  """Dynamic weighted sum of the P normed streams: [P * B, N, D] -> [B, N, D]."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, h_PBxNxD: Array) -> Array:
    cfg = self.cfg
    p = cfg.num_streams
    h_PxBxNxD = h_PBxNxD.reshape(p, -1, *h_PBxNxD.shape[1:])
    _, b, n, d = h_PxBxNxD.shape
    features_BxNxDP = h_PxBxNxD.transpose(1, 2, 3, 0).reshape(b, n, d * p)
    hidden_BxNxD = nn.silu(_Dense(cfg, d, (None, "embed"), name="hidden")(features_BxNxDP))
    logits_BxNxP = _Dense(cfg, p, ("embed", None), name="weights")(hidden_BxNxD)
    weights_BxNxP = jax.nn.softmax(logits_BxNxP.astype(jnp.float32), axis=-1)
    smoothing = cfg.stream_weight_smoothing
    weights_BxNxP = weights_BxNxP * (1.0 - smoothing) + smoothing / p
    out = jnp.einsum("pbnd,bnp->bnd", h_PxBxNxD.astype(jnp.float32), weights_BxNxP)
    return out.astype(h_PBxNxD.dtype)
