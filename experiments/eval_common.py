"""Flags and helpers shared by the evaluation binaries (eval_ppl, eval_niah, eval_harness)."""

from __future__ import annotations

import os
from typing import Any, Callable

from absl import flags

_ITERATIONS = flags.DEFINE_integer("num_iterations", 0, "Loop count T at evaluation (0: trained).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_CHUNK = flags.DEFINE_integer("chunk_size", 512, "Tokens per sequence per engine call.")
_TOKEN_BUDGET = flags.DEFINE_integer("token_budget", 32768, "Rows x padded length per batch.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Write the results as JSON here.")


def json_out() -> str | None:
  return _JSON_OUT.value


def int_list(flag, minimum: int = 1) -> list[int]:
  try:
    values = [int(v) for v in flag.value]
  except ValueError:
    raise SystemExit(f"error: --{flag.name}={','.join(flag.value)}: give integers") from None
  if not values or min(values) < minimum:
    raise SystemExit(f"error: --{flag.name}={','.join(flag.value)}: give integers >= {minimum}")
  return values


def fail_on(error: type[Exception], fn: Callable, *args, **kwargs) -> Any:
  """``fn(*args, **kwargs)``; an ``error`` becomes one ``error: ...`` line and exit status 1."""
  try:
    return fn(*args, **kwargs)
  except error as e:
    raise SystemExit(f"error: {e}") from None


def workdirs(flag) -> list[str]:
  """The run directories of a string or list flag; a missing one is one line naming the flag."""
  if not flag.value:
    raise SystemExit(f"error: --{flag.name} is required")
  values = [flag.value] if isinstance(flag.value, str) else list(flag.value)
  for workdir in values:
    if not os.path.isdir(workdir):
      raise SystemExit(f"error: --{flag.name}={workdir}: no such directory")
  return values


def load_run(workdir: str):
  """The run's checkpoint (``--step``, ``--num_iterations``); a bad workdir is one line."""
  from yocou_jax.export.hf import ExportError  # pylint: disable=g-import-not-at-top
  from yocou_jax.inference import text  # pylint: disable=g-import-not-at-top

  if _ITERATIONS.value < 0:
    raise SystemExit(f"error: --num_iterations={_ITERATIONS.value} must be >= 0")
  try:
    return text.load_run(workdir, _STEP.value, _ITERATIONS.value)
  except (ExportError, FileNotFoundError) as e:
    raise SystemExit(f"error: --workdir={workdir}: {e}") from None


def batching_kwargs() -> dict[str, int]:
  """``chunk_size`` and ``token_budget`` of :class:`batched.BatchedModel`, checked."""
  if _CHUNK.value < 1 or _TOKEN_BUDGET.value < 1:
    raise SystemExit(f"error: --chunk_size={_CHUNK.value} and --token_budget="
                     f"{_TOKEN_BUDGET.value} must be >= 1")
  return dict(chunk_size=_CHUNK.value, token_budget=_TOKEN_BUDGET.value)


def batched_model(run):
  from yocou_jax.evaluation import batched  # pylint: disable=g-import-not-at-top

  return batched.BatchedModel(run.model_cfg, run.params, **batching_kwargs())


def run_info(workdir: str, run) -> dict[str, Any]:
  cfg = run.model_cfg
  return {"workdir": workdir, "arch": cfg.arch, "num_iterations": cfg.iterations,
          "step": run.step, "train_seq_len": int(run.config.data.seq_len)}
