"""Trace capture of chosen training steps (``config.profile``) for xprof / TensorBoard / Perfetto.

``config.profile.steps="10,15"`` traces steps 10 to 15 (numbered as in ``metrics.jsonl``: step
``n`` is the ``n``-th optimizer update) with ``jax.profiler.start_trace`` into the workdir's
TensorBoard directory, ``workdir/tensorboard/plugins/profile/<timestamp>/<host>.xplane.pb`` (plus
``<host>.trace.json.gz``, which Perfetto opens). Each traced step is marked with a
``StepTraceAnnotation`` so xprof's step view separates them. The trace stops after the device
finished the last traced step. When ``steps`` is empty the trainer builds no profiler: nothing
runs per step.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

import jax
from absl import logging

TRACE_NAME = "train"  # The StepTraceAnnotation name of one training step.


def parse_steps(spec: str) -> Optional[tuple[int, int]]:
  """``"10,15"`` -> ``(10, 15)``; ``""`` -> None (off). ValueError for anything else."""
  if not spec.strip():
    return None
  parts = spec.split(",")
  try:
    first, last = (int(p) for p in parts)
  except ValueError:
    raise ValueError(f"{spec!r} is not two integers START,STOP") from None
  if not 1 <= first <= last:
    raise ValueError(f"{spec!r} needs 1 <= START <= STOP")
  return first, last


class StepProfiler:
  """Starts a trace before step ``first`` and stops it once step ``last`` ran on the device.

  A run resumed inside the range traces its remaining steps; one resumed after it traces none.
  ``close()`` ends a trace a run left open by stopping inside the range (preemption).
  """

  def __init__(self, first: int, last: int, log_dir: str):
    self.first, self.last = first, last
    self.log_dir = log_dir
    self._active = False
    self._finished = False

  def wrap(self, train_step: Callable, first_step: int) -> Callable:
    """``train_step`` traced over the range; ``first_step``: the number of its first update."""
    number = first_step

    def traced_step(state, batch):
      nonlocal number
      if not (self._active or self._finished) and self.first <= number <= self.last:
        os.makedirs(self.log_dir, exist_ok=True)
        jax.profiler.start_trace(self.log_dir)
        self._active = True
        logging.info("profiling steps %d..%d into %s", number, self.last, self.log_dir)
      if not self._active:
        new_state, metrics = train_step(state, batch)
      else:
        with jax.profiler.StepTraceAnnotation(TRACE_NAME, step_num=number):
          new_state, metrics = train_step(state, batch)
        if number >= self.last:
          jax.block_until_ready(new_state)  # The trace holds the device work of the last step.
          self.close()
      number += 1
      return new_state, metrics

    return traced_step

  def close(self) -> None:
    if self._active:
      jax.profiler.stop_trace()
      self._active = False
      self._finished = True
      logging.info("profile written to %s (view: xprof --logdir=%s)", self.log_dir,
                   self.log_dir)


def from_config(profile_config: Any, log_dir: str, process_index: int) -> Optional[StepProfiler]:
  """The profiler ``config.profile`` asks for on this process, or None (no profiling here)."""
  steps = parse_steps(profile_config.steps)
  if steps is None or not (process_index == 0 or profile_config.all_processes):
    return None
  return StepProfiler(*steps, log_dir)
