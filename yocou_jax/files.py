"""Writing a file or a directory whole or not at all: a reader never sees a half-written one."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import IO, Iterator


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w", **open_kwargs) -> Iterator[IO]:
  """Opens a temporary sibling of ``path``; renames it onto ``path`` only if the block succeeds.

  The parent directory is created. On an exception the temporary file is removed and ``path``
  keeps whatever it held before.
  """
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  if "b" not in mode:
    open_kwargs.setdefault("encoding", "utf-8")
  try:
    with os.fdopen(fd, mode, **open_kwargs) as f:
      yield f
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


@contextlib.contextmanager
def atomic_directory(path: str) -> Iterator[str]:
  """Yields a new temporary sibling of ``path`` to fill; renames it onto ``path`` only if the block
  succeeds, so ``path`` appears complete or not at all.

  A directory already at ``path`` is replaced. On an exception the temporary directory is
  removed; a process killed inside the block leaves only the hidden temporary
  (``.NAME.*.tmp``), which nothing reads.
  """
  parent, name = os.path.split(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=f".{name}.", suffix=".tmp")
  try:
    yield tmp
    if os.path.lexists(path):
      shutil.rmtree(path)
    os.rename(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def pyplot():
  """matplotlib.pyplot on the non-interactive Agg backend (imported on first use)."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  return plt


def save_figure(fig, path: str, dpi: int = 110) -> None:
  """Writes ``fig`` as a PNG at ``path`` whole (see :func:`atomic_write`) and closes it."""
  with atomic_write(path, "wb") as f:
    fig.savefig(f, format="png", dpi=dpi)
  pyplot().close(fig)
