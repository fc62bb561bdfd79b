"""Cached inference for every arch: chunked prefill with YOCO's early exit, decode, generation.

The functions here run the *training* model's parameter tree unchanged: every layer calls the
same Flax pieces (:class:`RMSNorm`, :class:`Projection`, the feed-forward of
:func:`yocou_jax.moe.feed_forward` (SwiGLU or MoE), :func:`apply_rope`, and
``Model.embed`` / ``Model.logits``) on the same param sub-trees; only the attention is replaced by
its cached form (:mod:`yocou_jax.inference.attention`).

A batch holds sequences of different lengths, right-padded: sequence b's token p sits at position
p (RoPE and windows use it) and ``DecodeState.lengths[b]`` says how many tokens its cache holds.

* :func:`forward_chunk`: C tokens per sequence at positions ``lengths + [0, C)``. yoco/yocou run
  the self-decoder (T iterations, one ring buffer per (iteration, layer)) and write the global
  K/V; the other archs run all their layers against full buffers.
* prefill = forward_chunk over the prompt in chunks of ``chunk_size`` (bounded memory), then, for
  yoco/yocou, the cross-decoder over the last prompt token only (the early exit), then logits.
* decode = forward_chunk of one token (plus the cross-decoder for that token), then logits.

:class:`Engine` jits these (one compile per shape, the state donated) and generates text.
``num_iterations`` may differ from training (test-time depth): ``cfg.replace(num_iterations=6)``
runs the same params with 6 loops and 6 ring buffers per self-decoder layer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from typing import Any, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from yocou_jax import model as model_lib
from yocou_jax import moe as moe_lib
from yocou_jax import parscale as parscale_lib
from yocou_jax import sharding as sharding_lib
from yocou_jax.config import ModelConfig
from yocou_jax.inference import attention as attn_lib
from yocou_jax.inference import cache as cache_lib
from yocou_jax.inference import sampling as sampling_lib
from yocou_jax.layers import Projection, RMSNorm, apply_rope
from yocou_jax.model import Model

Array = jax.Array
Params = Any

_Q_AXES = ("embed", "q_heads", "head_dim")
_KV_AXES = ("embed", "kv_heads", "head_dim")
_OUT_AXES = ("q_heads", "head_dim", "embed")


@flax.struct.dataclass
class DecodeState:
  """Everything a decode step carries: the K/V cache and how many tokens each sequence has."""

  cache: cache_lib.Cache
  lengths: Array  # [B] int32: tokens in the cache per sequence (= the next token's position).


@dataclasses.dataclass(frozen=True)
class Options:
  """Inference knobs that do not change the model."""

  chunk_size: int = 512  # Prefill tokens per chunk (per sequence): bounds prefill memory.
  kv_block: int = 512  # Keys per block of cached full/global attention for a prefill chunk.
  decode_kv_block: int = 2048  # The same in the decode kernel (XLA decode reads in one pass).
  window_block: int = 128  # Query sub-block of sliding-window attention over a chunk.

  def kv_block_for(self, num_queries: int) -> int:
    return self.decode_kv_block if num_queries == 1 else self.kv_block


def param_shardings(cfg: ModelConfig, mesh: jax.sharding.Mesh,
                    rules=sharding_lib.LOGICAL_AXIS_RULES) -> Params:
  """NamedShardings of the training param tree on ``mesh`` by its logical names, as the trainer
  shards it (embed over 'fsdp', heads, MLP and vocab over 'tensor'); a one-line ConfigError
  names the first dimension its mesh axes do not divide."""
  # Neither the attention backend nor remat changes the params; XLA's traces on any machine.
  return sharding_lib.param_shardings(Model(cfg.replace(attention_impl="xla", remat="none")),
                                      mesh, rules)


def init_state(cfg: ModelConfig, batch: int, max_len: int) -> DecodeState:
  return DecodeState(cache=cache_lib.init_cache(cfg, batch, max_len),
                     lengths=jnp.zeros((batch,), jnp.int32))


# --- layers on the training param tree ----------------------------------------------------------

def _apply(module, params: Params, *args) -> Array:
  return module.apply({"params": params}, *args)


def _qkv(cfg: ModelConfig, p: Params, h_BxCxD: Array, positions_BxC: Array):
  heads, kv = (cfg.num_heads, cfg.head_dim), (cfg.num_kv_heads, cfg.head_dim)
  q = _apply(Projection(cfg, heads, _Q_AXES), p["query"], h_BxCxD)
  k = _apply(Projection(cfg, kv, _KV_AXES), p["key"], h_BxCxD)
  v_BxCxKxD = _apply(Projection(cfg, kv, _KV_AXES), p["value"], h_BxCxD)
  return (apply_rope(q, positions_BxC, cfg.rope_theta),
          apply_rope(k, positions_BxC, cfg.rope_theta), v_BxCxKxD)


def _attention_out(cfg: ModelConfig, p: Params, out_BxCxHxD: Array) -> Array:
  return _apply(Projection(cfg, (cfg.d_model,), _OUT_AXES, in_axes=2), p["out"], out_BxCxHxD)


def _feed_forward(cfg: ModelConfig, lp: Params, x_BxCxD: Array) -> Array:
  ffn = moe_lib.feed_forward(cfg, name=None)
  return x_BxCxD + _apply(ffn, lp["mlp"], _apply(RMSNorm(cfg), lp["mlp_norm"], x_BxCxD))


def _positions(lengths_B: Array, c: int) -> Array:
  return lengths_B[:, None] + jnp.arange(c, dtype=jnp.int32)[None, :]


def _window_stack(cfg: ModelConfig, stack: Params, x_BxCxD: Array, rings: list, lengths_B: Array,
                  counts_B: Array, opts: Options):
  """The self-decoder: (L/2 SWA layers) x T, one ring buffer per application (unrolled)."""
  positions_BxC = _positions(lengths_B, x_BxCxD.shape[1])
  num_layers = model_lib.stack_depth(cfg, stack)
  updated = []
  for a, ring in enumerate(rings):
    layer_cfg, lp = model_lib.layer_params(cfg, stack, a % num_layers)
    q, k, v = _qkv(cfg, lp["attn"], _apply(RMSNorm(cfg), lp["attn_norm"], x_BxCxD), positions_BxC)
    out, ring_k, ring_v = attn_lib.window_attention(
        q, attn_lib.heads_first(k), attn_lib.heads_first(v), ring["k"], ring["v"], lengths_B,
        counts_B, window=cfg.window, block_size=opts.window_block,
        impl=cfg.attention_impl)
    x_BxCxD = _feed_forward(layer_cfg, lp, x_BxCxD + _attention_out(cfg, lp["attn"], out))
    updated.append({"k": ring_k, "v": ring_v})
  return x_BxCxD, updated


def _write(buffer_BxKxSxD: Array, positions_BxC: Array, x_BxCxKxD: Array) -> Array:
  return cache_lib.write(buffer_BxKxSxD, positions_BxC, attn_lib.heads_first(x_BxCxKxD))


def _with_prefix(prefix: Params, buffer: dict) -> dict:
  """ParScale: each row's stream prefix [P, K, M, D] written into slots [0, M) of the buffer."""
  def put(buffer_RxKxSxD, prefix_PxKxMxD):
    rows_per_stream = buffer_RxKxSxD.shape[0] // prefix_PxKxMxD.shape[0]
    rows = jnp.repeat(prefix_PxKxMxD.astype(buffer_RxKxSxD.dtype), rows_per_stream, axis=0)
    return jax.lax.dynamic_update_slice(buffer_RxKxSxD, rows, (0, 0, 0, 0))

  return {"k": put(buffer["k"], prefix["key"]), "v": put(buffer["v"], prefix["value"])}


def _full_stack(cfg: ModelConfig, stack: Params, x_BxCxD: Array, buffers: list, lengths_B: Array,
                opts: Options):
  """Causal layers (x T for looped blocks), one full buffer per application (unrolled).

  ParScale's prefix occupies the first M slots of every buffer (rewritten each call: M tokens),
  so token p sits at slot M + p and attends to slots [0, M + p].
  """
  positions_BxC = _positions(lengths_B, x_BxCxD.shape[1])
  slots_BxC = positions_BxC + cfg.stream_prefix_length
  num_layers = model_lib.stack_depth(cfg, stack)
  updated = []
  for a, buffer in enumerate(buffers):
    layer_cfg, lp = model_lib.layer_params(cfg, stack, a % num_layers)
    q, k, v = _qkv(cfg, lp["attn"], _apply(RMSNorm(cfg), lp["attn_norm"], x_BxCxD), positions_BxC)
    if cfg.stream_prefix_length:
      buffer = _with_prefix(lp["attn"]["prefix"], buffer)
    cache_k = _write(buffer["k"], slots_BxC, k)
    cache_v = _write(buffer["v"], slots_BxC, v)
    out = attn_lib.cache_attention(q, slots_BxC, cache_k, cache_v,
                                   block_size=opts.kv_block_for(q.shape[1]),
                                   impl=cfg.attention_impl)
    x_BxCxD = _feed_forward(layer_cfg, lp, x_BxCxD + _attention_out(cfg, lp["attn"], out))
    updated.append({"k": cache_k, "v": cache_v})
  return x_BxCxD, updated


def _global_kv(cfg: ModelConfig, p: Params, x_BxCxD: Array, positions_BxC: Array):
  """YOCO's K = norm(x) W_K, V = norm(x) W_V (RoPE on K only with cross_rope)."""
  kv = (cfg.num_kv_heads, cfg.head_dim)
  h = _apply(RMSNorm(cfg), p["norm"], x_BxCxD)
  k = _apply(Projection(cfg, kv, _KV_AXES), p["key"], h)
  v_BxCxKxD = _apply(Projection(cfg, kv, _KV_AXES), p["value"], h)
  if cfg.cross_rope:
    k = apply_rope(k, positions_BxC, cfg.rope_theta)
  return k, v_BxCxKxD


def cross_decode(params: Params, cfg: ModelConfig, global_kv: dict, x_BxCxD: Array,
                 positions_BxC: Array, opts: Options) -> Array:
  """The cross-decoder for queries at ``positions`` over the global K/V buffer (keys j <= p)."""
  stack = params["cross_decoder"]["layers"]
  for l in range(cfg.num_cross_layers):
    layer_cfg, lp = model_lib.layer_params(cfg, stack, l)
    h = _apply(RMSNorm(cfg), lp["attn_norm"], x_BxCxD)
    q = _apply(Projection(cfg, (cfg.num_heads, cfg.head_dim), _Q_AXES), lp["query"], h)
    if cfg.cross_rope:
      q = apply_rope(q, positions_BxC, cfg.rope_theta)
    out = attn_lib.cache_attention(q, positions_BxC, global_kv["k"], global_kv["v"],
                                   block_size=opts.kv_block_for(q.shape[1]),
                                   impl=cfg.attention_impl)
    x_BxCxD = _feed_forward(layer_cfg, lp, x_BxCxD + _attention_out(cfg, lp, out))
  return x_BxCxD


# --- the model, chunk by chunk ----------------------------------------------------------------

def forward_chunk(params: Params, state: DecodeState, tokens_BxC: Array, counts_B: Array, *,
                  cfg: ModelConfig, opts: Options) -> tuple[Array, DecodeState]:
  """Feeds ``counts_B`` (<= C) tokens per sequence; returns the last hidden state computed.

  For yoco/yocou that is the self-decoder's output (the cross-decoder runs separately, on the
  tokens whose logits are needed); yoco_upper_loop_nokv also runs its first T - 1 cross-decoder
  iterations here (iteration t's K/V is made from iteration t - 1's output at every token) and
  returns the last iteration's input; parscale returns its P streams' outputs (P x B rows); the
  other archs the final layer's output.
  """
  lengths_B, cache = state.lengths, dict(state.cache)
  x_BxCxD = Model(cfg).apply({"params": params}, tokens_BxC, method=Model.embed)
  if cfg.is_decoder_decoder:
    x_BxCxD, cache["self_decoder"] = _window_stack(
        cfg, params["self_decoder"]["stack"]["layers"], x_BxCxD, cache["self_decoder"],
        lengths_B, counts_B, opts)
    positions_BxC = _positions(lengths_B, tokens_BxC.shape[1])
    buffers = []
    for t, buffer in enumerate(cache["global_kv"]):
      if t:
        x_BxCxD = cross_decode(params, cfg, buffers[-1], x_BxCxD, positions_BxC, opts)
      k, v = _global_kv(cfg, params["global_kv"], x_BxCxD, positions_BxC)
      buffers.append({"k": _write(buffer["k"], positions_BxC, k),
                      "v": _write(buffer["v"], positions_BxC, v)})
    cache["global_kv"] = buffers
  else:
    (x_BxCxD,) = parscale_lib.replicate_streams(cfg.streams, x_BxCxD)
    (lengths_R,) = parscale_lib.replicate_streams(cfg.streams, lengths_B)
    for group in ("recursive", "decoder"):
      if group in cache:
        x_BxCxD, cache[group] = _full_stack(cfg, params[group]["stack"]["layers"], x_BxCxD,
                                            cache[group], lengths_R, opts)
  return x_BxCxD, DecodeState(cache=cache_lib.constrain(cache), lengths=lengths_B + counts_B)


def _features(model: Model, params: Params, state: DecodeState, x_BxCxD: Array,
              positions_BxC: Array, *, opts: Options) -> Array:
  """The final features [B, C, D] (``Model.features``): the cross-decoder (yoco/yocou; T times
  for the upper loop over its one K/V, the last iteration for the upper loop without shared KV)
  and ParScale's aggregation of the streams."""
  cfg = model.cfg
  if cfg.is_decoder_decoder:
    for _ in range(cfg.cross_iterations - (cfg.global_kv_iterations - 1)):
      x_BxCxD = cross_decode(params, cfg, state.cache["global_kv"][-1], x_BxCxD, positions_BxC,
                             opts)
  if cfg.arch == "parscale":
    x_BxCxD = model.apply({"params": params}, x_BxCxD, method=Model.aggregate_streams)
  return x_BxCxD


def _head(params: Params, state: DecodeState, x_BxCxD: Array, positions_BxC: Array, *,
          cfg: ModelConfig, opts: Options) -> Array:
  """The final features and the output head: float32 logits [B, C, V]."""
  model = Model(cfg)
  x_BxCxD = _features(model, params, state, x_BxCxD, positions_BxC, opts=opts)
  return model.apply({"params": params}, x_BxCxD, method=Model.logits)


def prefill_chunk(params: Params, state: DecodeState, last_x_BxD: Array, tokens_BxC: Array,
                  counts_B: Array, *, cfg: ModelConfig, opts: Options):
  """One prefill chunk; keeps the hidden state of each sequence's latest real token."""
  x_BxCxD, state = forward_chunk(params, state, tokens_BxC, counts_B, cfg=cfg, opts=opts)
  (counts_B,) = parscale_lib.replicate_streams(cfg.streams, counts_B)  # Rows of every stream.
  latest_BxD = jnp.take_along_axis(x_BxCxD, jnp.maximum(counts_B - 1, 0)[:, None, None], 1)[:, 0]
  return state, jnp.where((counts_B > 0)[:, None], latest_BxD, last_x_BxD)


def prefill_logits(params: Params, state: DecodeState, last_x_BxD: Array, *, cfg: ModelConfig,
                   opts: Options) -> Array:
  """Logits [B, V] at each prompt's last token; yoco/yocou run the cross-decoder there only."""
  positions_Bx1 = (state.lengths - 1)[:, None]
  return _head(params, state, last_x_BxD[:, None], positions_Bx1, cfg=cfg, opts=opts)[:, 0]


def chunk_features(params: Params, state: DecodeState, tokens_BxC: Array, counts_B: Array, *,
                   cfg: ModelConfig, opts: Options) -> tuple[Array, DecodeState]:
  """A prefill chunk that also returns the final features [B, C, D] at every fed position.

  Positions past ``counts_B`` hold padding. yoco/yocou run the cross-decoder on the whole chunk
  (no early exit), over the global K/V written up to each position. Scoring turns them into
  log-probabilities without materialising the logits (``loss.token_logprobs``).
  """
  positions_BxC = _positions(state.lengths, tokens_BxC.shape[1])
  x_BxCxD, state = forward_chunk(params, state, tokens_BxC, counts_B, cfg=cfg, opts=opts)
  return _features(Model(cfg), params, state, x_BxCxD, positions_BxC, opts=opts), state


def decode_step(params: Params, state: DecodeState, tokens_B: Array, *, cfg: ModelConfig,
                opts: Options) -> tuple[Array, DecodeState]:
  """Feeds one token per sequence; returns its logits [B, V] and the advanced state."""
  positions_Bx1 = state.lengths[:, None]
  x_Bx1xD, state = forward_chunk(params, state, tokens_B[:, None], jnp.ones_like(state.lengths),
                                 cfg=cfg, opts=opts)
  return _head(params, state, x_Bx1xD, positions_Bx1, cfg=cfg, opts=opts)[:, 0], state


def decode_and_sample(params: Params, state: DecodeState, tokens_B: Array, rng: Array, *,
                      cfg: ModelConfig, opts: Options,
                      sampling: sampling_lib.SamplingConfig) -> tuple[Array, DecodeState]:
  """A decode step whose output is the next token of every sequence."""
  logits_BxV, state = decode_step(params, state, tokens_B, cfg=cfg, opts=opts)
  return sampling_lib.sample(logits_BxV, rng, sampling), state


# --- jitted engine ----------------------------------------------------------------------------

_STATIC = ("cfg", "opts")
_jit_prefill_chunk = jax.jit(prefill_chunk, static_argnames=_STATIC, donate_argnums=(1, 2))
_jit_prefill_logits = jax.jit(prefill_logits, static_argnames=_STATIC)
_jit_decode_step = jax.jit(decode_step, static_argnames=_STATIC, donate_argnums=(1,))
_jit_decode_and_sample = jax.jit(decode_and_sample, static_argnames=(*_STATIC, "sampling"),
                                 donate_argnums=(1,))


@dataclasses.dataclass
class Generation:
  """Continuations (stop token included when one ended it) and timings."""

  tokens: list[list[int]]
  prefill_seconds: float
  decode_seconds: float
  prompt_tokens: int
  decode_steps: int
  cache_bytes: int  # Live K/V arrays.
  max_len: int  # Tokens the cache was allocated for, per sequence.

  @property
  def prefill_tokens_per_sec(self) -> float:
    return self.prompt_tokens / max(self.prefill_seconds, 1e-9)

  @property
  def decode_tokens_per_sec(self) -> float:
    return self.decode_steps * len(self.tokens) / max(self.decode_seconds, 1e-9)


class Engine:
  """Jitted prefill and decode for one config (the cache state is donated to every step).

  With a ``mesh``, the cache is sharded by its logical names under ``rules`` (batch over the data
  axes, kv heads over 'tensor'); params should already be placed on that mesh.
  """

  def __init__(self, cfg: ModelConfig, opts: Options = Options(), *,
               mesh: Optional[jax.sharding.Mesh] = None, rules=sharding_lib.LOGICAL_AXIS_RULES):
    self.cfg, self.opts, self.mesh, self.rules = cfg, opts, mesh, rules
    static = dict(cfg=cfg, opts=opts)  # Engines of equal (cfg, opts) share compilations.
    self._chunk = functools.partial(_jit_prefill_chunk, **static)
    self._logits = functools.partial(_jit_prefill_logits, **static)
    self._decode = functools.partial(_jit_decode_step, **static)
    self._sample_step = functools.partial(_jit_decode_and_sample, **static)

  def scope(self) -> contextlib.AbstractContextManager:
    """The mesh and logical-axis rules every jitted call runs under (nothing without a mesh)."""
    if self.mesh is None:
      return contextlib.nullcontext()
    return sharding_lib.activate(self.mesh, self.rules)

  def state_shardings(self, batch: int, max_len: int) -> Optional[DecodeState]:
    if self.mesh is None:
      return None
    abstract = jax.eval_shape(lambda: init_state(self.cfg, batch, max_len))
    replicated = jax.sharding.NamedSharding(self.mesh, jax.P())
    return DecodeState(cache=cache_lib.shardings(abstract.cache, self.mesh, self.rules),
                       lengths=replicated)

  def init_state(self, batch: int, max_len: int) -> DecodeState:
    if self.mesh is not None and batch % cache_lib.batch_shards(self.mesh, self.rules):
      raise ValueError(f"batch={batch} is not a multiple of "
                       f"{cache_lib.batch_shards(self.mesh, self.rules)}, the number of ways the "
                       "mesh splits the batch (its data-parallel axes)")
    with self.scope():
      return self._init_fn(batch, max_len)()

  @functools.lru_cache(maxsize=8)
  def _init_fn(self, batch: int, max_len: int):
    return jax.jit(functools.partial(init_state, self.cfg, batch, max_len),
                   out_shardings=self.state_shardings(batch, max_len))

  def prefill(self, params: Params, prompts_BxP: Array, lengths_B: Array,
              max_len: int) -> tuple[Array, DecodeState]:
    """Right-padded prompts (lengths_B >= 1 real tokens each) -> (last-token logits, state)."""
    prompts_BxP = np.asarray(prompts_BxP, np.int32)
    lengths_B = np.asarray(lengths_B, np.int32)
    b, p = prompts_BxP.shape
    if lengths_B.min() < 1 or lengths_B.max() > min(p, max_len):
      raise ValueError(f"prompt lengths {lengths_B.tolist()} must be in [1, {min(p, max_len)}]")
    c = min(self.opts.chunk_size, p)
    padded = np.zeros((b, -(-p // c) * c), np.int32)
    padded[:, :p] = prompts_BxP
    state = self.init_state(b, max_len)
    with self.scope():
      last_x = jnp.zeros((self.cfg.streams * b, self.cfg.d_model), self.cfg.compute_dtype)
      for start in range(0, int(lengths_B.max()), c):
        counts = np.clip(lengths_B - start, 0, c).astype(np.int32)
        state, last_x = self._chunk(params, state, last_x, padded[:, start:start + c], counts)
      return self._logits(params, state, last_x), state

  def decode(self, params: Params, state: DecodeState, tokens_B: Array):
    """(logits [B, V], state) after feeding one token per sequence; ``state`` is donated."""
    with self.scope():
      return self._decode(params, state, np.asarray(tokens_B, np.int32))

  def generate(self, params: Params, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
               sampling: sampling_lib.SamplingConfig = sampling_lib.SamplingConfig(),
               rng: Optional[Array] = None, stop_tokens: Sequence[int] = (),
               max_len: Optional[int] = None) -> Generation:
    """Samples up to ``max_new_tokens`` per prompt; a sequence stops after a stop token."""
    rng = jax.random.key(0) if rng is None else rng
    lengths = np.array([len(p) for p in prompts], np.int32)
    prompts_BxP = np.zeros((len(prompts), lengths.max()), np.int32)
    for b, prompt in enumerate(prompts):
      prompts_BxP[b, :len(prompt)] = prompt
    max_len = max_len or int(lengths.max()) + max_new_tokens
    start = time.perf_counter()
    logits_BxV, state = self.prefill(params, prompts_BxP, lengths, max_len)
    rng, key = jax.random.split(rng)
    tokens_B = np.asarray(sampling_lib.sample(logits_BxV, key, sampling))
    prefill_s = time.perf_counter() - start
    outputs: list[list[int]] = [[] for _ in prompts]
    done = np.zeros(len(prompts), bool)
    stops = np.asarray(list(stop_tokens), np.int32)
    start, steps = time.perf_counter(), 0
    for i in range(max_new_tokens):
      for b in np.flatnonzero(~done):
        outputs[b].append(int(tokens_B[b]))
      done |= np.isin(tokens_B, stops)
      if done.all() or i == max_new_tokens - 1:
        break
      rng, key = jax.random.split(rng)
      with self.scope():
        next_B, state = self._sample_step(params, state, tokens_B, key, sampling=sampling)
      tokens_B, steps = np.asarray(next_B), steps + 1
    return Generation(tokens=outputs, prefill_seconds=prefill_s,
                      decode_seconds=time.perf_counter() - start,
                      prompt_tokens=int(lengths.sum()), decode_steps=steps,
                      cache_bytes=cache_lib.cache_bytes(state.cache), max_len=max_len)
