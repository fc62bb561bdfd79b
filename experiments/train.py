r"""Trains a model of the YOCO-U family.

  python -m experiments.train --config=experiments/configs/default.py \
      --config.model.num_iterations=3 --workdir=runs/my_run

With no flags it trains the embedded default (a small YOCO-U, T=3, on the Python standard
library's source) into ``runs/default``, then writes ``loss_curve.png`` and prints a greedy
and a seeded sampled continuation (``--sample_temperature``, ``--sample_top_p``). Re-running on
a workdir that holds checkpoints resumes where it stopped.

Multi-host: on TPU pods pass ``--multihost`` (JAX finds the coordinator itself); elsewhere pass
``--coordinator_address=HOST:PORT --num_processes=N --process_id=I`` on every host.
"""

from __future__ import annotations

import logging as std_logging
import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/default.py", "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: runs/<config name>).")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize().")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_SAMPLE_TOKENS = flags.DEFINE_integer("sample_tokens", 120, "Final samples' length (0: none).")
_SAMPLE_PROMPT = flags.DEFINE_string(
    "sample_prompt", "def", "Prompt of the final samples (no trailing space: a BPE such as the "
    "default's starts a word's token with the space before it).")
_SAMPLE_TEMPERATURE = flags.DEFINE_float(
    "sample_temperature", 0.6, "Temperature of the sampled sample (0: greedy only).")
_SAMPLE_TOP_P = flags.DEFINE_float("sample_top_p", 0.9, "Nucleus mass of the sampled sample.")
_SAMPLE_SEED = flags.DEFINE_integer("sample_seed", 0, "PRNG seed of the sampled sample.")


def initialize_distributed(collective_timeout_s: int) -> None:
  """Joins the multi-process runtime when asked to (TPU pods, GPU clusters, CPU loopback)."""
  from yocou_jax import distributed  # pylint: disable=g-import-not-at-top

  if not (_MULTIHOST.value or _COORDINATOR.value):
    return
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                         collective_timeout_s=collective_timeout_s)


class _QuietLibraryInfo(std_logging.Filter):
  """Keeps Orbax's per-save INFO chatter out of the console (warnings still show)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or "orbax" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraryInfo())
  initialize_distributed(_CONFIG.value.train.collective_timeout_s)
  import jax  # pylint: disable=g-import-not-at-top

  from experiments import reporting  # pylint: disable=g-import-not-at-top
  from yocou_jax import distributed, validation  # pylint: disable=g-import-not-at-top
  from yocou_jax.config import ConfigError  # pylint: disable=g-import-not-at-top
  from yocou_jax.train import safety, trainer  # pylint: disable=g-import-not-at-top
  from yocou_jax.train.checkpoint import CheckpointSaveError  # pylint: disable=g-import-not-at-top

  from yocou_jax.inference import sampling as sampling_lib  # pylint: disable=g-import-not-at-top

  try:
    sampling = sampling_lib.SamplingConfig(_SAMPLE_TEMPERATURE.value, top_p=_SAMPLE_TOP_P.value)
  except ValueError as e:
    raise SystemExit(f"error: --sample_{e}") from None
  config = _CONFIG.value
  config_name = os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0]
  workdir = _WORKDIR.value or os.path.join("runs", config_name)
  logging.info("workdir %s, %d processes, %d devices (%s)", workdir, jax.process_count(),
               jax.device_count(), jax.devices()[0].device_kind)
  try:
    with distributed.exit_on_lost_process(config.train.collective_timeout_s):
      result = trainer.train(config, workdir)
  except (ConfigError, safety.NonFiniteError, CheckpointSaveError) as e:
    raise SystemExit(validation.error_lines(e)) from None  # One line per cause, no traceback.
  if jax.process_index() != 0:
    return
  reporting.summarize_run(config, workdir, result, sample_prompt=_SAMPLE_PROMPT.value,
                          sample_tokens=_SAMPLE_TOKENS.value, sampling=sampling,
                          sample_seed=_SAMPLE_SEED.value)


if __name__ == "__main__":
  from yocou_jax import platforms  # pylint: disable=g-import-not-at-top

  platforms.restart_with_cpu_malloc()  # On CPU: no page faults on each step's temporaries.
  app.run(main)
