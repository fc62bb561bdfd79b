"""The learning-rate grid behind ``cpu_common.LEARNING_RATES``.

  python -m experiments.sweep --sweep=experiments/configs/sweeps/lr_cpu.py \
      --workdir=runs/lr_cpu --parallel=2

Every arch (yocou at T=3) at the smallest and the largest CPU rung, and yocou at T=5 at the
smallest rung, at 2e11 training FLOPs (the smallest budget of the first ``scaling_cpu`` design), on 4-5 peak rates x2 apart; ``python -m experiments.analyze_scaling
--sweep_dir=runs/lr_cpu --out=...`` prints the best rate per (arch, T, rung), which goes into
``cpu_common.LEARNING_RATES`` (it must be interior to its grid).
"""

import itertools

from experiments.configs.sweeps import cpu_common
from yocou_jax.scaling import sweeps

BOTH = (cpu_common.SMALLEST, cpu_common.LARGEST)
# First grids 2e-3..1.6e-2 (transformer, yoco), 1e-3..8e-3 (yocou): the transformer's optimum
# was at the low edge, so each grid moved one step down (the runs done stay in the table).
GRIDS = {"transformer": (1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2), "yoco": (1e-3, 2e-3, 4e-3),
         "yocou": (5e-4, 1e-3, 2e-3, 4e-3)}
# yoco stopped at 4e-3 (its optimum, 2e-3 at both rungs, was already interior).
# (T, rungs): yocou's T=5 only at the smallest rung (T=2 and the other rungs follow the rule).
SETTINGS = {"transformer": [(1, BOTH)], "yoco": [(1, BOTH)],
            "yocou": [(3, BOTH), (5, (cpu_common.SMALLEST,))]}
# yocou T=5 skips the lowest rate of the grid (far above T=3's optimum there).
# yocou T=3 at the largest rung was still improving at 4e-3: one step more up.
# yocou T=5 at the smallest rung was still improving at 4e-3: one step more up.
EXTRA = [("yocou", 3, cpu_common.LARGEST, 8e-3), ("yocou", 5, cpu_common.SMALLEST, 8e-3)]


def get_sweep() -> sweeps.Sweep:
  points = []
  for arch, rates in GRIDS.items():
    for (t, rung_names), lr in itertools.product(SETTINGS[arch], rates):
      if t == 5 and lr == min(rates):
        continue
      for p in sweeps.grid(archs=[arch], rungs=cpu_common.rungs(rung_names),
                           budgets={"C2e11": {"train.flops_budget": 2e11}}, iterations=[t],
                           common={**cpu_common.COMMON, "eval.every_steps": 50}):
        points.append(sweeps.Point(f"{p.name}_lr{lr:g}",
                                   {**p.overrides, "train.learning_rate": lr}))
  for arch, t, rung_name, lr in EXTRA:
    for p in sweeps.grid(archs=[arch], rungs=cpu_common.rungs((rung_name,)),
                         budgets={"C2e11": {"train.flops_budget": 2e11}}, iterations=[t],
                         common={**cpu_common.COMMON, "eval.every_steps": 50}):
      points.append(sweeps.Point(f"{p.name}_lr{lr:g}", {**p.overrides, "train.learning_rate": lr}))
  return sweeps.Sweep(name="lr_cpu", config="experiments/configs/default.py", points=points,
                      description="learning-rate grid per arch at the smallest and largest rung")
