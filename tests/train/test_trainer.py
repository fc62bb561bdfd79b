"""The trainer: sharded == single-device, exact resume, preemption, restore onto fewer devices."""

import os
import signal

import grain
import jax
import numpy as np
import pytest

from experiments.configs import default
from yocou_jax import sharding as sharding_lib
from yocou_jax.config import ConfigError
from yocou_jax.model import Model
from yocou_jax.train import checkpoint as checkpoint_lib
from yocou_jax.train import optimizer as optimizer_lib
from yocou_jax.train import step as step_lib
from yocou_jax.train import trainer

SEQ_LEN = 32
BATCH = 8


def synthetic_row(index: int) -> dict:
  """A packed row of two documents with a learnable pattern, a pure function of ``index``."""
  rng = np.random.default_rng(index)
  tokens = rng.integers(3, 64, size=SEQ_LEN).astype(np.int32)
  tokens[1::2] = (tokens[0::2] + 1) % 64
  cut = int(rng.integers(8, SEQ_LEN - 8))
  segment_ids = np.where(np.arange(SEQ_LEN) < cut, 1, 2).astype(np.int32)
  positions = np.where(segment_ids == 1, np.arange(SEQ_LEN), np.arange(SEQ_LEN) - cut)
  return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions.astype(np.int32)}


def synthetic_data(seed=0, process_index=0, process_count=1):
  """(grain iterator, eval batches, tokenizer=None): the trainer's ``data`` argument."""
  per_process = BATCH // process_count

  def local_rows(batch):
    return {k: v[process_index * per_process:(process_index + 1) * per_process]
            for k, v in batch.items()}

  train = (grain.MapDataset.range(1000).seed(seed).shuffle().map(synthetic_row).repeat()
           .batch(BATCH).map(local_rows).to_iter_dataset())
  eval_batches = [local_rows({k: np.stack([synthetic_row(10_000 + b * BATCH + i)[k]
                                           for i in range(BATCH)])
                              for k in ("tokens", "segment_ids", "positions")})
                  for b in range(2)]
  return iter(train), eval_batches, None


def tiny_config(arch="yocou", steps=20, mesh=(1, 1, 1)):
  c = default.get_config()
  c.model.update(arch=arch, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
                 d_ff=64, vocab_size=64, window=8, num_iterations=2, num_recursive_layers=1,
                 attention_block_size=8)
  c.data.seq_len = SEQ_LEN
  c.train.update(batch_size=BATCH, steps=steps, learning_rate=1e-2, warmup_steps=3)
  c.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
  c.logging.update(every_steps=1, tensorboard=False, progress=False)
  c.eval.update(every_steps=10, batch_size=BATCH)
  c.checkpoint.update(every_steps=5, keep=10)
  return c


def losses(result):
  return np.array([r["loss"] for r in result.history])


def test_sharded_run_matches_single_device(tmp_path):
  config8 = tiny_config(mesh=(2, 2, 2))
  sharded = trainer.train(config8, str(tmp_path / "8"), data=synthetic_data())
  single = trainer.train(tiny_config(), str(tmp_path / "1"), data=synthetic_data(),
                         devices=jax.devices()[:1])
  assert len(sharded.history) == 20
  np.testing.assert_allclose(losses(sharded), losses(single), rtol=0, atol=1e-5)
  assert losses(single)[-1] < 0.8 * losses(single)[0]  # It trains.
  # Parameters really are sharded on the 8-device run.
  emb = sharded.state.params["embedding"]
  assert emb.sharding.spec == jax.P("tensor", "fsdp")
  assert emb.addressable_shards[0].data.shape == (32, 16)


def test_sigterm_checkpoint_and_exact_resume(tmp_path):
  config = tiny_config(arch="yoco", mesh=(2, 2, 2))
  straight = trainer.train(config, str(tmp_path / "straight"), data=synthetic_data())

  def preempt_at_12(step, state):
    del state
    if step == 12:
      os.kill(os.getpid(), signal.SIGTERM)

  workdir = str(tmp_path / "resumed")
  first = trainer.train(config, workdir, data=synthetic_data(), hooks=[preempt_at_12])
  assert first.preempted and int(first.state.step) == 12
  assert checkpoint_lib.Checkpointer(workdir, keep=10).latest_step() == 12
  # A fresh process would build a fresh iterator: the checkpoint restores its position.
  second = trainer.train(config, workdir, data=synthetic_data())
  assert int(second.state.step) == 20
  resumed_losses = np.concatenate([losses(first), losses(second)])
  np.testing.assert_array_equal(resumed_losses, losses(straight))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(second.state.params),
               jax.device_get(straight.state.params))


def test_restore_checkpoint_saved_on_8_devices_onto_4(tmp_path):
  config = tiny_config(steps=5, mesh=(2, 2, 2))
  result = trainer.train(config, str(tmp_path), data=synthetic_data())
  mesh4 = sharding_lib.make_mesh({"data": 1, "fsdp": 2, "tensor": 2}, jax.devices()[:4])
  model = Model(trainer.ModelConfig.from_config(config.model))
  tx = optimizer_lib.make_optimizer(config.train)
  abstract, shardings = step_lib.state_shardings(model, tx, mesh4, SEQ_LEN)
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), keep=3)
  restored = ckpt.restore(5, checkpoint_lib.abstract_with_shardings(abstract, shardings))
  emb = restored.params["embedding"]
  assert set(emb.sharding.device_set) == set(jax.devices()[:4])
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored),
               jax.device_get(result.state))


@pytest.mark.parametrize("field, value, message", [
    ("mesh.data", 3, "config.mesh sizes"),
    ("train.batch_size", 6, "config.train.batch_size=6"),
    ("model.window", 0, "config.model.window=0"),
    ("model.num_heads", 3, "config.model.num_kv_heads"),
    ("model.d_model", 30, "config.model.num_heads=4"),
    ("model.arch", "mamba", "config.model.arch='mamba'"),
    ("train.microbatches", 3, "config.train.microbatches=3"),
    ("checkpoint.every_steps", 0, "config.checkpoint.every_steps=0"),
])
def test_bad_config_fails_at_start_with_named_field(field, value, message):
  config = tiny_config(mesh=(2, 2, 2))
  section, name = field.split(".")
  config[section][name] = value
  with pytest.raises((ConfigError, ValueError), match=message.replace("(", r"\(")) as info:
    trainer.validate_config(config, 8, 1)
  assert "\n" not in str(info.value)
