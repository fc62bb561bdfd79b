"""Where a compiled step's time goes: XLA op times from a profiler trace, by model region.

:func:`op_breakdown` runs a compiled step under ``jax.profiler``, reads the trace back
(``jax.profiler.ProfileData``), matches every executed XLA op (traced under the name of its HLO
instruction) with that instruction in the compiled program, and sums the op times by

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
import re
import tempfile
from typing import Any, Callable

import jax

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
