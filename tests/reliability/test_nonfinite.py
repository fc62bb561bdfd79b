"""Injected NaNs: skipped inside the jitted step, counted, and a stop that saves nothing."""

import os

import jax
import numpy as np
import pytest

from tests.train.synthetic import synthetic_data, tiny_config
from yocou_jax.train import checkpoint as checkpoint_lib
from yocou_jax.train import integrity
from yocou_jax.train import safety
from yocou_jax.train import trainer


class PoisonedBatches:
  """The synthetic stream with an out-of-vocabulary token in the batches of ``poison_steps``.

  The embedding lookup of an id >= vocab_size yields NaN (``jnp.take``'s fill mode), so the loss
  and every gradient of that step are NaN: a bad batch as it happens in real data.
  """

  def __init__(self, poison_steps, vocab_size):
    self.inner, self.eval_batches, _ = synthetic_data()
    self.poison_steps, self.vocab_size, self.step = set(poison_steps), vocab_size, 0

  def __next__(self):
    batch = dict(next(self.inner))
    self.step += 1
    if self.step in self.poison_steps:
      batch["tokens"] = batch["tokens"].copy()
      batch["tokens"][0, 5] = self.vocab_size
    return batch

  def get_state(self):
    return self.inner.get_state()

  def set_state(self, state):
    self.inner.set_state(state)


def run(tmp_path, poison_steps, log_every=1, **train):
  config = tiny_config(steps=10)
  config.logging.every_steps = log_every
  config.train.update(**train)
  stream = PoisonedBatches(poison_steps, config.model.vocab_size)
  params = {}
  record = lambda step, state: params.__setitem__(step, jax.device_get(state.params))
  result = trainer.train(config, str(tmp_path), data=(stream, [], None),  # No eval: fewer compiles.
                         devices=jax.devices()[:1], hooks=[record])
  return result, params


def test_skip_leaves_the_update_out_and_counts_it(tmp_path):
  result, params = run(tmp_path, poison_steps=[3, 4], nonfinite="skip", max_skipped_steps=3)
  logged = {r["step"]: r for r in result.history if "loss" in r}
  assert sorted(logged) == list(range(1, 11))
  assert [s for s, r in logged.items() if not np.isfinite(r["loss"])] == [3, 4]
  assert [logged[s]["skipped_consecutive"] for s in (2, 3, 4, 5, 10)] == [0, 1, 2, 0, 0]
  assert logged[10]["skipped_total"] == 2 and logged[10]["skipped_longest_run"] == 2
  assert logged[10]["skipped_last_step"] == 4
  # Steps 3 and 4 left every parameter bit-identical; step 5 trained again.
  for step in (3, 4):
    jax.tree.map(np.testing.assert_array_equal, params[step], params[2])
  assert not np.array_equal(params[5]["embedding"], params[4]["embedding"])
  # Adam saw 8 updates (its bias correction counts only applied ones); the state's step is 10.
  adam_count = jax.tree.leaves(result.state.opt_state.inner_state.inner_state)
  assert int(result.state.step) == 10 and 8 in [int(x) for x in adam_count if x.ndim == 0]
  for step in (5, 10):  # Both checkpoints hold finite values only.
    assert integrity.read_step(os.path.join(tmp_path, "checkpoints", str(step))) is None


def test_skip_stops_after_max_skipped_steps_in_a_row(tmp_path):
  with pytest.raises(safety.NonFiniteError) as info:
    run(tmp_path, poison_steps=[4, 5, 6, 7], nonfinite="skip", max_skipped_steps=3)
  message = str(info.value)
  directory = os.path.join(tmp_path, "checkpoints")
  assert message == (
      f"non-finite loss or gradients at step 6 (3 skipped updates in all; 3 updates in a row "
      f"were skipped, config.train.max_skipped_steps=3): stopped at step 6 without saving; "
      f"last good checkpoint: step 5 in {directory}")
  assert checkpoint_lib.Checkpointer(str(tmp_path), keep=10).intact_steps() == [5]


def test_stop_mode_stops_at_the_next_check_and_saves_nothing(tmp_path):
  # Metrics are read every 3 steps and checkpoints every 5: the NaN of step 4 is seen at 5.
  with pytest.raises(safety.NonFiniteError) as info:
    run(tmp_path, poison_steps=[4], nonfinite="stop", log_every=3)
  assert str(info.value) == (
      "non-finite loss or gradients at step 4 (1 skipped updates in all; "
      "config.train.nonfinite='stop'): stopped at step 5 without saving; last good checkpoint: "
      "none")
  assert not os.listdir(os.path.join(tmp_path, "checkpoints"))
