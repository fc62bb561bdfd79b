"""The benchmark binaries at tiny shapes: they run, and their derived figures are consistent.

Speed targets are not asserted here (they belong to the full-size runs); what is asserted is that
every figure a benchmark prints is computed from what it measured and from the accounting
module's closed forms, so a full-size run can be trusted.
"""

import json
import math

import numpy as np
import pytest

import cpu_env
from yocou_jax import accounting
from yocou_jax import platforms
from yocou_jax.config import ModelConfig


def test_bench_train_figures_follow_from_step_times(tmp_path):
  path = tmp_path / "train.json"
  run = cpu_env.run_module(
      "experiments.bench_train", "--archs=yoco,yocou", "--d_model=128", "--num_layers=2",
      "--seq_len=128", "--batch_size=2", "--window=32", "--steps=3", "--warmup=1",
      "--pipeline_batches=3", f"--json_out={path}")
  assert run.returncode == 0, run.stderr[-3000:]
  result = json.loads(path.read_text())
  peak = result["peak_flops"]
  assert result["peak_source"] == "measured f32 matmul" and peak == result[
      "measured_matmul_peak_flops"] > 1e8
  assert peak == max(result["matmul_peak_before_after_flops"])  # The best of before and after.
  assert result["ffn_matmul_flops"] > 1e8 and 0 <= result["peak_spread"] < 1
  assert result["glibc_tunables"] == platforms.CPU_MALLOC_TUNABLES  # It restarted itself.
  for row in result["rows"]:
    cfg = ModelConfig(arch=row["arch"], num_layers=2, d_model=128, num_heads=2, num_kv_heads=1,
                      head_dim=64, d_ff=384, vocab_size=384, window=32, num_iterations=3)
    assert row["train_flops_per_step"] == pytest.approx(
        accounting.train_flops_per_step(cfg, 128, 2))
    assert len(row["step_times_s"]) == 3
    assert row["step_time_s"] == pytest.approx(float(np.median(row["step_times_s"])))
    assert row["mfu"] == pytest.approx(row["train_flops_per_step"] / row["step_time_s"] / peak)
    assert row["mfu_of_ffn_matmul"] == pytest.approx(
        row["train_flops_per_step"] / row["step_time_s"] / result["ffn_matmul_flops"])
    assert row["tokens_per_sec"] == pytest.approx(2 * 128 / row["step_time_s"])
    assert abs(row["loss"] - math.log(384)) < 0.5  # Random tokens, a few warm-up steps.
    seconds = row["op_breakdown"]["seconds"]  # Every region of the model shows up in the trace.
    for region in ("attention", "feed-forward", "loss"):
      assert seconds["matmul"][region] > 0, region
    assert seconds["other"]["norms"] > 0 and seconds["other"]["optimizer, metrics"] > 0
  yoco, yocou = result["rows"]
  gap = result["yocou_over_yoco"]
  assert gap["time_ratio"] == pytest.approx(yocou["step_time_s"] / yoco["step_time_s"])
  assert gap["flops_ratio"] == pytest.approx(
      yocou["train_flops_per_step"] / yoco["train_flops_per_step"])
  assert 1.5 < gap["flops_ratio"] < 3  # Two more self-decoder passes, not three more models.
  assert "yocou/yoco: time x" in run.stdout and "MFU" in run.stdout
  assert "yocou: op time" in run.stdout and "by region" in run.stdout


def test_bench_inference_figures_follow_from_measurements(tmp_path):
  path = tmp_path / "inference.json"
  run = cpu_env.run_module(
      "experiments.bench_inference", "--archs=transformer,yocou", "--contexts=256,1024",
      "--long_decode_contexts=2048,4096", "--decode_steps=4", "--decode_rounds=2",
      "--cache_budget_mib=4", "--d_model=64", "--num_layers=2", "--num_heads=2",
      "--num_kv_heads=1", "--window=64", "--chunk_size=128", "--kv_block=128",
      "--decode_kv_block=256", f"--plot_out={tmp_path / 'plot.png'}", f"--json_out={path}")
  assert run.returncode == 0, run.stderr[-3000:]
  result = json.loads(path.read_text())
  assert (tmp_path / "plot.png").stat().st_size > 0
  assert "full-length cache attentions per decoded token: transformer 2, yocou 1" in run.stdout
  # Closed forms: K and V, 1 kv head of 32 floats, per token per cache. The transformer keeps
  # one cache per layer (2); yocou one global cache plus T=3 x 1 self layer rings of W=64.
  per_token = 2 * 1 * 32 * 4
  for section in ("results", "long_context_decode"):
    for arch, layers, ring in (("transformer", 2, 0), ("yocou", 1, 3 * 64)):
      for row in result[section][arch]:
        n = row["context"]
        assert row["cache_bytes"] == per_token * (layers * n + ring)  # Every n >= W here.
        assert row["decode_tokens_per_s"] == pytest.approx(
            1 / float(np.median(row["decode_step_s"])))
  rows = {arch: {r["context"]: r for r in rs} for arch, rs in result["results"].items()}
  targets = {t["name"]: t for t in result["targets"]}
  prefill = targets["transformer / yocou prefill time at 1024"]
  assert prefill["value"] == pytest.approx(rows["transformer"][1024]["prefill_s"]
                                           / rows["yocou"][1024]["prefill_s"])
  assert prefill["met"] == (prefill["value"] >= 5)
  decode = targets["yocou / transformer decode tokens/s at 1024"]
  assert decode["value"] == pytest.approx(rows["yocou"][1024]["decode_tokens_per_s"]
                                          / rows["transformer"][1024]["decode_tokens_per_s"])
  assert targets["transformer / yocou cache bytes at 1024"]["value"] == pytest.approx(
      2 * 1024 / (1024 + 3 * 64))
  # The fit reproduces every context's step time to within the noise of a shared machine.
  for arch, fit in result["decode_fit"].items():
    every = result["results"][arch] + result["long_context_decode"][arch]
    ctx = np.array([r["context"] for r in every], float)
    step = np.array([1 / r["decode_tokens_per_s"] for r in every])
    slope, fixed = np.polyfit(ctx, step, 1)
    assert fit["per_token_s"] == pytest.approx(slope) and fit["fixed_s"] == pytest.approx(fixed)
  # 4 MiB: the transformer's cache per sequence at max_len 1029 (1024 + 2 rounds x 2 steps + 1)
  # is 256 B x 2 x 1029, so 7 fit; yocou's, 256 B x (1029 + 3 x 64), so 13 fit.
  budget = {r["arch"]: r for r in result["equal_memory_decode"]}
  assert budget["transformer"]["cache_bytes_per_sequence"] == 256 * 2 * 1029
  assert budget["yocou"]["cache_bytes_per_sequence"] == 256 * (1029 + 3 * 64)
  assert (budget["transformer"]["batch"], budget["yocou"]["batch"]) == (7, 13)
  for arch in ("transformer", "yocou"):
    r = budget[arch]
    assert r["batch"] == 4 * 2**20 // r["cache_bytes_per_sequence"]
    assert r["cache_bytes"] == r["batch"] * r["cache_bytes_per_sequence"] <= 4 * 2**20


def test_bench_inference_paper_protocol_rows_follow_from_measurements(tmp_path):
  path = tmp_path / "paper.json"
  # A 0.45 MiB cap on a batch's caches: the transformer's 4 do not fit (3 do), yocou's do.
  run = cpu_env.run_module(
      "experiments.bench_inference", "--protocol=paper", "--archs=transformer,yocou",
      "--paper_contexts=256", "--paper_new_tokens=4", "--paper_batch=4",
      f"--paper_memory_gib={0.45 / 1024}", "--decode_steps=2", "--cache_budget_mib=1",
      "--d_model=64", "--num_layers=2", "--num_heads=2", "--num_kv_heads=1", "--window=64",
      "--chunk_size=128", "--kv_block=128", "--decode_kv_block=256", f"--json_out={path}")
  assert run.returncode == 0, run.stderr[-3000:]
  result = json.loads(path.read_text())
  rows = {r["arch"]: r for r in result["rows"]}
  # Closed forms per sequence (max_len 260): K and V of 1 kv head of 32 floats per token, the
  # transformer per layer (2), yocou one global buffer plus T=3 rings of W=64.
  per_token = 2 * 32 * 4
  assert rows["transformer"]["cache_bytes_per_sequence"] == per_token * 2 * 260
  assert rows["yocou"]["cache_bytes_per_sequence"] == per_token * (260 + 3 * 64)
  for arch, r in rows.items():
    assert r["batch"] == min(4, int(0.45 * 2**20) // r["cache_bytes_per_sequence"])
    assert r["batch_equal_memory"] == 2**20 // r["cache_bytes_per_sequence"]
    assert r["cache_bytes"] == r["batch"] * r["cache_bytes_per_sequence"]
    assert r["prefill_s"] > 0 and r["prefill_batch"] == 1
    assert r["decode_tokens_per_s"] == pytest.approx(
        r["batch"] / float(np.median(r["decode_step_s"])))
    assert r["decode_tokens_per_s_equal_memory"] == pytest.approx(
        r["batch_equal_memory"] / float(np.median(r["decode_step_s_equal_memory"])))
    assert r["decode_s_new_tokens"] == pytest.approx(
        4 * float(np.median(r["decode_step_s"])))
  assert (rows["transformer"]["batch"], rows["yocou"]["batch"]) == (3, 4)
  y, t = rows["yocou"], rows["transformer"]
  assert y["decode_tokens_per_s_equal_memory_vs_transformer"] == pytest.approx(
      y["decode_tokens_per_s_equal_memory"] / t["decode_tokens_per_s_equal_memory"])
  assert y["prefill_speedup_vs_transformer"] == pytest.approx(t["prefill_s"] / y["prefill_s"])
  targets = {t["name"]: t for t in result["targets"]}
  equal = targets[f"yocou / transformer decode tokens/s at equal cache memory at 256 "
                  f"(batches {y['batch_equal_memory']} / {t['batch_equal_memory']})"]
  assert equal["value"] == pytest.approx(y["decode_tokens_per_s_equal_memory_vs_transformer"])
  assert equal["met"] == (equal["value"] >= 2)
  for read in result["cache_read"]:
    assert read["fraction"] == pytest.approx(read["reduction_s"] / read["attention_s"])
    assert read["bytes"] == 2 * read["batch"] * 256 * 32 * 4
  assert [r["batch"] for r in result["cache_read"]] == [1, y["batch_equal_memory"]]
  assert "PASS" in run.stdout or "MISS" in run.stdout
  # Bytes read per decoded token at max_len 260: the transformer's 2 caches; yocou's global
  # K/V once per cross layer (1) and its 3 rings.
  assert result["equal_memory_read_bound"] == pytest.approx(2 * 260 / (260 + 3 * 64))
  # With the weights read once a step (float32): the transformer's 2 layers and head, yocou's
  # self-decoder layer 3 times, its global K/V projections, cross layer (no K/V) and head.
  layer, head = 64 * 64 * 2 + 2 * 64 * 32 + 3 * 64 * 192, 64 * 384
  weights = {"transformer": 4 * (2 * layer + head),
             "yocou": 4 * (3 * layer + 2 * 64 * 32 + layer - 2 * 64 * 32 + head)}
  reads = {"transformer": 2 * 260 * 256, "yocou": (260 + 3 * 64) * 256}
  per_byte = {a: rows[a]["batch_equal_memory"] / (weights[a] + rows[a]["batch_equal_memory"]
                                                  * reads[a]) for a in rows}
  bound = result["equal_memory_bound"]
  assert bound["with_weights"] == pytest.approx(per_byte["yocou"] / per_byte["transformer"])
  assert bound["measured"] == pytest.approx(y["decode_tokens_per_s_equal_memory_vs_transformer"])
