"""The training binary end to end on a real (tiny) text corpus and the real grain pipeline."""

import functools
import json
import os
import random
import signal
import subprocess
import sys

import jax
import numpy as np

from tests import cpu_env
from tests.train.synthetic import tiny_config
from yocou_jax.data import corpora
from yocou_jax.data import run_tokenizer
from yocou_jax.data import tokenizers
from yocou_jax.inference import text
from yocou_jax.train import checkpoint as checkpoint_lib
from yocou_jax.train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_corpus(directory) -> str:
  rng = random.Random(0)
  words = ["def", "return", "self", "import", "class", "for", "in", "if", "(x)", ":", "\n"]
  directory.mkdir(parents=True, exist_ok=True)
  for i in range(80):
    text = " ".join(rng.choices(words, k=rng.randint(5, 60)))
    (directory / f"f{i:02d}.py").write_text(text, encoding="utf-8")
  return str(directory)


def corpus_config(tmp_path, steps=8):
  """The real text pipeline on one device (sharded runs of the same trainer: test_trainer.py)."""
  config = tiny_config(steps=steps)
  config.model.vocab_size = 384  # Byte tokenizer: 259 ids.
  config.data.update(tfds_name="text_files", text_glob=write_corpus(tmp_path / "corpus"),
                     tfds_data_dir=str(tmp_path / "tfds"), shuffle_window=256, packing_bins=8)
  config.eval.update(every_steps=4, num_batches=1)
  config.checkpoint.every_steps = 4
  return config


def test_real_pipeline_resumes_exactly_after_preemption(corpus_run, tmp_path):
  # The pipeline's state and batches do not depend on the mesh: one device keeps the runs cheap.
  config, _, straight = corpus_run  # The uninterrupted run (conftest.py).
  train = functools.partial(trainer.train, devices=jax.devices()[:1])

  def preempt_at_3(step, state):
    del state
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)

  workdir = str(tmp_path / "resumed")
  first = train(config, workdir, hooks=[preempt_at_3])
  assert first.preempted
  second = train(config, workdir)
  got = [r["loss"] for r in first.history + second.history if "loss" in r]
  want = [r["loss"] for r in straight.history if "loss" in r]
  np.testing.assert_array_equal(got, want)
  # The tokenizer travels with the run.
  assert os.path.exists(os.path.join(workdir, "tokenizer", "tokenizer_config.json"))


def test_binary_trains_reports_and_resumes(tmp_path):
  config_overrides = [
      "--config.model.num_layers=2", "--config.model.d_model=32", "--config.model.num_heads=2",
      "--config.model.num_kv_heads=1", "--config.model.head_dim=16", "--config.model.d_ff=64",
      "--config.model.window=8", "--config.data.seq_len=32", "--config.train.steps=6",
      "--config.train.batch_size=4", "--config.eval.every_steps=3",
      "--config.eval.num_batches=1", "--config.eval.batch_size=4",
      "--config.checkpoint.every_steps=3", "--config.logging.every_steps=2",
      "--config.data.tfds_name=text_files", "--config.data.shuffle_window=256",
      f"--config.data.text_glob={write_corpus(tmp_path / 'corpus')}",
      f"--config.data.tfds_data_dir={tmp_path / 'tfds'}",
  ]
  workdir = tmp_path / "run"
  cmd = [sys.executable, "-m", "experiments.train", f"--workdir={workdir}",
         "--sample_tokens=8", *config_overrides]
  env = cpu_env.subprocess_env(1)
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "validation loss:" in out.stdout and "greedy sample (8 tokens)" in out.stdout
  assert "temperature 0.6, top-p 0.9, seed 0 sample (8 tokens)" in out.stdout
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [0, 2, 3, 4, 6]
  for key in ("loss", "learning_rate", "grad_norm", "tokens_per_sec", "tflops_per_device", "mfu",
              "cumulative_tokens", "cumulative_train_flops"):
    assert key in records[-1], key
  assert records[-1]["cumulative_tokens"] == 6 * 4 * 32
  assert (workdir / "loss_curve.png").stat().st_size > 1000
  assert os.listdir(workdir / "tensorboard")
  assert checkpoint_lib.Checkpointer(str(workdir), keep=3).all_steps() == [3, 6]

  # The default tokenizer, bpe:1024: train_tokenizer's BPE of the corpus' training split.
  tokenizer_dir = str(workdir / "tokenizer")
  reference = tokenizers.train_tokenizer(
      "bpe", corpora.iterate_texts("text_files", str(tmp_path / "tfds"), "train",
                                   str(tmp_path / "corpus")), 1024, str(tmp_path / "reference"))
  saved = run_tokenizer.fingerprint(tokenizer_dir)
  assert "a byte-level BPE of" in out.stderr and "trained on" in out.stderr
  assert saved == run_tokenizer.fingerprint(str(tmp_path / "reference"))
  assert text.load_run(str(workdir)).tokenizer.encode("def f(x):") == reference.encode("def f(x):")

  # Re-running a finished run resumes at its last step and trains nothing more (no samples:
  # the first run checked them), its tokenizer read back, not made again.
  again = subprocess.run([*cmd, "--sample_tokens=0"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert len((workdir / "metrics.jsonl").read_text().splitlines()) == len(records)
  assert run_tokenizer.fingerprint(tokenizer_dir) == saved
  assert "trained on" not in again.stderr
  # A bad value failing at start-up with one line naming the field: the table of
  # tests/reliability/test_bad_inputs.py (config.model.window=0 among them).
