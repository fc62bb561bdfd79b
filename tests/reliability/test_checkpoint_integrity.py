"""Torn and corrupted Orbax checkpoints: found, reported, skipped, never the only one deleted."""

import logging
import os
import shutil

import jax
import numpy as np
import pytest

from tests import cpu_env
from tests.train.synthetic import synthetic_data, tiny_config
from yocou_jax.train import checkpoint as checkpoint_lib
from yocou_jax.train import integrity
from yocou_jax.train import trainer


def step_dir(workdir, step):
  return os.path.join(workdir, "checkpoints", str(step))


def largest_data_file(workdir, step):
  data = os.path.join(step_dir(workdir, step), "state", "ocdbt.process_0", "d")
  return max((os.path.join(data, f) for f in os.listdir(data)), key=os.path.getsize)


def truncate(path):
  os.truncate(path, os.path.getsize(path) // 2)


def write(path, text):
  with open(path, "w") as f:
    f.write(text)


# (name, damage(step_dir, workdir), words the reason must contain, found without reading arrays)
DAMAGE = [
    ("commit marker removed", lambda d, w: os.remove(os.path.join(d, "commit_success.txt")),
     "no commit marker", True),
    ("step metadata garbled", lambda d, w: write(os.path.join(d, "_CHECKPOINT_METADATA"), "{x"),
     "_CHECKPOINT_METADATA is unreadable", True),
    ("data item missing", lambda d, w: shutil.rmtree(os.path.join(d, "data")),
     "item 'data' is missing", True),
    ("config JSON garbled", lambda d, w: write(os.path.join(d, "config", "metadata"), "{\"a\": "),
     "item 'config': config/metadata is unreadable", True),
    ("array metadata removed", lambda d, w: os.remove(os.path.join(d, "state", "_METADATA")),
     "state/_METADATA is missing", True),
    ("manifest emptied", lambda d, w: truncate(os.path.join(d, "state", "manifest.ocdbt")) or
     os.truncate(os.path.join(d, "state", "manifest.ocdbt"), 0), "manifest.ocdbt", True),
    ("data file emptied", lambda d, w: os.truncate(largest_data_file(w, 10), 0), "is empty", True),
    ("data file truncated", lambda d, w: truncate(largest_data_file(w, 10)), "arrays unreadable",
     False),
    ("data file deleted", lambda d, w: os.remove(largest_data_file(w, 10)), "arrays unreadable",
     False),
]


@pytest.mark.parametrize("name, damage, reason, structural", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_damage_is_found_with_its_reason(run10_copy, name, damage, reason, structural):
  del name
  workdir = run10_copy
  assert integrity.read_step(step_dir(workdir, 10)) is None  # Intact before the damage.
  damage(step_dir(workdir, 10), workdir)
  found = integrity.read_step(step_dir(workdir, 10))
  assert found is not None and reason in found, found
  assert (integrity.check_step(step_dir(workdir, 10)) is not None) == structural
  assert integrity.read_step(step_dir(workdir, 5)) is None  # The older step is untouched.


def test_non_finite_array_is_bad(run10, run10_copy):
  workdir = run10_copy
  ckpt = checkpoint_lib.Checkpointer(workdir, keep=10, use_async=False)
  state = jax.device_get(run10[1].state)
  state = state.replace(params=jax.tree.map(lambda x: x * np.nan, state.params))
  ckpt.save(15, state)
  ckpt.wait_until_finished()
  assert "holds non-finite values" in integrity.read_step(step_dir(workdir, 15))


@pytest.mark.parametrize("damage", ["commit_marker", "truncated_data"])
def test_resume_skips_a_bad_newest_step_and_continues_exactly(run10, run10_copy, caplog, damage):
  workdir = run10_copy
  if damage == "commit_marker":
    os.remove(os.path.join(step_dir(workdir, 10), "commit_success.txt"))
  else:
    truncate(largest_data_file(workdir, 10))
  config = tiny_config(steps=10)
  with caplog.at_level(logging.WARNING):
    resumed = trainer.train(config, workdir, data=synthetic_data(), devices=jax.devices()[:1])
  warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert any("checkpoint step 10" in w and "is bad" in w for w in warnings), warnings
  assert any("resuming from step 5" in w for w in warnings), warnings
  # It retrained steps 6..10 from step 5 and lands exactly where the undamaged run did.
  assert [r["step"] for r in resumed.history if "loss" in r] == [6, 7, 8, 9, 10]
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.state),
               jax.device_get(run10[1].state))
  # The bad step was moved aside, not deleted, and the new step 10 is intact.
  assert len(os.listdir(os.path.join(workdir, checkpoint_lib.QUARANTINE_DIR))) == 1
  assert integrity.read_step(step_dir(workdir, 10)) is None


def test_retention_counts_intact_steps_only(run10, run10_copy):
  workdir = run10_copy
  os.remove(os.path.join(step_dir(workdir, 10), "commit_success.txt"))
  ckpt = checkpoint_lib.Checkpointer(workdir, keep=1, use_async=False)
  ckpt.wait_until_finished()  # Applies retention.
  assert ckpt.all_steps() == [5, 10]  # Step 5 is the only intact one: kept.
  state = jax.device_get(run10[1].state)
  ckpt.save(15, state)
  ckpt.wait_until_finished()
  ckpt.save(20, state)
  ckpt.wait_until_finished()
  # keep=1 intact: once 15 was intact, 5 and the bad 10 went; then 20 replaced 15.
  assert ckpt.all_steps() == [20] and ckpt.intact_steps() == [20]


def test_check_checkpoints_binary_lists_each_step(run10_copy, tmp_path):
  workdir = run10_copy
  truncate(largest_data_file(workdir, 10))
  out = cpu_env.run_module("experiments.check_checkpoints", f"--workdir={workdir}",
                           f"--json_out={tmp_path / 'c.json'}", timeout=300)
  assert out.returncode == 1, out.stderr[-2000:]
  lines = {line.split()[0]: line for line in out.stdout.splitlines() if line.strip()}
  assert lines["5"].split()[1] == "intact"
  assert lines["10"].split()[1] == "BAD" and "arrays unreadable" in lines["10"]
  assert "1 of 2 steps intact; newest intact: 5" in out.stdout
  missing = cpu_env.run_module("experiments.check_checkpoints", f"--workdir={tmp_path / 'nope'}")
  assert missing.returncode == 1
  assert missing.stderr.strip().splitlines()[-1] == (
      f"error: --workdir={tmp_path / 'nope'} holds no checkpoints/ directory")


def test_an_intact_checkpoint_that_does_not_fit_is_refused_not_moved(run10_copy):
  """A state of another structure (here: another optimizer) is no reason to drop a checkpoint."""
  import optax  # pylint: disable=g-import-not-at-top
  from yocou_jax.config import ConfigError  # pylint: disable=g-import-not-at-top
  from yocou_jax.model import Model  # pylint: disable=g-import-not-at-top
  from yocou_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from yocou_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top

  config = tiny_config(steps=10)
  mesh = sharding_lib.make_mesh(config.mesh, jax.devices()[:1])
  model = Model(trainer.ModelConfig.from_config(config.model))
  abstract, shardings = step_lib.state_shardings(model, optax.sgd(0.1), mesh, 32)
  ckpt = checkpoint_lib.Checkpointer(run10_copy, keep=10)
  with pytest.raises(ConfigError, match="checkpoint step 10 in .* is intact but does not "
                     "restore into this run's state"):
    ckpt.restore_latest(checkpoint_lib.abstract_with_shardings(abstract, shardings))
  assert ckpt.all_steps() == [5, 10]
  assert not os.path.exists(os.path.join(run10_copy, checkpoint_lib.QUARANTINE_DIR))
