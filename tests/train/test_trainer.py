"""The trainer: sharded == single-device, exact resume, preemption, restore onto fewer devices."""

import os
import signal

import jax
import numpy as np
import pytest

from yocou_jax import sharding as sharding_lib
from yocou_jax.config import ConfigError
from yocou_jax.model import Model
from yocou_jax.train import checkpoint as checkpoint_lib
from yocou_jax.train import optimizer as optimizer_lib
from yocou_jax.train import step as step_lib
from yocou_jax.train import trainer
from tests.train.conftest import TOOLING_STEPS
from tests.train.synthetic import SEQ_LEN, synthetic_data, tiny_config

def losses(result):
  return np.array([r["loss"] for r in result.history if "loss" in r])


def test_sharded_run_matches_single_device(tmp_path):
  config8 = tiny_config(mesh=(2, 2, 2))
  sharded = trainer.train(config8, str(tmp_path / "8"), data=synthetic_data())
  single = trainer.train(tiny_config(), str(tmp_path / "1"), data=synthetic_data(),
                         devices=jax.devices()[:1])
  assert len(losses(sharded)) == 20
  assert sharded.history[0]["step"] == 0 and "eval_loss" in sharded.history[0]
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


def test_restore_checkpoint_saved_on_8_devices_onto_4(tooling_run):
  """The whole state (params, Adam moments, step) of the shared run's last step on 8 devices."""
  config = tooling_run.config
  assert config.mesh.to_dict() == {"data": 2, "fsdp": 2, "tensor": 2}
  mesh4 = sharding_lib.make_mesh({"data": 1, "fsdp": 2, "tensor": 2}, jax.devices()[:4])
  model = Model(trainer.ModelConfig.from_config(config.model))
  tx = optimizer_lib.make_optimizer(config.train)
  abstract, shardings = step_lib.state_shardings(model, tx, mesh4, SEQ_LEN)
  ckpt = checkpoint_lib.Checkpointer(tooling_run.workdir, keep=3)
  restored = ckpt.restore(TOOLING_STEPS,
                          checkpoint_lib.abstract_with_shardings(abstract, shardings))
  emb = restored.params["embedding"]
  assert set(emb.sharding.device_set) == set(jax.devices()[:4])
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored),
               jax.device_get(tooling_run.result.state))


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


def test_training_starts_from_a_checkpoint_without_data_state(tmp_path):
  """An imported checkpoint (params and step, no iterator state) starts a fresh data stream."""
  config = tiny_config(steps=4)
  model = Model(trainer.ModelConfig.from_config(config.model))
  tx = optimizer_lib.make_optimizer(config.train)
  # Jitted like the trainer's own init, so both runs start from bit-identical weights and any
  # difference in their losses can only come from the data stream.
  state = jax.jit(step_lib.init_state_fn(model, tx, SEQ_LEN))(jax.random.key(config.seed))
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "imported"), keep=3)
  ckpt.save(0, state, config=config.to_dict())
  ckpt.wait_until_finished()
  ckpt.close()
  from_import = trainer.train(config, str(tmp_path / "imported"), data=synthetic_data(),
                              devices=jax.devices()[:1])
  fresh = trainer.train(config, str(tmp_path / "fresh"), data=synthetic_data(),
                        devices=jax.devices()[:1])
  np.testing.assert_array_equal(losses(from_import), losses(fresh))
  assert len(losses(from_import)) == 4
