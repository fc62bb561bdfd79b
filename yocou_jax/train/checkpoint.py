"""Orbax checkpoints: train state, data-iterator state and the full config, saved together.

Layout: ``workdir/checkpoints/<step>/{state,data,config}``. Orbax writes each step into a
temporary directory and renames it only once every item (and every host) has finished, so a
crash mid-save never leaves a directory that ``latest_step()`` would return. Restores always pass
an abstract target with shardings, so a checkpoint saved on one mesh restores onto another.

Damage after the commit (a truncated or deleted file) is found by ``integrity.check_step``:
``restore_latest`` skips a bad step with a warning naming it and the reason, moves it out of the
way into ``workdir/corrupt_checkpoints/`` and resumes from the newest intact step. Retention
counts intact steps only, so the newest intact checkpoint is never deleted.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any, Callable, Optional

import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from yocou_jax.config import ConfigError
from yocou_jax.train import integrity

CHECKPOINT_DIR = "checkpoints"
QUARANTINE_DIR = "corrupt_checkpoints"


class CheckpointSaveError(RuntimeError):
  """A save failed (disk full, permissions, ...); earlier checkpoints are untouched."""


class Checkpointer:
  """A thin wrapper over ``ocp.CheckpointManager`` with the items this project saves."""

  def __init__(self, workdir: str, *, keep: int, use_async: bool = True,
               read_only: bool = False):
    if keep <= 0:
      raise ConfigError(f"config.checkpoint.keep={keep} must be positive")
    self.keep = keep
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, CHECKPOINT_DIR)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            save_interval_steps=1,  # The caller decides when to save.
            max_to_keep=None,  # Retention is ours: it counts intact steps only (see _prune).
            enable_async_checkpointing=use_async,
            create=not read_only,
            read_only=read_only,  # Another run's checkpoints (config.train.init_from).
        ),
    )

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def check(self, step: int) -> Optional[str]:
    """None if ``step`` is intact on disk, else the reason it is not."""
    return integrity.check_step(self.step_dir(step))

  def intact_steps(self) -> list[int]:
    return [s for s in self.all_steps() if self.check(s) is None]

  def save(self, step: int, state: Any, *, data_iterator: Any = None,
           config: Optional[dict] = None) -> bool:
    """Starts a (possibly async) save of this step; returns whether one was started.

    Raises CheckpointSaveError when this save, or the previous async one, failed.
    """
    self.wait_until_finished()  # Orbax waits for the previous save anyway; surface its error.
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      # Saved once as JSON (not per process): every process's iterator has the same state
      # (each slices the same global batches), so a run can resume on another process count.
      items["data"] = ocp.args.JsonSave(data_iterator.get_state())
    if config is not None:
      items["config"] = ocp.args.JsonSave(config)
    try:
      return self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointSaveError(
          f"saving step {step} to {self.directory} failed ({type(e).__name__}: "
          f"{integrity.first_line(e)}); intact checkpoint steps: "
          f"{self.intact_steps()}") from e

  def _prune(self) -> None:
    """Deletes steps older than the newest ``keep`` intact ones (bad newer ones stay)."""
    intact = self.intact_steps()
    if len(intact) <= self.keep:
      return
    oldest_kept = intact[-self.keep]
    for step in self.all_steps():
      if step < oldest_kept:
        self.manager.delete(step)

  def restore(self, step: int, abstract_state: Any, *, data_iterator: Any = None) -> Any:
    """Restores the state onto ``abstract_state``'s shardings (and the iterator in place)."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    # Imported checkpoints (e.g. from Hugging Face) have no data state: the iterator starts fresh.
    if data_iterator is not None and not self.has_data_state(step):
      data_iterator = None
    if data_iterator is not None:
      items["data"] = ocp.args.JsonRestore()
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    if data_iterator is not None:
      data_iterator.set_state(restored["data"])
    return restored["state"]

  def restore_params(self, step: int, abstract_params: Any) -> Any:
    """``state.params`` alone of ``step`` onto ``abstract_params``' shardings (no optimizer)."""
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_params)
    restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item={"params": abstract_params}, restore_args={"params": restore_args},
        partial_restore=True)))
    return restored["state"]["params"]

  def restore_latest(self, abstract_state: Any, *, data_iterator: Any = None,
                     before_restore: Optional[Callable[[int], None]] = None,
                     ) -> tuple[Optional[int], Any]:
    """(step, state) of the newest intact step, or (None, None) when there is none.

    Every newer step that is bad (or fails to read) is logged with its reason and moved into
    ``workdir/corrupt_checkpoints/`` so the resumed run can save those step numbers again.
    ``before_restore(step)`` runs on the chosen step before its arrays are read (the resume
    config check: its errors propagate).
    """
    bad = []
    chosen, state = None, None
    for step in reversed(self.all_steps()):
      reason = self.check(step)
      if reason is None:
        if before_restore is not None:
          before_restore(step)
        try:
          state = self.restore(step, abstract_state, data_iterator=data_iterator)
          chosen = step
          break
        except Exception as e:  # pylint: disable=broad-except
          if jax.process_count() > 1:  # The processes must agree; no silent per-host fallback.
            raise
          reason = integrity.read_step(self.step_dir(step))
          if reason is None:  # Whole on disk: it is this run's state that does not fit it.
            raise ConfigError(
                f"checkpoint step {step} in {self.directory} is intact but does not restore "
                f"into this run's state ({type(e).__name__}: {integrity.first_line(e)})") from e
      logging.warning("checkpoint step %d in %s is bad: %s; falling back to an older step",
                      step, self.directory, reason)
      bad.append(step)
    if bad:
      self._quarantine(bad)
      if chosen is not None:
        logging.warning("resuming from step %d, the newest intact checkpoint", chosen)
      else:
        logging.warning("no intact checkpoint in %s: starting from scratch", self.directory)
    return chosen, state

  def _quarantine(self, steps: list[int]) -> None:
    if jax.process_index() == 0:
      target_root = os.path.join(self.workdir, QUARANTINE_DIR)
      os.makedirs(target_root, exist_ok=True)
      for step in steps:
        target = os.path.join(target_root, f"{step}.{time.strftime('%Y%m%dT%H%M%S')}")
        shutil.move(self.step_dir(step), target)
        logging.warning("moved bad checkpoint step %d to %s", step, target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("yocou_jax:checkpoint_quarantine")
    self.manager.reload()

  def has_data_state(self, step: int) -> bool:
    """Whether ``step`` holds a data-iterator state (imported checkpoints do not)."""
    return os.path.isdir(os.path.join(self.step_dir(step), "data"))

  def restore_config(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))[
        "config"]

  def wait_until_finished(self) -> None:
    """Blocks until async saves are committed, then applies retention.

    Raises CheckpointSaveError when a background save failed (nothing is deleted then).
    """
    try:
      self.manager.wait_until_finished()
      self.manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointSaveError(
          f"a background checkpoint save in {self.directory} failed ({type(e).__name__}: "
          f"{integrity.first_line(e)}); intact checkpoint steps: {self.intact_steps()}") from e
    self._prune()

  def close(self) -> None:
    self.manager.close()


def abstract_with_shardings(abstract_tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the target shardings: the restore target for any mesh."""
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)
