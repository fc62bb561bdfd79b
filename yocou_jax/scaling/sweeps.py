"""Sweeps: grids of ordinary training runs, one directory per point, skip / resume / refuse.

A sweep file (``experiments/configs/sweeps/NAME.py``) defines ``get_sweep() -> Sweep``: a base
config file and a list of :class:`Point` s, each a name and a flat dict of config overrides
(``{"model.arch": "yoco", "train.flops_budget": 3e11}``). A point is exactly the command line
``python -m experiments.train --config=BASE --config.KEY=VALUE ... --workdir=DIR/NAME``, so a
point run by the sweep runner, pasted into a shell or submitted to a cluster scheduler is the same
run. In ``DIR``:

* ``DIR/sweep.json``: the sweep definition, each point's resolved plan and status;
* ``DIR/NAME/``: the point's training workdir (checkpoints, metrics.jsonl, ...) plus
  ``point.json`` (its overrides and the hash of its resolved config) and, written last, ``DONE``.

A point with ``DONE`` is skipped; one without is (re)started and the trainer resumes from its
latest checkpoint. A point directory whose ``point.json`` hash differs from the current
definition is refused: its checkpoints belong to another config.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import itertools
import json
import os
import shlex
import subprocess
import sys
import time
from typing import Any, Iterable, Mapping, Optional, Sequence

import ml_collections

from yocou_jax import accounting
from yocou_jax import files
from yocou_jax.config import ConfigError, ModelConfig
from yocou_jax.train import budget as budget_lib
from yocou_jax.train import metrics as metrics_lib

SWEEP_JSON = "sweep.json"
POINT_JSON = "point.json"
DONE = "DONE"
TRAIN_MODULE = "experiments.train"


@dataclasses.dataclass(frozen=True)
class Point:
  """One run of a sweep: a directory name and flat ``section.field`` config overrides."""

  name: str
  overrides: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Sweep:
  """A base config file (``path[:arg]``, relative to the repository root) and its points."""

  name: str
  config: str
  points: Sequence[Point]
  description: str = ""


def grid(*, archs: Iterable[str], rungs: Mapping[str, Mapping[str, Any]],
         budgets: Optional[Mapping[str, Mapping[str, Any]]] = None,
         iterations: Iterable[int] = (3,),
         common: Optional[Mapping[str, Any]] = None,
         per_point: Any = None, seeds: Iterable[int] = (0,)) -> list[Point]:
  """Points arch x rung x T x budget x seed, named ``{arch}_{rung}[_T{T}]_{budget}[_s{seed}]``.

  Args:
    archs: model.arch values.
    rungs: {rung name: overrides} (model dims).
    budgets: {budget name: overrides}, e.g. ``{"C1e12": {"train.flops_budget": 1e12}}`` or
      ``{"D3e5": {"train.tokens_budget": 3e5}}``; None: one budget, ``train.steps``.
    iterations: model.num_iterations values (named only for looped archs; T is irrelevant to
      transformer and yoco, so they get one point).
    common: overrides shared by every point (applied first).
    per_point: optional ``fn(arch, rung, T) -> overrides`` (e.g. a tuned learning rate).
    seeds: ``seed`` values (the name gets ``_s{seed}`` when there are several).
  """
  seeds = tuple(seeds)
  budgets = budgets or {"": {}}
  points, seen = [], set()
  for arch, (rung, rung_overrides), t, (budget, budget_overrides), seed in itertools.product(
      archs, rungs.items(), tuple(iterations), budgets.items(), seeds):
    looped = arch in ("yocou", "rins", "looped", "yoco_upper_loop", "yoco_upper_loop_nokv")
    t = t if looped else 1
    name = "_".join(p for p in (arch, rung, f"T{t}" if looped else "", budget,
                                f"s{seed}" if len(seeds) > 1 else "") if p)
    if name in seen:
      continue
    seen.add(name)
    overrides = {**(common or {}), "model.arch": arch, **rung_overrides, **budget_overrides,
                 "seed": seed}
    if looped:
      overrides["model.num_iterations"] = t
    if per_point is not None:
      overrides.update(per_point(arch, rung, t))
    points.append(Point(name, overrides))
  return points


# --- loading ----------------------------------------------------------------------------------

def _load_module(path: str, name: str):
  if not os.path.exists(path):
    raise ConfigError(f"file {path!r} does not exist")
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_sweep(path: str) -> Sweep:
  """The ``Sweep`` of a sweep file (its ``get_sweep()``); names are checked to be unique."""
  sweep = _load_module(path, "sweep_definition").get_sweep()
  names = [p.name for p in sweep.points]
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise ConfigError(f"sweep {sweep.name!r} has duplicate point names: {duplicates}")
  return sweep


def base_config(spec: str) -> ml_collections.ConfigDict:
  """The ConfigDict of ``path[:arg]``, as ``--config=path[:arg]`` would load it."""
  path, _, arg = spec.partition(":")
  module = _load_module(path, "sweep_base_config")
  return module.get_config(arg) if arg else module.get_config()


def point_config(sweep: Sweep, point: Point) -> ml_collections.ConfigDict:
  """The base config with the point's overrides applied (unknown fields are an error)."""
  config = base_config(sweep.config)
  for key, value in point.overrides.items():
    *sections, field = key.split(".")
    node = config
    for section in sections:
      if section not in node:
        raise ConfigError(f"sweep point {point.name!r}: unknown config field {key!r}")
      node = node[section]
    if field not in node:
      raise ConfigError(f"sweep point {point.name!r}: unknown config field {key!r}")
    node[field] = value
  return config


def config_hash(config: ml_collections.ConfigDict) -> str:
  text = json.dumps(config.to_dict(), sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def plan_point(sweep: Sweep, point: Point) -> dict[str, Any]:
  """Params, FLOPs, tokens and steps of a point, from the analytic accounting (no compile)."""
  config = point_config(sweep, point)
  model_cfg = ModelConfig.from_config(config.model)
  budget = budget_lib.resolve_steps(config, model_cfg)
  counts = accounting.param_counts(model_cfg)
  embedding = counts.get("embedding", 0) + counts.get("lm_head", 0)
  return {"arch": model_cfg.arch, "num_iterations": model_cfg.iterations,
          "params": counts["total"], "non_embedding_params": counts["total"] - embedding,
          "steps": budget.steps, "steps_decided_by": budget.decided_by,
          "tokens": budget.tokens, "flops": budget.flops,
          "learning_rate": float(config.train.learning_rate), "hash": config_hash(config)}


# --- commands ---------------------------------------------------------------------------------

def _flag_value(value: Any) -> str:
  if isinstance(value, float):
    return repr(value)
  return str(value)


def train_command(sweep: Sweep, point: Point, workdir: str,
                  python: str = "python") -> list[str]:
  """The ``experiments.train`` command line of ``point`` (run from the repository root)."""
  args = [python, "-m", TRAIN_MODULE, f"--config={sweep.config}"]
  args += [f"--config.{k}={_flag_value(v)}" for k, v in point.overrides.items()]
  args += [f"--workdir={os.path.join(os.path.abspath(workdir), point.name)}",
           "--sample_tokens=0", "--config.logging.progress=False"]
  return args


def format_command(args: Sequence[str]) -> str:
  return " ".join(shlex.quote(a) for a in args)


# --- state ------------------------------------------------------------------------------------

def _write_json(path: str, payload: Any) -> None:
  """Atomically: a reader never sees a half-written file."""
  with files.atomic_write(path) as f:
    json.dump(payload, f, indent=1, sort_keys=True)


def _mark_done(point_dir: str, note: str) -> None:
  with open(os.path.join(point_dir, DONE), "w", encoding="utf-8") as f:
    f.write(note + "\n")


def point_status(workdir: str, point: Point, expected_hash: str) -> str:
  """'done', 'interrupted' (a directory without DONE) or 'pending'; refuses a hash mismatch."""
  point_dir = os.path.join(workdir, point.name)
  meta_path = os.path.join(point_dir, POINT_JSON)
  if os.path.exists(meta_path):
    with open(meta_path, encoding="utf-8") as f:
      recorded = json.load(f)["hash"]
    if recorded != expected_hash:
      raise ConfigError(
          f"point {point.name!r} in {point_dir} was made by another config (hash {recorded}, "
          f"the sweep now gives {expected_hash}); remove that directory or use a new --workdir")
  if os.path.exists(os.path.join(point_dir, DONE)):
    return "done"
  return "interrupted" if os.path.exists(meta_path) else "pending"


def finished(point_dir: str, steps: int) -> bool:
  """The run logged its last step and committed its final checkpoint (Orbax renames a step's
  directory into place only once it is complete)."""
  return (last_step(point_dir) == steps
          and os.path.isdir(os.path.join(point_dir, "checkpoints", str(steps))))


def last_step(point_dir: str) -> int:
  """The last step logged in ``point_dir/metrics.jsonl`` (0 if none)."""
  return max((r["step"] for r in metrics_lib.read_metrics(point_dir)), default=0)


def select(sweep: Sweep, only: Optional[Sequence[str]]) -> list[Point]:
  if not only:
    return list(sweep.points)
  names = {p.name for p in sweep.points}
  unknown = [n for n in only if n not in names]
  if unknown:
    raise ConfigError(f"--only names unknown points {unknown}; allowed: {sorted(names)}")
  return [p for p in sweep.points if p.name in only]


class Runner:
  """Runs the points of a sweep in ``workdir`` as child processes, K at a time."""

  def __init__(self, sweep: Sweep, workdir: str, *, python: str = sys.executable,
               repo_root: Optional[str] = None, log=None,
               env: Optional[Mapping[str, str]] = None):
    self.sweep = sweep
    self.workdir = os.path.abspath(workdir)
    self.python = python
    self.repo_root = repo_root or os.getcwd()
    self.log = log or (lambda line: print(line, flush=True))
    self.env = dict(os.environ if env is None else env)
    self.plans = {p.name: plan_point(sweep, p) for p in sweep.points}
    self.status: dict[str, str] = {}
    self._selected: set[str] = set()

  def _save_sweep_json(self) -> None:
    for p in self.sweep.points:  # Points this invocation does not run: their state on disk.
      if p.name not in self._selected:
        try:
          self.status[p.name] = point_status(self.workdir, p, self.plans[p.name]["hash"])
        except ConfigError:
          self.status[p.name] = "made by another config"
    _write_json(os.path.join(self.workdir, SWEEP_JSON), {
        "name": self.sweep.name, "config": self.sweep.config,
        "description": self.sweep.description,
        "points": [{"name": p.name, "overrides": dict(p.overrides), "plan": self.plans[p.name],
                    "status": self.status.get(p.name, "pending")} for p in self.sweep.points]})

  def _start(self, point: Point) -> subprocess.Popen:
    point_dir = os.path.join(self.workdir, point.name)
    os.makedirs(point_dir, exist_ok=True)
    _write_json(os.path.join(point_dir, POINT_JSON),
                {"name": point.name, "overrides": dict(point.overrides),
                 "hash": self.plans[point.name]["hash"], "sweep": self.sweep.name})
    args = train_command(self.sweep, point, self.workdir, python=self.python)
    log_file = open(os.path.join(point_dir, "train.log"), "a", encoding="utf-8")
    log_file.write(f"$ {format_command(args)}\n")
    log_file.flush()
    proc = subprocess.Popen(args, cwd=self.repo_root, stdout=log_file, stderr=subprocess.STDOUT,
                            env={**self.env, "PYTHONPATH": self.repo_root})
    proc.log_file = log_file  # Closed when the child ends.
    return proc

  def run(self, points: Sequence[Point], parallel: int = 1) -> dict[str, str]:
    """Runs ``points`` (skipping finished ones); returns {name: final status}."""
    if parallel < 1:
      raise ConfigError(f"--parallel={parallel} must be >= 1")
    os.makedirs(self.workdir, exist_ok=True)
    self._selected = {p.name for p in points}
    for p in self.sweep.points:
      self.status[p.name] = point_status(self.workdir, p, self.plans[p.name]["hash"])
      point_dir = os.path.join(self.workdir, p.name)
      if (p.name in self._selected and self.status[p.name] == "interrupted"
          and finished(point_dir, self.plans[p.name]["steps"])):
        _mark_done(point_dir, "finished before this runner started")  # Its runner had died.
        self.status[p.name] = "done"
    self._save_sweep_json()
    queue = [p for p in points if self.status[p.name] != "done"]
    for p in points:
      if self.status[p.name] == "done":
        self.log(f"[skip] {p.name}: done")
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    while queue or running:
      while queue and len(running) < parallel:
        point = queue.pop(0)
        verb = "resume" if self.status[point.name] == "interrupted" else "start"
        self.log(f"[{verb}] {point.name}: {self.plans[point.name]['steps']} steps")
        running[point.name] = (self._start(point), time.time())
        self.status[point.name] = "running"
        self._save_sweep_json()
      time.sleep(0.2)
      for name, (proc, started) in list(running.items()):
        if proc.poll() is None:
          continue
        proc.log_file.close()
        del running[name]
        point_dir = os.path.join(self.workdir, name)
        if proc.returncode == 0 and finished(point_dir, self.plans[name]["steps"]):
          _mark_done(point_dir, f"{time.time() - started:.1f} s")
          self.status[name] = "done"
        elif proc.returncode == 0:  # A clean exit before the last step: preempted.
          self.status[name] = "interrupted"
        else:
          self.status[name] = f"failed (exit {proc.returncode}; see {point_dir}/train.log)"
        self.log(f"[{self.status[name]}] {name} in {time.time() - started:.0f} s")
        self._save_sweep_json()
    return {p.name: self.status[p.name] for p in points}


def format_plan_table(sweep: Sweep, points: Sequence[Point]) -> str:
  rows = [("point", "arch", "T", "params", "non-emb", "lr", "steps", "by", "tokens", "FLOPs")]
  for p in points:
    plan = plan_point(sweep, p)
    rows.append((p.name, plan["arch"], str(plan["num_iterations"]), f"{plan['params']:,}",
                 f"{plan['non_embedding_params']:,}", f"{plan['learning_rate']:.3g}",
                 str(plan["steps"]), plan["steps_decided_by"], f"{plan['tokens']:.3g}",
                 f"{plan['flops']:.3g}"))
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(r, widths))) for r in rows)
