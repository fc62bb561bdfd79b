"""config.logging.wandb: the offline run's history holds the metrics written to metrics.jsonl."""

import glob
import json
import os
import struct
import sys

import pytest
from wandb.proto import wandb_internal_pb2 as wandb_pb2

from tests.train.conftest import TOOLING_STEPS
from tests.train.synthetic import tiny_config
from yocou_jax.config import ConfigError
from yocou_jax.train import metrics as metrics_lib
from yocou_jax.train import trainer

_BLOCK = 32 * 1024  # The .wandb file is a LevelDB log: 32 KiB blocks of checksummed chunks.
_FILE_HEADER = 7  # b":W&B", a 2-byte magic and a version byte.
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def wandb_records(path: str) -> list:
  """Every ``Record`` protobuf of an offline run file, in order."""
  with open(path, "rb") as f:
    data = f.read()
  assert data[:4] == b":W&B"
  records, pending, pos = [], b"", _FILE_HEADER
  while pos + 7 <= len(data):
    if _BLOCK - pos % _BLOCK < 7:  # A block's tail too short for a chunk header is padding.
      pos += _BLOCK - pos % _BLOCK
      continue
    _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
    chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
    if kind in (_FULL, _FIRST):
      pending = chunk
    elif kind in (_MIDDLE, _LAST):
      pending += chunk
    if kind in (_FULL, _LAST):
      record = wandb_pb2.Record()
      record.ParseFromString(pending)
      records.append(record)
  return records


def wandb_history(path: str) -> dict[int, dict]:
  """{step: {metric: value}} of the run's history records."""
  history = {}
  for record in wandb_records(path):
    if record.WhichOneof("record_type") == "history":
      row = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
             for item in record.history.item}
      history[int(row.pop("_step"))] = row
  return history


def test_offline_run_history_equals_the_logged_metrics(tooling_run):
  run_id = open(os.path.join(tooling_run.workdir, metrics_lib.WANDB_RUN_ID_FILE)).read().strip()
  [run_file] = glob.glob(os.path.join(tooling_run.workdir, "wandb", "offline-run-*",
                                      f"run-{run_id}.wandb"))
  history = wandb_history(run_file)
  logged = metrics_lib.read_metrics(tooling_run.workdir)
  assert sorted(history) == [r["step"] for r in logged] == list(range(TOOLING_STEPS + 1))
  for record in logged:
    row = history[record["step"]]
    for name, value in record.items():
      if name != "step":
        assert row[name] == pytest.approx(value, rel=1e-12, abs=0), (record["step"], name)
  assert "eval_loss" in history[0] and "loss" in history[TOOLING_STEPS]
  # The run carries the experiment config.
  configs = [r.run.config for r in wandb_records(run_file) if r.WhichOneof("record_type") == "run"]
  logged_config = {item.key: json.loads(item.value_json) for item in configs[0].update}
  assert logged_config["model"] == tooling_run.config.model.to_dict()


def test_wandb_requested_but_missing_is_one_line(monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError.
  config = tiny_config()
  config.logging.wandb.mode = "offline"
  with pytest.raises(ConfigError, match=r"config\.logging\.wandb\.mode='offline' needs the "
                     r"wandb package: pip install 'yocou_jax\[wandb\]'") as info:
    trainer.validate_config(config, 1, 1)
  assert "\n" not in str(info.value)


def test_bad_wandb_mode_names_the_allowed_modes():
  config = tiny_config()
  config.logging.wandb.mode = "cloud"
  with pytest.raises(ConfigError, match=r"config\.logging\.wandb\.mode='cloud' is invalid: must "
                     r"be one of disabled, offline, online"):
    trainer.validate_config(config, 1, 1)


def test_a_resumed_run_logs_into_the_same_wandb_run(tmp_path):
  config = tiny_config()
  config.logging.wandb.update(mode="offline", project="tests")
  for step, steps in ((3, 5), (7, 9)):  # A resume may change train.steps.
    config.train.steps = steps
    [sink] = metrics_lib.tracker_sinks(config, str(tmp_path))
    sink.write(step, {"loss": 1.0 / step, "note": "not a number"})
    sink.close()
  run_id = (tmp_path / metrics_lib.WANDB_RUN_ID_FILE).read_text().strip()
  run_files = sorted(glob.glob(str(tmp_path / "wandb" / "offline-run-*" / f"run-{run_id}.wandb")))
  assert len(run_files) == 2
  # Two runs started within one second get directories "...ID" and "...ID-1", which sort
  # either way round; order them by their steps.
  histories = sorted((wandb_history(f) for f in run_files), key=min)
  assert [{step: row["loss"] for step, row in h.items()} for h in histories] == [
      {3: 1 / 3}, {7: 1 / 7}]
  assert "note" not in histories[0][3]  # Only numbers are logged.
