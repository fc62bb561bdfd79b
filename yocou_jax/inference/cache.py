"""Inference K/V caches: their layout per arch, allocation, sharding names and byte count.

The cache is a dict pytree whose groups mirror the parameter tree; each group is a list with one
``{"k": ..., "v": ...}`` entry per layer *application*, in execution order (iteration-major:
entry ``t * L + l`` is layer l in loop iteration t). Every buffer is ``[B, K, S, D]`` (kv heads
before length, so decode attention is a plain batched matmul; B batch, K kv heads, D head dim)::

  transformer, looped  "decoder":      T * L buffers of S tokens   (T = 1 for transformer)
  rins                 "recursive":    T * R buffers of S tokens   (the looped first R layers)
                       "decoder":      L - R buffers of S tokens
  yoco, yocou          "self_decoder": T * L/2 ring buffers of W' = min(W, S) tokens
                       "global_kv":    one buffer of S tokens      (YOCO's single global K/V)
  yoco_upper_loop      "self_decoder": L/2 ring buffers; "global_kv": one buffer of S tokens
  yoco_upper_loop_nokv "self_decoder": L/2 ring buffers; "global_kv": T buffers of S tokens
                                       (one K/V per cross-decoder iteration)
  parscale             "decoder":      L buffers of M + S tokens, P x B rows (stream-major):
                                       slots [0, M) hold the stream's learned prefix, token p
                                       sits at slot M + p

S is the maximum length (prompt + generated tokens). Token ``p`` of a sequence lives at index
``p`` of a full buffer and at slot ``p % W'`` of a ring buffer. Positions are never stored: with
``n`` tokens in the cache, ring slot ``s`` holds position ``n - 1 - ((n - 1 - s) mod W')`` (empty
when negative). The per-sequence ``n`` is kept beside the cache (``engine.DecodeState.lengths``),
so the cache's bytes are K and V alone and equal ``accounting.kv_cache_bytes(cfg, S, B)``.

One array per application (rather than one stacked array) keeps every cache update in place:
XLA copies a stacked buffer that a loop both updates and reads.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from yocou_jax.config import ModelConfig

Array = jax.Array
Cache = dict[str, list[dict[str, Array]]]

# Logical axis names of every cache buffer: batch over the data axes and kv heads over 'tensor',
# like the activations they are made from (see yocou_jax/sharding.py).
AXES = ("activation_batch", "activation_kv_heads", "cache_length", None)


def ring_length(cfg: ModelConfig, max_len: int) -> int:
  """Tokens a sliding-window ring buffer holds: min(W, max_len)."""
  return min(cfg.window, max_len)


def layout(cfg: ModelConfig, max_len: int) -> dict[str, tuple[int, int]]:
  """{group: (layer applications, tokens per buffer)} for ``cfg.arch``, in forward order."""
  t = cfg.num_iterations
  if cfg.is_decoder_decoder:
    loops = t if cfg.arch == "yocou" else 1
    return {"self_decoder": (loops * cfg.num_self_layers, ring_length(cfg, max_len)),
            "global_kv": (cfg.global_kv_iterations, max_len)}
  if cfg.arch in ("transformer", "parscale"):
    return {"decoder": (cfg.num_layers, cfg.stream_prefix_length + max_len)}
  if cfg.arch == "looped":
    return {"decoder": (t * cfg.num_layers, max_len)}
  groups = {"recursive": (t * cfg.num_recursive_layers, max_len)}
  if cfg.num_layers > cfg.num_recursive_layers:
    groups["decoder"] = (cfg.num_layers - cfg.num_recursive_layers, max_len)
  return groups


def init_cache(cfg: ModelConfig, batch: int, max_len: int) -> Cache:
  """Zero K/V buffers in the activation dtype (ParScale: P x batch rows, stream-major)."""
  def buffer(length):
    return jnp.zeros((cfg.streams * batch, cfg.num_kv_heads, length, cfg.head_dim), cfg.compute_dtype)

  return {group: [{"k": buffer(length), "v": buffer(length)} for _ in range(count)]
          for group, (count, length) in layout(cfg, max_len).items()}


def write(buffer_BxKxSxD: Array, index_BxC: Array, x_BxKxCxD: Array) -> Array:
  """buffer[b, :, index[b, i]] = x[b, :, i]; indices past the buffer are dropped (not written).

  The scatter runs on the [B*K, S, D] view of the buffer, one row per (sequence, kv head). On
  the [B, K, S, D] array XLA turns a batch-1 scatter into a dynamic-update-slice that it then
  duplicates, with copies of the whole buffer, for a matmul reading it (measured: 4 copies of
  the cache per decode step); the row view is updated in place at every batch size.
  """
  b, k, s, d = buffer_BxKxSxD.shape
  rows_Nx1 = jnp.arange(b * k)[:, None]
  index_NxC = jnp.repeat(index_BxC, k, axis=0)
  x_NxCxD = x_BxKxCxD.reshape(b * k, -1, d)
  buffer_NxSxD = buffer_BxKxSxD.reshape(b * k, s, d)
  return buffer_NxSxD.at[rows_Nx1, index_NxC].set(x_NxCxD, mode="drop").reshape(b, k, s, d)


def constrain(cache: Cache) -> Cache:
  """Pins the cache's sharding by logical names (a no-op outside a mesh/rules scope)."""
  return jax.tree.map(lambda x: nn.with_logical_constraint(x, AXES), cache)


def shardings(cache: Any, mesh: jax.sharding.Mesh, rules) -> Any:
  """NamedShardings of a cache (or of its ``jax.eval_shape``) on ``mesh`` under ``rules``."""
  spec = nn.logical_to_mesh_sharding(jax.P(*AXES), mesh, rules)
  return jax.tree.map(lambda _: spec, cache)


def batch_shards(mesh: jax.sharding.Mesh, rules) -> int:
  """How many ways ``mesh`` splits a cache's batch under ``rules`` (the data axes' size)."""
  axes = nn.logical_to_mesh_axes(AXES[:1], rules)[0]
  axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
  return int(np.prod([mesh.shape[a] for a in axes]))


def cache_bytes(cache: Any) -> int:
  """Bytes of every K/V array in the cache."""
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(cache))
