"""Inference K/V caches: their layout per arch, allocation, sharding names and byte count.

The cache is a plain dict pytree whose groups mirror the parameter tree (``cache[group]["k"]``,
``cache[group]["v"]``). Shapes use B batch, S the maximum length (prompt + generated tokens),
K kv heads, D head dim, T loop iterations, L layers of the group, W' = min(W, S)::

  transformer, looped  "decoder":      [T, L, B, S, K, D]   one full buffer per layer application
  rins                 "recursive":    [T, R, B, S, K, D]   the looped block A (T applications)
                       "decoder":      [1, L-R, B, S, K, D] block B, applied once
  yoco, yocou          "self_decoder": [T, L/2, B, W', K, D] one ring buffer per (iteration, layer)
                       "global_kv":    [B, S, K, D]          YOCO's single global K/V

Token ``p`` of a sequence lives at index ``p`` of a full buffer and at slot ``p % W'`` of a ring
buffer. Positions are never stored: with ``n`` tokens in the cache, ring slot ``s`` holds position
``n - 1 - ((n - 1 - s) mod W')`` (empty when negative). The per-sequence ``n`` is kept beside the
cache (``engine.DecodeState.lengths``), so the cache's bytes are K and V alone and equal
``accounting.kv_cache_bytes(cfg, S, B)`` exactly.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from yocou_jax.config import ModelConfig

Array = jax.Array
Cache = dict[str, dict[str, Array]]

# Logical axis names of the cache arrays: batch over the data axes, kv heads over 'tensor', as
# the activations they are made from (see yocou_jax/sharding.py).
STACKED_AXES = (None, None, "activation_batch", "cache_length", "activation_kv_heads", None)
GLOBAL_AXES = ("activation_batch", "cache_length", "activation_kv_heads", None)


def ring_length(cfg: ModelConfig, max_len: int) -> int:
  """Tokens a sliding-window ring buffer holds: min(W, max_len)."""
  return min(cfg.window, max_len)


def cache_shapes(cfg: ModelConfig, batch: int, max_len: int) -> dict[str, tuple[int, ...]]:
  """{group: shape of its K (and V) buffer} for ``cfg.arch`` (see the module docstring)."""
  kv = (cfg.num_kv_heads, cfg.head_dim)
  t = cfg.num_iterations
  if cfg.is_decoder_decoder:
    t = t if cfg.arch == "yocou" else 1
    return {"self_decoder": (t, cfg.num_self_layers, batch, ring_length(cfg, max_len), *kv),
            "global_kv": (batch, max_len, *kv)}
  if cfg.arch == "transformer":
    return {"decoder": (1, cfg.num_layers, batch, max_len, *kv)}
  if cfg.arch == "looped":
    return {"decoder": (t, cfg.num_layers, batch, max_len, *kv)}
  shapes = {"recursive": (t, cfg.num_recursive_layers, batch, max_len, *kv)}
  if cfg.num_layers > cfg.num_recursive_layers:
    shapes["decoder"] = (1, cfg.num_layers - cfg.num_recursive_layers, batch, max_len, *kv)
  return shapes


def init_cache(cfg: ModelConfig, batch: int, max_len: int) -> Cache:
  """Zero K/V buffers in the activation dtype."""
  dtype = cfg.compute_dtype
  return {group: {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
          for group, shape in cache_shapes(cfg, batch, max_len).items()}


def logical_axes(cache: Mapping[str, Any]) -> Any:
  """The logical axis names of every cache array (same tree structure)."""
  return jax.tree.map(lambda x: GLOBAL_AXES if len(x.shape) == 4 else STACKED_AXES, cache)


def constrain(cache: Cache) -> Cache:
  """Pins the cache's sharding by logical names (a no-op outside a mesh/rules scope)."""
  return jax.tree.map(lambda x, axes: nn.with_logical_constraint(x, axes), cache,
                      logical_axes(cache), is_leaf=lambda x: isinstance(x, jax.Array))


def shardings(cache: Any, mesh: jax.sharding.Mesh, rules) -> Any:
  """NamedShardings of a cache (or of its ``jax.eval_shape``) on ``mesh`` under ``rules``."""
  specs = jax.tree.map(lambda axes: jax.P(*axes), logical_axes(cache),
                       is_leaf=lambda x: isinstance(x, tuple))
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def cache_bytes(cache: Any) -> int:
  """Bytes of every K/V array in the cache."""
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(cache))
