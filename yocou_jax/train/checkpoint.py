"""Orbax checkpoints: train state, data-iterator state and the full config, saved together.

Layout: ``workdir/checkpoints/<step>/{state,data,config}``. Orbax writes each step into a
temporary directory and renames it only once every item (and every host) has finished, so a
crash mid-save never leaves a directory that ``latest_step()`` would return. Restores always pass
an abstract target with shardings, so a checkpoint saved on one mesh restores onto another.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from yocou_jax.config import ConfigError

CHECKPOINT_DIR = "checkpoints"


class Checkpointer:
  """A thin wrapper over ``ocp.CheckpointManager`` with the items this project saves."""

  def __init__(self, workdir: str, *, keep: int, use_async: bool = True):
    if keep <= 0:
      raise ConfigError(f"config.checkpoint.keep={keep} must be positive")
    self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            save_interval_steps=1,  # The caller decides when to save.
            max_to_keep=keep,
            enable_async_checkpointing=use_async,
            create=True,
        ),
    )

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, *, data_iterator: Any = None,
           config: Optional[dict] = None) -> bool:
    """Starts a (possibly async) save of this step; returns whether one was started."""
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      # Saved once as JSON (not per process): every process's iterator has the same state
      # (each slices the same global batches), so a run can resume on another process count.
      items["data"] = ocp.args.JsonSave(data_iterator.get_state())
    if config is not None:
      items["config"] = ocp.args.JsonSave(config)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, step: int, abstract_state: Any, *, data_iterator: Any = None) -> Any:
    """Restores the state onto ``abstract_state``'s shardings (and the iterator in place)."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    # Imported checkpoints (e.g. from Hugging Face) have no data state: the iterator starts fresh.
    if data_iterator is not None and not os.path.isdir(os.path.join(self.directory, str(step),
                                                                    "data")):
      data_iterator = None
    if data_iterator is not None:
      items["data"] = ocp.args.JsonRestore()
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    if data_iterator is not None:
      data_iterator.set_state(restored["data"])
    return restored["state"]

  def restore_config(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))[
        "config"]

  def wait_until_finished(self) -> None:
    """Blocks until async saves are committed; re-raises their errors."""
    self.manager.wait_until_finished()
    self.manager.check_for_errors()

  def close(self) -> None:
    self.manager.close()


def abstract_with_shardings(abstract_tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the target shardings: the restore target for any mesh."""
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)
