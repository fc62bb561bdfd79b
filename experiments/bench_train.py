r"""Training throughput: matmul peak, step time and MFU per arch, and input-pipeline headroom.

  python -m experiments.bench_train [--archs=transformer,yoco,yocou] [--json_out=PATH]

Runs on whatever single device JAX finds (this CPU, one GPU, one TPU chip). For each arch at
the same benchmark shape (d 512, 8 layers, seq 1024 by default) it jits the real train step
(the trainer's own ``jit_train_step``), times ``--steps`` steps after ``--warmup`` (interleaved
across the archs, so that load on a shared machine affects them alike) and reports
MFU = analytic training FLOPs per step / step time / peak, with the peak of the device table or,
on CPU and unknown devices, the best of a 2048^3 matmul measured before and after the steps (their
spread is printed: on a shared machine it moves with the load, and MFU with it); the FFN's own
matmul shape is timed too ("of FFN mm": the step's FLOP/s over that matmul's). It also checks that yocou's extra time
over yoco is no more than its extra arithmetic, and that the grain pipeline delivers tokens far
faster than the trainer consumes them.

Run as a program on a CPU host, it restarts itself once with glibc's allocator set to keep
freed memory (``yocou_jax.platforms.restart_with_cpu_malloc``): XLA:CPU allocates each step's
temporaries afresh, and without it every step page-faults through all of them. The table shows
the setting, and the minor page faults and kernel time of each step ("faults", "sys s").

With ``--breakdown`` (default) each arch's step is also profiled and its op time printed by
model region, matmuls apart from the rest (softmax, norms, elementwise, the loss, layout copies:
what the analytic FLOPs count ignores); see ``yocou_jax.profiling``.

Targets: MFU >= 50% of the measured peak per arch (float32); yocou/yoco step-time ratio within
10% of the analytic FLOPs ratio; pipeline tokens/s >= 20x the fastest trainer's.

``--ffn=moe`` also times, next to each dense arch, the same arch with every FFN a Mixture of
Experts of equal *active* width (``--num_experts`` routed, top ``--experts_per_token``, plus one
shared expert, each ``d_ff / (top-k + 1)`` wide; ``--capacity_factor`` > 0 for the dropping
path), steps interleaved with the dense ones; MFU counts active FLOPs only. ``--moe_matmul``
names the dropless experts' grouped matmul(s) (``auto``: the backend's, ``blocked`` on CPU; a
list times each, interleaved); the rows are labelled ``arch-moe[matmul]``. Target: the MoE step
at most 1.5x the dense step at equal active FLOPs.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import time

from absl import app, flags
import jax
import numpy as np

from experiments.configs import default
from yocou_jax import accounting
from yocou_jax import moe as moe_lib
from yocou_jax import platforms
from yocou_jax import profiling
from yocou_jax import sharding as sharding_lib
from yocou_jax.config import ModelConfig
from yocou_jax.model import Model
from yocou_jax.train import metrics as metrics_lib
from yocou_jax.train import optimizer as optimizer_lib
from yocou_jax.train import step as step_lib

_ARCHS = flags.DEFINE_list("archs", ["transformer", "yoco", "yocou"], "Archs to time.")
_D_MODEL = flags.DEFINE_integer("d_model", 512, "Residual width.")
_LAYERS = flags.DEFINE_integer("num_layers", 8, "Layers (yoco/yocou: both halves).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 1024, "Tokens per row.")
_BATCH = flags.DEFINE_integer("batch_size", 4, "Rows per step.")
_WINDOW = flags.DEFINE_integer("window", 256, "Sliding window of yoco/yocou.")
_ITERATIONS = flags.DEFINE_integer("num_iterations", 3, "T of yocou.")
_UNROLL = flags.DEFINE_bool("unroll_loops", True, "yocou's T iterations unrolled in the "
                            "compiled step (config.model.unroll_loops) or one while loop.")
_UNROLL_LAYERS = flags.DEFINE_bool("unroll_layers", True, "Layer stacks unrolled in the compiled "
                                   "step (config.model.unroll_layers) or one while loop each.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Activation dtype.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per arch.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps (compilation) per arch.")
_PIPELINE_BATCHES = flags.DEFINE_integer("pipeline_batches", 50, "Batches to time the pipeline.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Also write the figures here as JSON.")
_BREAKDOWN = flags.DEFINE_bool("breakdown", True, "Also profile each arch's step and print its "
                               "op time by region: matmuls vs the rest (yocou_jax.profiling).")
_FFN = flags.DEFINE_enum("ffn", "dense", ["dense", "moe"], "moe: also time each arch with MoE "
                         "FFNs of the dense FFN's active width.")
_NUM_EXPERTS = flags.DEFINE_integer("num_experts", 8, "--ffn=moe: routed experts.")
_EXPERTS_PER_TOKEN = flags.DEFINE_integer("experts_per_token", 2, "--ffn=moe: top-k.")
_CAPACITY = flags.DEFINE_float("capacity_factor", 0.0, "--ffn=moe: expert capacity (0: dropless).")
_MOE_MATMULS = flags.DEFINE_list("moe_matmul", ["auto"], "--ffn=moe: grouped matmul(s) of the "
                                 "dropless experts (config.model.moe_matmul); each one is timed.")
MOE_TARGET = 1.5  # MoE step time / dense step time at equal active FLOPs.


def bench_config(arch: str):
  config = default.get_config()
  config.model.update(arch=arch, num_layers=_LAYERS.value, d_model=_D_MODEL.value,
                      num_heads=_D_MODEL.value // 64, num_kv_heads=_D_MODEL.value // 128,
                      head_dim=64, d_ff=3 * _D_MODEL.value, window=_WINDOW.value,
                      num_iterations=_ITERATIONS.value, dtype=_DTYPE.value,
                      attention_block_size=128, unroll_loops=_UNROLL.value,
                      unroll_layers=_UNROLL_LAYERS.value)
  config.model.vocab_size = 384  # The byte tokenizer's 259 ids (the figures in BUILD.md).
  config.data.update(seq_len=_SEQ_LEN.value, tokenizer="byte")
  config.train.batch_size = _BATCH.value
  return config


def moe_bench_config(arch: str, matmul: str):
  """``bench_config(arch)`` with MoE FFNs: top-k routed + 1 shared expert = the dense width."""
  config = bench_config(arch)
  top_k = _EXPERTS_PER_TOKEN.value
  config.model.update(ffn="moe", num_experts=_NUM_EXPERTS.value, num_experts_per_token=top_k,
                      num_shared_experts=1, expert_d_ff=config.model.d_ff // (top_k + 1),
                      capacity_factor=_CAPACITY.value, moe_matmul=matmul)
  return config


def moe_label(cfg: ModelConfig) -> str:
  """``arch-moe[matmul]``: the arch and the grouped matmul its dropless experts ran with."""
  matmul = "capacity" if cfg.capacity_factor else moe_lib.resolve_matmul(cfg.moe_matmul)
  return f"{cfg.arch}-moe[{matmul}]"


class TrainStepTimer:
  """The trainer's jitted step for one arch on one device, on random tokens, ready to time."""

  def __init__(self, config):
    self.cfg = ModelConfig.from_config(config.model)
    model = Model(self.cfg)
    self.mesh = sharding_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    tx = optimizer_lib.make_optimizer(config.train)
    schedule = optimizer_lib.learning_rate_schedule(config.train)
    self.seq_len, self.batch = config.data.seq_len, config.train.batch_size
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, self.cfg.vocab_size, (self.batch, self.seq_len), dtype=np.int32)
    batch_arrays = {"tokens": tokens, "segment_ids": np.ones_like(tokens),
                    "positions": np.broadcast_to(np.arange(self.seq_len, dtype=np.int32),
                                                 tokens.shape)}
    with sharding_lib.activate(self.mesh):
      _, shardings = step_lib.state_shardings(model, tx, self.mesh, self.seq_len)
      self.state = jax.jit(step_lib.init_state_fn(model, tx, self.seq_len),
                           out_shardings=shardings)(jax.random.key(0))
      self.train_step = step_lib.jit_train_step(model, tx, schedule, self.mesh, shardings)
      self.batch_dev = jax.device_put(batch_arrays, sharding_lib.batch_sharding(self.mesh))
    self.times: list[float] = []
    self.faults: list[int] = []  # Minor page faults of each timed step (the whole process).
    self.system_s: list[float] = []  # Kernel CPU time of each timed step.
    self.metrics = None
    start = time.perf_counter()
    for _ in range(_WARMUP.value):
      self.step(record=False)
    self.warmup_s = time.perf_counter() - start

  def step(self, record: bool = True) -> None:
    with sharding_lib.activate(self.mesh):
      usage, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
      self.state, self.metrics = self.train_step(self.state, self.batch_dev)
      jax.block_until_ready(self.metrics)
      if record:
        self.times.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_SELF)
        self.faults.append(after.ru_minflt - usage.ru_minflt)
        self.system_s.append(after.ru_stime - usage.ru_stime)

  def breakdown(self) -> dict:
    """Op time per (kind, region) of one step, from a profiler trace of two more steps."""
    with sharding_lib.activate(self.mesh):
      hlo = self.train_step.lower(self.state, self.batch_dev).compile().as_text()
    return profiling.op_breakdown(lambda: self.step(record=False), hlo)

  def row(self) -> dict:
    flops = accounting.train_flops_per_step(self.cfg, self.seq_len, self.batch)
    step_time = statistics.median(self.times)
    label = moe_label(self.cfg) if self.cfg.ffn == "moe" else self.cfg.arch
    return {"arch": label, "step_time_s": step_time, "step_times_s": self.times,
            "train_flops_per_step": flops, "tokens_per_sec": self.batch * self.seq_len / step_time,
            "flops_per_sec": flops / step_time, "warmup_s": self.warmup_s,
            "minor_faults_per_step": statistics.median(self.faults),
            "system_s_per_step": statistics.median(self.system_s),
            "loss": float(self.metrics["loss"]),
            **({"moe_dropped_fraction": float(self.metrics["moe_dropped_fraction"])}
               if self.cfg.ffn == "moe" else {})}


def time_train_steps(configs) -> tuple[list[dict], list[TrainStepTimer]]:
  """Median step time per arch; timed steps are interleaved across archs (a, b, c, a, b, c, ...)
  so that a shared machine's load drifting during the run slows every arch alike."""
  timers = [TrainStepTimer(config) for config in configs]
  for _ in range(_STEPS.value):
    for timer in timers:
      timer.step()
  return [timer.row() for timer in timers], timers


def pipeline_tokens_per_sec(config) -> float:
  """Tokens/s of the configured grain pipeline (python_stdlib, byte tokenizer) on this host."""
  from yocou_jax.data import pipeline, tokenizers  # pylint: disable=g-import-not-at-top

  tokenizer = tokenizers.load_tokenizer(config.data.tokenizer)
  iterator = pipeline.make_train_iterator(config.data, tokenizer,
                                          global_batch_size=config.train.batch_size, seed=0)
  next(iterator)  # Opening the source and the first packing are start-up, not throughput.
  start = time.perf_counter()
  for _ in range(_PIPELINE_BATCHES.value):
    next(iterator)
  elapsed = time.perf_counter() - start
  return _PIPELINE_BATCHES.value * config.train.batch_size * config.data.seq_len / elapsed


def main(argv):
  del argv
  device = jax.devices()[0]
  peak_before = metrics_lib.measure_matmul_peak(size=2048)
  configs = [bench_config(arch) for arch in _ARCHS.value]
  if _FFN.value == "moe":
    configs = [c for arch in _ARCHS.value for c in (
        bench_config(arch), *(moe_bench_config(arch, m) for m in _MOE_MATMULS.value))]
  rows, timers = time_train_steps(configs)
  if _BREAKDOWN.value:
    for row, timer in zip(rows, timers):
      row["op_breakdown"] = timer.breakdown()
  # The square-matmul peak again after the steps (a shared or throttling machine moves it: the
  # spread bounds how far the MFU figures can be trusted; the best of the two is the peak), and
  # the rate of the feed-forward's own matmul shape, [tokens, d_model] x [d_model, d_ff].
  peak_after = metrics_lib.measure_matmul_peak(size=2048)
  measured_peak = max(peak_before, peak_after)
  ffn_peak = metrics_lib.measure_matmul_peak(
      shape=(_BATCH.value * _SEQ_LEN.value, _D_MODEL.value, 3 * _D_MODEL.value))
  table_peak = metrics_lib.table_peak_flops(device)
  peak = table_peak or measured_peak
  peak_source = "table (dense bf16)" if table_peak else "measured f32 matmul"
  for row in rows:
    row["mfu"] = row["flops_per_sec"] / peak
    row["mfu_of_ffn_matmul"] = row["flops_per_sec"] / ffn_peak
  by_arch = {r["arch"]: r for r in rows}
  result = {"device": device.device_kind, "measured_matmul_peak_flops": measured_peak,
            "matmul_peak_before_after_flops": [peak_before, peak_after],
            "peak_spread": abs(peak_before - peak_after) / measured_peak,
            "ffn_matmul_flops": ffn_peak,
            "peak_flops": peak, "peak_source": peak_source, "rows": rows,
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
            "shape": {"d_model": _D_MODEL.value, "num_layers": _LAYERS.value,
                      "seq_len": _SEQ_LEN.value, "batch_size": _BATCH.value,
                      "window": _WINDOW.value, "num_iterations": _ITERATIONS.value,
                      "unroll_loops": _UNROLL.value,
                      "unroll_layers": _UNROLL_LAYERS.value, "dtype": _DTYPE.value}}
  if "yoco" in by_arch and "yocou" in by_arch:
    time_ratio = by_arch["yocou"]["step_time_s"] / by_arch["yoco"]["step_time_s"]
    flops_ratio = (by_arch["yocou"]["train_flops_per_step"]
                   / by_arch["yoco"]["train_flops_per_step"])
    result["yocou_over_yoco"] = {"time_ratio": time_ratio, "flops_ratio": flops_ratio,
                                 "relative_gap": time_ratio / flops_ratio - 1.0}
  if _FFN.value == "moe":
    result["moe_over_dense"] = {
        label: {"time_ratio": by_arch[label]["step_time_s"] / by_arch[arch]["step_time_s"],
                "active_flops_ratio": (by_arch[label]["train_flops_per_step"]
                                       / by_arch[arch]["train_flops_per_step"]),
                "dropped_fraction": by_arch[label]["moe_dropped_fraction"]}
        for arch in _ARCHS.value for label in by_arch if label.startswith(f"{arch}-moe[")}
    result["moe"] = {"num_experts": _NUM_EXPERTS.value,
                     "experts_per_token": _EXPERTS_PER_TOKEN.value, "num_shared_experts": 1,
                     "capacity_factor": _CAPACITY.value, "target_time_ratio": MOE_TARGET,
                     "matmuls": [moe_lib.resolve_matmul(m) for m in _MOE_MATMULS.value]}
  pipe = pipeline_tokens_per_sec(bench_config("yocou"))
  fastest = max(r["tokens_per_sec"] for r in rows)
  result["pipeline"] = {"tokens_per_sec": pipe, "trainer_tokens_per_sec": fastest,
                        "headroom": pipe / fastest}

  print(f"\ndevice: {device.device_kind}; peak {peak / 1e9:,.1f} GFLOP/s ({peak_source}); "
        f"measured f32 matmul peak {measured_peak / 1e9:,.1f} GFLOP/s (2048^3 before / after the "
        f"steps: {peak_before / 1e9:,.1f} / {peak_after / 1e9:,.1f}, spread "
        f"{100 * result['peak_spread']:.0f}%); the FFN's [{_BATCH.value * _SEQ_LEN.value}x"
        f"{_D_MODEL.value}]x[{_D_MODEL.value}x{3 * _D_MODEL.value}] matmul "
        f"{ffn_peak / 1e9:,.1f} GFLOP/s")
  print(f"shape: {result['shape']}")
  print(f"host allocator: GLIBC_TUNABLES={result['glibc_tunables'] or '(unset)'}")
  print(f"{'arch':<22}{'step s':>9}{'tokens/s':>11}{'GFLOP/step':>12}{'GFLOP/s':>10}{'MFU':>8}"
        f"{'>=50%':>7}{'of FFN mm':>11}{'faults':>11}{'sys s':>7}")
  for r in rows:
    print(f"{r['arch']:<22}{r['step_time_s']:>9.3f}{r['tokens_per_sec']:>11,.0f}"
          f"{r['train_flops_per_step'] / 1e9:>12,.1f}{r['flops_per_sec'] / 1e9:>10,.1f}"
          f"{100 * r['mfu']:>7.1f}%{'yes' if r['mfu'] >= 0.5 else 'NO':>7}"
          f"{100 * r['mfu_of_ffn_matmul']:>10.1f}%{r['minor_faults_per_step']:>11,.0f}"
          f"{r['system_s_per_step']:>7.2f}")
  for r in rows:
    if "op_breakdown" in r:
      print("\n".join(profiling.format_breakdown(r["op_breakdown"], r["arch"])))
  if "yocou_over_yoco" in result:
    g = result["yocou_over_yoco"]
    print(f"yocou/yoco: time x{g['time_ratio']:.3f}, FLOPs x{g['flops_ratio']:.3f}, gap "
          f"{100 * g['relative_gap']:+.1f}% (target within 10%: "
          f"{'yes' if abs(g['relative_gap']) <= 0.10 else 'NO'})")
  for label, g in result.get("moe_over_dense", {}).items():
    print(f"{label}/{label.split('-moe[')[0]}: time x{g['time_ratio']:.3f} at active FLOPs "
          f"x{g['active_flops_ratio']:.3f}, {100 * g['dropped_fraction']:.1f}% of routed pairs "
          f"dropped (target <= {MOE_TARGET}x: "
          f"{'yes' if g['time_ratio'] <= MOE_TARGET else 'NO'})")
  p = result["pipeline"]
  print(f"pipeline: {p['tokens_per_sec']:,.0f} tokens/s = {p['headroom']:.1f}x the fastest "
        f"trainer (target >= 20x: {'yes' if p['headroom'] >= 20 else 'NO'})")
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  platforms.restart_with_cpu_malloc()  # No page faults on each step's temporaries.
  app.run(main)
