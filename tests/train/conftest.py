"""A tiny traced and tracked training run, shared by the profiling, tracker and fine-tuning tests."""

import dataclasses

import pytest

from tests.conftest import once_per_suite
from tests.train.synthetic import synthetic_data, tiny_config
from yocou_jax.train import trainer

TOOLING_STEPS = 6
PROFILED_STEPS = "3,4"


@dataclasses.dataclass
class ToolingRun:
  config: object
  workdir: str
  result: trainer.TrainResult


@pytest.fixture(scope="session")
def tooling_run(tmp_path_factory) -> ToolingRun:
  """6 steps of the tiny yocou on 8 devices, profiling steps 3..4, wandb in offline mode."""
  config = tiny_config(steps=TOOLING_STEPS, mesh=(2, 2, 2))
  config.profile.steps = PROFILED_STEPS
  config.logging.wandb.update(mode="offline", project="tests", name="tooling")

  def train(workdir):
    return ToolingRun(config, str(workdir), trainer.train(config, str(workdir),
                                                          data=synthetic_data()))

  return once_per_suite(tmp_path_factory, "tooling_run", train)
