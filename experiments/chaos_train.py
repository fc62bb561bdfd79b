r"""Chaos test of training: SIGKILL a run at random moments, restart it, demand identical results.

  python -m experiments.chaos_train --trials=10 [--json_out=/tmp/chaos.json]

Trains a tiny YOCO-U on a small corpus of the Python standard library through the real binary
(``experiments.train``: grain pipeline, async Orbax checkpoints, evaluation), once without
interruption and then ``--trials`` times under fire: each trial kills the run
``--kills_per_trial`` times (aimed in turn at start-up, an in-flight async checkpoint write, an
evaluating step, a random moment) and restarts it until it finishes. A trial is identical when
every loss and validation loss it logged, including the steps it recomputed after a resume, and
every array of its final checkpoint are bit-identical to the uninterrupted run's.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from typing import Sequence

from absl import app
from absl import flags

from yocou_jax.train import chaos

_TRIALS = flags.DEFINE_integer("trials", 10, "Chaos trials.")
_KILLS = flags.DEFINE_integer("kills_per_trial", 2, "SIGKILLs per trial before it may finish.")
_STEPS = flags.DEFINE_integer("steps", 16, "Training steps of the run.")
_SEED = flags.DEFINE_integer("seed", 0, "Seeds the kill moments.")
_SCRATCH = flags.DEFINE_string("scratch", None, "Scratch directory (default: a new temp dir).")
_KEEP = flags.DEFINE_bool("keep_scratch", False, "Keep the scratch directory.")
_TIMEOUT = flags.DEFINE_float("attempt_timeout_s", 600, "Longest one attempt may run.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Also write the results here as JSON.")

CHECKPOINT_EVERY, EVAL_EVERY = 4, 8
CORPUS_FILES = 80


def train_overrides(workdir: str, corpus: str, tfds_dir: str, steps: int) -> list[str]:
  """The tiny run every attempt trains: 2 devices (data parallel), async checkpoints.

  Evaluation reads 8 batches of 64 rows, several times a train step, so that a kill aimed at an
  evaluating step mostly lands in the evaluation.
  """
  values = {
      "model.num_layers": 2, "model.d_model": 64, "model.num_heads": 4, "model.num_kv_heads": 2,
      "model.head_dim": 16, "model.d_ff": 128, "model.window": 32, "model.num_iterations": 2,
      "model.attention_block_size": 32,
      "data.seq_len": 64, "data.tfds_name": "text_files", "data.text_glob": corpus,
      "data.tfds_data_dir": tfds_dir, "data.shuffle_window": 64, "data.packing_bins": 8,
      "train.batch_size": 8, "train.steps": steps, "train.warmup_steps": 3,
      "eval.every_steps": EVAL_EVERY, "eval.num_batches": 8, "eval.batch_size": 64,
      "checkpoint.every_steps": CHECKPOINT_EVERY, "checkpoint.keep": 3,
      "checkpoint.use_async": True,
      "logging.every_steps": 1, "logging.tensorboard": False, "logging.progress": False,
  }
  return ([sys.executable, "-m", "experiments.train",
           "--config=experiments/configs/default.py", f"--workdir={workdir}",
           "--sample_tokens=0"] + [f"--config.{k}={v}" for k, v in values.items()])


def write_corpus(directory: str) -> str:
  """The first CORPUS_FILES modules (by name, 2-40 KB) of this interpreter's standard library."""
  stdlib = sysconfig.get_paths()["stdlib"]
  names = sorted(n for n in os.listdir(stdlib) if n.endswith(".py")
                 and 2_000 <= os.path.getsize(os.path.join(stdlib, n)) <= 40_000)
  os.makedirs(directory, exist_ok=True)
  for name in names[:CORPUS_FILES]:
    shutil.copy(os.path.join(stdlib, name), os.path.join(directory, name))
  return directory


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  for name, value, low in (("trials", _TRIALS.value, 1), ("kills_per_trial", _KILLS.value, 1),
                           ("steps", _STEPS.value, EVAL_EVERY + 1)):
    if value < low:
      raise SystemExit(f"error: --{name}={value} is invalid: must be >= {low}")
  scratch = _SCRATCH.value or tempfile.mkdtemp(prefix="chaos_train_")
  corpus = write_corpus(os.path.join(scratch, "corpus"))
  tfds_dir = os.path.join(scratch, "tfds")
  command = lambda workdir: train_overrides(workdir, corpus, tfds_dir, _STEPS.value)
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=repo,
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  eval_steps = [s for s in range(1, _STEPS.value + 1) if s % EVAL_EVERY == 0 or s == _STEPS.value]
  final_step = _STEPS.value

  start = time.perf_counter()
  reference_dir = os.path.join(scratch, "reference")
  timings = chaos.reference_run(command(reference_dir), reference_dir, env, _TIMEOUT.value,
                                os.path.join(scratch, "reference.log"))
  print(f"uninterrupted run: {timings.total_s:.1f} s (first step logged at "
        f"{timings.first_step_s:.1f} s)", flush=True)
  results = []
  print(f"{'trial':>5} {'attempts':>8} {'identical':>9} {'s':>6}  kills (aimed -> landed @ step)")
  for trial in range(_TRIALS.value):
    result = chaos.run_trial(trial, command, env, scratch, reference_dir, eval_steps, final_step,
                             _KILLS.value, _SEED.value, _TIMEOUT.value)
    results.append(result)
    kills = ", ".join(f"{k.mode}->{k.landed}@{k.step}" for k in result.kills)
    print(f"{trial:>5} {result.attempts:>8} {str(result.identical):>9} {result.seconds:>6.1f}  "
          f"{kills}", flush=True)
    for mismatch in result.mismatches[:5]:
      print(f"      mismatch: {mismatch}")

  landed = collections.Counter(k.landed for r in results for k in r.kills)
  summary = {
      "trials": len(results),
      "identical": sum(r.identical for r in results),
      "kills": sum(len(r.kills) for r in results),
      "kills_during_save": landed["save"],
      "kills_during_eval": landed["eval"],
      "kills_in_evaluating_step": sum(k.in_evaluating_step for r in results for k in r.kills),
      "kills_at_start": landed["start"],
      "kills_between_steps": landed["steps"],
      "resumes": sum(r.attempts - 1 for r in results),
      "mismatches": [f"trial {r.trial}: {m}" for r in results for m in r.mismatches],
      "wall_s": round(time.perf_counter() - start, 1),
      "reference_run_s": round(timings.total_s, 1),
      "steps": final_step,
      "load_average": open("/proc/loadavg").read().split()[:3] if os.path.exists(
          "/proc/loadavg") else None,
      "details": [dataclasses.asdict(r) for r in results],
  }
  print(f"\n{summary['identical']} of {summary['trials']} trials bit-identical; "
        f"{summary['kills']} kills ({summary['kills_during_save']} during an async save, "
        f"{summary['kills_during_eval']} in an evaluating step with no save in flight, "
        f"{summary['kills_in_evaluating_step']} in an evaluating step in all, "
        f"{summary['kills_at_start']} before the first step, "
        f"{summary['kills_between_steps']} between other steps), "
        f"{summary['resumes']} resumes, {summary['wall_s']} s")
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w") as f:
      json.dump(summary, f, indent=2)
    print(f"wrote {_JSON_OUT.value}")
  if not _KEEP.value and not _SCRATCH.value:
    shutil.rmtree(scratch, ignore_errors=True)
  if summary["identical"] != summary["trials"]:
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
