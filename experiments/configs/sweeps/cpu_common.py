"""What the CPU sweeps share: tiny rungs, a short-run training setup and the tuned learning rates.

Rungs are 4-layer models of width d (head_dim 16, GQA 2:1, SwiGLU 3d) on the byte-level Python
standard library corpus, rows of 128 tokens, 8 rows per step, window 32 (< seq_len, so the
self-decoder's attention really is local). Every arch of a rung has the same dims; looped archs
spend T times the self-decoder FLOPs per token.

Learning rates (``LEARNING_RATES``) were measured, not guessed: the ``lr_cpu`` sweep trains every
arch (yocou at T=3) at the smallest and the largest rung on a grid of 4 rates x2 apart at the
smallest FLOPs budget, and the table holds the rate of the lowest final validation loss (each one
interior to its grid); yocou at T=5 is measured at the smallest rung. ``learning_rate(arch,
rung, T)`` interpolates log(lr) linearly in log(d) between the two measured rungs and, for
yocou, in log(T) between the measured T (T=1 is yoco: one application of the same weights).
"""

import math

# name: d_model (4 layers, head_dim 16, heads d/16, kv heads d/32, d_ff 3d).
WIDTHS = {"s0": 48, "s1": 64, "s2": 96}
SMALLEST, LARGEST = "s0", "s2"

COMMON = {
    "model.num_layers": 4, "model.head_dim": 16, "model.window": 32, "model.vocab_size": 384,
    "data.tokenizer": "byte", "data.seq_len": 128, "train.batch_size": 8, "train.warmup_steps": 10,
    "train.schedule": "cosine", "train.min_lr_ratio": 0.1,
    "eval.every_steps": 25, "eval.num_batches": 8, "eval.batch_size": 8,
    "checkpoint.every_steps": 100, "checkpoint.keep": 2,
    "logging.every_steps": 10, "logging.tensorboard": False,
}

# FLOPs budgets (analytic training FLOPs), x4 apart: the compute law L(C) and Fig. 2 (the
# frontier of the learning curves of 3 rungs x 2 budgets).
FLOPS_BUDGETS = {f"C{c:.0e}".replace("+", ""): {"train.flops_budget": c} for c in (1e11, 4e11)}
# One token budget (equal steps, 122, for every rung and arch): the parameter law L(N), Fig. 5.
TOKENS_BUDGETS = {"D1.25e5": {"train.tokens_budget": 1.25e5}}

# Measured best peak learning rate: {(arch, T): {rung: lr}} (see the module docstring).
LEARNING_RATES = {
    ("transformer", 1): {"s0": 2e-3, "s2": 2e-3},
    ("yoco", 1): {"s0": 2e-3, "s2": 2e-3},
    ("yocou", 3): {"s0": 2e-3, "s2": 4e-3},
    ("yocou", 5): {"s0": 4e-3},  # The top of its grid: 8e-3 was run to check it is interior.
}


def rung(name: str) -> dict:
  d = WIDTHS[name]
  return {"model.d_model": d, "model.num_heads": d // 16, "model.num_kv_heads": d // 32,
          "model.d_ff": 3 * d}


def rungs(names=tuple(WIDTHS)) -> dict:
  return {name: rung(name) for name in names}


def _interp(x, x0, x1, y0, y1):
  """log-log linear interpolation (extrapolation outside [x0, x1])."""
  if x0 == x1:
    return y0
  w = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
  return math.exp((1 - w) * math.log(y0) + w * math.log(y1))


def _lr_at_width(table: dict, name: str) -> float:
  return _interp(WIDTHS[name], WIDTHS[SMALLEST], WIDTHS[LARGEST], table[SMALLEST],
                 table[LARGEST])


def learning_rate(arch: str, rung_name: str, t: int = 1) -> float:
  """The tuned peak learning rate of ``arch`` at ``rung_name`` (and loop count T for yocou).

  yocou at T=1 is yoco; a T measured at the smallest rung only moves with width like T=3; T
  between measured values is log-log interpolated, beyond them extrapolated from the last two.
  """
  if arch != "yocou":
    return _lr_at_width(LEARNING_RATES[(arch, 1)], rung_name)
  at_t = {1: _lr_at_width(LEARNING_RATES[("yoco", 1)], rung_name)}
  t3 = LEARNING_RATES[("yocou", 3)]
  for (name, measured_t), table in LEARNING_RATES.items():
    if name != "yocou":
      continue
    if LARGEST in table:
      at_t[measured_t] = _lr_at_width(table, rung_name)
    else:  # Measured at the smallest rung only: scale with width as T=3 does.
      at_t[measured_t] = table[SMALLEST] * _lr_at_width(t3, rung_name) / t3[SMALLEST]
  ts = sorted(at_t)
  lo = max([x for x in ts if x <= t] or [ts[0]])
  hi_candidates = [x for x in ts if x > lo]
  hi = min([x for x in hi_candidates if x >= t] or hi_candidates[-1:] or [lo])
  if hi == lo:
    lo = ts[-2] if len(ts) > 1 else lo
  return _interp(t, lo, hi, at_t[lo], at_t[hi])


def tuned(arch: str, rung_name: str, t: int) -> dict:
  return {"train.learning_rate": float(f"{learning_rate(arch, rung_name, t):.3g}")}
