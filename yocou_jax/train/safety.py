"""What the trainer refuses to do: resume onto another model or data, train into a workdir it
cannot write, or go on (or save) after the loss or gradients went non-finite.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Any, Mapping, Optional

from absl import logging

from yocou_jax.config import ConfigError, ModelConfig

# Fields that may change when a run resumes (everything else in these sections may not):
# implementation choices of the model that leave its parameters and function unchanged, and where
# the data lives. The train section (steps, learning-rate knobs, microbatches), eval, logging,
# checkpoint, inference and mesh sections, and the process count, are free to change.
RESUME_MAY_CHANGE = frozenset({
    "model.attention_impl", "model.remat", "model.unroll_loops", "model.unroll_layers",
    "model.attention_block_size",
    "data.tfds_data_dir",
})
# Sections compared on resume; the data stream's fields only when the checkpoint holds a data
# state (an imported checkpoint starts a fresh stream and may use any data).
MODEL_FIELDS = ("model.",)
DATA_FIELDS = ("data.", "seed", "train.batch_size")
# A model field a checkpoint predates counts as its default: a new field defaults to the
# behaviour from before it existed.
_MODEL_DEFAULTS = {f"model.{f.name}": f.default for f in dataclasses.fields(ModelConfig)
                   if f.default is not dataclasses.MISSING}


class NonFiniteError(RuntimeError):
  """The loss or gradients went non-finite beyond what config.train.nonfinite tolerates."""


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def resume_differences(saved: Mapping[str, Any], current: Mapping[str, Any], *,
                       has_data_state: bool) -> list[str]:
  """``["model.d_model: 32 -> 64", ...]``: compared fields that differ, sorted.

  A model field ``saved`` predates (added to the code since) counts as its default.
  """
  prefixes = MODEL_FIELDS + (DATA_FIELDS if has_data_state else ())
  old, new = _flatten(saved), _flatten(current)
  for name, default in _MODEL_DEFAULTS.items():  # Fields added since the checkpoint was saved.
    if name in new and name not in old:
      old[name] = default
  for flat in (old, new):  # Mixture weights may change on resume (check_resume logs it).
    if "data.sources" in flat:
      flat["data.sources"] = _sources_without_weights(flat["data.sources"])
  missing = object()
  diffs = []
  for name in sorted(set(old) | set(new)):
    if name in RESUME_MAY_CHANGE or not any(name == p or name.startswith(p) for p in prefixes):
      continue
    before, after = old.get(name, missing), new.get(name, missing)
    if before != after:
      show = lambda v: "(absent)" if v is missing else repr(v)
      diffs.append(f"{name}: {show(before)} -> {show(after)}")
  return diffs


def _sources_without_weights(spec: Any) -> Any:
  from yocou_jax.data import sources  # pylint: disable=g-import-not-at-top

  return sources.without_weights(spec) if isinstance(spec, str) else spec


def check_resume(saved: Mapping[str, Any], current: Mapping[str, Any], *, step: int,
                 directory: str, has_data_state: bool) -> None:
  """Raises a one-line ConfigError when the run would resume onto a different model or data."""
  before = saved.get("data", {}).get("sources")
  after = current.get("data", {}).get("sources")
  if before != after and _sources_without_weights(before) == _sources_without_weights(after):
    logging.warning("resuming from step %d with new mixture weights: %r -> %r (each source "
                    "continues from its position)", step, before, after)
  diffs = resume_differences(saved, current, has_data_state=has_data_state)
  if diffs:
    raise ConfigError(
        f"refusing to resume from step {step} in {directory}: the config differs from the one "
        f"it was trained with: {'; '.join(diffs)} (use a new workdir, or restore these values)")


def check_workdir(workdir: str) -> None:
  """Creates ``workdir`` if needed and proves it writable; a one-line ConfigError otherwise."""
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise ConfigError(f"--workdir={workdir} cannot be created: {e.strerror or e}") from None
  if not os.path.isdir(workdir):
    raise ConfigError(f"--workdir={workdir} is not a directory")
  try:
    with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write_probe"):
      pass
  except OSError as e:
    raise ConfigError(f"--workdir={workdir} is not writable: {e.strerror or e}") from None


def check_nonfinite(counts: Mapping[str, Any], *, mode: str, max_skipped_steps: int,
                    step: int, last_checkpoint: Optional[str]) -> None:
  """Raises NonFiniteError when ``counts`` (the optimizer's skip metrics) say the run must stop.

  ``mode="stop"``: at the first skipped update; ``"skip"``: once ``max_skipped_steps`` updates
  in a row were skipped. The skipped updates never reached the parameters, so the state in
  memory is finite; the run still stops without saving it.
  """
  total, longest = int(counts["skipped_total"]), int(counts["skipped_longest_run"])
  last = int(counts["skipped_last_step"])
  if mode == "stop" and total > 0:
    why = "config.train.nonfinite='stop'"
  elif mode == "skip" and longest >= max_skipped_steps:
    why = (f"{longest} updates in a row were skipped, config.train.max_skipped_steps="
           f"{max_skipped_steps}")
  else:
    return
  raise NonFiniteError(
      f"non-finite loss or gradients at step {last} ({total} skipped updates in all; {why}): "
      f"stopped at step {step} without saving; last good checkpoint: "
      f"{last_checkpoint or 'none'}")
