"""Loop scaling in miniature (Fig. 6): yocou at T = 1, 2, 3, 5, same parameters, equal steps.

  python -m experiments.sweep --sweep=experiments/configs/sweeps/loop_cpu.py \
      --workdir=runs/loop_cpu
  python -m experiments.analyze_scaling --sweep_dir=runs/loop_cpu --out=runs/loop_cpu/analysis

The smallest CPU rung (d 48, where the learning rate was measured at T = 1, 3 and 5) trains 200
steps of 8 x 128 tokens at every T, each at its tuned rate (``cpu_common.learning_rate``,
log-log in T between the measured T).
T = 1 is yoco's computation with yocou's parameters.
"""

from experiments.configs.sweeps import cpu_common
from yocou_jax.scaling import sweeps

ITERATIONS = (1, 2, 3, 5)
RUNG = "s0"
STEPS = 200


def get_sweep() -> sweeps.Sweep:
  points = sweeps.grid(archs=["yocou"], rungs=cpu_common.rungs((RUNG,)), iterations=ITERATIONS,
                       budgets={f"S{STEPS}": {"train.steps": STEPS}}, common=cpu_common.COMMON,
                       per_point=cpu_common.tuned)
  return sweeps.Sweep(name="loop_cpu", config="experiments/configs/default.py", points=points,
                      description=__doc__.split("\n")[0])
