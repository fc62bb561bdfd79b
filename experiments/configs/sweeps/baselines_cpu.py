"""Table 3 / Table 5 in miniature: every arch at the smallest CPU rung, one FLOPs budget.

  python -m experiments.sweep --sweep=experiments/configs/sweeps/baselines_cpu.py \
      --workdir=runs/baselines_cpu --parallel=2
  python -m experiments.analyze_scaling --sweep_dir=runs/baselines_cpu \
      --out=runs/baselines_cpu/analysis

transformer, yoco, yocou (T = 3), rins (2 looped layers x 3 + 2), looped (T = 2, as in the
paper), parscale (P = 2 streams, 8-token prefixes: the rows are 128 tokens) and the upper loop
with and without shared KV (T = 3) at rung s0 (d 48, 4 layers; see ``cpu_common``), each trained
to the same analytic training-FLOPs budget, so the looped and parallel archs see fewer tokens.
Learning rates: the measured ``cpu_common`` rates for transformer, yoco and yocou; the others
were not tuned and borrow the rate of the arch they extend (yoco for the upper loops, the
transformer for rins, looped and parscale).
"""

from experiments.configs.sweeps import cpu_common
from yocou_jax.scaling import sweeps

RUNG = "s0"
BUDGET = {"C4e11": {"train.flops_budget": 4e11}}
BORROWED_RATE = {"rins": "transformer", "looped": "transformer", "parscale": "transformer",
                 "yoco_upper_loop": "yoco", "yoco_upper_loop_nokv": "yoco"}


def learning_rate(arch: str, rung: str, t: int) -> dict:
  return cpu_common.tuned(BORROWED_RATE.get(arch, arch), rung, t)


def get_sweep() -> sweeps.Sweep:
  common = dict(rungs=cpu_common.rungs((RUNG,)), budgets=BUDGET,
                common={**cpu_common.COMMON, "model.prefix_length": 8},
                per_point=learning_rate)
  points = sweeps.grid(archs=("transformer", "yoco", "yocou", "rins", "parscale",
                              "yoco_upper_loop", "yoco_upper_loop_nokv"), iterations=[3],
                       **common)
  points += sweeps.grid(archs=["looped"], iterations=[2], **common)
  return sweeps.Sweep(name="baselines_cpu", config="experiments/configs/default.py",
                      points=points, description=__doc__.split("\n")[0])
