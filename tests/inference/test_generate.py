"""Generation: stop tokens, greedy = the full forward's argmax chain, and the generate binary."""

import json

import jax
import numpy as np

from yocou_jax import accounting
from yocou_jax.config import ModelConfig
from yocou_jax.data import tokenizers
from yocou_jax.inference import engine as engine_lib
from yocou_jax.inference import sampling as sampling_lib
from yocou_jax.inference import text
from tests import cpu_env
from tests.inference import reference as ref_lib


def test_greedy_generation_follows_forward_argmax_and_stops():
  cfg = ref_lib.tiny("yocou")
  params = ref_lib.random_params(cfg, seed=7)
  engine = engine_lib.Engine(cfg, engine_lib.Options(chunk_size=4, kv_block=4, window_block=2))
  prompts = [[5, 9, 3, 11, 20, 1, 7], [8, 2, 40]]
  free = engine.generate(params, prompts, 10, max_len=17)
  seqs = np.zeros((2, 17), np.int32)  # Right padding: causal logits before it are unchanged.
  for b, (prompt, out) in enumerate(zip(prompts, free.tokens)):
    seqs[b, :len(prompt) + len(out)] = prompt + out
  logits = ref_lib.reference_logits(cfg, params, seqs)
  for b, (prompt, out) in enumerate(zip(prompts, free.tokens)):
    assert len(out) == 10
    np.testing.assert_array_equal(logits[b, len(prompt) - 1:len(prompt) + 9].argmax(-1), out)
  stop = free.tokens[0][2]
  stopped = engine.generate(params, prompts, 10, stop_tokens=[stop], max_len=17)
  for out, cut in zip(free.tokens, stopped.tokens):
    end = out.index(stop) + 1 if stop in out else len(out)
    assert cut == out[:end]
  assert free.cache_bytes == accounting.kv_cache_bytes(cfg, 17, 2)


def test_load_run_and_generate_at_another_depth(tmp_path):
  # A T = 2 checkpoint loaded at T = 3 (test-time depth); greedy continuations stop at EOS.
  workdir = str(tmp_path)
  trained_cfg, params = ref_lib.write_run(workdir)
  run = text.load_run(workdir, num_iterations=3)
  assert run.step == 5 and run.model_cfg == trained_cfg.replace(num_iterations=3)
  jax.tree.map(np.testing.assert_array_equal, run.params, params)
  continuations, result = text.generate(run, ["ab", "hello"], 5, chunk_size=4, warmup=False)
  tok = tokenizers.ByteTokenizer()
  ids = [[tok.bos_id] + tok.encode(p) for p in ("ab", "hello")]
  want = engine_lib.Engine(run.model_cfg, engine_lib.Options(chunk_size=4)).generate(
      params, ids, 5, stop_tokens=[tok.eos_id]).tokens
  assert continuations == [tok.decode(t) for t in want] and result.tokens == want
  assert result.cache_bytes == accounting.kv_cache_bytes(run.model_cfg, 6 + 5, 2)


def test_generate_binary(tmp_path):
  # The binary in a child process (absl flags of binaries collide in one process), on a run
  # trained with attention_impl=auto (the TPU/GPU setting), served here through XLA; with
  # JAX_PLATFORMS (and what this process's yocou_jax.platforms.select set) unset, as a user
  # runs it: no TPU runtime noise on a host without a TPU.
  workdir = str(tmp_path)
  trained_cfg, _ = ref_lib.write_run(workdir, attention_impl="auto")
  (tmp_path / "prompt.txt").write_text("print(1)\n")
  proc = cpu_env.run_module("experiments.generate", f"--workdir={workdir}", "--prompt=ab",
                            f"--prompt_file={tmp_path / 'prompt.txt'}", "--max_new_tokens=4",
                            "--num_iterations=3", "--temperature=0.8", "--top_k=20",
                            "--top_p=0.9", "--chunk_size=4", timeout=300, JAX_PLATFORMS="",
                            TPU_WORKER_HOSTNAMES="", TPU_HOST_BOUNDS="")
  assert proc.returncode == 0, proc.stderr[-3000:]
  for noise in ("Failed to find host bounds", "Source Location Trace", "libtpu"):
    assert noise not in proc.stderr, proc.stderr[-3000:]
  cfg = trained_cfg.replace(num_iterations=3)
  formula = accounting.kv_cache_bytes(cfg, 10 + 4, 2)  # BOS + "print(1)\n", 4 new tokens.
  assert "checkpoint step 5: yocou, 2 layers, T=3, window 4" in proc.stdout
  assert "--- prompt: 'ab'" in proc.stdout and "--- prompt: 'print(1)\\n'" in proc.stdout
  # The greedy continuation beside the seeded sampled one, each as the library generates it.
  run = text.load_run(workdir, num_iterations=3)
  for sampling in (sampling_lib.SamplingConfig(), sampling_lib.SamplingConfig(0.8, 20, 0.9)):
    (want, _), _ = text.generate(run, ["ab", "print(1)\n"], 4, sampling=sampling, chunk_size=4,
                                 warmup=False)
    assert f"[{sampling.describe(seed=0)}]\nab{want}\n" in proc.stdout, repr(proc.stdout)
  assert f"{formula:,} bytes for 2 x 14 tokens (accounting.kv_cache_bytes: {formula:,})" in (
      proc.stdout)


def test_generate_binary_on_a_mesh_gives_the_tokens_of_one_device(tmp_path):
  # One batch of 4 prompts on 8 devices (--mesh: the batch over 'data', heads over 'tensor'):
  # the greedy and the seeded sampled continuations are the library's on one device.
  workdir = str(tmp_path)
  ref_lib.write_run(workdir)
  prompts = ["def f", "x", "import os", "class A:"]
  (tmp_path / "prompts.txt").write_text("".join(p + "\n" for p in prompts))
  proc = cpu_env.run_module("experiments.generate", f"--workdir={workdir}",
                            f"--prompts_file={tmp_path / 'prompts.txt'}", "--max_new_tokens=5",
                            "--mesh=data:-1,tensor:2", "--chunk_size=4", "--seed=3",
                            "--warmup=false", device_count=8, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "window 4 on the mesh {'data': 4, 'fsdp': 1, 'tensor': 2}" in proc.stdout
  run = text.load_run(workdir)
  for sampling in (sampling_lib.SamplingConfig(), sampling_lib.SamplingConfig(0.6, 0, 0.9)):
    want, _ = text.generate(run, prompts, 5, sampling=sampling, seed=3, chunk_size=4,
                            warmup=False)
    for prompt, continuation in zip(prompts, want):
      assert f"[{sampling.describe(seed=3)}]\n{prompt}{continuation}\n" in proc.stdout, (
          repr(proc.stdout))


def test_generate_binary_serves_a_prompts_file(tmp_path):
  # A JSONL file of prompts with their own budgets by continuous batching, greedy, on 8 devices:
  # the params sharded over 'fsdp' and 'tensor', 4 rows over 'data' x 'fsdp' (the 3 requests
  # fill 3). Each continuation is the library's for that prompt alone on one device; the JSON
  # lines come in order. (Rows reused on a mesh: tests/inference/test_serving.py.)
  workdir = str(tmp_path / "run")
  ref_lib.write_run(workdir)
  prompts = [("def f", 5), ("x", 2), ("import os\n", 4)]
  path = tmp_path / "prompts.jsonl"
  path.write_text("".join(json.dumps({"prompt": p, "max_new_tokens": n}) + "\n"
                          for p, n in prompts) + "\n")
  out = tmp_path / "out.jsonl"
  proc = cpu_env.run_module("experiments.generate", f"--workdir={workdir}",
                            f"--prompts_file={path}", "--rows=4", "--temperature=0",
                            "--chunk_size=4", f"--json_out={out}",
                            "--mesh=data:2,fsdp:2,tensor:2", device_count=8, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "3 requests through 4 rows on the mesh {'data': 2, 'fsdp': 2, 'tensor': 2}" in (
      proc.stdout)
  run = text.load_run(workdir)
  want = [text.generate(run, [p], n, chunk_size=4, warmup=False)[0][0] for p, n in prompts]
  records = [json.loads(line) for line in out.read_text().splitlines()]
  assert records == [{"index": i, "prompt": p, "continuation": c}
                     for i, ((p, _), c) in enumerate(zip(prompts, want))]
  # Per-request budgets without --rows, and mesh specs the devices, the model or the rows
  # cannot take, are refused: tests/reliability/test_bad_inputs.py.
