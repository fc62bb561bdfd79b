r"""One-shot GPU check of the attention kernels: numerics first, then speed.

  python -m experiments.gpu_check [--json_out=PATH] [--quick]

Written to run once on a lent GPU (the kernels cannot run on the CPU development machine):

1. environment: jax version, device, whether Pallas-Triton is importable;
2. numerics: the Pallas (Triton) kernels and cuDNN against the pure-JAX reference computed in
   float32 (highest matmul precision) from the same inputs, output and (dq, dk, dv), at ragged lengths, windows below / at /
   above the block and causal (cross), GQA 1 and 4, segment ids, a soft-cap (Pallas only),
   bfloat16 inputs; plus the decode kernel against ``kernels.reference.decode_reference``.
   A check passes when the largest error relative to the reference's largest magnitude is
   below 2e-2 (bfloat16 tolerance, as in the CPU tests);
3. speed: ``experiments.bench_attention``'s measurement (W=512, D=128, GQA 4) at 4K..32K for
   xla, pallas and cudnn, the ratio pallas / cudnn forward+backward time (target <= 1.2) and
   the growth time(4N) / time(N) (target about 4);
4. a small block-size sweep of the Triton kernels at N=16K, to pick ``DEFAULT_BLOCKS``.

Every section catches its own failure (recorded with the error text), so one run reports
everything. Prints tables; ``--json_out`` writes all figures. The shape flags of
``bench_attention`` (``--num_heads``, ``--head_dim``, ``--window``, ...) apply to the timing.
"""

from __future__ import annotations

import functools
import json
import traceback

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from experiments import bench_attention
from kernels import ops
from kernels import reference

_JSON_OUT = bench_attention._JSON_OUT  # pylint: disable=protected-access  # Shared --json_out.
_QUICK = flags.DEFINE_bool("quick", False, "Numerics and N in {4K, 16K} only.")

TOLERANCE = 2e-2  # Relative to the reference's largest magnitude (bfloat16 inputs).

# (name, N, H, K, D, window, segments, softcap)
NUMERIC_CASES = [
    ("window<block ragged gqa4 seg", 1000, 8, 2, 128, 40, True, None),
    ("window=block gqa1", 1024, 4, 4, 64, 64, False, None),
    ("window 512 gqa4 seg", 2048, 8, 2, 128, 512, True, None),
    ("window>seq softcap", 700, 4, 2, 128, 4096, True, 30.0),
    ("cross causal ragged gqa4 seg", 1500, 8, 2, 128, None, True, None),
]


def rel_error(actual, expected) -> float:
  actual, expected = (np.asarray(jnp.asarray(x, jnp.float32), np.float64)
                      for x in (actual, expected))
  if np.isnan(actual).any():
    return float("nan")
  return float(np.abs(actual - expected).max() / max(1.0, np.abs(expected).max()))


def _inputs(n, h, kv_heads, d, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  make = lambda key, heads: jax.random.normal(key, (2, n, heads, d), jnp.float32)  # pylint: disable=unnecessary-lambda-assignment
  q, k, v, do = make(keys[0], h), make(keys[1], kv_heads), make(keys[2], kv_heads), make(keys[3], h)
  segment_ids = jnp.asarray(np.where(np.arange(n) < n // 3, 1, 2)[None].repeat(2, 0), jnp.int32)
  return q, k, v, do, segment_ids


def _value_and_grads(fn, q, k, v, do):
  out, vjp = jax.vjp(fn, q, k, v)
  return (out, *vjp(do))


def check_numerics() -> list[dict]:
  results = []
  for name, n, h, kv_heads, d, window, use_seg, softcap in NUMERIC_CASES:
    q, k, v, do, seg = _inputs(n, h, kv_heads, d)
    seg = seg if use_seg else None
    ref_fn = functools.partial(reference.attention_reference, window=window, segment_ids=seg,
                               softcap=softcap)
    with jax.default_matmul_precision("highest"):  # A float32 reference, not TF32.
      expected = jax.jit(functools.partial(_value_and_grads, ref_fn))(q, k, v, do)
    impls = {"pallas": functools.partial(ops.flash_attention, window=window, segment_ids=seg,
                                         softcap=softcap)}
    if softcap is None:
      impls["cudnn"] = functools.partial(ops.cudnn_attention, window=window, segment_ids=seg)
    for impl, fn in impls.items():
      row = {"case": name, "impl": impl}
      try:
        bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v, do)]
        got = jax.jit(functools.partial(_value_and_grads, fn))(*bf16)
        errors = {f: rel_error(a, e) for f, a, e in zip(("out", "dq", "dk", "dv"), got, expected)}
        row.update(errors, ok=all(err <= TOLERANCE for err in errors.values()))
      except Exception as e:  # pylint: disable=broad-except
        row.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000])
      results.append(row)
  results.append(check_decode())
  return results


def check_decode() -> dict:
  row = {"case": "decode T=2 gqa4 window+kv_length", "impl": "pallas"}
  try:
    q, k, v, _, _ = _inputs(4096, 8, 2, 128, seed=1)
    q = q[:, :2].astype(jnp.bfloat16)
    k, v = k.astype(jnp.bfloat16), v.astype(jnp.bfloat16)
    pos = jnp.asarray([[3000, 3001], [100, 101]])
    kv_len = jnp.asarray([3002, 4096])
    got = jax.jit(lambda q, k, v: ops.decode_attention(
        q, k, v, q_positions_BxT=pos, kv_length_B=kv_len, window=512))(q, k, v)
    with jax.default_matmul_precision("highest"):
      expected = reference.decode_reference(q.astype(jnp.float32), k.astype(jnp.float32),
                                            v.astype(jnp.float32), q_positions_BxT=pos,
                                            kv_length_B=kv_len, window=512)
    err = rel_error(got, expected)
    row.update(out=err, ok=err <= TOLERANCE)
  except Exception as e:  # pylint: disable=broad-except
    row.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000])
  return row


def time_impls(seq_lens) -> list[dict]:
  rows = []
  for impl in ("xla", "pallas", "cudnn"):
    for n in seq_lens:
      try:
        row = bench_attention.measure(impl, n, jnp.bfloat16)
      except Exception as e:  # pylint: disable=broad-except
        row = {"impl": impl, "seq_len": n, "error": f"{type(e).__name__}: {e}"[:1000]}
      if row is not None:
        rows.append(row)
  timed = [r for r in rows if "error" not in r]
  bench_attention.add_growth(timed)
  cudnn = {r["seq_len"]: r for r in timed if r["impl"] == "cudnn"}
  for r in timed:
    if r["impl"] == "pallas" and r["seq_len"] in cudnn:
      r["fwd_bwd_vs_cudnn"] = r["fwd_bwd_ms"] / cudnn[r["seq_len"]]["fwd_bwd_ms"]
      r["fwd_vs_cudnn"] = r["fwd_ms"] / cudnn[r["seq_len"]]["fwd_ms"]
  return rows


SWEEP = [  # (fwd q, fwd kv, bwd q, bwd kv) Triton blocks.
    (128, 64, 64, 64), (128, 128, 64, 64), (64, 64, 64, 64), (128, 64, 128, 64),
    (128, 64, 64, 128), (128, 64, 32, 32),
]


def sweep_blocks(n: int = 16384) -> list[dict]:
  rows = []
  for sizes in SWEEP:
    attn = functools.partial(ops.local_attention, window=512, block_q=sizes[0], block_kv=sizes[1],
                             block_q_bwd=sizes[2], block_kv_bwd=sizes[3])
    row = {"blocks": sizes, "seq_len": n}
    try:
      q, k, v, do, _ = _inputs(n, 8, 2, 128)
      q, k, v, do = (x[:1].astype(jnp.bfloat16) for x in (q, k, v, do))
      row["fwd_ms"] = 1e3 * bench_attention.time_call(jax.jit(attn), q, k, v, repeats=5)
      row["fwd_bwd_ms"] = 1e3 * bench_attention.time_call(
          jax.jit(functools.partial(_value_and_grads, attn)), q, k, v, do, repeats=5)
    except Exception as e:  # pylint: disable=broad-except
      row["error"] = f"{type(e).__name__}: {e}"[:1000]
    rows.append(row)
  return rows


def _section(report: dict, name: str, fn):
  try:
    report[name] = fn()
  except Exception:  # pylint: disable=broad-except
    report[name] = {"error": traceback.format_exc()[-3000:]}


def main(argv):
  del argv
  device = jax.devices()[0]
  report = {"jax": jax.__version__, "device": device.device_kind, "platform": device.platform,
            "triton_available": ops.triton_available(), "auto_impl": ops.resolve_impl("auto")}
  print(json.dumps(report))
  _section(report, "numerics", check_numerics)
  for r in report["numerics"] if isinstance(report["numerics"], list) else []:
    errs = " ".join(f"{f}={r[f]:.1e}" for f in ("out", "dq", "dk", "dv") if f in r)
    print(f"{'PASS' if r['ok'] else 'FAIL'} {r['impl']:<7}{r['case']:<34}{errs} "
          f"{r.get('error', '')[:300]}")
  seq_lens = [4096, 16384] if _QUICK.value else [4096, 8192, 16384, 32768]
  _section(report, "timing", functools.partial(time_impls, seq_lens))
  timed = [r for r in report["timing"] if "error" not in r] if isinstance(
      report["timing"], list) else []
  bench_attention.print_table(timed, device.device_kind, jnp.bfloat16)
  for r in timed:
    if "fwd_bwd_vs_cudnn" in r:
      print(f"pallas/cudnn N={r['seq_len']}: fwd {r['fwd_vs_cudnn']:.2f}x, "
            f"fwd+bwd {r['fwd_bwd_vs_cudnn']:.2f}x (target <= 1.2)")
  if not _QUICK.value:
    _section(report, "block_sweep", sweep_blocks)
    for r in report["block_sweep"] if isinstance(report["block_sweep"], list) else []:
      print("blocks", r)
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=2, default=str)


if __name__ == "__main__":
  app.run(main)
