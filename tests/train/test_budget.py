"""FLOPs and token budgets decide the step count (yocou_jax.train.budget)."""

import logging

import jax
import pytest

from tests.train.synthetic import BATCH, SEQ_LEN, synthetic_data, tiny_config
from yocou_jax import accounting
from yocou_jax.config import ConfigError, ModelConfig
from yocou_jax.train import budget as budget_lib
from yocou_jax.train import trainer


def _flops_per_step(config):
  cfg = ModelConfig.from_config(config.model)
  return accounting.train_flops_per_step(cfg, SEQ_LEN, BATCH)


def test_equal_flops_budget_gives_each_arch_its_steps_and_yocou_fewer_tokens():
  budget = 3e9
  resolved = {}
  for arch in ("transformer", "yoco", "yocou", "rins", "looped"):
    config = tiny_config(arch)
    config.train.flops_budget = budget
    got = budget_lib.resolve_steps(config)
    per_step = _flops_per_step(config)
    assert got.decided_by == "flops_budget"
    assert got.steps * per_step <= budget < (got.steps + 1) * per_step
    assert got.flops == got.steps * per_step and got.tokens == got.steps * BATCH * SEQ_LEN
    resolved[arch] = got
  # yocou runs its self-decoder T=2 times per token: more FLOPs per step, fewer steps and tokens.
  assert resolved["yocou"].flops_per_step > resolved["yoco"].flops_per_step
  assert resolved["yocou"].tokens < resolved["yoco"].tokens
  ratio = resolved["yoco"].flops_per_step / resolved["yocou"].flops_per_step
  assert resolved["yocou"].steps == int(budget // (resolved["yoco"].flops_per_step / ratio))


def test_tokens_budget_and_the_smaller_of_two_budgets():
  config = tiny_config("yoco", steps=999)
  assert budget_lib.resolve_steps(config).steps == 999  # No budget: train.steps as given.
  config.train.tokens_budget = 10 * BATCH * SEQ_LEN + 5
  got = budget_lib.resolve_steps(config)
  assert (got.steps, got.decided_by) == (10, "tokens_budget")
  config.train.flops_budget = 4.5 * _flops_per_step(config)
  got = budget_lib.resolve_steps(config)
  assert (got.steps, got.decided_by) == (4, "flops_budget")


@pytest.mark.parametrize("field, value, message", [
    ("flops_budget", -1.0, "config.train.flops_budget=-1.0 must be >= 0"),
    ("flops_budget", 10.0, "config.train.flops_budget=10 is smaller than one step"),
    ("tokens_budget", 5.0, "config.train.tokens_budget=5 is smaller than one step"),
])
def test_bad_budget_is_one_line_naming_the_field(field, value, message):
  config = tiny_config()
  config.train[field] = value
  with pytest.raises(ConfigError, match=message) as info:
    budget_lib.resolve_steps(config)
  assert "\n" not in str(info.value)


def test_trainer_runs_the_budgeted_steps_and_logs_the_deciding_budget(tmp_path, caplog):
  config = tiny_config("yocou", steps=1000)
  config.train.flops_budget = 3.5 * _flops_per_step(config)
  with caplog.at_level(logging.INFO):
    result = trainer.train(config, str(tmp_path), data=synthetic_data(),
                           devices=jax.devices()[:1])
  assert int(result.state.step) == 3
  assert result.history[-1]["cumulative_train_flops"] == 3 * _flops_per_step(config)
  assert "3 steps decided by config.train.flops_budget" in caplog.text
