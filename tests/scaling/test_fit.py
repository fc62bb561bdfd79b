"""Scaling-law fits and comparisons against closed forms (yocou_jax.scaling)."""

import csv
import math

import numpy as np
import pytest

from yocou_jax.config import ConfigError
from yocou_jax.scaling import analysis
from yocou_jax.scaling import fit
from yocou_jax.scaling import points as points_lib
from yocou_jax.scaling import report


def test_fit_recovers_a_known_law_from_noisy_points():
  rng = np.random.default_rng(0)
  truth = fit.PowerLaw(E=1.8, A=0.9, alpha=0.32, x_ref=1e17)
  x = np.geomspace(1e15, 1e19, 20)
  loss = truth(x) * np.exp(rng.normal(0.0, 0.003, x.size))  # 0.3% noise on every loss.
  result = fit.fit_power_law(x, loss, x_ref=1e17)
  for name in ("E", "A", "alpha"):
    assert getattr(result.law, name) == pytest.approx(getattr(truth, name), rel=0.02), name
  assert not result.at_bound
  # Variable projection (NNLS over a dense alpha grid, least squares in L) agrees.
  varpro = fit.fit_power_law_varpro(x, loss, x_ref=1e17)
  for name in ("E", "A", "alpha"):
    assert getattr(varpro, name) == pytest.approx(getattr(truth, name), rel=0.02), name


def test_inverse_and_parametric_law():
  law = fit.PowerLaw(E=2.0, A=0.5, alpha=0.25, x_ref=1e6)
  assert law(law.inverse(2.3)) == pytest.approx(2.3, rel=1e-12)
  assert math.isnan(law.inverse(1.9))  # Below E: never reached.
  rng = np.random.default_rng(1)
  n, d = np.meshgrid(np.geomspace(1e5, 1e7, 4), np.geomspace(1e7, 1e9, 4))
  truth = fit.ParametricLaw(E=1.7, A=0.6, a=0.34, B=0.8, b=0.28, n_ref=1e6, d_ref=1e8)
  got, _ = fit.fit_parametric(n.ravel(), d.ravel(), truth(n, d).ravel())
  for name in ("E", "A", "a", "B", "b"):
    assert getattr(got, name) == pytest.approx(getattr(truth, name), rel=0.02), name
  del rng


# Two synthetic archs sharing E and exponents, so the savings have closed forms:
# token law L = E + B (D/1e6)^-beta, flops = k D; parameter law at equal steps
# L = E_N + A (N/1e6)^-alpha (E_N above every token-run loss, at more tokens: never on a frontier).
E, BETA, E_N, ALPHA = 2.0, 0.3, 3.0, 0.4
LAWS = {"yocou": {"B": 1.0, "k": 2e6, "A": 0.5}, "yoco": {"B": 2.0, "k": 1e6, "A": 1.0}}
TOKENS = np.geomspace(1e6, 1e8, 8)
SIZES = np.geomspace(1e6, 1e7, 4)


def _synthetic_rows():
  rows = []
  for arch, c in LAWS.items():
    for i, d in enumerate(TOKENS):
      rows.append({"run": f"{arch}_d{i}", "arch": arch, "num_iterations": 1, "params": 2e6,
                   "non_embedding_params": 1_000_000, "step": 100 + i, "tokens": d,
                   "flops": c["k"] * d, "loss": E + c["B"] * (d / 1e6) ** -BETA, "final": True})
    for j, n in enumerate(SIZES):
      rows.append({"run": f"{arch}_n{j}", "arch": arch, "num_iterations": 1, "params": int(n) + 1,
                   "non_embedding_params": int(n), "step": 500, "tokens": 1e9,
                   "flops": c["k"] * 1e9, "loss": E_N + c["A"] * (n / 1e6) ** -ALPHA,
                   "final": True})
  return rows


def test_comparisons_equal_their_closed_forms(tmp_path):
  rows = _synthetic_rows()
  result = report.analyze(rows, str(tmp_path), pairs=[("yocou", "yoco")], num_bootstrap=4,
                          figures=False)
  a, b = LAWS["yocou"], LAWS["yoco"]
  assert result["token_fits"]["yocou"]["alpha"] == pytest.approx(BETA, rel=1e-3)
  assert result["param_fits"]["yoco"]["alpha"] == pytest.approx(ALPHA, rel=1e-3)
  c = result["comparisons"][0]
  # Tokens: D_a / D_b = (B_a / B_b)^(1/beta) at every loss.
  assert c["token_saving"] == pytest.approx(1 - (a["B"] / b["B"]) ** (1 / BETA), rel=1e-3)
  assert c["measured_token_saving"] == pytest.approx(c["token_saving"], abs=0.05)
  assert not c["token_saving_extrapolated"]
  # Parameters at equal steps: N_a / N_b = (A_a / A_b)^(1/alpha) at every size of b.
  assert c["param_saving"] == pytest.approx(1 - (a["A"] / b["A"]) ** (1 / ALPHA), rel=1e-3)
  assert c["param_saving_min"] == pytest.approx(c["param_saving_max"], rel=1e-6)
  assert c["param_saving_extrapolated"]  # b's smallest size maps below a's range.
  # Equal FLOPs: C* = the smaller of the two archs' largest compute; L = E + B (C/(k 1e6))^-beta.
  c_star = min(a["k"], b["k"]) * TOKENS[-1]
  gap = (b["B"] * (c_star / (b["k"] * 1e6)) ** -BETA - a["B"] * (c_star / (a["k"] * 1e6)) ** -BETA)
  assert c["c_star"] == pytest.approx(c_star)
  assert c["loss_gap_at_equal_flops"] == pytest.approx(gap, rel=1e-3)
  assert c["measured_loss_gap_at_equal_flops"] == pytest.approx(gap, rel=1e-2)


def test_csv_input_gives_the_same_analysis(tmp_path):
  rows = _synthetic_rows()
  path = str(tmp_path / "points.csv")
  points_lib.write_csv(rows, path)
  with open(path, newline="", encoding="utf-8") as f:
    header = next(csv.reader(f))
  assert header[:len(points_lib.COLUMNS)] == list(points_lib.COLUMNS)
  direct = report.analyze(rows, str(tmp_path / "a"), num_bootstrap=2, figures=False)
  from_csv = report.analyze(points_lib.read_csv(path), str(tmp_path / "b"), num_bootstrap=2,
                            figures=True)
  assert from_csv["comparisons"][0]["token_saving"] == direct["comparisons"][0]["token_saving"]
  assert from_csv["fits"] == direct["fits"]
  assert sorted(p.rsplit("/", 1)[1] for p in from_csv["figures"]) == [
      "loss_vs_flops.png", "loss_vs_params.png", "loss_vs_tokens.png"]
  assert "| yocou vs yoco |" in open(from_csv["report"], encoding="utf-8").read()


def test_csv_without_a_required_column_is_one_clear_line(tmp_path):
  path = tmp_path / "bad.csv"
  path.write_text("run,arch,step,loss\nr,yoco,1,2.0\n", encoding="utf-8")
  with pytest.raises(ConfigError, match=r"lacks the columns \['num_iterations'") as info:
    points_lib.read_csv(str(path))
  assert "\n" not in str(info.value)


def test_frontier_and_loop_table():
  rows = [{"run": "r1", "arch": "yocou", "num_iterations": t, "non_embedding_params": 10,
           "step": 300, "tokens": 1.0, "flops": float(t), "loss": 3.0 - 0.1 * t, "final": True}
          for t in (1, 2, 3)]
  for r, name in zip(rows, ("t1", "t2", "t3")):
    r["run"] = name
  table = analysis.loop_table(rows)
  assert [r["num_iterations"] for r in table] == [1, 2, 3]
  assert table[0]["gain_to_next_T"] == pytest.approx(0.1)
  assert table[-1]["gain_to_next_T"] is None
  pts = [dict(flops=f, loss=l) for f, l in ((1, 3.0), (2, 3.1), (3, 2.5), (4, 2.6), (5, 2.0))]
  assert [p["flops"] for p in analysis.frontier(pts, "flops")] == [1, 3, 5]


def test_report_fits_the_parametric_law_on_final_points(tmp_path):
  truth = fit.ParametricLaw(E=1.7, A=0.6, a=0.34, B=0.8, b=0.28, n_ref=1e6, d_ref=1e8)
  rows = []
  for i, n in enumerate(np.geomspace(1e5, 1e7, 4)):
    for j, d in enumerate(np.geomspace(1e7, 1e9, 4)):
      run = f"yoco_n{i}_d{j}"
      # A mid-schedule point far above the law: the fit must use only each run's final point.
      rows.append({"run": run, "arch": "yoco", "num_iterations": 1, "params": int(n) + 1,
                   "non_embedding_params": int(n), "step": 10, "tokens": d / 10,
                   "flops": 6 * n * d / 10, "loss": 9.0, "final": False})
      rows.append({"run": run, "arch": "yoco", "num_iterations": 1, "params": int(n) + 1,
                   "non_embedding_params": int(n), "step": 100, "tokens": d,
                   "flops": 6 * n * d, "loss": float(truth(n, d)), "final": True})
  result = report.analyze(rows, str(tmp_path), pairs=[], num_bootstrap=2, figures=False)
  got = result["parametric_fits"]["yoco"]
  assert got["runs"] == 16
  for name in ("E", "a", "b"):
    assert got[name] == pytest.approx(getattr(truth, name), rel=0.02), name
  # A and B are at the fit's own reference sizes: compare the law's predictions instead.
  law = fit.ParametricLaw(**{k: got[k] for k in ("E", "A", "a", "B", "b", "n_ref", "d_ref")})
  assert law(3e5, 5e7) == pytest.approx(float(truth(3e5, 5e7)), rel=1e-3)
  assert got["max_relative_residual"] < 1e-3
  assert "## Parametric law" in open(result["report"], encoding="utf-8").read()
  assert analysis.parametric_fit(rows[:8]) is None  # 4 runs: too few.
