r"""Angular distance between the residual stream after consecutive layer applications (Fig. 8).

  python -m experiments.analyze_representations --workdir=runs/loop_cpu/yocou_s1_T3_S300 \
      --out=runs/representations.png --json_out=runs/representations.json

Every self-decoder layer of every loop iteration, the self/cross boundary (where the global K/V
is produced) and every cross-decoder layer, averaged over the run's validation tokens.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Training run directory.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_ITERATIONS = flags.DEFINE_integer("num_iterations", 0, "Evaluate at this T (0: the trained T).")
_OUT = flags.DEFINE_string("out", None, "PNG (default: WORKDIR/representations.png).")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Write the distances here as JSON.")


def _plot(transitions, path: str, title: str) -> None:
  from yocou_jax import files  # pylint: disable=g-import-not-at-top

  plt = files.pyplot()
  fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(transitions)), 3.8))
  colors = {"self_decoder": "tab:blue", "cross_decoder": "tab:red", "decoder": "tab:green",
            "recursive": "tab:purple"}
  xs = range(1, len(transitions) + 1)
  ax.plot(xs, [t.distance for t in transitions], "-", color="gray", linewidth=0.8)
  for x, t in zip(xs, transitions):
    ax.plot([x], [t.distance], "o", color=colors.get(t.part, "black"))
  boundary = [i for i, t in enumerate(transitions) if t.part == "cross_decoder"]
  if boundary:
    ax.axvline(boundary[0] + 0.5, color="tab:red", linestyle=":", label="global K/V")
    ax.legend()
  ax.set_xticks(list(xs))
  ax.set_xticklabels([t.label for t in transitions], rotation=75, fontsize=7)
  ax.set_ylabel("angular distance / pi")
  ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  files.save_figure(fig, path)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from yocou_jax.export.exporter import ExportError  # pylint: disable=g-import-not-at-top
  from yocou_jax.scaling import depth  # pylint: disable=g-import-not-at-top

  if _ITERATIONS.value < 0:
    raise SystemExit(f"error: --num_iterations={_ITERATIONS.value} must be >= 0")
  try:
    model_cfg, transitions = depth.representation_analysis(_WORKDIR.value, _STEP.value,
                                                           _ITERATIONS.value)
  except ExportError as e:
    raise SystemExit(f"error: {e}") from None
  print(f"{model_cfg.arch}, T={model_cfg.iterations}: {len(transitions)} layer applications")
  for i, t in enumerate(transitions, 1):
    print(f"{i:>3}  {t.label:<24} {t.distance:.4f}")
  out = _OUT.value or os.path.join(_WORKDIR.value, "representations.png")
  _plot(transitions, out, f"{os.path.basename(os.path.abspath(_WORKDIR.value))} "
        f"({model_cfg.arch}, T={model_cfg.iterations})")
  print(f"plot: {out}")
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w", encoding="utf-8") as f:
      json.dump([dataclasses.asdict(t) for t in transitions], f, indent=1)


if __name__ == "__main__":
  app.run(main)
