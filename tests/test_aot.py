"""Tests for yocou_jax.aot and experiments/compile_for.py: TPU programs compiled on this CPU.

Needs libtpu (the ``tpu`` test extra); no TPU. Each test compiles one tiny program for a TPU
slice (the TPU compiler takes 10-40 s even for these on loaded cores).
"""

from __future__ import annotations

import json
import os

import pytest

from experiments.configs import default
from tests import cpu_env
from yocou_jax import accounting
from yocou_jax import aot
from yocou_jax.config import ConfigError, ModelConfig

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TINY = ("--config.model.num_layers=2", "--config.model.num_heads=2",
         "--config.model.num_kv_heads=1", "--config.model.head_dim=64",
         "--config.model.d_ff=384", "--config.model.vocab_size=256", "--config.model.window=32",
         "--config.model.num_iterations=2", "--config.model.attention_block_size=32",
         "--config.data.seq_len=128", "--config.train.batch_size=8")


def _run_binary(*args: str):
  """Runs experiments.compile_for in a child process; returns the CompletedProcess."""
  return cpu_env.run_module("experiments.compile_for",
                            f"--config={_REPO}/experiments/configs/default.py", *args)


def _norm_params(cfg: ModelConfig) -> int:
  """Parameters replicated under the rules: RMSNorm scales (logical axis 'norm')."""
  import jax  # pylint: disable=g-import-not-at-top
  flat = jax.tree_util.tree_flatten_with_path(accounting.abstract_params(cfg))[0]
  return sum(leaf.size for path, leaf in flat if "scale" in jax.tree_util.keystr(path))


@pytest.mark.parametrize("unroll_loops", [True, False])
def test_train_step_v5p_fsdp(tmp_path, unroll_loops):
  """Full FSDP over 4 chips: parameter bytes, fit, FLOPs against the analytic count."""
  path = tmp_path / "aot.json"
  run = _run_binary(*_TINY, "--config.model.d_model=128", "--topology=v5p:2x2x1",
                    "--mesh=data:1,fsdp:-1,tensor:1", f"--json_out={path}",
                    f"--config.model.unroll_loops={unroll_loops}")
  assert run.returncode == 0, run.stderr[-3000:]
  (report,) = json.loads(path.read_text())
  cfg = ModelConfig(arch="yocou", num_layers=2, d_model=128, num_heads=2, num_kv_heads=1,
                    head_dim=64, d_ff=384, vocab_size=256, window=32, num_iterations=2,
                    attention_block_size=32, unroll_loops=unroll_loops)
  count, norms = accounting.param_counts(cfg)["total"], _norm_params(cfg)
  assert report["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
  assert report["num_devices"] == 4 and report["hbm_bytes"] == 95 * 2 ** 30
  # float32 params: every matrix split 4 ways over fsdp; the norm scales replicated.
  assert report["bytes"]["parameters"] == (count - norms) * 4 // 4 + norms * 4
  assert report["bytes"]["parameters"] == pytest.approx(count * 4 / 4, rel=0.01)
  # Adam's two moments shard like the params; plus scalar counters.
  assert 2 * report["bytes"]["parameters"] <= report["bytes"]["optimizer_state"]
  assert report["bytes"]["optimizer_state"] < 2 * report["bytes"]["parameters"] + 1024
  assert report["fits"] and 0 < report["bytes"]["total"] < 2 ** 30
  assert report["bytes"]["temporaries"] > 0
  assert report["bytes"]["host_temporaries"] == 0  # Nothing offloaded without remat=offload.
  # XLA counts each scanned layer once: compare on that basis (attention is XLA here).
  flops = report["flops"]
  assert flops["analytic"] == pytest.approx(accounting.train_flops_per_step(cfg, 128, 8))
  assert abs(flops["xla_over_analytic_loops_once"] - 1) < 0.10
  largest = report["largest_tensors"][0]
  assert "fsdp" in largest["spec"] and largest["bytes_per_device"] * 4 == largest["global_bytes"]
  assert "fits" in run.stdout and "per device" in run.stdout


def test_train_flops_basis():
  """The loops-once basis: one layer per scan, remat=full counts the forward twice."""
  cfg = ModelConfig(arch="transformer", num_layers=4, d_model=128, num_heads=2, num_kv_heads=1,
                    head_dim=64, d_ff=384, vocab_size=256, loss_chunk_size=-1)
  per_token = accounting.flops_per_token(cfg, 128)["by_part"]
  # The fused loss: one chunk of positions, its logits recomputed in the backward pass.
  for chunk, head_factor in ((0, 4), (32, 1)):
    fused = aot.train_flops(cfg.replace(loss_chunk_size=chunk), 128, 8, 1)["analytic_loops_once"]
    assert fused == pytest.approx(128 * 8 * (3 * per_token["decoder"] / 4
                                             + head_factor * per_token["lm_head"]))
  once = aot.train_flops(cfg, 128, 8, 1)["analytic_loops_once"]
  assert once == pytest.approx(3 * 128 * 8 * (per_token["decoder"] / 4 + per_token["lm_head"]))
  remat = aot.train_flops(cfg.replace(remat="full"), 128, 8, 2)["analytic_loops_once"]
  assert remat == pytest.approx(128 * 8 / 2 * (4 * per_token["decoder"] / 4
                                               + 3 * per_token["lm_head"]))
  # yocou: the layer scan loops; the T=3 iterations count three times when unrolled, once not.
  cfg = cfg.replace(arch="yocou", num_iterations=3)
  by_part = accounting.flops_per_token(cfg, 128)["by_part"]
  rest = sum(v for k, v in by_part.items() if k not in ("self_decoder", "cross_decoder"))
  for unroll, trips in ((True, 2), (False, 6)):
    once = aot.train_flops(cfg.replace(unroll_loops=unroll), 128, 8, 1)["analytic_loops_once"]
    assert once == pytest.approx(3 * 128 * 8 * (by_part["self_decoder"] / trips
                                                 + by_part["cross_decoder"] / 2 + rest))
  # Unrolled layer stacks count every layer; the T iterations still as above.
  once = aot.train_flops(cfg.replace(unroll_layers=True), 128, 8, 1)["analytic_loops_once"]
  assert once == pytest.approx(3 * 128 * 8 * sum(by_part.values()))


def test_offload_reports_host_memory():
  """remat=offload: the layer inputs kept for the backward pass are in host memory, not HBM."""
  config = default.get_config()
  config.model.update(num_layers=4, num_heads=2, num_kv_heads=1, head_dim=64, d_ff=384,
                      vocab_size=256, window=32, num_iterations=2, attention_block_size=32,
                      d_model=128, dtype="bfloat16", remat="offload")
  config.data.seq_len = 128
  config.train.batch_size = 8
  mesh = aot.topology_mesh("v5p:2x2x1", {"data": 1, "fsdp": -1, "tensor": 1})
  report = aot.compile_train(config, "v5p:2x2x1", mesh)
  layer_input = 8 // 4 * 128 * 128 * 2  # One [rows, N, D] bfloat16 input per chip.
  host = report.bytes["host_temporaries"]
  assert report.fits and host > 0 and host % layer_input == 0
  assert "host_temporaries" in aot.format_report(report)


def test_decode_step_v4_kv_cache():
  """v4 (32 GiB chips): the compiled decode step's cache equals the planner's KV cache."""
  config = default.get_config()
  config.model.update(num_layers=2, num_heads=2, num_kv_heads=1, head_dim=64, d_ff=384,
                      vocab_size=256, window=32, num_iterations=2, attention_block_size=32,
                      d_model=128)
  config.data.seq_len = 128
  config.train.batch_size = 8
  mesh = aot.topology_mesh("v4:2x2x1", {"data": -1, "fsdp": 1, "tensor": 1})
  report = aot.compile_inference(config, "v4:2x2x1", mesh, "decode", batch=4, context=256)
  cfg = ModelConfig.from_config(config.model)
  planned = accounting.kv_cache_bytes(cfg, 256, 4)
  assert report.extra["kv_cache_planned_bytes"] == planned
  assert report.extra["kv_cache_compiled_bytes"] == planned
  assert report.bytes["kv_cache"] == planned // 4  # Batch over the 4 data-parallel chips.
  assert report.hbm_bytes == 32 * 2 ** 30 and report.fits
  assert report.flops["xla_raw"] > 0.5 * report.flops["analytic"]


def test_too_big_for_one_chip_exits_nonzero():
  run = _run_binary("--config.model.num_layers=2", "--config.model.d_model=16384",
                    "--config.model.num_heads=128", "--config.model.num_kv_heads=8",
                    "--config.model.head_dim=128", "--config.model.d_ff=65536",
                    "--config.model.vocab_size=256", "--config.data.seq_len=128",
                    "--config.train.batch_size=1", "--topology=v5e:1x1")
  assert run.returncode == 1, run.stderr[-3000:]
  err = run.stderr
  assert "does NOT fit" in err and "GiB over the 16 GiB HBM of v5e" in err
  assert "dominated by" in err


def test_out_of_memory_message_figures():
  """The HBM a step needs, read from the TPU compiler's two out-of-memory messages."""
  gib = 2 ** 30
  used = "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space "
  assert aot._oom_bytes(used + "hbm. Used 120.5G of 95.74G hbm.", gib) == int(120.5 * gib)
  temporaries = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
                 "temporaries (116.15G) exceeds available HBM (95.74G).")
  assert aot._oom_bytes(temporaries, 2 * gib) == int(116.15 * gib) + 2 * gib
  assert aot._oom_bytes("RESOURCE_EXHAUSTED: Ran out of memory", gib) is None


def test_bad_topology_and_mesh():
  with pytest.raises(ConfigError, match="topology"):
    aot.generation("v9x:2x2")
  with pytest.raises(ConfigError, match="mesh item"):
    aot.parse_mesh("data:2,model:2")
  assert aot.parse_mesh("fsdp:-1") == {"data": 1, "fsdp": -1, "tensor": 1}
  with pytest.raises(ConfigError, match="do not divide"):
    aot.topology_mesh("v5p:2x2x1", {"data": 3, "fsdp": -1, "tensor": 1})
