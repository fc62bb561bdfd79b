r"""Attention kernels benchmark: forward and forward+backward time, FLOP/s and growth with N.

  python -m experiments.bench_attention [--seq_lens=4096,8192,16384,32768] [--json_out=PATH]

For the self-decoder's sliding-window attention (``--window`` 512, head dim 128, GQA) it times,
on the default JAX device, every implementation this backend has:

* ``xla``: the blocked XLA path of ``yocou_jax.attention`` (the CPU path);
* ``pallas``: the kernels of ``kernels/`` (Mosaic on TPU, Triton on GPU; on CPU the same TPU
  kernels in interpret mode, which checks that they run but says nothing about speed:
  those rows are marked ``interpret`` and limited to ``--interpret_max_seq``);
* ``cudnn`` (GPU only): ``jax.nn.dot_product_attention(implementation="cudnn",
  local_window_size=(W - 1, 0))``, the speed reference.

FLOPs are the useful ones, ``4 * B * H * D * sum_i min(W, i + 1)`` forward and 3.5x that for
forward+backward (the FlashAttention convention: the backward recomputes the scores), so every
implementation is measured against the same work. ``growth`` is time(4N) / time(N): about 4 for
O(N * W) work, 16 for O(N^2). Targets on an H100: Pallas forward+backward within 1.2x of
cuDNN's time (or faster), and linear growth.
"""

from __future__ import annotations

import functools
import json
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from kernels import ops
from yocou_jax import attention

_SEQ_LENS = flags.DEFINE_list("seq_lens", ["4096", "8192", "16384", "32768"], "Sequence lengths.")
_WINDOW = flags.DEFINE_integer("window", 512, "Sliding window W (keys per query).")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "Head dimension D.")
_HEADS = flags.DEFINE_integer("num_heads", 8, "Query heads H.")
_KV_HEADS = flags.DEFINE_integer("num_kv_heads", 2, "Key/value heads K (GQA: H / K per group).")
_BATCH = flags.DEFINE_integer("batch_size", 1, "Rows.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                           "Input dtype (default: bfloat16 on accelerators, float32 on CPU).")
_IMPLS = flags.DEFINE_list("impls", ["xla", "pallas", "cudnn"], "Implementations to time.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per measurement (best).")
_INTERPRET_MAX_SEQ = flags.DEFINE_integer(
    "interpret_max_seq", 0, "Longest N for Pallas in interpret mode on CPU (not a speed figure; "
    "about 80 s for forward+backward at N=4096).")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Also write the table here as JSON.")


def window_flops(batch: int, n: int, heads: int, head_dim: int, window: int) -> float:
  """Useful forward FLOPs of sliding-window attention: QK^T and PV over min(W, i+1) keys."""
  keys = np.minimum(window, np.arange(1, n + 1)).sum()
  return 4.0 * batch * heads * head_dim * float(keys)


def attention_fn(impl: str, window: int):
  """(q, k, v) -> out for one implementation, or None when this backend lacks it."""
  platform = jax.default_backend()
  if impl == "xla":
    return functools.partial(attention.self_attention, window=window, segment_ids=None,
                             impl="xla", block_size=128)
  if impl == "pallas":
    return functools.partial(ops.local_attention, window=window)
  if impl == "cudnn" and platform in ("gpu", "cuda"):
    return functools.partial(ops.cudnn_attention, window=window)
  return None


def time_call(fn, *args, repeats: int) -> float:
  """Best wall time of ``fn(*args)`` after a compile-and-warm-up call (least disturbed by load
  from other processes)."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return min(times)


def measure(impl: str, n: int, dtype) -> dict | None:
  attn = attention_fn(impl, _WINDOW.value)
  interpret = impl == "pallas" and ops.default_kernel()[1]
  if attn is None or (interpret and n > _INTERPRET_MAX_SEQ.value):
    return None
  b, h, kv_heads, d = _BATCH.value, _HEADS.value, _KV_HEADS.value, _HEAD_DIM.value
  keys = jax.random.split(jax.random.key(n), 4)
  q = jax.random.normal(keys[0], (b, n, h, d), dtype)
  k = jax.random.normal(keys[1], (b, n, kv_heads, d), dtype)
  v = jax.random.normal(keys[2], (b, n, kv_heads, d), dtype)
  do = jax.random.normal(keys[3], (b, n, h, d), dtype)

  def fwd_bwd(q, k, v, do):
    _, vjp = jax.vjp(attn, q, k, v)
    return vjp(do)

  repeats = 1 if interpret else _REPEATS.value
  fwd_s = time_call(jax.jit(attn), q, k, v, repeats=repeats)
  fwd_bwd_s = time_call(jax.jit(fwd_bwd), q, k, v, do, repeats=repeats)
  flops = window_flops(b, n, h, d, _WINDOW.value)
  return {"impl": impl, "seq_len": n, "interpret": bool(interpret), "fwd_ms": fwd_s * 1e3,
          "fwd_bwd_ms": fwd_bwd_s * 1e3, "fwd_tflops": flops / fwd_s / 1e12,
          "fwd_bwd_tflops": 3.5 * flops / fwd_bwd_s / 1e12}


def add_growth(rows: list[dict]) -> None:
  """growth = time(4N) / time(N) for every row whose N / 4 was measured too."""
  by_key = {(r["impl"], r["seq_len"]): r for r in rows}
  for r in rows:
    base = by_key.get((r["impl"], r["seq_len"] // 4))
    for field in ("fwd_ms", "fwd_bwd_ms"):
      r[f"{field[:-3]}_growth"] = r[field] / base[field] if base else None


def print_table(rows: list[dict], device: str, dtype) -> None:
  print(f"\nsliding-window attention on {device} ({jnp.dtype(dtype).name}, B={_BATCH.value}, "
        f"H={_HEADS.value}, K={_KV_HEADS.value}, D={_HEAD_DIM.value}, W={_WINDOW.value})")
  print(f"{'impl':<18}{'N':>7}{'fwd ms':>11}{'TFLOP/s':>9}{'fwd+bwd ms':>12}{'TFLOP/s':>9}"
        f"{'growth fwd':>12}{'growth f+b':>12}")
  fmt = lambda x: f"{'-':>12}" if x is None else f"{x:>12.2f}"  # pylint: disable=unnecessary-lambda-assignment
  for r in rows:
    name = r["impl"] + (" (interpret)" if r["interpret"] else "")
    print(f"{name:<18}{r['seq_len']:>7}{r['fwd_ms']:>11.2f}{r['fwd_tflops']:>9.3f}"
          f"{r['fwd_bwd_ms']:>12.2f}{r['fwd_bwd_tflops']:>9.3f}"
          f"{fmt(r['fwd_growth'])}{fmt(r['fwd_bwd_growth'])}")
  if jax.default_backend() == "cpu":
    print("On CPU only the xla rows are speed figures; pallas runs in the Pallas interpreter "
          "(rows marked interpret, only up to --interpret_max_seq).")


def main(argv):
  del argv
  device = jax.devices()[0]
  dtype = jnp.dtype(_DTYPE.value or ("float32" if device.platform == "cpu" else "bfloat16"))
  rows = []
  for impl in _IMPLS.value:
    for n in map(int, _SEQ_LENS.value):
      row = measure(impl, n, dtype)
      if row is not None:
        rows.append(row)
  add_growth(rows)
  print_table(rows, device.device_kind, dtype)
  if _JSON_OUT.value:
    config = {"window": _WINDOW.value, "head_dim": _HEAD_DIM.value, "num_heads": _HEADS.value,
              "num_kv_heads": _KV_HEADS.value, "batch_size": _BATCH.value,
              "dtype": jnp.dtype(dtype).name}
    with open(_JSON_OUT.value, "w", encoding="utf-8") as f:
      json.dump({"device": device.device_kind, "platform": device.platform,
                 "jax": jax.__version__, "config": config, "rows": rows}, f, indent=2)


if __name__ == "__main__":
  app.run(main)
