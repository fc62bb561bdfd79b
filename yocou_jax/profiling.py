"""Profiler traces: capturing chosen training steps, and reading a trace into op time by region.

Two halves, one subject (``jax.profiler`` traces):

* Capture (``config.profile``; :class:`StepProfiler`, :func:`from_config`): the trainer traces
  steps ``START..STOP`` into the workdir's TensorBoard directory for xprof / TensorBoard / Perfetto.
* Breakdown (:func:`op_breakdown`, :func:`format_breakdown`; printed by
  ``experiments.bench_train``): a compiled step's XLA op times, by kind and model region.

Capture
-------
``config.profile.steps="10,15"`` traces steps 10 to 15 (numbered as in ``metrics.jsonl``: step
``n`` is the ``n``-th optimizer update) with ``jax.profiler.start_trace`` into the workdir's
TensorBoard directory, ``workdir/tensorboard/plugins/profile/<timestamp>/<host>.xplane.pb`` (plus
``<host>.trace.json.gz``, which Perfetto opens). Each traced step is marked with a
``StepTraceAnnotation`` so xprof's step view separates them. The trace stops after the device
finished the last traced step. When ``steps`` is empty the trainer builds no profiler: nothing
runs per step.

Breakdown
---------
Where a compiled step's time goes. :func:`op_breakdown` runs a compiled step under
``jax.profiler``, reads the trace back (``jax.profiler.ProfileData``), matches every executed XLA
op (traced under the name of its HLO instruction) with that instruction in the compiled program,
and sums the op times by

* kind: ``matmul`` (a dot or convolution, or a fusion around one) or ``other`` (what analytic
  FLOPs counts ignore: softmax, norms, elementwise, reductions, layout copies); and
* region: the part of the model the op comes from, read from the op's JAX name stack (the Flax
  module path and ``jax.named_scope`` s): attention, feed-forward, norms, embedding, the fused
  output head and loss, the optimizer and metrics, the layer scans' residual stacks and unnamed
  copies, or other (residual adds, masks).

Control-flow ops (while, conditional, call) are skipped: their bodies' ops are counted instead.
On a CPU, ops of one step can run on several threads at once, so the op times can sum to more
than the step time; the shares are of the summed op time.
"""

from __future__ import annotations

import collections
import glob
import os
import re
import tempfile
from typing import Any, Callable, Optional

from absl import logging
import jax

# --- capture: chosen training steps ---------------------------------------------------------

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


# --- breakdown: op time by kind and model region ---------------------------------------------

REGIONS = (  # (region, op-name pattern); the first that matches names an op's region.
    ("loss", r"fused_cross_entropy|cross_entropy|Model\.head|Model\.logits"),
    ("norms", r"norm/|norm\b"),
    ("attention", r"/attn/|attention|global_kv"),
    ("feed-forward", r"/mlp/|/moe/|experts|router"),
    ("embedding", r"Model\.embed|embedding"),
    ("optimizer, metrics", r"^(?=.)(?!.*Model\.)"),  # Named, outside the model's passes.
    # Scans stacking per-layer residuals for the backward pass and reading them back, and
    # copies the compiler left unnamed (layouts, buffer initialisation).
    ("scan stacks, copies", r"dynamic_update_slice|dynamic_slice|^$"),
    ("other", r""),
)
_CONTROL_FLOW = ("while", "conditional", "call")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = .*? (\S+?)\((.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) ")


def classify_instructions(hlo_text: str) -> dict[str, tuple[str, str] | None]:
  """HLO instruction name -> (kind, region), None for control flow, from ``compiled.as_text()``."""
  has_matmul, calls, op_names, opcodes = set(), {}, {}, {}
  dot_op_name, first_op_name = {}, {}  # Per computation: its first dot's, its first op's.
  computation = None
  for line in hlo_text.splitlines():
    if line.endswith("{") and (m := _COMPUTATION.match(line)):
      computation = m.group(1)
      continue
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    name, opcode, rest = m.groups()
    opcodes[name] = opcode
    is_dot = opcode in ("dot", "convolution")
    if is_dot:
      has_matmul.add(computation)
    if c := re.search(r"calls=%([\w.\-]+)", rest):
      calls[name] = c.group(1)
    if o := re.search(r'op_name="([^"]*)"', rest):
      op_names[name] = o.group(1)
      if is_dot:
        dot_op_name.setdefault(computation, o.group(1))
      first_op_name.setdefault(computation, o.group(1))
  result = {}
  for name, opcode in opcodes.items():
    if opcode in _CONTROL_FLOW:
      result[name] = None
      continue
    matmul = opcode in ("dot", "convolution") or calls.get(name) in has_matmul
    # A fusion around a matmul is the matmul's (elementwise ops fused into it belong with it).
    callee = calls.get(name)
    op_name = dot_op_name.get(callee) or op_names.get(name) or first_op_name.get(callee, "")
    region = next(r for r, pattern in REGIONS if re.search(pattern, op_name))
    result[name] = ("matmul" if matmul else "other", region)
  return result


def op_breakdown(run: Callable[[], Any], hlo_text: str, repeats: int = 2) -> dict[str, Any]:
  """Seconds per (kind, region) per call of ``run()`` (one call of a compiled program).

  ``hlo_text`` is that program's ``compiled.as_text()``; ``run`` blocks until it is done.
  Returns ``{"seconds": {kind: {region: s}}, "total_op_s": s}``.
  """
  classes = classify_instructions(hlo_text)
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    for _ in range(repeats):
      run()
    jax.profiler.stop_trace()
    (path,) = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
    profile = jax.profiler.ProfileData.from_file(path)
  seconds = collections.defaultdict(lambda: collections.defaultdict(float))
  for plane in profile.planes:
    for line in plane.lines:
      for event in line.events:
        cls = classes.get(event.name)
        if cls is not None:
          seconds[cls[0]][cls[1]] += event.duration_ns * 1e-9 / repeats
  total = sum(s for by_region in seconds.values() for s in by_region.values())
  return {"seconds": {k: dict(v) for k, v in seconds.items()}, "total_op_s": total}


def format_breakdown(breakdown: dict[str, Any], label: str) -> list[str]:
  """Table lines: one per region, matmul and other milliseconds and shares of the op time."""
  total = breakdown["total_op_s"] or 1.0
  by_kind = breakdown["seconds"]
  lines = [f"{label}: op time {1e3 * total:,.1f} ms per step, by region "
           f"(matmul ms, other ms, other share)"]
  for region, _ in REGIONS:
    mm = by_kind.get("matmul", {}).get(region, 0.0)
    other = by_kind.get("other", {}).get(region, 0.0)
    if mm or other:
      lines.append(f"  {region:<20}{1e3 * mm:>10.1f}{1e3 * other:>10.1f}{100 * other / total:>8.1f}%")
  mm_total = sum(by_kind.get("matmul", {}).values())
  lines.append(f"  {'total':<20}{1e3 * mm_total:>10.1f}{1e3 * (total - mm_total):>10.1f}"
               f"{100 * (total - mm_total) / total:>8.1f}%")
  return lines
