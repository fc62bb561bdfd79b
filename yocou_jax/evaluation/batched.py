"""Fixed-shape batches over the cached inference engine: log-likelihoods and generation.

Every evaluation reduces to two kinds of request:

* score: the log-probability of ``tokens[first_scored:]``, each token given all tokens before it
  (teacher forcing), and whether each is the argmax (lm-eval's ``is_greedy``);
* generate: a continuation of a prompt, token by token, until a stop token, a stop condition or
  ``max_new_tokens``.

:class:`BatchedModel` sorts requests by length, pads each to the next *bucket* length (powers of
two up to the longest request) and each batch to a power-of-two row count within a token
budget, so a whole evaluation compiles a few programs per bucket rather than one per request.
Scoring feeds the rows through the engine in chunks (bounded memory at any length): chunks
before the first scored position run without the output head (the engine's early exit for
yoco/yocou), the others through :func:`engine.chunk_features` and the training loss's fused
head (:func:`loss.token_logprobs`: float32, without materialising the logits).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from yocou_jax import loss as loss_lib
from yocou_jax.config import ModelConfig
from yocou_jax.evaluation import report
from yocou_jax.inference import engine as engine_lib
from yocou_jax.inference import sampling as sampling_lib
from yocou_jax.model import Model

Array = jax.Array
MIN_BUCKET = 64


@dataclasses.dataclass(frozen=True)
class ScoreRequest:
  tokens: Sequence[int]  # The whole sequence.
  first_scored: int  # tokens[first_scored:] are scored; >= 1 (the first token has no context).


@dataclasses.dataclass
class Score:
  logprobs: np.ndarray  # float32 log-probability of each scored token.
  greedy: bool  # Every scored token is the model's argmax.

  @property
  def total(self) -> float:
    return float(np.sum(self.logprobs, dtype=np.float64))


def _score_chunk(params, state, tokens_BxC, counts_B, targets_BxC, *, cfg, opts):
  x_BxCxD, state = engine_lib.chunk_features(params, state, tokens_BxC, counts_B, cfg=cfg,
                                             opts=opts)
  h_BxCxD, w_DxV = Model(cfg).apply({"params": params}, x_BxCxD, method=Model.head)
  # The training loss's fused head: float32 log-probabilities, [B, C, V] never materialised.
  logp_BxC, hit_BxC = loss_lib.token_logprobs(h_BxCxD, w_DxV, targets_BxC,
                                              max(cfg.loss_chunk_size, 0))
  return logp_BxC, hit_BxC, state


def _feed_chunk(params, state, tokens_BxC, counts_B, *, cfg, opts):
  return engine_lib.forward_chunk(params, state, tokens_BxC, counts_B, cfg=cfg, opts=opts)[1]


_STATIC = ("cfg", "opts")
_jit_score_chunk = jax.jit(_score_chunk, static_argnames=_STATIC, donate_argnums=(1,))
_jit_feed_chunk = jax.jit(_feed_chunk, static_argnames=_STATIC, donate_argnums=(1,))


def bucket_length(n: int, multiple: int, smallest: int = MIN_BUCKET) -> int:
  """The power of two >= max(n, smallest), rounded up to a multiple of ``multiple``."""
  b = max(smallest, 1 << max(n - 1, 0).bit_length())
  return -(-b // multiple) * multiple


def _pow2_at_most(n: int) -> int:
  return 1 << (max(n, 1).bit_length() - 1)


class BatchedModel:
  """A model (config + params) answering score and generate requests in fixed-shape batches."""

  def __init__(self, cfg: ModelConfig, params: Any, *, chunk_size: int = 512,
               token_budget: int = 32768, max_rows: int = 64, show_progress: bool = True):
    """
    Args:
      cfg: the model (``num_iterations`` as it should run).
      params: its parameter tree (on device).
      chunk_size: tokens per sequence fed per engine call (bounds activation memory).
      token_budget: rows x bucket length per batch, at most.
      max_rows: rows per batch, at most.
      show_progress: print progress with an ETA to stderr.
    """
    self.cfg, self.params = cfg, params
    self.chunk_size, self.token_budget, self.max_rows = chunk_size, token_budget, max_rows
    self.show_progress = show_progress
    self.programs: set[tuple] = set()  # (kind, rows, length, chunk, ...): shapes run so far.

  @functools.lru_cache(maxsize=16)
  def engine(self, chunk: int) -> engine_lib.Engine:
    return engine_lib.Engine(self.cfg, engine_lib.Options(chunk_size=chunk))

  def _rows(self, length: int, pending: int) -> int:
    """Rows of a batch of ``length``-token buckets: a power of two, within the budget."""
    return min(_pow2_at_most(max(self.token_budget // length, 1)), _pow2_at_most(self.max_rows),
               1 << max(pending - 1, 0).bit_length())

  def _batches(self, lengths: Sequence[int], multiple: int):
    """(bucket length, request indices) per batch: longest first, each bucket in row groups."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, start = [], 0
    while start < len(order):
      bucket = bucket_length(lengths[order[start]], multiple)
      same = [i for i in order[start:] if bucket_length(lengths[i], multiple) == bucket]
      rows = self._rows(bucket, len(same))
      batches.append((bucket, same[:rows], rows))
      start += min(rows, len(same))
    return batches

  # --- scoring ---------------------------------------------------------------------------------

  def score(self, requests: Sequence[ScoreRequest], label: str = "scoring") -> list[Score]:
    """One :class:`Score` per request, in request order."""
    for r in requests:
      if not 1 <= r.first_scored < len(r.tokens):
        raise ValueError(f"first_scored={r.first_scored} must be in [1, {len(r.tokens)}) for a "
                         f"request of {len(r.tokens)} tokens")
    inputs = [len(r.tokens) - 1 for r in requests]
    chunk = min(self.chunk_size, bucket_length(max(inputs), 1)) if requests else 1
    batches = self._batches(inputs, chunk)
    total = sum(-(-max(inputs[i] for i in indices) // min(chunk, length))
                for length, indices, _ in batches)
    progress = report.Progress(total, label, unit="chunks", enabled=self.show_progress)
    results: list[Optional[Score]] = [None] * len(requests)
    for length, indices, rows in batches:
      for i, score in zip(indices, self._score_batch([requests[i] for i in indices], length,
                                                     rows, min(chunk, length), progress)):
        results[i] = score
    return results

  def _score_batch(self, requests, length: int, rows: int, chunk: int,
                   progress: report.Progress) -> list[Score]:
    tokens_BxL = np.zeros((rows, length), np.int32)
    targets_BxL = np.zeros((rows, length), np.int32)
    lengths_B = np.zeros((rows,), np.int32)
    for b, r in enumerate(requests):
      seq = np.asarray(r.tokens, np.int32)
      tokens_BxL[b, :len(seq) - 1], targets_BxL[b, :len(seq) - 1] = seq[:-1], seq[1:]
      lengths_B[b] = len(seq) - 1
    first_scored_pos = min(r.first_scored - 1 for r in requests)
    engine = self.engine(chunk)
    state = engine.init_state(rows, length)
    logp_BxL = np.zeros((rows, length), np.float32)
    hit_BxL = np.zeros((rows, length), bool)
    with engine.scope():
      for start in range(0, int(lengths_B.max()), chunk):
        counts_B = np.clip(lengths_B - start, 0, chunk).astype(np.int32)
        cols = slice(start, start + chunk)
        static = dict(cfg=engine.cfg, opts=engine.opts)
        if start + chunk <= first_scored_pos:  # No scored position in this chunk: no head.
          self.programs.add(("feed", rows, length, chunk))
          state = _jit_feed_chunk(self.params, state, tokens_BxL[:, cols], counts_B, **static)
        else:
          self.programs.add(("score", rows, length, chunk))
          logp, hit, state = _jit_score_chunk(self.params, state, tokens_BxL[:, cols], counts_B,
                                              targets_BxL[:, cols], **static)
          logp_BxL[:, cols], hit_BxL[:, cols] = np.asarray(logp), np.asarray(hit)
        jax.block_until_ready(state)
        progress.update()
    scores = []
    for b, r in enumerate(requests):
      scored = slice(r.first_scored - 1, lengths_B[b])
      scores.append(Score(logp_BxL[b, scored].copy(), bool(hit_BxL[b, scored].all())))
    return scores

  # --- generation ------------------------------------------------------------------------------

  def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
               stop_tokens: Sequence[int] = (),
               stop_when: Optional[Callable[[int, list[int]], bool]] = None,
               sampling: sampling_lib.SamplingConfig = sampling_lib.SamplingConfig(),
               seed: int = 0, label: str = "generating") -> list[list[int]]:
    """Continuations (a stop token included when one ended it), in prompt order.

    ``stop_when(i, tokens)`` is asked after every new token of prompt ``i``; True ends it.
    """
    if any(len(p) < 1 for p in prompts):
      raise ValueError("every prompt needs at least one token")
    lengths = [len(p) for p in prompts]
    chunk = min(self.chunk_size, bucket_length(max(lengths), 1)) if prompts else 1
    batches = self._batches(lengths, chunk)
    progress = report.Progress(len(batches), label, enabled=self.show_progress)
    results: list[list[int]] = [[] for _ in prompts]
    rng = jax.random.key(seed)
    for length, indices, rows in batches:
      rng, key = jax.random.split(rng)
      outputs = self._generate_batch([prompts[i] for i in indices], indices, length, rows,
                                     min(chunk, length), max_new_tokens, stop_tokens, stop_when,
                                     sampling, key)
      for i, out in zip(indices, outputs):
        results[i] = out
      progress.update()
    return results

  def _generate_batch(self, prompts, indices, length, rows, chunk, max_new_tokens, stop_tokens,
                      stop_when, sampling, rng) -> list[list[int]]:
    prompts_BxP = np.zeros((rows, length), np.int32)
    lengths_B = np.ones((rows,), np.int32)  # Padding rows: one pad token.
    for b, p in enumerate(prompts):
      prompts_BxP[b, :len(p)], lengths_B[b] = p, len(p)
    engine = self.engine(chunk)
    self.programs.add(("generate", rows, length, chunk, max_new_tokens))
    logits_BxV, state = engine.prefill(self.params, prompts_BxP, lengths_B,
                                       length + max_new_tokens)
    outputs: list[list[int]] = [[] for _ in prompts]
    done = np.zeros(rows, bool)
    done[len(prompts):] = True
    stops = np.asarray(list(stop_tokens), np.int32)
    for step in range(max_new_tokens):
      rng, key = jax.random.split(rng)
      tokens_B = np.asarray(sampling_lib.sample(logits_BxV, key, sampling))
      for b in np.flatnonzero(~done):
        outputs[b].append(int(tokens_B[b]))
        if tokens_B[b] in stops or (stop_when is not None and stop_when(indices[b], outputs[b])):
          done[b] = True
      if done.all() or step == max_new_tokens - 1:
        break
      logits_BxV, state = engine.decode(self.params, state, tokens_B)
    return outputs
