r"""Test-time depth: one trained looped model's validation loss at other loop counts T.

  python -m experiments.eval_depth --workdir=runs/loop_cpu/yocou_s1_T3_S300 \
      --num_iterations=1,2,3,4,6 --out=runs/eval_depth.png --json_out=runs/eval_depth.json

The run's own fixed validation batches are used, so the row at the trained T is the trainer's
final validation loss. Prints a table and writes a PNG of loss against T.
"""

from __future__ import annotations

import json
from typing import Sequence

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Training run directory.", required=True)
_ITERATIONS = flags.DEFINE_list("num_iterations", ["1", "2", "3", "4", "6"],
                                "Loop counts T to evaluate.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_OUT = flags.DEFINE_string("out", None, "PNG of loss against T (default: WORKDIR/eval_depth.png).")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Write the table here as JSON.")


def _plot(rows, path: str, title: str) -> None:
  from yocou_jax import files  # pylint: disable=g-import-not-at-top

  plt = files.pyplot()
  fig, ax = plt.subplots(figsize=(5, 3.5))
  ax.plot([r["num_iterations"] for r in rows], [r["eval_loss"] for r in rows], "o-")
  for r in rows:
    if r["trained"]:
      ax.plot([r["num_iterations"]], [r["eval_loss"]], "r*", markersize=12, label="trained T")
  ax.set_xlabel("loop count T at evaluation")
  ax.set_ylabel("validation loss")
  ax.set_title(title, fontsize=8)
  ax.grid(alpha=0.3)
  if any(r["trained"] for r in rows):
    ax.legend()
  fig.tight_layout()
  files.save_figure(fig, path)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import os  # pylint: disable=g-import-not-at-top

  from yocou_jax.export.exporter import ExportError  # pylint: disable=g-import-not-at-top
  from yocou_jax.scaling import depth  # pylint: disable=g-import-not-at-top

  try:
    iterations = [int(t) for t in _ITERATIONS.value]
  except ValueError:
    raise SystemExit(f"error: --num_iterations={','.join(_ITERATIONS.value)} must be positive "
                     "integers") from None
  if not iterations or min(iterations) < 1:
    raise SystemExit(f"error: --num_iterations={','.join(_ITERATIONS.value)} must be positive "
                     "integers")
  try:
    rows = depth.loss_at_depths(_WORKDIR.value, iterations, _STEP.value)
  except ExportError as e:
    raise SystemExit(f"error: {e}") from None
  print(f"{'T':>3}  {'validation loss':>15}")
  for r in rows:
    print(f"{r['num_iterations']:>3}  {r['eval_loss']:>15.4f}{'  (trained)' if r['trained'] else ''}")
  out = _OUT.value or os.path.join(_WORKDIR.value, "eval_depth.png")
  _plot(rows, out, os.path.basename(os.path.abspath(_WORKDIR.value)))
  print(f"plot: {out}")
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w", encoding="utf-8") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  app.run(main)
