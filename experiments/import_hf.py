r"""Imports a Hugging Face Llama directory as a yocou_jax checkpoint (arch=transformer).

  python -m experiments.import_hf --hf_dir=path/to/llama --workdir=runs/from_llama \
      [--config=experiments/configs/default.py] [--step=0] [--overwrite]

Only safetensors weights are read. The checkpoint lands at ``workdir/checkpoints/<step>/`` with
``config.model`` set from the Llama ``config.json`` (the rest of ``--config`` is kept), a fresh
optimizer state, and the ``tokenizer.json`` (if any) in ``workdir/tokenizer/``. Export it back with
``experiments.export``. Unsupported Llama features (RoPE scaling, biases) are refused by name.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/default.py", "Experiment config the import trains with.")
_HF_DIR = flags.DEFINE_string("hf_dir", None, "Hugging Face Llama directory.", required=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "yocou_jax run directory to write.",
                               required=True)
_STEP = flags.DEFINE_integer("step", 0, "Step number of the written checkpoint.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace checkpoints already in --workdir.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from yocou_jax.config import ConfigError  # pylint: disable=g-import-not-at-top
  from yocou_jax.export import importer  # pylint: disable=g-import-not-at-top

  try:
    cfg = importer.import_llama(_HF_DIR.value, _WORKDIR.value, _CONFIG.value, step=_STEP.value,
                                overwrite=_OVERWRITE.value)
  except (importer.ExportError, ConfigError) as e:
    raise SystemExit(f"error: {e}") from None
  print(f"imported {_HF_DIR.value} ({cfg.num_layers} layers, d_model {cfg.d_model}, vocab "
        f"{cfg.vocab_size}) into {_WORKDIR.value} step {_STEP.value}")


if __name__ == "__main__":
  app.run(main)
