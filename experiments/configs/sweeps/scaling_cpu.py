"""FLOPs-vs-loss scaling curves in miniature: transformer, yoco and yocou (T=3) on 2 CPU cores.

  python -m experiments.sweep --sweep=experiments/configs/sweeps/scaling_cpu.py \
      --workdir=runs/scaling_cpu --parallel=2
  python -m experiments.analyze_scaling --sweep_dir=runs/scaling_cpu --out=runs/scaling_cpu/analysis

Three rungs (d 48, 64, 96; 4 layers; see ``cpu_common``) x two FLOPs budgets x4 apart (each
run's cosine schedule ends at its budget, so every final point is an annealed run: the compute
law L(C) and Fig. 2). The parameter law L(N) at equal steps (Fig. 5) reads every rung's
evaluation at the largest step all rungs reached (mid-schedule: a miniature's compromise; add
``cpu_common.TOKENS_BUDGETS`` to the budgets for annealed equal-step runs). Learning rates are the measured ones of
``cpu_common.LEARNING_RATES`` (the ``lr_cpu`` sweep), per arch, rung and T. rins is left out to
keep the sweep inside its time budget (add it to ARCHS; it has a T like yocou).
"""

from experiments.configs.sweeps import cpu_common
from yocou_jax.scaling import sweeps

ARCHS = ("transformer", "yoco", "yocou")


def get_sweep() -> sweeps.Sweep:
  common = dict(archs=ARCHS, rungs=cpu_common.rungs(), iterations=[3],
                common=cpu_common.COMMON, per_point=cpu_common.tuned)
  points = sweeps.grid(budgets=cpu_common.FLOPS_BUDGETS, **common)
  return sweeps.Sweep(name="scaling_cpu", config="experiments/configs/default.py",
                      points=points, description=__doc__.split("\n")[0])
