"""The paper's scaling study at full size, for accelerators (Fig. 5 and Fig. 6 shapes).

  python -m experiments.sweep --sweep=experiments/configs/sweeps/scaling_paper.py --list
  python -m experiments.sweep --sweep=experiments/configs/sweeps/scaling_paper.py \
      --workdir=gs://BUCKET/scaling_paper --print_commands     # one cluster job per line

Fig. 5: transformer, yoco and yocou (T=3) at ladder rungs from ~0.3B to ~10B parameters, each
20k steps of 1M tokens (128 rows of 8192), the same data and schedule for all (YOCO's recipe:
AdamW 0.9/0.98, weight decay 0.05, 375 warmup steps, linear decay; peak rate 1.5e-4 up to 1.4B,
7.5e-5 above; arXiv 2405.05254, Table 8). Fig. 6: yocou at T = 1, 2, 3, 5 on the 1.3B rung.
Table 3 and Table 5 on the 1.3B rung, next to its yoco and yocou (T = 3): rins (10 layers x 3
+ 10), looped (the whole stack twice), parscale (P = 2 streams, 48-token prefixes), the upper
loop with and without shared KV (T = 3), and the deeper-instead-of-wider YOCO (40 layers at d
1792, ``yoco_deep_1p3b.py``).
Rungs come from ``ladder.RUNGS`` plus YOCO's 6.8B and 13B shapes; ``--list`` prints the exact
parameter counts and FLOPs. Check memory per slice with ``python -m experiments.compile_for``.
"""

from experiments.configs import ladder
from experiments.configs import yoco_deep_1p3b
from yocou_jax.scaling import sweeps

# name: (num_layers, d_model, num_heads, num_kv_heads, head_dim)
RUNGS = {**{k: ladder.RUNGS[k] for k in ("s1", "s2", "s3", "s4", "s5", "s6")},
         "s7": (32, 4096, 32, 8, 128),  # YOCO's 6.8B shape.
         "s8": (40, 5120, 40, 8, 128)}  # YOCO's 13B shape.
COMMON = {"train.batch_size": 128, "train.microbatches": 4, "train.b2": 0.98,
          "train.weight_decay": 0.05, "train.warmup_steps": 375, "train.schedule": "linear",
          "eval.every_steps": 1000}
STEPS = {"S20k": {"train.steps": 20_000}}


def rung(name: str) -> dict:
  layers, d, heads, kv_heads, head_dim = RUNGS[name]
  return {"model.num_layers": layers, "model.d_model": d, "model.num_heads": heads,
          "model.num_kv_heads": kv_heads, "model.head_dim": head_dim,
          "model.d_ff": ladder.swiglu_width(d), "model.num_recursive_layers": layers // 2}


def learning_rate(arch: str, rung_name: str, t: int) -> dict:
  del arch, t
  return {"train.learning_rate": 7.5e-5 if RUNGS[rung_name][1] > 2048 else 1.5e-4}


def get_sweep() -> sweeps.Sweep:
  rungs = {name: rung(name) for name in RUNGS}
  points = sweeps.grid(archs=("transformer", "yoco", "yocou"), rungs=rungs, iterations=[3],
                       budgets=STEPS, common=COMMON, per_point=learning_rate)
  points += sweeps.grid(archs=["yocou"], rungs={"s4": rungs["s4"]}, iterations=[1, 2, 5],
                        budgets=STEPS, common=COMMON, per_point=learning_rate)
  table3 = {"s4": rungs["s4"]}
  points += sweeps.grid(archs=("rins", "parscale", "yoco_upper_loop", "yoco_upper_loop_nokv"),
                        rungs=table3, iterations=[3], budgets=STEPS, common=COMMON,
                        per_point=learning_rate)
  points += sweeps.grid(archs=["looped"], rungs=table3, iterations=[2], budgets=STEPS,
                        common=COMMON, per_point=learning_rate)
  deep = yoco_deep_1p3b
  deeper = {"model.num_layers": deep.NUM_LAYERS, "model.d_model": deep.D_MODEL,
            "model.num_heads": deep.NUM_HEADS, "model.num_kv_heads": deep.NUM_KV_HEADS,
            "model.head_dim": deep.HEAD_DIM, "model.d_ff": ladder.swiglu_width(deep.D_MODEL)}
  points += sweeps.grid(archs=["yoco"], rungs={"s4deep": deeper}, budgets=STEPS, common=COMMON,
                        per_point=lambda *_: {"train.learning_rate": 1.5e-4})
  return sweeps.Sweep(name="scaling_paper", config="experiments/configs/ladder.py:yocou,s0,tpu",
                      points=points, description=__doc__.split("\n")[0])
