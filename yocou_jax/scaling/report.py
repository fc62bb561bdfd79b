"""A whole scaling analysis: fits, comparisons, loop table, figures, report.md and its JSON."""

from __future__ import annotations

import math
import os
from typing import Any, Optional, Sequence

from yocou_jax.config import ConfigError
from yocou_jax.scaling import analysis
from yocou_jax.scaling import plots
from yocou_jax.scaling import points as points_lib

DEFAULT_PAIRS = (("yocou", "yoco"), ("yocou", "transformer"))


def analyze(rows: Sequence[dict], out_dir: str, *, pairs: Optional[Sequence[tuple]] = None,
            points: str = "frontier", num_bootstrap: int = 100, seed: int = 0,
            figures: bool = True) -> dict[str, Any]:
  """Writes points.csv, the figures and report.md into ``out_dir``; returns the JSON result."""
  if points not in ("frontier", "final"):
    raise ConfigError(f"--points={points!r} is invalid; allowed: frontier, final")
  if not rows:
    raise ConfigError("no evaluation points: no run has logged a validation loss yet")
  os.makedirs(out_dir, exist_ok=True)
  points_lib.write_csv(rows, os.path.join(out_dir, "points.csv"))
  archs = sorted({r["arch"] for r in rows})
  equal_step = None if analysis.has_equal_step_runs(rows) else analysis.common_step(rows)
  fits = {arch: analysis.fit_arch(rows, arch, points=points, num_bootstrap=num_bootstrap,
                                  seed=seed, equal_step=equal_step) for arch in archs}
  if pairs is None:
    pairs = [p for p in DEFAULT_PAIRS if p[0] in fits and p[1] in fits]
  for a, b in pairs:
    for arch in (a, b):
      if arch not in fits:
        raise ConfigError(f"--compare names arch {arch!r}, which has no points; present: {archs}")
  comparisons = [analysis.compare(fits[a], fits[b]) for a, b in pairs]
  loop = analysis.loop_table(rows)
  result = {
      "fits": {arch: analysis.fit_summary(f, "flops") for arch, f in fits.items()},
      "token_fits": {arch: analysis.fit_summary(f, "tokens") for arch, f in fits.items()},
      "param_fits": {arch: analysis.fit_summary(f, "params") for arch, f in fits.items()},
      "parametric_fits": {arch: analysis.parametric_fit([r for r in rows if r["arch"] == arch])
                          for arch in archs},
      "comparisons": comparisons, "loop": loop,
      "learning_rates": analysis.best_learning_rates(rows),
      "runs": len(points_lib.runs(rows)), "points": len(rows), "fit_points": points,
      "param_law_points": ("final points of annealed runs at equal tokens" if equal_step is None
                           else f"evaluations at step {equal_step}, common to every run "
                                "(mid-schedule)"),
  }
  result["figures"] = plots.plot_all(rows, fits, comparisons, loop, out_dir) if figures else []
  report_path = os.path.join(out_dir, "report.md")
  with open(report_path, "w", encoding="utf-8") as f:
    f.write(format_report(result))
  result["report"] = report_path
  return result


def _num(value: Any, fmt: str = ".4g") -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "n/a"
  return format(value, fmt)


def _ci(ci: Optional[Sequence[float]], fmt: str = ".4g") -> str:
  if not ci:
    return ""
  return f" [{_num(ci[0], fmt)}, {_num(ci[1], fmt)}]"


def _fit_table(title: str, fits: dict, x_name: str) -> list[str]:
  lines = [f"## {title}", "",
           f"L({x_name}) = E + A ({x_name}/x_ref)^-alpha; 95% bootstrap intervals over runs.", "",
           "| arch | E | A | alpha | x_ref | points | at bound | bootstrap (failed) |",
           "|---|---|---|---|---|---|---|---|"]
  for arch, s in fits.items():
    if s is None:
      lines.append(f"| {arch} | not enough distinct points | | | | | | |")
      continue
    lines.append(
        f"| {arch} | {_num(s['E'])}{_ci(s['ci']['E'])} | {_num(s['A'])}{_ci(s['ci']['A'])} | "
        f"{_num(s['alpha'])}{_ci(s['ci']['alpha'])} | {s['x_ref']:.3g} | {s['points']} | "
        f"{s['at_bound']} | {s['bootstrap']} ({s['bootstrap_failed'] + s['bootstrap_unfittable']}) |")
  return lines + [""]


def format_report(result: dict) -> str:
  lines = ["# Scaling analysis", "",
           f"{result['runs']} runs, {result['points']} evaluation points; compute and token laws "
           f"fitted on the {result['fit_points']} points.", ""]
  lines += _fit_table("Compute law", result["fits"], "C")
  lines += _fit_table("Token law", result["token_fits"], "D")
  lines += _fit_table("Parameter law at equal steps", result["param_fits"], "N")
  lines.insert(-1, f"Points: {result['param_law_points']}.\n")
  if any(result.get("parametric_fits", {}).values()):
    lines += ["## Parametric law", "",
              "L(N, D) = E + A (N/N_ref)^-a + B (D/D_ref)^-b on each run's final point "
              "(Chinchilla's Approach 3; no intervals).", "",
              "| arch | E | A | a | B | b | N_ref | D_ref | runs | max residual |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for arch, p in result["parametric_fits"].items():
      if p is None:
        lines.append(f"| {arch} | fewer than 6 runs over 2 sizes and 2 token counts "
                     "| | | | | | | | |")
        continue
      lines.append(f"| {arch} | {p['E']:.4g} | {p['A']:.4g} | {p['a']:.4g} | {p['B']:.4g} | "
                   f"{p['b']:.4g} | {p['n_ref']:.3g} | {p['d_ref']:.3g} | {p['runs']} | "
                   f"{p['max_relative_residual']:.2%} |")
    lines.append("")
  if result["comparisons"]:
    lines += ["## Comparisons", "",
              "Gap = L_b - L_a (positive: a is better). Savings are a's relative to b.", "",
              "| a vs b | C* | loss gap at C* (fit) | measured gap at C* | token saving (fit) | "
              "measured token saving | param saving (median over b's sizes; range) | "
              "extrapolated (tokens, params) |", "|---|---|---|---|---|---|---|---|"]
    for c in result["comparisons"]:
      ci = c.get("ci", {})
      lines.append(
          f"| {c['a']} vs {c['b']} | {_num(c.get('c_star'), '.3g')} | "
          f"{_num(c.get('loss_gap_at_equal_flops'), '+.4f')}"
          f"{_ci(ci.get('loss_gap_at_equal_flops'), '+.4f')} | "
          f"{_num(c.get('measured_loss_gap_at_equal_flops'), '+.4f')} | "
          f"{_num(c.get('token_saving'), '.1%')}{_ci(ci.get('token_saving'), '.1%')} | "
          f"{_num(c.get('measured_token_saving'), '.1%')} | "
          f"{_num(c.get('param_saving'), '.1%')}{_ci(ci.get('param_saving'), '.1%')} "
          f"({_num(c.get('param_saving_min'), '.1%')} .. {_num(c.get('param_saving_max'), '.1%')}) | "
          f"{c.get('token_saving_extrapolated', 'n/a')}, "
          f"{c.get('param_saving_extrapolated', 'n/a')} |")
    lines.append("")
  if result["loop"]:
    lines += ["## Loop scaling (equal steps)", "",
              "| arch | non-emb params | steps | T | loss | training FLOPs | gain to next T |",
              "|---|---|---|---|---|---|---|"]
    for r in result["loop"]:
      lines.append(f"| {r['arch']} | {r['non_embedding_params']:,} | {r['steps']} | "
                   f"{r['num_iterations']} | {r['loss']:.4f} | {r['flops']:.3g} | "
                   f"{_num(r['gain_to_next_T'], '+.4f')} |")
    lines.append("")
  if result["learning_rates"]:
    lines += ["## Learning-rate grids", "",
              "| arch | T | non-emb params | best lr | interior | final loss per lr |",
              "|---|---|---|---|---|---|"]
    for r in result["learning_rates"]:
      losses = ", ".join(f"{k}: {v:.4f}" for k, v in r["losses"].items())
      lines.append(f"| {r['arch']} | {r['num_iterations']} | {r['non_embedding_params']:,} | "
                   f"{r['best_learning_rate']:g} | {r['interior']} | {losses} |")
    lines.append("")
  if result.get("figures"):
    lines += ["## Figures", ""] + [f"- `{os.path.basename(p)}`" for p in result["figures"]]
  return "\n".join(lines) + "\n"
