"""Kill a training run with SIGKILL at chosen moments, restart it until it finishes, compare.

A trial runs the training binary as a child process in a fresh workdir and kills it several
times, each kill aimed at one moment: start-up (1-6 s after launch: imports, data pipeline,
restore, compilation), an async checkpoint write in flight (a new ``*.orbax-checkpoint-tmp*``
directory), an evaluating step (50-300 ms after the step before it is logged) or a random step.
After each kill it starts the same command again, which resumes from the newest intact
checkpoint; the last attempt runs to the end. The trial passes when every loss and validation
loss it ever logged (recomputed steps included) and every array of its final checkpoint are
bit-identical to an uninterrupted run's.

Where a kill landed is read from the workdir after the child is dead: a temporary step
directory that appeared during the attempt is a torn save; no record logged in the attempt is
start-up; otherwise the step after the last logged one was running (its train step, and its
evaluation when it evaluates). The watcher polls every few milliseconds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import time
from typing import Callable, Optional, Sequence

import jax
import numpy as np

from yocou_jax.train import checkpoint as checkpoint_lib
from yocou_jax.train import integrity

KILL_MODES = ("start", "save", "eval", "random")
POLL_S = 0.002
START_WINDOW_S = (1.0, 6.0)  # Start-up of the binary takes longer than this on any machine.


@dataclasses.dataclass
class Kill:
  mode: str  # What the kill aimed at (KILL_MODES).
  after_s: float  # Seconds after the attempt started.
  step: int  # The last step logged before the kill.
  landed: str  # What was really in flight: "save", "eval", "start" or "steps".
  in_evaluating_step: bool = False  # The running step evaluates (whatever else was in flight).


@dataclasses.dataclass
class TrialResult:
  trial: int
  kills: list[Kill]
  attempts: int
  identical: bool
  mismatches: list[str]
  seconds: float


def _logged_steps(workdir: str) -> list[dict]:
  """Every complete record of metrics.jsonl, in the order written (re-logged steps included)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.endswith("\n")]


def _temporary_dirs(workdir: str) -> set[tuple[str, int]]:
  """(name, inode) of every temporary step directory Orbax has in the workdir."""
  directory = os.path.join(workdir, checkpoint_lib.CHECKPOINT_DIR)
  found = set()
  try:
    for entry in os.scandir(directory):
      if "orbax-checkpoint-tmp" in entry.name:
        found.add((entry.name, entry.inode()))
  except FileNotFoundError:
    pass
  return found


class Watcher:
  """The state of a running child, read from its workdir.

  A save is in flight when a temporary step directory exists that was not there when the
  attempt started (a torn save of an earlier attempt leaves one until Orbax cleans it up).
  """

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.leftovers = _temporary_dirs(workdir)

  def last_step(self) -> int:
    records = _logged_steps(self.workdir)
    return records[-1]["step"] if records else -1

  def save_in_flight(self) -> bool:
    return bool(_temporary_dirs(self.workdir) - self.leftovers)


def run_attempt(command: Sequence[str], watcher: Watcher, env: dict, *, kill_when:
                Optional[Callable[[float, Watcher], bool]], timeout_s: float,
                log_path: str) -> tuple[int, float]:
  """Runs ``command`` once; SIGKILLs it the first time ``kill_when(elapsed, watcher)`` holds.

  Returns (exit status, seconds it ran); a killed child returns -SIGKILL.
  """
  with open(log_path, "ab") as log:
    child = subprocess.Popen(list(command), env=env, stdout=log, stderr=subprocess.STDOUT)
    start = time.perf_counter()
    while child.poll() is None:
      elapsed = time.perf_counter() - start
      if elapsed > timeout_s:
        child.kill()
        child.wait()
        raise TimeoutError(f"{' '.join(command)} ran over {timeout_s:.0f} s; log: {log_path}")
      if kill_when is not None and kill_when(elapsed, watcher):
        child.send_signal(signal.SIGKILL)
        child.wait()
        break
      time.sleep(POLL_S)
    return child.returncode, time.perf_counter() - start


@dataclasses.dataclass
class Timings:
  """What the uninterrupted run measured: when the first step was logged, the whole run."""
  first_step_s: float
  total_s: float


def kill_policy(mode: str, rng: random.Random, eval_steps: Sequence[int], resumed_from: int,
                final_step: int) -> Callable[[float, Watcher], bool]:
  """The trigger of one kill aimed at ``mode``."""
  if mode == "start":  # Imports, data pipeline, restore, compilation: seconds before a step.
    at = rng.uniform(START_WINDOW_S[0], START_WINDOW_S[1])
    return lambda elapsed, w: elapsed >= at
  if mode == "save":  # As soon as an async write is in flight (after a random 0-20 ms).
    return _after_first(lambda w: w.save_in_flight(), rng.uniform(0.0, 0.02))
  if mode == "eval":  # Once the step before an evaluating step is logged, 50-300 ms later.
    targets = [s for s in eval_steps if s > resumed_from + 1]
    if not targets:
      return lambda elapsed, w: False
    target = rng.choice(targets)
    return _after_first(lambda w: w.last_step() >= target - 1, rng.uniform(0.05, 0.3))
  # A random moment: after a random step of the rest of the run is logged, 0-300 ms later.
  step = rng.randint(resumed_from + 1, max(resumed_from + 1, final_step - 1))
  return _after_first(lambda w: w.last_step() >= step, rng.uniform(0.0, 0.3))


def _after_first(condition: Callable[[Watcher], bool],
                 delay_s: float) -> Callable[[float, Watcher], bool]:
  """A trigger that fires ``delay_s`` after ``condition`` first holds."""
  seen = []

  def trigger(elapsed, watcher):
    if not seen and condition(watcher):
      seen.append(elapsed)
    return bool(seen) and elapsed >= seen[0] + delay_s
  return trigger


def _where_it_landed(watcher: Watcher, eval_steps: Sequence[int], step: int,
                     logged_this_attempt: bool) -> str:
  if watcher.save_in_flight():  # The child is dead: a new temporary directory is a torn save.
    return "save"
  if not logged_this_attempt:
    return "start"
  if step + 1 in eval_steps:
    return "eval"
  return "steps"


def compare_runs(reference_dir: str, chaos_dir: str, final_step: int) -> list[str]:
  """Mismatches between two runs: every logged loss/eval loss, and every final array."""
  reference = {r["step"]: r for r in _logged_steps(reference_dir)}
  mismatches = []
  seen_steps = set()
  for record in _logged_steps(chaos_dir):
    want = reference.get(record["step"], {})
    seen_steps.add(record["step"])
    for key in ("loss", "eval_loss"):
      if key in record and record[key] != want.get(key):
        mismatches.append(f"step {record['step']} {key}: {record[key]!r} != {want.get(key)!r}")
  missing = sorted(set(reference) - seen_steps)
  if missing:
    mismatches.append(f"steps never logged: {missing}")
  step_dirs = [os.path.join(d, checkpoint_lib.CHECKPOINT_DIR, str(final_step))
               for d in (reference_dir, chaos_dir)]
  try:
    (_, want), (_, got) = (integrity.read_arrays(d) for d in step_dirs)
  except Exception as e:  # pylint: disable=broad-except
    return mismatches + [f"final checkpoint unreadable: {integrity.first_line(e)}"]
  want_leaves = dict(jax.tree_util.tree_leaves_with_path(want))
  for path, leaf in jax.tree_util.tree_leaves_with_path(got):
    if not np.array_equal(np.asarray(leaf), np.asarray(want_leaves[path])):
      mismatches.append(f"final {jax.tree_util.keystr(path)} differs")
  return mismatches


def run_trial(trial: int, command: Callable[[str], Sequence[str]], env: dict, scratch: str,
              reference_dir: str, eval_steps: Sequence[int], final_step: int,
              kills_per_trial: int, seed: int, timeout_s: float) -> TrialResult:
  """One chaos trial: ``kills_per_trial`` kills (the first aimed at KILL_MODES in turn)."""
  rng = random.Random(seed * 1_000_003 + trial)
  workdir = os.path.join(scratch, f"trial{trial:03d}")
  shutil.rmtree(workdir, ignore_errors=True)
  modes = [KILL_MODES[trial % len(KILL_MODES)]] + [
      rng.choice(KILL_MODES) for _ in range(kills_per_trial - 1)]
  kills, attempts = [], 0
  start = time.perf_counter()
  log_path = os.path.join(scratch, f"trial{trial:03d}.log")
  for mode in modes + [None]:
    watcher = Watcher(workdir)
    resumed_from = max(watcher.last_step(), 0)
    records_before = len(_logged_steps(workdir))
    policy = None if mode is None else kill_policy(mode, rng, eval_steps, resumed_from,
                                                   final_step)
    code, seconds = run_attempt(command(workdir), watcher, env, kill_when=policy,
                                timeout_s=timeout_s, log_path=log_path)
    attempts += 1
    if code == -signal.SIGKILL:
      step = watcher.last_step()
      logged = len(_logged_steps(workdir)) > records_before
      kills.append(Kill(mode, seconds, step, _where_it_landed(watcher, eval_steps, step, logged),
                        in_evaluating_step=logged and step + 1 in eval_steps))
      continue
    if code != 0:
      raise RuntimeError(f"trial {trial}: attempt {attempts} exited with status {code}; log: "
                         f"{log_path}")
    break  # Finished before (or without) the kill.
  mismatches = compare_runs(reference_dir, workdir, final_step)
  return TrialResult(trial, kills, attempts, not mismatches, mismatches,
                     time.perf_counter() - start)


def reference_run(command: Sequence[str], workdir: str, env: dict, timeout_s: float,
                  log_path: str) -> Timings:
  """The uninterrupted run, timed: when its first step is logged, and its whole length."""
  shutil.rmtree(workdir, ignore_errors=True)
  first = []

  def note_first_step(elapsed, watcher):
    if not first and watcher.last_step() >= 1:
      first.append(elapsed)
    return False

  code, seconds = run_attempt(command, Watcher(workdir), env, kill_when=note_first_step,
                              timeout_s=timeout_s, log_path=log_path)
  if code != 0:
    raise RuntimeError(f"the reference run exited with status {code}; log: {log_path}")
  return Timings(first_step_s=first[0] if first else seconds, total_s=seconds)
