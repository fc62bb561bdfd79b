"""Evaluation points of training runs: collected from sweep directories, or read from a CSV.

A point is one validation evaluation of one run, a row with at least the columns of
:data:`COLUMNS` (``loss`` is the validation loss in nats/token, ``flops`` the cumulative analytic
training FLOPs, ``tokens`` the cumulative training tokens). Other frameworks' runs or points
digitised from a paper's figure go through the same CSV layout, so every fit and comparison of
:mod:`yocou_jax.scaling.analysis` works without this project's runs.
"""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Iterable, Sequence

from yocou_jax import files
from yocou_jax.config import ConfigError
from yocou_jax.scaling import sweeps
from yocou_jax.train import metrics as metrics_lib

COLUMNS = ("run", "arch", "num_iterations", "params", "non_embedding_params", "step", "tokens",
           "flops", "loss")
EXTRA_COLUMNS = ("final", "steps", "steps_decided_by", "learning_rate")
_INTEGER = ("num_iterations", "params", "non_embedding_params", "step", "steps")
_FLOAT = ("tokens", "flops", "loss", "learning_rate")


def collect_sweep(sweep_dir: str) -> list[dict]:
  """One row per validation evaluation of every point of ``sweep_dir/sweep.json``.

  A run's metrics.jsonl may repeat steps after a resume; the last record of a step wins. Points
  without metrics yet are left out; ``final`` marks a run's evaluation at its last planned step.
  """
  path = os.path.join(sweep_dir, sweeps.SWEEP_JSON)
  if not os.path.exists(path):
    raise ConfigError(f"--sweep_dir={sweep_dir} holds no {sweeps.SWEEP_JSON} (not a sweep "
                      "directory; run experiments.sweep first, or pass --csv)")
  with open(path, encoding="utf-8") as f:
    definition = json.load(f)
  rows = []
  for point in definition["points"]:
    plan = point["plan"]
    by_step = {}
    for record in metrics_lib.read_metrics(os.path.join(sweep_dir, point["name"])):
      if "eval_loss" in record:
        by_step[record["step"]] = record
    for step, record in sorted(by_step.items()):
      rows.append({
          "run": point["name"], "arch": plan["arch"], "num_iterations": plan["num_iterations"],
          "params": plan["params"], "non_embedding_params": plan["non_embedding_params"],
          "step": step, "tokens": float(record["cumulative_tokens"]),
          "flops": float(record["cumulative_train_flops"]), "loss": float(record["eval_loss"]),
          "final": step == plan["steps"], "steps": plan["steps"],
          "steps_decided_by": plan["steps_decided_by"],
          "learning_rate": plan["learning_rate"]})
  return rows


def write_csv(rows: Sequence[dict], path: str) -> None:
  columns = list(COLUMNS) + [c for c in EXTRA_COLUMNS if any(c in r for r in rows)]
  with files.atomic_write(path, newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)


def _parse(column: str, value: str, line: int, path: str):
  try:
    if column in _INTEGER:
      return int(float(value))
    if column in _FLOAT:
      return float(value)
    if column == "final":
      return value.strip().lower() in ("1", "true", "yes")
    return value
  except ValueError:
    raise ConfigError(f"{path} line {line}: column {column!r} has {value!r}, not a number") \
        from None


def read_csv(path: str) -> list[dict]:
  """Rows of a points CSV (columns :data:`COLUMNS`, extras optional); ``final`` defaults to
  each run's last step."""
  if not os.path.exists(path):
    raise ConfigError(f"--csv={path} does not exist")
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f)
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
      raise ConfigError(f"--csv={path} lacks the columns {missing}; required: {list(COLUMNS)}")
    rows = [{k: _parse(k, v, i + 2, path) for k, v in row.items() if v not in (None, "")}
            for i, row in enumerate(reader)]
  bad = [r for r in rows if not (r["loss"] > 0 and math.isfinite(r["loss"]))]
  if bad:
    raise ConfigError(f"--csv={path}: run {bad[0]['run']!r} step {bad[0]['step']} has loss "
                      f"{bad[0]['loss']}; losses must be positive and finite")
  if rows and "final" not in rows[0]:
    last = {}
    for r in rows:
      last[r["run"]] = max(last.get(r["run"], r["step"]), r["step"])
    for r in rows:
      r["final"] = r["step"] == last[r["run"]]
  return rows


def runs(rows: Iterable[dict]) -> dict[str, list[dict]]:
  """{run: its rows sorted by step}."""
  out: dict[str, list[dict]] = {}
  for r in rows:
    out.setdefault(r["run"], []).append(r)
  return {k: sorted(v, key=lambda r: r["step"]) for k, v in out.items()}


def final_rows(rows: Iterable[dict]) -> list[dict]:
  """Each run's final evaluation (runs that have not finished are left out)."""
  return [r for r in rows if r.get("final")]
