"""Power-law fits of loss: L(x) = E + A x^-alpha and L(N, D) = E + A/N^a + B/D^b.

The fitting procedure is Chinchilla's (Hoffmann et al., arXiv 2203.15556, App. D.2) with the
corrections of its replication (Besiroglu et al., arXiv 2404.10102): the model is fitted in log
space, ``log L_hat = logsumexp(a - alpha log x, e)`` with ``A = exp(a)``, ``E = exp(e)``; the
objective is the *sum* (not the mean) of Huber losses (delta 1e-3) of the log residuals; x is
normalised by a reference (the geometric mean of the data) so A stays O(1); L-BFGS-B runs from
every start of a grid and the lowest objective wins. E is bounded above by the smallest observed
loss. :func:`fit_power_law_varpro` is an independent cross-check: for fixed alpha the law is
linear in (E, A), solved by non-negative least squares on a dense alpha grid.

Uncertainty is a bootstrap over *runs* (a run's points stay together): :func:`bootstrap`.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Callable, Optional, Sequence

import numpy as np
from scipy import optimize

HUBER_DELTA = 1e-3
ALPHA_STARTS = (0.1, 0.5)
E_STARTS = (-0.5, 0.5)
A_STARTS = (-1.0, 1.0)
_LBFGS = {"maxiter": 1000, "ftol": 1e-13, "gtol": 1e-11}
ALPHA_BOUNDS = (0.0, 5.0)


@dataclasses.dataclass(frozen=True)
class PowerLaw:
  """L(x) = E + A * (x / x_ref)^-alpha."""

  E: float
  A: float
  alpha: float
  x_ref: float = 1.0

  def __call__(self, x):
    return self.E + self.A * (np.asarray(x, np.float64) / self.x_ref) ** -self.alpha

  def inverse(self, loss: float) -> float:
    """The x at which the law reaches ``loss``; NaN when ``loss <= E`` (never reached)."""
    if loss <= self.E or self.A <= 0 or self.alpha <= 0:
      return math.nan
    return self.x_ref * (self.A / (loss - self.E)) ** (1.0 / self.alpha)

  @property
  def A_unnormalised(self) -> float:
    """A of L = E + A' x^-alpha in the un-normalised x (may overflow for large x_ref)."""
    return self.A * self.x_ref ** self.alpha

  def as_dict(self) -> dict:
    return {"E": self.E, "A": self.A, "alpha": self.alpha, "x_ref": self.x_ref}


@dataclasses.dataclass(frozen=True)
class FitResult:
  law: PowerLaw
  objective: float
  at_bound: bool  # The optimum touches a bound (E = min loss, alpha = 0 or 5): suspect.
  num_points: int


def _huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
  """Huber loss and its derivative."""
  small = np.abs(r) <= delta
  loss = np.where(small, 0.5 * r ** 2, delta * (np.abs(r) - 0.5 * delta))
  grad = np.where(small, r, delta * np.sign(r))
  return loss, grad


def _softmax_lse(terms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """logsumexp over axis 0 and the softmax weights."""
  top = terms.max(axis=0)
  exp = np.exp(terms - top)
  total = exp.sum(axis=0)
  return top + np.log(total), exp / total


def _objective(theta: np.ndarray, logx: np.ndarray, logy: np.ndarray, delta: float):
  a, alpha, e = theta
  terms = np.stack([a - alpha * logx, np.full_like(logx, e)])
  lse, weights = _softmax_lse(terms)  # weights: softmax over (power-law term, E)
  loss, dloss = _huber(lse - logy, delta)
  grad = np.array([np.sum(dloss * weights[0]), np.sum(dloss * weights[0] * -logx),
                   np.sum(dloss * weights[1])])
  return float(np.sum(loss)), grad


def fit_power_law(x: Sequence[float], loss: Sequence[float], *, x_ref: Optional[float] = None,
                  delta: float = HUBER_DELTA,
                  starts: Optional[Sequence[tuple[float, float, float]]] = None) -> FitResult:
  """Fits L = E + A (x/x_ref)^-alpha to (x, loss) by multi-start L-BFGS-B (module docstring).

  ``starts`` are (a, alpha, e) triples (e is clipped to its bound log(min loss)); the default is
  the variable-projection solution (a dense grid over alpha) plus the corners of the grid
  A_STARTS x ALPHA_STARTS x E_STARTS.
  """
  x = np.asarray(x, np.float64)
  loss = np.asarray(loss, np.float64)
  if x.shape != loss.shape or x.size < 3:
    raise ValueError(f"a power-law fit needs >= 3 (x, loss) points, got {x.size}")
  if np.any(x <= 0) or np.any(loss <= 0):
    raise ValueError("a power-law fit needs positive x and loss")
  x_ref = float(np.exp(np.mean(np.log(x)))) if x_ref is None else float(x_ref)
  logx, logy = np.log(x / x_ref), np.log(loss)
  e_max = float(np.log(loss.min()))
  bounds = [(-30.0, 30.0), ALPHA_BOUNDS, (-30.0, e_max)]
  if starts is None:
    starts = list(itertools.product(A_STARTS, ALPHA_STARTS, E_STARTS))
    guess = fit_power_law_varpro(x, loss, x_ref=x_ref, alphas=np.linspace(0.01, 3.0, 600))
    if guess.A > 0 and guess.E > 0:
      starts.insert(0, (math.log(guess.A), guess.alpha, math.log(guess.E)))
  best = None
  for a0, alpha0, e0 in starts:
    theta0 = np.array([a0, alpha0, min(e0, e_max - 1e-6)])
    res = optimize.minimize(_objective, theta0, args=(logx, logy, delta), jac=True,
                            method="L-BFGS-B", bounds=bounds, options=_LBFGS)
    if best is None or res.fun < best.fun:
      best = res
  a, alpha, e = best.x
  at_bound = bool(e > e_max - 1e-4 or alpha < 1e-4 or alpha > ALPHA_BOUNDS[1] - 1e-4)
  return FitResult(PowerLaw(E=float(np.exp(e)), A=float(np.exp(a)), alpha=float(alpha),
                            x_ref=x_ref), float(best.fun), at_bound, int(x.size))


def fit_power_law_varpro(x: Sequence[float], loss: Sequence[float], *,
                         x_ref: Optional[float] = None,
                         alphas: Optional[np.ndarray] = None) -> PowerLaw:
  """Variable projection: NNLS for (E, A) at each alpha of a dense grid; least squares in L."""
  x = np.asarray(x, np.float64)
  loss = np.asarray(loss, np.float64)
  x_ref = float(np.exp(np.mean(np.log(x)))) if x_ref is None else float(x_ref)
  alphas = np.linspace(1e-3, ALPHA_BOUNDS[1], 5000) if alphas is None else alphas
  best = None
  for alpha in alphas:
    design = np.stack([np.ones_like(x), (x / x_ref) ** -alpha], axis=1)
    coef, residual = optimize.nnls(design, loss)
    if best is None or residual < best[0]:
      best = (residual, alpha, coef)
  _, alpha, (e, a) = best
  return PowerLaw(E=float(e), A=float(a), alpha=float(alpha), x_ref=x_ref)


# --- L(N, D) ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ParametricLaw:
  """L(N, D) = E + A (N/N_ref)^-a + B (D/D_ref)^-b (Chinchilla's Approach 3)."""

  E: float
  A: float
  a: float
  B: float
  b: float
  n_ref: float
  d_ref: float

  def __call__(self, n, d):
    n, d = np.asarray(n, np.float64), np.asarray(d, np.float64)
    return self.E + self.A * (n / self.n_ref) ** -self.a + self.B * (d / self.d_ref) ** -self.b

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def _parametric_objective(theta, logn, logd, logy, delta):
  ea, a, eb, b, e = theta
  terms = np.stack([ea - a * logn, eb - b * logd, np.full_like(logn, e)])
  lse, w = _softmax_lse(terms)
  loss, dl = _huber(lse - logy, delta)
  grad = np.array([np.sum(dl * w[0]), np.sum(dl * w[0] * -logn), np.sum(dl * w[1]),
                   np.sum(dl * w[1] * -logd), np.sum(dl * w[2])])
  return float(np.sum(loss)), grad


def fit_parametric(n: Sequence[float], d: Sequence[float], loss: Sequence[float], *,
                   delta: float = HUBER_DELTA) -> tuple[ParametricLaw, float]:
  """Fits L(N, D) by multi-start L-BFGS-B on normalised N and D; returns (law, objective)."""
  n, d, loss = (np.asarray(v, np.float64) for v in (n, d, loss))
  if n.size < 6:
    raise ValueError(f"the L(N, D) fit needs >= 6 runs, got {n.size}")
  n_ref, d_ref = float(np.exp(np.log(n).mean())), float(np.exp(np.log(d).mean()))
  logn, logd, logy = np.log(n / n_ref), np.log(d / d_ref), np.log(loss)
  e_max = float(np.log(loss.min()))
  bounds = [(-30.0, 30.0), ALPHA_BOUNDS, (-30.0, 30.0), ALPHA_BOUNDS, (-30.0, e_max)]
  best = None
  for ea, a, eb, b, e in itertools.product((0.0,), (0.2, 0.5), (0.0,), (0.2, 0.5), (-0.5, 0.5)):
    theta0 = np.array([ea, a, eb, b, min(e, e_max - 1e-6)])
    res = optimize.minimize(_parametric_objective, theta0, args=(logn, logd, logy, delta),
                            jac=True, method="L-BFGS-B", bounds=bounds, options=_LBFGS)
    if best is None or res.fun < best.fun:
      best = res
  ea, a, eb, b, e = best.x
  return ParametricLaw(E=float(np.exp(e)), A=float(np.exp(ea)), a=float(a), B=float(np.exp(eb)),
                       b=float(b), n_ref=n_ref, d_ref=d_ref), float(best.fun)


# --- bootstrap over runs -------------------------------------------------------------------------

def bootstrap(groups: Sequence[object], statistic: Callable[[list], Optional[dict]], *,
              num_samples: int = 200, seed: int = 0) -> tuple[list[dict], int]:
  """``statistic`` of ``num_samples`` resamples (with replacement) of ``groups`` (runs).

  ``statistic`` takes the resampled list and returns a dict of numbers, or None when the
  resample cannot be fitted (too few distinct runs). Returns (the replicates, failures).
  """
  rng = np.random.default_rng(seed)
  replicates, failures = [], 0
  for _ in range(num_samples):
    picks = [groups[i] for i in rng.integers(0, len(groups), len(groups))]
    try:
      value = statistic(picks)
    except (ValueError, FloatingPointError, ZeroDivisionError):
      value = None
    if value is None:
      failures += 1
    else:
      replicates.append(value)
  return replicates, failures


def interval(replicates: Sequence[dict], key: str, level: float = 0.95) -> list[float]:
  """The central ``level`` percentile interval of ``key`` over the finite replicates."""
  values = np.array([r[key] for r in replicates if key in r], np.float64)
  values = values[np.isfinite(values)]
  if values.size == 0:
    return [math.nan, math.nan]
  tail = 100 * (1 - level) / 2
  return [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]
