r"""Generates continuations from the latest checkpoint of a training run.

  python -m experiments.generate --workdir=runs/default --prompt="def " --prompt="import os"
  python -m experiments.generate --workdir=runs/default --prompt_file=prompt.txt \
      --temperature=0.7 --top_p=0.9 --seed=3 --num_iterations=6

Loads ``workdir/checkpoints/<latest>/{config,state}`` and the tokenizer saved in
``workdir/tokenizer``, prefills every prompt (one batch, mixed lengths) in chunks, decodes with
the K/V cache and prints each prompt's greedy continuation beside a seeded sampled one
(``--temperature``, ``--top_k``, ``--top_p``, ``--seed``; ``--temperature=0``: greedy only), then
the prefill and decode throughput of the last generation and the cache bytes (live arrays, and
``accounting.kv_cache_bytes`` for the same length). A checkpoint trained with any
``attention_impl`` is served on any backend (``auto`` and ``pallas`` use the Pallas kernels on
TPU and GPU; ``auto`` uses XLA on CPU).
``--num_iterations`` runs a looped model at another depth than it was trained with.
"""

from __future__ import annotations

import os

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Training run directory (required).")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "A prompt (repeat the flag for a batch).")
_PROMPT_FILE = flags.DEFINE_string("prompt_file", None, "A file whose whole text is one prompt.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "Tokens to generate per prompt.")
_TEMPERATURE = flags.DEFINE_float(
    "temperature", 0.8, "Temperature of the sampled continuation (0: greedy only).")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample from the k most likely tokens (0: all).")
_TOP_P = flags.DEFINE_float("top_p", 0.95, "Nucleus sampling mass (1: all).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling PRNG seed.")
_ITERATIONS = flags.DEFINE_integer("num_iterations", 0, "Loop count T at inference (0: trained).")
_CHUNK = flags.DEFINE_integer(
    "chunk_size", None, "Prefill chunk length (default: config.inference.chunk_size, else 512).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_WARMUP = flags.DEFINE_bool("warmup", True, "Compile first, so the reported speeds exclude it.")


def _prompts_and_sampling(sampling_lib):
  """The prompts and sampling settings from the flags; ValueError names a bad one."""
  if not os.path.isdir(_WORKDIR.value):
    raise ValueError(f"--workdir={_WORKDIR.value} is not a directory")
  if _MAX_NEW.value <= 0:
    raise ValueError(f"--max_new_tokens={_MAX_NEW.value} must be a positive integer")
  if _ITERATIONS.value < 0:
    raise ValueError(f"--num_iterations={_ITERATIONS.value} must be >= 0 (0: as trained)")
  if _CHUNK.value is not None and _CHUNK.value <= 0:
    raise ValueError(f"--chunk_size={_CHUNK.value} must be a positive integer")
  prompts = list(_PROMPT.value)
  if _PROMPT_FILE.value:
    if not os.path.isfile(_PROMPT_FILE.value):
      raise ValueError(f"--prompt_file={_PROMPT_FILE.value} does not exist")
    with open(_PROMPT_FILE.value) as f:
      prompts.append(f.read())
  if not prompts:
    raise ValueError("give --prompt (one or more) or --prompt_file")
  try:
    sampling = sampling_lib.SamplingConfig(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
  except ValueError as e:
    raise ValueError(f"--{e}") from None
  return prompts, sampling


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from yocou_jax import accounting  # pylint: disable=g-import-not-at-top
  from yocou_jax.inference import sampling as sampling_lib  # pylint: disable=g-import-not-at-top
  from yocou_jax.inference import text  # pylint: disable=g-import-not-at-top

  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  try:
    prompts, sampling = _prompts_and_sampling(sampling_lib)
    run = text.load_run(_WORKDIR.value, _STEP.value, _ITERATIONS.value)
  except (ValueError, OSError) as e:  # Bad flags, workdir or checkpoint: one line, no traceback.
    raise SystemExit(f"error: {e}") from None
  settings = [sampling_lib.SamplingConfig()] + ([sampling] if sampling.temperature > 0 else [])
  outputs = []
  for setting in settings:
    continuations, result = text.generate(run, prompts, _MAX_NEW.value, sampling=setting,
                                          seed=_SEED.value, chunk_size=_CHUNK.value,
                                          warmup=_WARMUP.value)
    outputs.append((setting.describe(_SEED.value), continuations))
  cfg = run.model_cfg
  print(f"checkpoint step {run.step}: {cfg.arch}, {cfg.num_layers} layers, "
        f"T={cfg.iterations}, window {cfg.window}")
  for i, prompt in enumerate(prompts):
    print(f"\n--- prompt: {prompt!r}")
    for label, continuations in outputs:
      print(f"[{label}]\n{prompt}{continuations[i]}")
  formula = accounting.kv_cache_bytes(cfg, result.max_len, len(prompts))
  print(f"\nprefill: {result.prompt_tokens} tokens in {result.prefill_seconds:.3f} s "
        f"({result.prefill_tokens_per_sec:,.0f} tokens/s)")
  print(f"decode: {result.decode_steps} steps x {len(prompts)} sequences in "
        f"{result.decode_seconds:.3f} s ({result.decode_tokens_per_sec:,.1f} tokens/s)")
  print(f"kv cache: {result.cache_bytes:,} bytes for {len(prompts)} x {result.max_len} tokens "
        f"(accounting.kv_cache_bytes: {formula:,})")


if __name__ == "__main__":
  app.run(main)
