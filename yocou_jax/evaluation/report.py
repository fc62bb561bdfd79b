"""Progress with ETA, text tables, JSON and PNG output for the evaluation binaries."""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Sequence

from yocou_jax import files


class Progress:
  """A one-line console display: ``label done/total unit, elapsed, ETA``."""

  def __init__(self, total: int, label: str, unit: str = "batches", enabled: bool = True,
               stream=sys.stderr):
    self.total, self.label, self.unit = total, label, unit
    self.enabled, self.stream = enabled and total > 0, stream
    self.done, self.start = 0, time.perf_counter()

  def update(self, n: int = 1) -> None:
    self.done += n
    if not self.enabled:
      return
    elapsed = time.perf_counter() - self.start
    eta = (self.total - self.done) * elapsed / max(self.done, 1)
    self.stream.write(f"\r{self.label}: {self.done}/{self.total} {self.unit}, "
                      f"{format_seconds(elapsed)} elapsed, ETA {format_seconds(eta)}   ")
    if self.done >= self.total:
      self.stream.write("\n")
    self.stream.flush()


def format_seconds(seconds: float) -> str:
  s = int(seconds)
  return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A fixed-width text table; floats with 4 significant decimals."""
  cells = [[f"{v:.4f}" if isinstance(v, float) else str(v) for v in row] for row in rows]
  widths = [max(len(str(h)), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
  lines = ["  ".join(str(h).rjust(w) for h, w in zip(header, widths)),
           "  ".join("-" * w for w in widths)]
  lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
  return "\n".join(lines)


def write_json(path: str, value: Any) -> None:
  """Writes through a temporary sibling and a rename: a partial file never takes the name."""
  with files.atomic_write(path) as f:
    json.dump(value, f, indent=2, default=str)  # Numpy scalars and the like as text.
    f.write("\n")
