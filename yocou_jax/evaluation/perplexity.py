"""Perplexity of the last tokens of a document as the visible context before them grows.

Each document is tokenised as in training (``[bos] + text + [eos]``) and cut into consecutive
windows of ``max(prefix_lengths)`` tokens (at most ``windows_per_document`` per document;
shorter documents are skipped and counted). For a prefix length N the model reads the last N
tokens of every window and only the last ``target_len`` are scored, so the scored tokens are
the same at every N and the curve shows the effect of context alone: each scored token sees
between ``N - target_len`` and ``N - 1`` tokens before it. N may exceed the training length.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from yocou_jax.data import pipeline
from yocou_jax.data import tokenizers
from yocou_jax.evaluation import batched

DEFAULT_TARGET_LEN = 512


class PerplexityError(ValueError):
  """Settings that cannot give a curve; the message names the flag."""


@dataclasses.dataclass
class Windows:
  tokens: list[np.ndarray]  # One int32 window of max(prefix_lengths) tokens each.
  documents: int  # Documents that gave at least one window.
  skipped: int  # Documents shorter than one window.


@dataclasses.dataclass
class Row:
  prefix: int  # Tokens the model reads (the scored ones included).
  nll: float  # Mean negative log-likelihood of the scored tokens (nats/token).
  ppl: float  # exp(nll).
  documents: int
  windows: int
  tokens: int  # Scored tokens.


def make_windows(texts: Sequence[str], tokenizer: tokenizers.Tokenizer, length: int,
                 windows_per_document: int = 1, max_windows: int = 0) -> Windows:
  """Consecutive ``length``-token windows of each document, in document order."""
  windows, documents, skipped = [], 0, 0
  for text in texts:
    tokens = pipeline.tokenize_document(tokenizer, text)
    count = min(len(tokens) // length, windows_per_document)
    if count == 0:
      skipped += 1
      continue
    documents += 1
    windows += [tokens[i * length:(i + 1) * length] for i in range(count)]
    if max_windows and len(windows) >= max_windows:
      windows = windows[:max_windows]
      break
  return Windows(windows, documents, skipped)


def check_lengths(prefix_lengths: Sequence[int], target_len: int) -> None:
  if target_len < 1:
    raise PerplexityError(f"--target_len={target_len} must be >= 1")
  bad = [n for n in prefix_lengths if n <= target_len]
  if not prefix_lengths or bad:
    raise PerplexityError(f"--prefix_lengths={','.join(map(str, prefix_lengths))}: every prefix "
                          f"must be > --target_len={target_len} (the scored tokens need context)")


def last_tokens_perplexity(model: batched.BatchedModel, windows: Windows,
                           prefix_lengths: Sequence[int],
                           target_len: int = DEFAULT_TARGET_LEN) -> list[Row]:
  """One :class:`Row` per prefix length, over the same windows and scored tokens."""
  check_lengths(prefix_lengths, target_len)
  if not windows.tokens:
    raise PerplexityError(f"no document has {max(prefix_lengths)} tokens (the longest "
                          f"--prefix_lengths); {windows.skipped} shorter documents skipped")
  rows = []
  for n in prefix_lengths:
    requests = [batched.ScoreRequest(w[-n:], n - target_len) for w in windows.tokens]
    scores = model.score(requests, label=f"prefix {n}")
    nll = -sum(s.total for s in scores) / (len(scores) * target_len)
    rows.append(Row(prefix=n, nll=nll, ppl=math.exp(nll), documents=windows.documents,
                    windows=len(windows.tokens), tokens=len(scores) * target_len))
  return rows
