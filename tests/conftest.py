"""Test-wide setup: 8 fake CPU devices and parsed absl flags, before anything imports jax.

Pytest imports this file before any test module, so the XLA flags below take effect for every
test and for the subprocesses tests start (the sharding tests build a (2, 2, 2) mesh from
``jax.devices("cpu")``). The suite is a CPU suite on every host: ``JAX_PLATFORMS=cpu``.

The CPU compiler runs with fusion emitters off and backend optimisation level 0: the tests
compile hundreds of tiny programs, and this cuts compile time 4-6x without changing results
(benchmarks, which run outside pytest, keep the defaults).
"""

import dataclasses
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_XLA_TEST_FLAGS = ("--xla_force_host_platform_device_count=8",
                   "--xla_cpu_use_fusion_emitters=false",
                   "--xla_backend_optimization_level=0")
_flags = os.environ.get("XLA_FLAGS", "")
for _flag in _XLA_TEST_FLAGS:
  if _flag.split("=")[0] not in _flags:
    _flags = f"{_flags} {_flag}".strip()
os.environ["XLA_FLAGS"] = _flags

from absl import flags  # pylint: disable=g-import-not-at-top

flags.FLAGS.mark_as_parsed()  # grain worker processes read absl flags.

import pytest  # pylint: disable=g-import-not-at-top

from yocou_jax.config import ModelConfig  # pylint: disable=g-import-not-at-top

TINY_MODEL = dict(
    num_layers=4, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=64,
    vocab_size=64, window=4, num_iterations=2, num_recursive_layers=2,
    attention_block_size=8)


@pytest.fixture
def tiny_config():
  """Factory for tiny ``ModelConfig``s (d 32, 4 layers, vocab 64): ``tiny_config("yoco", ...)``."""

  def make(arch: str = "yocou", **overrides) -> ModelConfig:
    return ModelConfig(arch=arch, **{**TINY_MODEL, **overrides})

  return make


def _on_host(value):
  """``value`` with every jax.Array in it fetched to numpy: pytrees (a TrainState) as they are,
  and through plain tuples and dataclasses that are not pytrees (a TrainResult)."""
  import jax  # pylint: disable=g-import-not-at-top

  if type(value) is tuple:  # pylint: disable=unidiomatic-typecheck
    return tuple(_on_host(v) for v in value)
  leaves = jax.tree.leaves(value)
  if (dataclasses.is_dataclass(value) and not isinstance(value, type)
      and len(leaves) == 1 and leaves[0] is value):
    return dataclasses.replace(value, **{f.name: _on_host(getattr(value, f.name))
                                         for f in dataclasses.fields(value) if f.init})
  return jax.device_get(value)


def once_per_suite(tmp_path_factory, name: str, train):
  """``train(directory)`` run once per test session, even with pytest-xdist workers.

  The first worker to ask runs it in a directory all workers share (under a file lock) and
  pickles the result there, with its arrays on the host; every worker, that one included,
  returns the unpickled copy, so each test sees the same objects whichever worker runs it.
  The directory is shared: tests read it, and copy it before changing anything in it.
  """
  import pickle  # pylint: disable=g-import-not-at-top

  import filelock  # pylint: disable=g-import-not-at-top

  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # The base directory of the whole session.
  done = root / f"{name}.pkl"
  with filelock.FileLock(str(root / f"{name}.lock")):
    if not done.exists():
      (root / name).mkdir()
      result = _on_host(train(root / name))
      (root / f"{name}.pkl.tmp").write_bytes(pickle.dumps(result))
      os.replace(root / f"{name}.pkl.tmp", done)
  return pickle.loads(done.read_bytes())


@pytest.fixture(scope="session")
def corpus_run(tmp_path_factory):
  """(config, workdir, result): 8 steps of the tiny yocou on the real text pipeline, one device.

  The uninterrupted run of test_train_binary's resume test and the trained run test_depth reads.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from tests.train.test_train_binary import corpus_config  # pylint: disable=g-import-not-at-top
  from yocou_jax.train import trainer  # pylint: disable=g-import-not-at-top

  def train(tmp_path):
    config = corpus_config(tmp_path)
    workdir = str(tmp_path / "run")
    return config, workdir, trainer.train(config, workdir, devices=jax.devices()[:1])

  return once_per_suite(tmp_path_factory, "corpus_run", train)


# Modules whose tests each run several JAX processes or training runs (the longest of the suite).
# pytest-xdist hands tests out in collection order, so these go first: started last, one of them
# would run alone at the end while the other worker sits idle. test_depth follows
# test_train_binary into the first worker's first batch, where corpus_run is already trained.
# Tests do not depend on the order.
LONG_FIRST = ("tests/train/test_multiprocess.py", "tests/reliability/test_multiprocess_faults.py",
              "tests/train/test_train_binary.py", "tests/scaling/test_depth.py")


def pytest_collection_modifyitems(config, items):
  del config
  rank = {module: i for i, module in enumerate(LONG_FIRST)}
  items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(LONG_FIRST)))  # Stable.
