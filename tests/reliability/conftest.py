"""A finished tiny run shared by the reliability tests (copied before any test damages it)."""

import shutil

import jax
import pytest

from tests.conftest import once_per_suite
from tests.train.synthetic import synthetic_data, tiny_config
from yocou_jax.train import trainer


@pytest.fixture(scope="session")
def run10(tmp_path_factory):
  """(workdir, result) of a 10-step run with intact checkpoints at steps 5 and 10."""

  def train(workdir):
    return str(workdir), trainer.train(tiny_config(steps=10), str(workdir),
                                       data=synthetic_data(), devices=jax.devices()[:1])

  return once_per_suite(tmp_path_factory, "run10", train)


@pytest.fixture
def run10_copy(run10, tmp_path):
  """A private copy of ``run10``'s workdir."""
  workdir = str(tmp_path / "copy")
  shutil.copytree(run10[0], workdir)
  return workdir
