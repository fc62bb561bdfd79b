r"""Fits scaling laws to a sweep's runs and reports the paper's comparisons, with figures.

  python -m experiments.analyze_scaling --sweep_dir=runs/scaling_cpu \
      --out=runs/scaling_cpu/analysis --json_out=runs/scaling_cpu/analysis/result.json

Writes ``OUT/points.csv`` (one row per validation evaluation: run, arch, num_iterations, params,
non_embedding_params, step, tokens, flops, loss, ...), ``OUT/report.md`` and PNGs
(loss vs FLOPs / tokens / parameters, and loss vs T for loop sweeps). ``--csv=PATH`` reads points
in that column layout from elsewhere (other frameworks, digitised figures) instead of a sweep.
See ``yocou_jax.scaling.analysis`` for the laws and comparisons.
"""

from __future__ import annotations

import json
from typing import Sequence

from absl import app, flags

from yocou_jax.config import ConfigError
from yocou_jax.scaling import points as points_lib
from yocou_jax.scaling import report

_SWEEP_DIR = flags.DEFINE_string("sweep_dir", None, "Sweep directory (holds sweep.json).")
_CSV = flags.DEFINE_string("csv", None, "Read points from this CSV instead of --sweep_dir.")
_OUT = flags.DEFINE_string("out", None, "Output directory.", required=True)
_COMPARE = flags.DEFINE_list("compare", [], "Pairs A:B to compare (default: yocou:yoco, "
                             "yocou:transformer where present).")
_POINTS = flags.DEFINE_enum("points", "frontier", ["frontier", "final"],
                            "Compute/token laws on the frontier of all evaluations, or on each "
                            "run's final point.")
_BOOTSTRAP = flags.DEFINE_integer("bootstrap", 100, "Bootstrap resamples of the runs.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Write the fits and comparisons here as JSON.")


def _pairs(specs: Sequence[str]):
  pairs = []
  for spec in specs:
    a, sep, b = spec.partition(":")
    if not (sep and a and b):
      raise ConfigError(f"--compare entry {spec!r} is invalid: expected ARCH_A:ARCH_B")
    pairs.append((a, b))
  return pairs or None


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    if bool(_SWEEP_DIR.value) == bool(_CSV.value):
      raise ConfigError("pass exactly one of --sweep_dir and --csv")
    rows = (points_lib.read_csv(_CSV.value) if _CSV.value
            else points_lib.collect_sweep(_SWEEP_DIR.value))
    result = report.analyze(rows, _OUT.value, pairs=_pairs(_COMPARE.value),
                            points=_POINTS.value, num_bootstrap=_BOOTSTRAP.value)
  except ConfigError as e:
    raise SystemExit(f"error: {e}") from None
  with open(result["report"], encoding="utf-8") as f:
    print(f.read())
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1, default=float)


if __name__ == "__main__":
  app.run(main)
