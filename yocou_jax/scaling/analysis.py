"""Scaling laws per arch and the paper's comparisons between archs, with bootstrap intervals.

Per arch (``fit_arch``):

* the compute law ``L(C) = E + A C^-alpha`` on the compute-optimal frontier (the lower envelope
  of every evaluation of every run against cumulative training FLOPs; ``points="final"`` uses
  each run's final, annealed point instead);
* the token law ``L(D)``, the same on the frontier against training tokens;
* the parameter law ``L(N)`` (N = non-embedding parameters) on the final points of the runs that
  trained the same number of tokens (equal steps), the group with the most model sizes.

Comparisons of arch a against arch b (``compare``), as in the paper's Figs. 2 and 5:

* ``loss_gap_at_equal_flops`` = L_b(C*) - L_a(C*) at the largest common compute
  C* = min(max C_a, max C_b) (positive: a is better), from the fits and from the measured
  frontiers (log-linear interpolation), plus the fitted gap along the common range;
* ``token_saving`` = 1 - D_a(L*) / D_ref: b reaches its best loss L* after D_ref tokens; a
  reaches L* after D_a(L*) tokens by its token law (the paper: 1 - 80B/210B = 62%);
* ``param_saving`` = 1 - N_a(L_b) / N_b at equal steps, for each of b's model sizes (the
  paper's "50% fewer parameters").

Every number gets a 95% bootstrap interval over runs (runs of each arch resampled
independently, every fit redone) and an ``extrapolated`` flag when it needs a law outside the
range that arch measured; a saving is ``nan`` (undefined) when L* lies below a's fitted E.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import numpy as np

from yocou_jax.scaling import fit as fit_lib
from yocou_jax.scaling import points as points_lib

LAWS = ("flops", "tokens", "params")


def frontier(rows: Sequence[dict], x_key: str) -> list[dict]:
  """The lower envelope of ``rows`` against ``x_key``: points no cheaper point beats."""
  out, best = [], math.inf
  for r in sorted((r for r in rows if r[x_key] > 0), key=lambda r: (r[x_key], r["loss"])):
    if r["loss"] < best:
      out.append(r)
      best = r["loss"]
  return out


def equal_steps_group(rows: Sequence[dict], step: Optional[int] = None) -> list[dict]:
  """One point per model size at equal steps, for the parameter law.

  Without ``step``: the final points of the runs that trained the same tokens, the group with
  the most model sizes (annealed runs). With ``step``: every size's lowest evaluation at that
  step (mid-schedule points of runs with different schedules; see :func:`common_step`).
  """
  groups: dict[float, dict[int, dict]] = {}
  candidates = (points_lib.final_rows(rows) if step is None
                else [r for r in rows if r["step"] == step])
  for r in candidates:
    key = r["tokens"] if step is None else step
    by_size = groups.setdefault(key, {})
    size = r["non_embedding_params"]
    if size not in by_size or r["loss"] < by_size[size]["loss"]:
      by_size[size] = r
  if not groups:
    return []
  tokens = max(groups, key=lambda d: (len(groups[d]), d))
  return sorted(groups[tokens].values(), key=lambda r: r["non_embedding_params"])


def has_equal_step_runs(rows: Sequence[dict], min_sizes: int = 3) -> bool:
  """Every arch has annealed runs of >= ``min_sizes`` sizes at one token count."""
  archs = {r["arch"] for r in rows}
  return all(len(equal_steps_group([r for r in rows if r["arch"] == a])) >= min_sizes
             for a in archs)


def common_step(rows: Sequence[dict]) -> Optional[int]:
  """The largest step at which every (arch, model size) has an evaluation (None if none)."""
  steps_by_key: dict[tuple, set] = {}
  for r in rows:
    if r["step"] > 0:
      steps_by_key.setdefault((r["arch"], r["non_embedding_params"]), set()).add(r["step"])
  if not steps_by_key:
    return None
  common = set.intersection(*steps_by_key.values())
  return max(common) if common else None


def law_points(rows: Sequence[dict], law: str, points: str = "frontier",
               equal_step: Optional[int] = None) -> list[dict]:
  if law == "params":
    return equal_steps_group(rows, equal_step)
  if points == "final":
    return [r for r in points_lib.final_rows(rows) if r[law] > 0]
  return frontier(rows, law)


def _x(law: str, r: dict) -> float:
  return float(r["non_embedding_params"] if law == "params" else r[law])


@dataclasses.dataclass
class ArchFits:
  """The laws of one arch: {law: FitResult or None}, their points and bootstrap replicates."""

  arch: str
  fits: dict[str, Optional[fit_lib.FitResult]]
  points: dict[str, list[dict]]
  replicates: list[dict[str, Optional[fit_lib.PowerLaw]]]
  failures: int


def _fit_laws(rows: Sequence[dict], points: str, starts=None, x_refs: Optional[dict] = None,
              equal_step: Optional[int] = None) -> dict[str, Optional[fit_lib.FitResult]]:
  out = {}
  for law in LAWS:
    pts = law_points(rows, law, points, equal_step)
    if len({_x(law, r) for r in pts}) < 3:
      out[law] = None
      continue
    law_starts = None if starts is None or starts.get(law) is None else starts[law]
    out[law] = fit_lib.fit_power_law(
        [_x(law, r) for r in pts], [r["loss"] for r in pts],
        x_ref=None if x_refs is None else x_refs.get(law), starts=law_starts)
  return out


def _starts_near(result: Optional[fit_lib.FitResult]):
  """Bootstrap starts: the full-data optimum and a spread-out point."""
  if result is None:
    return None
  law = result.law
  return [(math.log(law.A), law.alpha, math.log(law.E)), (0.0, 0.3, 0.0)]


def fit_arch(rows: Sequence[dict], arch: str, *, points: str = "frontier",
             num_bootstrap: int = 100, seed: int = 0,
             equal_step: Optional[int] = None) -> ArchFits:
  """The arch's laws; ``equal_step``: the parameter law's points (see equal_steps_group)."""
  arch_rows = [r for r in rows if r["arch"] == arch]
  fits = _fit_laws(arch_rows, points, equal_step=equal_step)
  starts = {law: _starts_near(f) for law, f in fits.items()}
  x_refs = {law: f.law.x_ref for law, f in fits.items() if f is not None}
  by_run = list(points_lib.runs(arch_rows).values())

  def statistic(sample):
    refit = _fit_laws([r for run in sample for r in run], points, starts, x_refs, equal_step)
    return {law: (f.law if f is not None else None) for law, f in refit.items()}

  replicates, failures = fit_lib.bootstrap(by_run, statistic, num_samples=num_bootstrap,
                                           seed=seed)
  return ArchFits(arch, fits,
                  {law: law_points(arch_rows, law, points, equal_step) for law in LAWS},
                  replicates, failures)


def fit_summary(arch_fits: ArchFits, law: str = "flops") -> Optional[dict[str, Any]]:
  result = arch_fits.fits[law]
  if result is None:
    return None
  laws = [r[law] for r in arch_fits.replicates if r[law] is not None]
  reps = [lw.as_dict() for lw in laws]
  return {**result.law.as_dict(),
          "ci": {k: fit_lib.interval(reps, k) for k in ("E", "A", "alpha")},
          "points": result.num_points, "at_bound": result.at_bound,
          "bootstrap": len(arch_fits.replicates), "bootstrap_failed": arch_fits.failures,
          "bootstrap_unfittable": len(arch_fits.replicates) - len(laws),
          "x_range": [min(_x(law, r) for r in arch_fits.points[law]),
                      max(_x(law, r) for r in arch_fits.points[law])]}


def _interp_loss(pts: Sequence[dict], law: str, x: float) -> float:
  """Loss at x, log-linear between the measured points; NaN outside their range."""
  xs = np.log([_x(law, r) for r in pts])
  if not pts or not xs[0] <= math.log(x) <= xs[-1]:
    return math.nan
  return float(np.interp(math.log(x), xs, [r["loss"] for r in pts]))


def _first_crossing(pts: Sequence[dict], law: str, target: float) -> float:
  """The interpolated x at which the frontier first reaches ``target``; NaN if never."""
  for prev, cur in zip(pts, pts[1:]):
    if cur["loss"] <= target < prev["loss"]:
      w = (prev["loss"] - target) / (prev["loss"] - cur["loss"])
      return float(math.exp((1 - w) * math.log(_x(law, prev)) + w * math.log(_x(law, cur))))
  return math.nan


def _comparison(a_laws: dict, b_laws: dict, a_pts: dict, b_pts: dict) -> dict[str, float]:
  """The comparison numbers of one (fit or replicate) pair of law sets."""
  out: dict[str, float] = {}
  ca, cb = a_laws.get("flops"), b_laws.get("flops")
  if a_pts["flops"] and b_pts["flops"]:
    c_star = min(a_pts["flops"][-1]["flops"], b_pts["flops"][-1]["flops"])
    out["c_star"] = c_star
    if ca is not None and cb is not None:
      out["loss_gap_at_equal_flops"] = float(cb(c_star) - ca(c_star))
      loss_b = float(cb(c_star))
      c_a = ca.inverse(loss_b)
      out["compute_multiplier"] = c_star / c_a if c_a == c_a else math.nan
  da = a_laws.get("tokens")
  if b_pts["tokens"]:
    ref = b_pts["tokens"][-1]
    out["token_reference_loss"], out["token_reference"] = ref["loss"], ref["tokens"]
    if da is not None:
      d_a = da.inverse(ref["loss"])
      out["tokens_needed"] = d_a
      out["token_saving"] = 1.0 - d_a / ref["tokens"] if d_a == d_a else math.nan
  na = a_laws.get("params")
  if na is not None and b_pts["params"]:
    savings = [1.0 - na.inverse(r["loss"]) / r["non_embedding_params"] for r in b_pts["params"]]
    finite = [s for s in savings if s == s]
    out["param_saving"] = float(np.median(finite)) if finite else math.nan
    out["param_saving_min"] = float(min(finite)) if finite else math.nan
    out["param_saving_max"] = float(max(finite)) if finite else math.nan
  return out


def compare(a: ArchFits, b: ArchFits) -> dict[str, Any]:
  """The paper's comparisons of ``a`` against ``b`` (module docstring), with intervals."""
  laws_a = {law: (f.law if f is not None else None) for law, f in a.fits.items()}
  laws_b = {law: (f.law if f is not None else None) for law, f in b.fits.items()}
  result: dict[str, Any] = {"a": a.arch, "b": b.arch,
                            **_comparison(laws_a, laws_b, a.points, b.points)}
  reps = [_comparison(ra, rb, a.points, b.points)
          for ra, rb in zip(a.replicates, b.replicates)]
  result["ci"] = {k: fit_lib.interval(reps, k) for k in
                  ("loss_gap_at_equal_flops", "token_saving", "param_saving",
                   "compute_multiplier") if k in result}
  result["bootstrap"] = len(reps)
  # Measured (no law): interpolated frontiers.
  if "c_star" in result:
    result["measured_loss_gap_at_equal_flops"] = (
        _interp_loss(b.points["flops"], "flops", result["c_star"])
        - _interp_loss(a.points["flops"], "flops", result["c_star"]))
    lo = max(a.points["flops"][0]["flops"], b.points["flops"][0]["flops"])
    grid = np.geomspace(lo, result["c_star"], 5) if lo < result["c_star"] else []
    if laws_a["flops"] is not None and laws_b["flops"] is not None:
      result["loss_gap_along_curve"] = [
          {"flops": float(c), "gap": float(laws_b["flops"](c) - laws_a["flops"](c))}
          for c in grid]
  if "token_reference" in result:
    measured = _first_crossing(a.points["tokens"], "tokens", result["token_reference_loss"])
    result["measured_token_saving"] = 1.0 - measured / result["token_reference"]
    needed = result.get("tokens_needed", math.nan)
    a_range = [a.points["tokens"][0]["tokens"], a.points["tokens"][-1]["tokens"]]
    result["token_saving_extrapolated"] = not (needed == needed
                                               and a_range[0] <= needed <= a_range[1])
  if "param_saving" in result:
    a_sizes = [r["non_embedding_params"] for r in a.points["params"]]
    needed = [laws_a["params"].inverse(r["loss"]) for r in b.points["params"]]
    result["param_saving_extrapolated"] = any(
        not (n == n and min(a_sizes) <= n <= max(a_sizes)) for n in needed)
    result["param_saving_tokens"] = b.points["params"][0]["tokens"]
  return result


def loop_table(rows: Sequence[dict]) -> list[dict]:
  """Final loss against T for runs of one arch that differ only in T (same params and steps).

  Returns one row per (arch, params, steps, T) with the FLOPs and the gap to the next T, for
  every group holding at least two values of T.
  """
  groups: dict[tuple, dict[int, dict]] = {}
  for r in points_lib.final_rows(rows):
    key = (r["arch"], r["non_embedding_params"], r["step"])
    groups.setdefault(key, {})[r["num_iterations"]] = r
  table = []
  for (arch, params, steps), by_t in sorted(groups.items()):
    if len(by_t) < 2:
      continue
    ts = sorted(by_t)
    for i, t in enumerate(ts):
      r = by_t[t]
      nxt = by_t[ts[i + 1]] if i + 1 < len(ts) else None
      table.append({"arch": arch, "non_embedding_params": params, "steps": steps,
                    "num_iterations": t, "run": r["run"], "loss": r["loss"], "flops": r["flops"],
                    "gain_to_next_T": (r["loss"] - nxt["loss"]) if nxt else None})
  return table


def best_learning_rates(rows: Sequence[dict]) -> list[dict]:
  """For LR grids: per (arch, T, params, steps decided by budget), the rate of the lowest final
  loss, and whether it is interior to the grid."""
  groups: dict[tuple, list[dict]] = {}
  for r in points_lib.final_rows(rows):
    if "learning_rate" in r:
      key = (r["arch"], r["num_iterations"], r["non_embedding_params"])
      groups.setdefault(key, []).append(r)
  out = []
  for (arch, t, params), group in sorted(groups.items()):
    rates = sorted({r["learning_rate"] for r in group})
    if len(rates) < 2:
      continue
    best = min(group, key=lambda r: r["loss"])
    out.append({"arch": arch, "num_iterations": t, "non_embedding_params": params,
                "best_learning_rate": best["learning_rate"], "best_loss": best["loss"],
                "interior": rates[0] < best["learning_rate"] < rates[-1],
                "losses": {f"{r['learning_rate']:g}": r["loss"]
                           for r in sorted(group, key=lambda r: r["learning_rate"])}})
  return out


def parametric_fit(rows: Sequence[dict], min_runs: int = 6) -> Optional[dict[str, Any]]:
  """Chinchilla's ``L(N, D) = E + A/N^a + B/D^b`` on the final points of one arch's runs.

  Final points of runs with their own schedules only (an intermediate checkpoint is not a run
  trained to that length); None unless there are ``min_runs`` runs spanning >= 2 sizes and >= 2
  token counts.
  """
  finals = [r for r in points_lib.final_rows(rows) if r["tokens"] > 0]
  sizes = {r["non_embedding_params"] for r in finals}
  tokens = {r["tokens"] for r in finals}
  if len(finals) < min_runs or len(sizes) < 2 or len(tokens) < 2:
    return None
  law, objective = fit_lib.fit_parametric([r["non_embedding_params"] for r in finals],
                                          [r["tokens"] for r in finals],
                                          [r["loss"] for r in finals])
  predicted = law([r["non_embedding_params"] for r in finals], [r["tokens"] for r in finals])
  residual = np.abs(predicted / np.array([r["loss"] for r in finals]) - 1.0)
  return {**law.as_dict(), "runs": len(finals), "objective": objective,
          "max_relative_residual": float(residual.max())}
