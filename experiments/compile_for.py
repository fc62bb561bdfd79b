r"""Compiles the sharded train step (and inference steps) for a TPU slice, on a CPU machine.

  JAX_PLATFORMS=cpu python -m experiments.compile_for \
      --config=experiments/configs/yocou_1p3b.py --topology=v5p:2x2x2 \
      [--mesh=data:-1,fsdp:8,tensor:1] [--batch_size=64] [--mode=train|prefill|decode|all] \
      [--context=32768] [--inference_batch=8] [--json_out=/tmp/aot.json]

Needs libtpu (``pip install "jax[tpu]"``); nothing runs on, or needs, a TPU. Prints per-device
memory by category against the chip's HBM, whether it fits, XLA's FLOPs against the analytic
count and the sharding of the largest tensors (see ``yocou_jax.aot``). Exits 1 with a line
saying by how much and what dominates when a compiled step does not fit.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Sequence

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from ml_collections import config_flags

from yocou_jax import aot
from yocou_jax import validation
from yocou_jax.config import ConfigError

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/default.py", "Experiment config file.")
_TOPOLOGY = flags.DEFINE_string("topology", "v5p:2x2x1", "TPU slice, e.g. v5p:4x4x4, v4:2x2x1.")
_MESH = flags.DEFINE_string("mesh", None, "data:D,fsdp:F,tensor:T (one may be -1); default: "
                            "config.mesh.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Override config.train.batch_size.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "prefill", "decode", "all"], "Step(s).")
_CONTEXT = flags.DEFINE_integer("context", 32768, "Inference: KV-cache length in tokens.")
_INFERENCE_BATCH = flags.DEFINE_integer("inference_batch", None,
                                        "Inference: sequences (default: data x fsdp).")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Also write the reports here as JSON.")


def run(config, topology: str, mesh_spec: str | None, mode: str, context: int,
        inference_batch: int | None) -> list[aot.Report]:
  """Compiles the requested step(s); one Report each."""
  sizes = aot.parse_mesh(mesh_spec) or dict(config.mesh)
  mesh = aot.topology_mesh(topology, sizes)
  modes = aot.MODES if mode == "all" else (mode,)
  batch = inference_batch or mesh.shape["data"] * mesh.shape["fsdp"]
  reports = []
  for m in modes:
    if m == "train":
      reports.append(aot.compile_train(config, topology, mesh))
    else:
      reports.append(aot.compile_inference(config, topology, mesh, m, batch, context))
    print(aot.format_report(reports[-1]), flush=True)
  return reports


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if _BATCH_SIZE.value:
    config.train.batch_size = _BATCH_SIZE.value
  try:
    validation.validate(config, check_data=False)
    reports = run(config, _TOPOLOGY.value, _MESH.value, _MODE.value, _CONTEXT.value,
                  _INFERENCE_BATCH.value)
  except ConfigError as e:
    sys.exit(validation.error_lines(e))
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w") as f:
      json.dump([dataclasses.asdict(r) for r in reports], f, indent=2)
    print(f"wrote {_JSON_OUT.value}")
  failed = [r for r in reports if not r.fits]
  for report in failed:
    print(f"error: {report.verdict()}", file=sys.stderr)
  if failed:
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
