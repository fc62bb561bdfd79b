"""Lists each checkpoint step of a run as intact or bad, with the reason.

  python -m experiments.check_checkpoints --workdir=runs/default [--json_out=/tmp/c.json]

Every step is checked from its files (commit markers, metadata, every item present, the array
store's manifest and data files) and, unless ``--noread_arrays``, by reading every array back
and comparing it with the shapes and dtypes its metadata promises (and checking it is finite).
The exit status is 0 when every step is intact, 1 when any is bad.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Sequence

from absl import app
from absl import flags
from absl import logging

from yocou_jax.train import checkpoint as checkpoint_lib
from yocou_jax.train import integrity

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory holding checkpoints/.")
_READ_ARRAYS = flags.DEFINE_bool("read_arrays", True, "Also read every array back.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Also write {step: reason or null} here.")


def check_workdir(workdir: str, read_arrays: bool = True) -> dict[int, str | None]:
  """{step: None if intact else the reason}, for every step directory of the run."""
  directory = os.path.join(workdir, checkpoint_lib.CHECKPOINT_DIR)
  if not os.path.isdir(directory):
    raise SystemExit(f"error: --workdir={workdir} holds no {checkpoint_lib.CHECKPOINT_DIR}/ "
                     "directory")
  steps = sorted(int(name) for name in os.listdir(directory) if name.isdigit())
  check = integrity.read_step if read_arrays else integrity.check_step
  return {step: check(os.path.join(directory, str(step))) for step in steps}


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # Keep Orbax's per-read INFO lines off the table.
  if not _WORKDIR.value:
    raise SystemExit("error: --workdir is required (a run directory holding checkpoints/)")
  report = check_workdir(_WORKDIR.value, _READ_ARRAYS.value)
  print(f"{'step':>10}  status  reason")
  for step, reason in report.items():
    print(f"{step:>10}  {'intact' if reason is None else 'BAD':6}  {reason or ''}")
  intact = [s for s, r in report.items() if r is None]
  print(f"{len(intact)} of {len(report)} steps intact; newest intact: "
        f"{intact[-1] if intact else None}")
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w") as f:
      json.dump({str(s): r for s, r in report.items()}, f, indent=2)
  sys.exit(0 if len(intact) == len(report) else 1)


if __name__ == "__main__":
  app.run(main)
