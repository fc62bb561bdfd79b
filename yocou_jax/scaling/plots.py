"""PNG figures of a scaling analysis (matplotlib, Agg backend): the paper's Figs. 2, 5 and 6."""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import numpy as np

from yocou_jax import files
from yocou_jax.scaling import analysis
from yocou_jax.scaling import points as points_lib

_LABELS = {"flops": "training FLOPs", "tokens": "training tokens",
           "params": "non-embedding parameters"}


def _colors(archs: Sequence[str]) -> dict[str, Any]:
  cycle = ["tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:brown"]
  return {arch: cycle[i % len(cycle)] for i, arch in enumerate(archs)}


def _band(ax, arch_fits: analysis.ArchFits, law: str, xs: np.ndarray, color) -> None:
  laws = [r[law] for r in arch_fits.replicates if r[law] is not None]
  if len(laws) < 10:
    return
  curves = np.stack([lw(xs) for lw in laws])
  lo, hi = np.nanpercentile(curves, [2.5, 97.5], axis=0)
  ax.fill_between(xs, lo, hi, color=color, alpha=0.15, linewidth=0)


def plot_law(rows: Sequence[dict], fits: dict[str, analysis.ArchFits], law: str, path: str,
             comparison: Optional[dict] = None) -> bool:
  """Loss against ``law``'s x: per-run curves (not for params), law points, fits and bands."""
  plt = files.pyplot()
  archs = [a for a in fits if fits[a].points[law]]
  if not archs:
    return False
  colors = _colors(list(fits))
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for arch in archs:
    color = colors[arch]
    if law != "params":
      for run_rows in points_lib.runs(r for r in rows if r["arch"] == arch).values():
        pts = [(r[law], r["loss"]) for r in run_rows if r[law] > 0]
        if pts:
          ax.plot(*zip(*pts), color=color, alpha=0.25, linewidth=0.8)
    pts = fits[arch].points[law]
    xs_pts = [analysis._x(law, r) for r in pts]  # pylint: disable=protected-access
    ax.plot(xs_pts, [r["loss"] for r in pts], "o", color=color, markersize=4,
            label=f"{arch} ({'equal steps' if law == 'params' else 'frontier'})")
    result = fits[arch].fits[law]
    if result is not None:
      xs = np.geomspace(min(xs_pts) / 1.5, max(xs_pts) * 1.5, 200)
      lw = result.law
      ax.plot(xs, lw(xs), color=color, linewidth=1.8,
              label=f"{arch}: {lw.E:.3f} + {lw.A:.3f}(x/{lw.x_ref:.2g})^-{lw.alpha:.3f}")
      _band(ax, fits[arch], law, xs, color)
  if comparison is not None and law == "flops" and "c_star" in comparison:
    gap = comparison.get("loss_gap_at_equal_flops")
    ax.axvline(comparison["c_star"], color="gray", linestyle=":", linewidth=1)
    if gap is not None:
      ax.annotate(f"{comparison['b']} - {comparison['a']} = {gap:+.3f} at C*",
                  (comparison["c_star"], ax.get_ylim()[1]), ha="right", va="top", fontsize=8)
  if comparison is not None and law == "tokens" and "token_reference_loss" in comparison:
    ax.axhline(comparison["token_reference_loss"], color="gray", linestyle=":", linewidth=1)
  ax.set_xscale("log")
  ax.xaxis.set_minor_formatter(plt.NullFormatter())  # No crowded minor labels.
  ax.set_xlabel(_LABELS[law])
  ax.set_ylabel("validation loss (nats/token)")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=7)
  fig.tight_layout()
  files.save_figure(fig, path)
  return True


def plot_loop(rows: Sequence[dict], table: Sequence[dict], path: str) -> bool:
  """Fig. 6: final loss against T (left) and each T's curve against training FLOPs (right)."""
  if not table:
    return False
  plt = files.pyplot()
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
  groups: dict[tuple, list[dict]] = {}
  for r in table:
    groups.setdefault((r["arch"], r["non_embedding_params"], r["steps"]), []).append(r)
  for (arch, params, steps), group in groups.items():
    left.plot([r["num_iterations"] for r in group], [r["loss"] for r in group], "o-",
              label=f"{arch}, {params:,} non-emb params, {steps} steps")
    for r in group:
      run_rows = [x for x in rows if x["run"] == r["run"] and x["flops"] > 0]
      right.plot([x["flops"] for x in run_rows], [x["loss"] for x in run_rows],
                 label=f"T={r['num_iterations']}")
  left.set_xlabel("loop count T")
  left.set_ylabel("final validation loss")
  left.grid(alpha=0.3)
  left.legend(fontsize=7)
  right.set_xscale("log")
  right.xaxis.set_minor_formatter(plt.NullFormatter())
  right.set_xlabel("training FLOPs")
  right.set_ylabel("validation loss")
  right.grid(alpha=0.3, which="both")
  right.legend(fontsize=7)
  fig.tight_layout()
  files.save_figure(fig, path)
  return True


def plot_all(rows, fits, comparisons, loop, out_dir: str) -> list[str]:
  """Every figure that the data supports; returns the written paths."""
  written = []
  first = comparisons[0] if comparisons else None
  for law, name in (("flops", "loss_vs_flops.png"), ("tokens", "loss_vs_tokens.png"),
                    ("params", "loss_vs_params.png")):
    path = os.path.join(out_dir, name)
    if plot_law(rows, fits, law, path, first):
      written.append(path)
  path = os.path.join(out_dir, "loss_vs_loops.png")
  if plot_loop(rows, loop, path):
    written.append(path)
  return written
