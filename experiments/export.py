r"""Exports a training checkpoint to a Hugging Face directory, then checks it against JAX.

  python -m experiments.export --workdir=runs/default --out=exports/default \
      [--step=N] [--dtype=bfloat16] [--overwrite] [--max_shard_size=5GB] [--noverify]

``arch=transformer`` exports load as native ``LlamaForCausalLM``
(``AutoModelForCausalLM.from_pretrained(out)``); the other archs ship ``modeling_yocou.py`` and
load with ``trust_remote_code=True``. Any mesh's checkpoint exports on a CPU-only machine. With
``--verify`` (the default) the export is loaded in PyTorch and its logits on random batches are
compared with the JAX model's; the binary fails when they differ by more than
``--verify_atol``.
"""

from __future__ import annotations

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", None, "Training run directory (holds checkpoints/).",
                               required=True)
_OUT = flags.DEFINE_string("out", None, "Export directory to create.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Stored weight dtype.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a non-empty --out directory.")
_MAX_SHARD_SIZE = flags.DEFINE_string("max_shard_size", "5GB",
                                      "Largest safetensors file before sharding (e.g. 500MB).")
_VERIFY = flags.DEFINE_bool("verify", True, "Compare PyTorch and JAX logits after exporting.")
_VERIFY_ATOL = flags.DEFINE_float("verify_atol", 1e-3,
                                  "Largest |logit difference| --verify accepts.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from yocou_jax.export import exporter, verify  # pylint: disable=g-import-not-at-top

  try:
    ckpt = exporter.export_checkpoint(
        _WORKDIR.value, _OUT.value, step=_STEP.value, dtype=_DTYPE.value,
        overwrite=_OVERWRITE.value, max_shard_size=_MAX_SHARD_SIZE.value)
  except exporter.ExportError as e:  # A bad input: one line naming it, no traceback.
    raise SystemExit(f"error: {e}") from None
  print(f"exported {ckpt.model_cfg.arch} step {ckpt.step} to {_OUT.value}")
  if not _VERIFY.value:
    return
  cfg = ckpt.model_cfg
  seq_len = 2 * cfg.window + 8 if cfg.is_decoder_decoder else 64
  diff = verify.max_logit_difference(_OUT.value, cfg, ckpt.params, export_dtype=_DTYPE.value,
                                     seq_len=seq_len)
  logging.info("verify: max |torch - jax| logit difference %.3e", diff)
  print(f"verified: max |logits(PyTorch) - logits(JAX)| = {diff:.3e} over 3 random batches of "
        f"{seq_len} tokens")
  if not diff <= _VERIFY_ATOL.value:
    raise SystemExit(f"error: the export differs from the JAX model by {diff:.3e} > "
                     f"--verify_atol={_VERIFY_ATOL.value}")


if __name__ == "__main__":
  app.run(main)
