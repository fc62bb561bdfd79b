"""Resume safety (a changed model or data is refused), workdir checks, and a save that fails."""

import errno
import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.train.synthetic import synthetic_data, tiny_config
from yocou_jax.config import ConfigError
from yocou_jax.train import checkpoint as checkpoint_lib
from yocou_jax.train import integrity
from yocou_jax.train import trainer


def test_resume_with_a_different_model_or_data_is_refused(run10_copy):
  config = tiny_config(steps=12)
  config.model.update(d_model=64, window=16)
  config.data.tokenizer = "other/tokenizer.json"
  config.seed = 3
  with pytest.raises(ConfigError) as info:
    trainer.train(config, run10_copy, data=synthetic_data(), devices=jax.devices()[:1])
  directory = os.path.join(run10_copy, "checkpoints")
  assert str(info.value) == (
      f"refusing to resume from step 10 in {directory}: the config differs from the one it was "
      "trained with: data.tokenizer: 'byte' -> 'other/tokenizer.json'; model.d_model: 32 -> 64; "
      "model.window: 8 -> 16; seed: 0 -> 3 (use a new workdir, or restore these values)")
  assert checkpoint_lib.Checkpointer(run10_copy, keep=10).intact_steps() == [5, 10]


def test_resume_may_change_steps_logging_eval_mesh_and_microbatches(run10, run10_copy):
  config = tiny_config(steps=12, mesh=(2, 1, 1))
  config.train.microbatches = 2
  config.logging.every_steps = 2
  config.eval.every_steps = 3
  config.checkpoint.update(every_steps=6, keep=4)
  config.model.remat = "full"
  result = trainer.train(config, run10_copy, data=synthetic_data(), devices=jax.devices()[:2])
  assert int(result.state.step) == 12
  assert [r["step"] for r in result.history if "loss" in r] == [12]  # Logged every 2, from 10.
  assert np.isfinite(result.history[-1]["loss"])


@pytest.mark.parametrize("make_bad, message", [
    (lambda tmp: str(tmp / "file" / "run"), "cannot be created: Not a directory"),
    (lambda tmp: str(tmp / "file"), "cannot be created: File exists"),
])
def test_unusable_workdir_fails_before_anything_is_built(tmp_path, make_bad, message):
  (tmp_path / "file").write_text("not a directory")
  workdir = make_bad(tmp_path)
  with pytest.raises(ConfigError) as info:
    trainer.train(tiny_config(), workdir, data=synthetic_data(), devices=jax.devices()[:1])
  assert str(info.value) == f"--workdir={workdir} {message}"


def test_a_save_that_fails_stops_the_run_and_keeps_earlier_checkpoints(run10, tmp_path,
                                                                       monkeypatch):
  """Step 10's write fails in the background with ENOSPC, as on a full disk."""
  original = ocp.JsonCheckpointHandler._save_fn  # pylint: disable=protected-access

  async def full_disk(self, x, directory):
    if "/10." in str(directory) or str(directory).split(os.sep)[-2].startswith("10"):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
    return await original(self, x, directory)

  monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", full_disk)
  workdir = str(tmp_path / "run")
  config = tiny_config(steps=10)
  with pytest.raises(checkpoint_lib.CheckpointSaveError) as info:
    trainer.train(config, workdir, data=synthetic_data(), devices=jax.devices()[:1])
  message = str(info.value)
  assert "No space left on device" in message, message
  assert message.endswith("intact checkpoint steps: [5]"), message
  assert "\n" not in message
  monkeypatch.undo()
  # Step 5 is intact and a restarted run from it ends exactly where the uninterrupted one did.
  assert integrity.read_step(os.path.join(workdir, "checkpoints", "5")) is None
  resumed = trainer.train(config, workdir, data=synthetic_data(), devices=jax.devices()[:1])
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.state),
               jax.device_get(run10[1].state))


def test_a_torn_metrics_line_is_dropped_before_appending(tmp_path):
  from yocou_jax.train import metrics as metrics_lib  # pylint: disable=g-import-not-at-top

  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 2.5}\n{"step": 2, "lo')  # Killed mid-write.
  assert metrics_lib.read_metrics(str(tmp_path)) == [{"step": 1, "loss": 2.5}]
  writer = metrics_lib.MetricsWriter(str(tmp_path), tensorboard=False)
  writer.write(2, {"loss": 2.25})
  writer.write(1, {"loss": 2.5})  # A step logged again after a resume.
  writer.close()
  assert path.read_text().splitlines()[1:] == ['{"step": 2, "loss": 2.25}',
                                               '{"step": 1, "loss": 2.5}']
  assert metrics_lib.read_metrics(str(tmp_path)) == [{"step": 1, "loss": 2.5},
                                                     {"step": 2, "loss": 2.25}]


def test_chaos_comparison_finds_a_changed_loss_and_array(run10, run10_copy):
  from yocou_jax.train import chaos  # pylint: disable=g-import-not-at-top

  assert chaos.compare_runs(run10[0], run10_copy, final_step=10) == []
  metrics = os.path.join(run10_copy, "metrics.jsonl")
  lines = open(metrics).read().splitlines()
  record = json.loads(lines[3])
  want = record["loss"]
  record["loss"] = float(np.nextafter(want, 10.0))  # One ulp.
  lines[3] = json.dumps(record)
  with open(metrics, "w") as f:
    f.write("\n".join(lines) + "\n")
  assert chaos.compare_runs(run10[0], run10_copy, final_step=10) == [
      f"step {record['step']} loss: {record['loss']!r} != {want!r}"]
  # The final checkpoint rewritten with one parameter changed by one ulp.
  shutil.rmtree(os.path.join(run10_copy, "checkpoints", "10"))
  state = jax.device_get(run10[1].state)
  params = dict(state.params)
  params["embedding"] = params["embedding"].copy()
  params["embedding"][0, 0] = np.nextafter(params["embedding"][0, 0], np.float32(10))
  ckpt = checkpoint_lib.Checkpointer(run10_copy, keep=10, use_async=False)
  ckpt.save(10, state.replace(params=params))
  ckpt.wait_until_finished()
  assert chaos.compare_runs(run10[0], run10_copy, final_step=10)[1:] == [
      "final ['params']['embedding'] differs"]
