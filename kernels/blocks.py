"""Block geometry shared by the attention kernels: which blocks a banded causal mask reaches.

The mask of every training kernel here is a band: query i sees key j iff ``0 <= i - j < W``
(``window=W``; ``window=None`` is plain causal, an unbounded band), intersected with equal
segment ids. Queries are cut into blocks of ``block_q`` rows, keys into blocks of ``block_kv``.

A query block ``i`` reaches the key blocks ``kv_lo(i) .. kv_hi(i)``; a key block ``j`` is reached
by the query blocks ``q_lo(j) .. q_hi(j)``. Both ranges are exact (every block pair in them has at
least one visible query-key pair, ignoring segments), so a kernel whose grid walks
``kv_lo(i) + s`` for ``s < kv_steps`` visits O(N * (W + block)) score entries, not O(N^2).
Steps past the end of a short range are clamped to the last block (no new DMA on TPU) and their
compute is skipped (``kv_visible`` / ``q_visible``).

The functions accept Python ints or numpy arrays (static planning) and traced int32 scalars
(index maps and kernel bodies); divisions are of non-negative values, so ``lax.div`` is exact.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Index = Union[int, np.ndarray, jax.Array]

# A finite "minus infinity": exp(MASK_VALUE - m) underflows to 0 for any real score m, and
# MASK_VALUE - MASK_VALUE = 0 stays finite (no NaN when a whole row of a block is masked).
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class FlashConfig:
  """Static settings of one flash-attention call (hashable: a custom_vjp non-diff argument)."""

  window: Optional[int] = None  # None: full causal.
  softcap: Optional[float] = None  # Logit soft-cap c: s -> c * tanh(s / c).
  block_q: int = 128  # Forward query block.
  block_kv: int = 128  # Forward key block.
  block_q_bwd: Optional[int] = None  # Backward blocks (default: the forward ones).
  block_kv_bwd: Optional[int] = None
  kernel: str = "tpu"  # "tpu" (Mosaic-style grid kernels) or "triton" (GPU loop kernels).
  interpret: Any = False  # False, True, or pltpu.InterpretParams(...).

  @property
  def backward_blocks(self) -> tuple[int, int]:
    return (self.block_q_bwd or self.block_q, self.block_kv_bwd or self.block_kv)


def _is_static(x) -> bool:
  return isinstance(x, (int, np.integer, np.ndarray))


def div(a: Index, b: int) -> Index:
  return a // b if _is_static(a) else lax.div(a, jnp.int32(b))


def _maximum(a: Index, b: Index) -> Index:
  return np.maximum(a, b) if _is_static(a) else jnp.maximum(a, b)


def _minimum(a: Index, b: Index) -> Index:
  return np.minimum(a, b) if _is_static(a) else jnp.minimum(a, b)


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class Band:
  """Blocked causal band of a square (self or cross) attention over ``length`` padded tokens."""

  length: int
  block_q: int
  block_kv: int
  window: Optional[int] = None

  def __post_init__(self):
    if self.length % self.block_q or self.length % self.block_kv:
      raise ValueError(f"length={self.length} is not a multiple of the blocks "
                       f"({self.block_q}, {self.block_kv}): pad it first")
    if self.window is not None and self.window <= 0:
      raise ValueError(f"window={self.window} must be positive")

  @property
  def num_q_blocks(self) -> int:
    return self.length // self.block_q

  @property
  def num_kv_blocks(self) -> int:
    return self.length // self.block_kv

  # Key blocks reached by query block i.
  def kv_lo(self, i: Index) -> Index:
    if self.window is None:
      return 0 * i
    return div(_maximum(i * self.block_q - (self.window - 1), 0), self.block_kv)

  def kv_hi(self, i: Index) -> Index:
    return div(i * self.block_q + self.block_q - 1, self.block_kv)

  @property
  def kv_steps(self) -> int:
    i = np.arange(self.num_q_blocks)
    return int(np.max(self.kv_hi(i) - self.kv_lo(i))) + 1

  def kv_block(self, i: Index, step: Index) -> Index:
    """The key block of grid step ``step`` of query block i (clamped to the last one)."""
    return _minimum(self.kv_lo(i) + step, self.kv_hi(i))

  def kv_visible(self, i: Index, step: Index) -> Index:
    return self.kv_lo(i) + step <= self.kv_hi(i)

  # Query blocks that reach key block j.
  def q_lo(self, j: Index) -> Index:
    return div(j * self.block_kv, self.block_q)

  def q_hi(self, j: Index) -> Index:
    if self.window is None:
      return 0 * j + (self.num_q_blocks - 1)
    last_q = j * self.block_kv + self.block_kv - 1 + self.window - 1
    return _minimum(div(last_q, self.block_q), self.num_q_blocks - 1)

  @property
  def q_steps(self) -> int:
    j = np.arange(self.num_kv_blocks)
    return int(np.max(self.q_hi(j) - self.q_lo(j))) + 1

  def q_block(self, j: Index, step: Index) -> Index:
    return _minimum(self.q_lo(j) + step, self.q_hi(j))

  def q_visible(self, j: Index, step: Index) -> Index:
    return self.q_lo(j) + step <= self.q_hi(j)

  # Fully visible blocks: every query of block i sees every key of block j (no band mask).
  def fully_visible(self, i: Index, j: Index) -> Index:
    below_diagonal = j * self.block_kv + self.block_kv - 1 <= i * self.block_q
    if self.window is None:
      return below_diagonal
    return below_diagonal & (i * self.block_q + self.block_q - 1 - j * self.block_kv < self.window)

  def kv_full_range(self, i: Index) -> tuple[Index, Index]:
    """[start, end) of the fully visible key blocks of query block i, inside kv_lo..kv_hi.

    The band's key blocks split into masked ``[kv_lo, start)``, unmasked ``[start, end)`` and
    masked ``[end, kv_hi]`` (the window edge, the interior, the diagonal).
    """
    lo, end = self.kv_lo(i), self.kv_hi(i) + 1
    first = lo
    if self.window is not None:
      first = _maximum(lo, div(_maximum(i * self.block_q + self.block_q - self.window, 0) +
                               self.block_kv - 1, self.block_kv))
    start = _minimum(first, end)
    return start, _maximum(_minimum(div(i * self.block_q + 1, self.block_kv), end), start)

  def q_full_range(self, j: Index) -> tuple[Index, Index]:
    """[start, end) of the query blocks that fully see key block j, inside q_lo..q_hi."""
    end = self.q_hi(j) + 1
    start = _minimum(div(j * self.block_kv + self.block_kv - 1 + self.block_q - 1, self.block_q),
                     end)
    last = end if self.window is None else _minimum(div(self.window + j * self.block_kv,
                                                        self.block_q), end)
    return start, _maximum(last, start)

  def visited_pairs(self) -> int:
    """Number of (query block, key block) pairs the kernels compute (for FLOP accounting)."""
    i = np.arange(self.num_q_blocks)
    return int(np.sum(self.kv_hi(i) - self.kv_lo(i) + 1))


def band_mask(q_start: Index, kv_start: Index, shape: tuple[int, int], window: Optional[int],
              transposed: bool = False) -> jax.Array:
  """Boolean [rows, cols] mask of a block: queries on rows (keys on rows if ``transposed``)."""
  rows = lax.broadcasted_iota(jnp.int32, shape, 0)
  cols = lax.broadcasted_iota(jnp.int32, shape, 1)
  q_pos, k_pos = (cols + q_start, rows + kv_start) if transposed else (rows + q_start,
                                                                       cols + kv_start)
  delta = q_pos - k_pos
  mask = delta >= 0
  if window is not None:
    mask &= delta < window
  return mask


def softcap_logits(s: jax.Array, softcap: Optional[float]) -> jax.Array:
  """``softcap * tanh(s / softcap)`` (identity without a cap)."""
  return s if softcap is None else softcap * jnp.tanh(s / softcap)


def softcap_grad(ds: jax.Array, capped: jax.Array, softcap: Optional[float]) -> jax.Array:
  """Chain rule through the cap: d/ds [c tanh(s/c)] = 1 - tanh^2 = 1 - (capped / c)^2."""
  if softcap is None:
    return ds
  t = capped / softcap
  return ds * (1.0 - t * t)


def fit_block(block: int, length: int, align: int) -> int:
  """The block actually used: at most ``block``, no larger than ``length`` rounded to ``align``."""
  if block <= 0:
    raise ValueError(f"block size {block} must be positive")
  return min(round_up(block, align), round_up(length, align))


def pad_axis(x: jax.Array, length: int, axis: int, value=0) -> jax.Array:
  pad = length - x.shape[axis]
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def padded_length(n: int, block_q: int, block_kv: int) -> int:
  return round_up(n, math.lcm(block_q, block_kv))


def pad_segments(q_segment_ids_BxN, kv_segment_ids_BxN, length: int):
  """Int32 segment ids padded to ``length`` (keys default to the query ids).

  The pad value is irrelevant: padded keys come after every real query, so causality hides
  them, and padded query rows are sliced off.
  """
  if q_segment_ids_BxN is None:
    if kv_segment_ids_BxN is not None:
      raise ValueError("kv_segment_ids needs segment_ids for the queries")
    return None, None
  q_seg = pad_axis(q_segment_ids_BxN.astype(jnp.int32), length, axis=1, value=-1)
  if kv_segment_ids_BxN is None:
    return q_seg, q_seg
  return q_seg, pad_axis(kv_segment_ids_BxN.astype(jnp.int32), length, axis=1, value=-1)
