"""Is a committed checkpoint step whole? Checks that run before a step is trusted.

Orbax renames a step's temporary directory into place only after every item is written, so a
crash mid-save leaves no step directory. What it cannot guard against is damage after the commit:
a file truncated or deleted by a failing disk, a half-copied directory, an edited metadata file.
``check_step`` finds those from the files alone (cheap enough to run on every resume and every
retention decision); ``read_step`` also reads every array back and compares it with what the
metadata promises (what ``experiments/check_checkpoints.py`` runs).

Limits: a bit flip inside an array's bytes keeps its size and decodes; only a non-finite value it
happens to produce is caught (``read_step`` checks finiteness).
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import jax
import numpy as np

STEP_METADATA = "_CHECKPOINT_METADATA"
COMMIT_MARKER = "commit_success.txt"
STATE_ITEM = "state"
JSON_ITEMS = ("data", "config")


def _json_file(path: str) -> tuple[Optional[Any], Optional[str]]:
  """(parsed JSON, None) or (None, why it is unusable)."""
  name = os.path.join(os.path.basename(os.path.dirname(path)), os.path.basename(path))
  if not os.path.isfile(path):
    return None, f"{name} is missing"
  try:
    with open(path, "rb") as f:
      return json.loads(f.read().decode("utf-8")), None
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    return None, f"{name} is unreadable ({type(e).__name__})"


def check_step(step_dir: str) -> Optional[str]:
  """None when ``step_dir`` holds a whole checkpoint, else one line saying what is wrong.

  Checks the step's commit marker and metadata, that every item the metadata lists is present
  and committed, that JSON items parse, and that the array store's manifest and every data file
  it may reference exist and are non-empty.
  """
  if not os.path.isdir(step_dir):
    return "step directory is missing"
  if not os.path.isfile(os.path.join(step_dir, COMMIT_MARKER)):
    return f"no commit marker ({COMMIT_MARKER}): the save never finished"
  metadata, error = _json_file(os.path.join(step_dir, STEP_METADATA))
  if error:
    return error
  items = metadata.get("item_handlers") if isinstance(metadata, dict) else None
  if not isinstance(items, dict) or STATE_ITEM not in items:
    return f"{STEP_METADATA} lists no '{STATE_ITEM}' item"
  for item in sorted(items):
    item_dir = os.path.join(step_dir, item)
    if not os.path.isdir(item_dir):
      return f"item '{item}' is missing"
    if not os.path.isfile(os.path.join(item_dir, COMMIT_MARKER)):
      return f"item '{item}' has no commit marker"
    if item in JSON_ITEMS:
      _, error = _json_file(os.path.join(item_dir, "metadata"))
      if error:
        return f"item '{item}': {error}"
  return _check_array_store(os.path.join(step_dir, STATE_ITEM))


def _check_array_store(state_dir: str) -> Optional[str]:
  tree, error = _json_file(os.path.join(state_dir, "_METADATA"))
  if error:
    return f"item 'state': {error}"
  if not isinstance(tree, dict) or not isinstance(tree.get("tree_metadata"), dict):
    return "item 'state': _METADATA has no tree_metadata"
  manifest = os.path.join(state_dir, "manifest.ocdbt")
  if not os.path.isfile(manifest) or os.path.getsize(manifest) == 0:
    return "item 'state': the array store manifest (manifest.ocdbt) is missing or empty"
  data_dirs = [os.path.join(state_dir, "d")] + [
      os.path.join(state_dir, p, "d") for p in sorted(os.listdir(state_dir))
      if p.startswith("ocdbt.process_")]
  files = [os.path.join(d, f) for d in data_dirs if os.path.isdir(d) for f in sorted(os.listdir(d))]
  if not files:
    return "item 'state': the array store holds no data files"
  for path in files:
    if os.path.getsize(path) == 0:
      return f"item 'state': data file {os.path.relpath(path, state_dir)} is empty"
  return None


def read_arrays(step_dir: str) -> tuple[Any, Any]:
  """(what the metadata promises, what was read): the step's state as arrays on one CPU device.

  The promise is a tree of ShapeDtypeStructs; raises whatever Orbax or TensorStore raise when a
  file cannot be read.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from orbax.checkpoint import metadata as ocp_metadata  # pylint: disable=g-import-not-at-top

  state_dir = os.path.join(step_dir, STATE_ITEM)
  checkpointer = ocp.StandardCheckpointer()
  try:
    meta = checkpointer.metadata(state_dir).item_metadata
    tree = meta.tree if hasattr(meta, "tree") else dict(meta)
    cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    is_array = lambda x: isinstance(x, ocp_metadata.ArrayMetadata)
    promised = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=cpu), tree,
                            is_leaf=is_array)
    return promised, checkpointer.restore(state_dir, promised)
  finally:
    checkpointer.close()


def read_step(step_dir: str) -> Optional[str]:
  """``check_step`` plus reading every array back onto one CPU device.

  Each array must decode with the shape and dtype the metadata promises and hold only finite
  values. Reads the whole state into host memory once.
  """
  reason = check_step(step_dir)
  if reason:
    return reason
  try:
    promised, restored = read_arrays(step_dir)
  except Exception as e:  # pylint: disable=broad-except
    return f"item 'state': arrays unreadable ({type(e).__name__}: {first_line(e)})"
  got_leaves = dict(jax.tree_util.tree_leaves_with_path(restored))
  for path, want in jax.tree_util.tree_leaves_with_path(promised):
    name = jax.tree_util.keystr(path)
    got = got_leaves.get(path)
    if got is None:
      return f"item 'state': {name} is missing"
    if got.shape != want.shape or got.dtype != want.dtype:
      return (f"item 'state': {name} read back as {got.dtype}{list(got.shape)}, the metadata "
              f"promises {want.dtype}{list(want.shape)}")
    if np.issubdtype(got.dtype, np.floating) and not np.isfinite(np.asarray(got)).all():
      return f"item 'state': {name} holds non-finite values"
  return None


def first_line(error: BaseException) -> str:
  line = (str(error).strip().splitlines() or [""])[0]
  return line.split(" See full TensorStore details")[0][:200]
