"""Continuous batching: many requests through a fixed number of cache rows, tokens streamed.

:func:`stream` keeps ``rows`` sequences in one :class:`~yocou_jax.inference.engine.DecodeState`
and decodes them together, one token per row per step. When a request ends (a stop token or its
``max_new_tokens``) its row takes the next waiting request at once: the new prompt is prefilled
alone (batch 1, the engine's chunked prefill, its width padded to a power of two or a chunk
multiple so that few shapes compile) and its cache copied into that row, so a batch is
never held by its longest member. Resetting a row needs nothing more: every cache read is bounded
by the row's own length (ring slots past it are empty, buffer positions past it invisible and
overwritten before they are read).

On a mesh (an :class:`~yocou_jax.inference.engine.Engine` with ``mesh``) the rows are split
over the data axes and the kv heads over 'tensor'; the number of rows is rounded up to a
multiple of the data axes' size, and a new request's batch-1 prefill runs with its batch
replicated (one row cannot be split), heads still over 'tensor', before it is copied into its
row's shard.

Sampling draws each request's token ``t`` with the key ``fold_in(fold_in(rng, request), t)``,
so a request's continuation does not depend on which row it runs in or what runs beside it:
serving N prompts over any number of rows gives the tokens of serving each alone.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from yocou_jax.inference import cache as cache_lib
from yocou_jax.inference import engine as engine_lib
from yocou_jax.inference import sampling as sampling_lib

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Request:
  prompt: Sequence[int]  # Token ids (at least one).
  max_new_tokens: int


@dataclasses.dataclass(frozen=True)
class Token:
  """One streamed token: ``request`` (its index), the token id, and whether it ended it."""

  request: int
  token: int
  done: bool


def _bucket(length: int, chunk: int) -> int:
  """The padded prompt width: a power of two up to ``chunk``, then a multiple of it, so the
  prefill compiles for a few shapes rather than for every prompt length."""
  if length >= chunk:
    return -(-length // chunk) * chunk
  return min(chunk, 1 << (length - 1).bit_length())


def _keys(rng: Array, requests_B: Array, steps_B: Array) -> Array:
  return jax.vmap(lambda r, t: jax.random.fold_in(jax.random.fold_in(rng, r), t))(requests_B,
                                                                                 steps_B)


def _sample_rows(logits_BxV: Array, rng: Array, requests_B: Array, steps_B: Array,
                 sampling: sampling_lib.SamplingConfig) -> Array:
  """Row b's token drawn with its request's key for its step (see the module docstring)."""
  return jax.vmap(lambda l, k: sampling_lib.sample(l[None], k, sampling)[0])(
      logits_BxV, _keys(rng, requests_B, steps_B))


def _decode_and_sample(params, state, tokens_B, rng, requests_B, steps_B, *, cfg, opts,
                       sampling):
  logits_BxV, state = engine_lib.decode_step(params, state, tokens_B, cfg=cfg, opts=opts)
  return _sample_rows(logits_BxV, rng, requests_B, steps_B, sampling), state


def _insert(state: engine_lib.DecodeState, one: engine_lib.DecodeState,
            row: Array) -> engine_lib.DecodeState:
  """``state`` with row ``row`` replaced by the batch-1 ``one`` (same max_len)."""
  return jax.tree.map(lambda x, y: jax.lax.dynamic_update_index_in_dim(x, y[0], row, 0), state,
                      one)


def _batch_shards(engine: engine_lib.Engine) -> int:
  return 1 if engine.mesh is None else cache_lib.batch_shards(engine.mesh, engine.rules)


def _prefill_engine(engine: engine_lib.Engine) -> engine_lib.Engine:
  """The engine that prefills one new request (batch 1): ``engine`` itself, or on a mesh that
  splits the batch, the same mesh with the batch replicated."""
  if _batch_shards(engine) == 1:
    return engine
  rules = tuple((name, None if name == cache_lib.AXES[0] else axes)
                for name, axes in engine.rules)
  return engine_lib.Engine(engine.cfg, engine.opts, mesh=engine.mesh, rules=rules)


_jit_decode_and_sample = jax.jit(_decode_and_sample, static_argnames=("cfg", "opts", "sampling"),
                                 donate_argnums=(1,))
_jit_insert = jax.jit(_insert, donate_argnums=(0,))
_jit_sample_rows = jax.jit(_sample_rows, static_argnames=("sampling",))


def stream(engine: engine_lib.Engine, params, requests: Sequence[Request], *, rows: int,
           sampling: sampling_lib.SamplingConfig = sampling_lib.SamplingConfig(),
           rng: Optional[Array] = None, stop_tokens: Sequence[int] = ()) -> Iterator[Token]:
  """Yields every request's tokens as they are produced, over ``rows`` cache rows.

  Requests start in order as rows free up; a request's tokens come in order and its last one
  has ``done`` (it is a stop token, or the ``max_new_tokens``-th).
  """
  if rows <= 0:
    raise ValueError(f"rows={rows} must be a positive integer")
  for i, r in enumerate(requests):
    if len(r.prompt) < 1 or r.max_new_tokens < 1:
      raise ValueError(f"request {i}: needs a non-empty prompt and max_new_tokens >= 1, got "
                       f"{len(r.prompt)} prompt tokens and max_new_tokens={r.max_new_tokens}")
  if not requests:
    return
  rng = jax.random.key(0) if rng is None else rng
  shards = _batch_shards(engine)
  rows = -(-min(rows, len(requests)) // shards) * shards  # Extra rows stay free.
  max_len = max(len(r.prompt) + r.max_new_tokens for r in requests)
  stops = set(int(s) for s in stop_tokens)
  decode = functools.partial(_jit_decode_and_sample, cfg=engine.cfg, opts=engine.opts,
                             sampling=sampling)
  state = engine.init_state(rows, max_len)
  prefill_engine = _prefill_engine(engine)
  waiting = collections.deque(enumerate(requests))
  request_B = np.full(rows, -1, np.int32)  # -1: a free row (decoded as padding, ignored).
  step_B = np.zeros(rows, np.int32)  # Tokens produced so far by the row's request.
  token_B = np.zeros(rows, np.int32)

  def emit(row: int, token: int) -> Token:
    i = int(request_B[row])
    step_B[row] += 1
    done = token in stops or step_B[row] == requests[i].max_new_tokens
    if done:
      request_B[row] = -1
    return Token(i, token, done)

  while True:
    for row in np.flatnonzero(request_B < 0):  # Fill free rows: prefill alone, copy in.
      if not waiting:
        break
      i, request = waiting.popleft()
      prompt_1xP = np.zeros((1, _bucket(len(request.prompt), engine.opts.chunk_size)), np.int32)
      prompt_1xP[0, :len(request.prompt)] = request.prompt
      logits_1xV, one = prefill_engine.prefill(
          params, prompt_1xP, np.asarray([len(request.prompt)], np.int32), max_len)
      with engine.scope():
        state = _jit_insert(state, one, jnp.int32(row))
        first = _jit_sample_rows(logits_1xV, rng, jnp.asarray([i], jnp.int32),
                                 jnp.zeros((1,), jnp.int32), sampling)
      request_B[row], step_B[row], token_B[row] = i, 0, int(first[0])
      yield emit(row, int(token_B[row]))
    active = request_B >= 0
    if not active.any():
      if waiting:  # Every new request ended on its first token.
        continue
      return
    with engine.scope():
      next_B, state = decode(params, state, token_B, rng, np.maximum(request_B, 0), step_B)
    token_B = np.asarray(next_B).copy()
    for row in np.flatnonzero(active):
      yield emit(row, int(token_B[row]))


def serve(engine: engine_lib.Engine, params, requests: Sequence[Request], *, rows: int,
          sampling: sampling_lib.SamplingConfig = sampling_lib.SamplingConfig(),
          rng: Optional[Array] = None, stop_tokens: Sequence[int] = ()) -> list[list[int]]:
  """Every request's continuation (stop token included when one ended it): :func:`stream`
  collected."""
  outputs: list[list[int]] = [[] for _ in requests]
  for t in stream(engine, params, requests, rows=rows, sampling=sampling, rng=rng,
                  stop_tokens=stop_tokens):
    outputs[t.request].append(t.token)
  return outputs
