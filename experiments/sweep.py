r"""Runs a sweep: a grid of ordinary ``experiments.train`` runs, one directory per point.

  python -m experiments.sweep --sweep=experiments/configs/sweeps/scaling_cpu.py \
      --workdir=runs/scaling_cpu [--list] [--print_commands] [--only=NAME,...] [--parallel=K]

Finished points are skipped and interrupted ones resume from their checkpoints; ``DIR/sweep.json``
records the definition, each point's plan (params, FLOPs, tokens, steps) and status.
``--print_commands`` prints one ``experiments.train`` command per point (run from the repository
root, e.g. one cluster job each). Analyse with ``python -m experiments.analyze_scaling``.
"""

from __future__ import annotations

import json
import sys
from typing import Sequence

from absl import app, flags

from yocou_jax.config import ConfigError
from yocou_jax.scaling import sweeps

_SWEEP = flags.DEFINE_string("sweep", None, "Sweep file defining get_sweep().", required=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory (one subdirectory per point).")
_LIST = flags.DEFINE_bool("list", False, "Print the points and their plans, run nothing.")
_PRINT_COMMANDS = flags.DEFINE_bool("print_commands", False,
                                    "Print one experiments.train command per point, run nothing.")
_ONLY = flags.DEFINE_list("only", [], "Run only these points (names as in --list).")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "Points run at once.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Write {point: plan or status} here as JSON.")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    sweep = sweeps.load_sweep(_SWEEP.value)
    points = sweeps.select(sweep, _ONLY.value)
    if _LIST.value:
      print(f"sweep {sweep.name}: {len(points)} points on {sweep.config}")
      print(sweeps.format_plan_table(sweep, points))
      result = {p.name: sweeps.plan_point(sweep, p) for p in points}
    elif _PRINT_COMMANDS.value:
      if not _WORKDIR.value:
        raise ConfigError("--print_commands needs --workdir (the points' parent directory)")
      for p in points:
        print(sweeps.format_command(sweeps.train_command(sweep, p, _WORKDIR.value)))
      result = {p.name: sweeps.train_command(sweep, p, _WORKDIR.value) for p in points}
    else:
      if not _WORKDIR.value:
        raise ConfigError("--workdir is required to run a sweep")
      runner = sweeps.Runner(sweep, _WORKDIR.value, python=sys.executable)
      result = runner.run(points, parallel=_PARALLEL.value)
      failed = {k: v for k, v in result.items() if v != "done"}
      print(f"sweep {sweep.name}: {len(result) - len(failed)}/{len(result)} points done"
            + (f"; not done: {failed}" if failed else ""))
  except ConfigError as e:
    raise SystemExit(f"error: {e}") from None
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)
  if not (_LIST.value or _PRINT_COMMANDS.value) and failed:
    raise SystemExit(1)


if __name__ == "__main__":
  app.run(main)
