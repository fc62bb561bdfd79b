"""config.train.init_from: another run's params, checked model config, fresh optimizer at step 0."""

import json
import logging
import os
import shutil

import jax
import numpy as np
import pytest

from tests.train.conftest import TOOLING_STEPS
from tests.train.synthetic import SEQ_LEN, synthetic_data, tiny_config
from yocou_jax import sharding as sharding_lib
from yocou_jax.config import ConfigError, ModelConfig
from yocou_jax.data import tokenizers
from yocou_jax.model import Model
from yocou_jax.train import checkpoint as checkpoint_lib
from yocou_jax.train import finetune
from yocou_jax.train import optimizer as optimizer_lib
from yocou_jax.train import step as step_lib
from yocou_jax.train import trainer


def abstract_params(config, devices):
  """This run's params as ShapeDtypeStructs sharded over a mesh of ``devices``."""
  mesh = sharding_lib.make_mesh(config.mesh, devices)
  model = Model(ModelConfig.from_config(config.model))
  abstract, shardings = step_lib.state_shardings(
      model, optimizer_lib.make_optimizer(config.train), mesh, SEQ_LEN)
  return checkpoint_lib.abstract_with_shardings(abstract.params, shardings.params)


def assert_trees_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


def test_params_of_the_newest_step_restore_onto_another_mesh(tooling_run):
  config = tiny_config(mesh=(1, 2, 2))  # The source trained on (2, 2, 2).
  target = abstract_params(config, jax.devices()[:4])
  step, params = finetune.restore_params(tooling_run.workdir, target, config.to_dict())
  assert step == TOOLING_STEPS
  assert_trees_equal(params, tooling_run.result.state.params)
  emb = params["embedding"]
  assert set(emb.sharding.device_set) == set(jax.devices()[:4])


def test_fine_tuning_starts_at_step_0_from_the_source_params(tooling_run, tmp_path, caplog):
  config = tiny_config(steps=2)
  config.train.init_from = tooling_run.workdir
  workdir = str(tmp_path / "sft")
  run = trainer.train(config, workdir, data=synthetic_data(seed=1), devices=jax.devices()[:1])
  source_final = tooling_run.result.history[-1]
  assert source_final["step"] == TOOLING_STEPS
  # Step 0 is evaluated on the same validation batches: the params are the source's.
  assert run.history[0]["step"] == 0
  np.testing.assert_allclose(run.history[0]["eval_loss"], source_final["eval_loss"], rtol=1e-6)
  assert [r["step"] for r in run.history] == [0, 1, 2]
  assert int(run.state.step) == 2
  # A fresh optimizer: Adam's step count restarted with the run (the source's stood at 6).
  counts = [int(x) for x in jax.tree.leaves(run.state.opt_state) if np.ndim(x) == 0
            and np.issubdtype(np.asarray(x).dtype, np.integer)]
  assert 2 in counts and TOOLING_STEPS not in counts

  # The fine-tuning workdir now holds its own checkpoints: it resumes its own run, and says so.
  with caplog.at_level(logging.INFO):
    again = trainer.train(config, workdir, data=synthetic_data(seed=1), devices=jax.devices()[:1])
  assert "not used: this workdir resumes its own run" in caplog.text
  assert int(again.state.step) == 2
  assert_trees_equal(again.state.params, run.state.params)


def test_a_different_model_is_refused_naming_the_field(tooling_run, tmp_path):
  config = tiny_config()
  config.model.d_model = 64
  config.train.init_from = tooling_run.workdir
  with pytest.raises(ConfigError, match=(
      rf"config\.train\.init_from=.*: its model \(step {TOOLING_STEPS}\) differs from this "
      r"run's config: model\.d_model: 32 -> 64 \(fine-tuning keeps the model")) as info:
    trainer.train(config, str(tmp_path), data=synthetic_data(), devices=jax.devices()[:1])
  assert "\n" not in str(info.value)
  config = tiny_config(arch="yoco")  # Same parameter shapes, another function: refused too.
  with pytest.raises(ConfigError, match=r"differs from this run's config: model\.arch: 'yocou' "
                     r"-> 'yoco' \("):
    finetune.restore_params(tooling_run.workdir, None, config.to_dict())


def test_a_damaged_newest_step_falls_back_to_the_previous_and_stays(tooling_run, tmp_path):
  source = tmp_path / "source"
  shutil.copytree(os.path.join(tooling_run.workdir, checkpoint_lib.CHECKPOINT_DIR),
                  source / checkpoint_lib.CHECKPOINT_DIR)
  ckpt = checkpoint_lib.Checkpointer(str(source), keep=10)
  assert ckpt.all_steps() == [5, TOOLING_STEPS]
  os.remove(os.path.join(ckpt.step_dir(TOOLING_STEPS), "state", "manifest.ocdbt"))
  ckpt.close()
  config = tiny_config(mesh=(2, 2, 2))
  step, params = finetune.restore_params(str(source), abstract_params(config, jax.devices()),
                                         config.to_dict())
  assert step == 5
  with pytest.raises(AssertionError):
    assert_trees_equal(params, tooling_run.result.state.params)
  assert os.path.isdir(source / checkpoint_lib.CHECKPOINT_DIR / str(TOOLING_STEPS))  # Not moved.


def test_a_source_saved_before_a_model_field_existed_counts_it_as_its_default(tooling_run,
                                                                                tmp_path):
  source = tmp_path / "older"
  shutil.copytree(os.path.join(tooling_run.workdir, checkpoint_lib.CHECKPOINT_DIR),
                  source / checkpoint_lib.CHECKPOINT_DIR)
  for step in (5, TOOLING_STEPS):  # As if written by a version without model.cross_rope.
    path = source / checkpoint_lib.CHECKPOINT_DIR / str(step) / "config" / "metadata"
    saved = json.loads(path.read_text())
    del saved["model"]["cross_rope"]
    path.write_text(json.dumps(saved))
  config = tiny_config(mesh=(2, 2, 2))
  assert config.model.cross_rope is False  # ModelConfig's default.
  step, params = finetune.restore_params(str(source), abstract_params(config, jax.devices()),
                                         config.to_dict())
  assert step == TOOLING_STEPS
  assert_trees_equal(params, tooling_run.result.state.params)
  config.model.cross_rope = True  # Not the default the source ran with: refused.
  with pytest.raises(ConfigError, match=r"model\.cross_rope: False -> True"):
    finetune.restore_params(str(source), None, config.to_dict())


def test_a_directory_without_checkpoints_is_refused(tmp_path):
  config = tiny_config()
  with pytest.raises(ConfigError, match=r"config\.train\.init_from=.*missing is invalid: .* does "
                     r"not exist \(it must be a run's workdir"):
    finetune.restore_params(str(tmp_path / "missing"), None, config.to_dict())


def test_another_tokenizer_than_the_source_runs_is_refused(tmp_path):
  source = tmp_path / "pretrain"
  tokenizers.ByteTokenizer().save(str(source / finetune.TOKENIZER_DIR))
  finetune.check_tokenizer(str(source), tokenizers.load_tokenizer("byte"))  # The same: accepted.
  texts = [f"def f{i}(x):\n    return x + {i}  # the quick brown fox" for i in range(200)]
  bpe = tokenizers.train_tokenizer("bpe", texts, 300, str(tmp_path / "bpe"))
  with pytest.raises(ConfigError, match=(
      rf"config\.train\.init_from={source} was trained with another tokenizer \(.*\): pass "
      rf"--config\.data\.tokenizer={source}/tokenizer$")) as info:
    finetune.check_tokenizer(str(source), bpe)
  assert "\n" not in str(info.value)
