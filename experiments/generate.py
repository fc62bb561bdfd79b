r"""Generates continuations from the latest checkpoint of a training run.

  python -m experiments.generate --workdir=runs/default --prompt="def " --prompt="import os"
  python -m experiments.generate --workdir=runs/default --prompt_file=prompt.txt \
      --temperature=0.7 --top_p=0.9 --seed=3 --num_iterations=6
  python -m experiments.generate --workdir=runs/big --prompts_file=prompts.jsonl --rows=32 \
      --mesh=data:-1,tensor:4

Loads ``workdir/checkpoints/<latest>/{config,state}`` and the tokenizer saved in
``workdir/tokenizer``, prefills every prompt (one batch, mixed lengths) in chunks, decodes with
the K/V cache and prints each prompt's greedy continuation beside a seeded sampled one
(``--temperature``, ``--top_k``, ``--top_p``, ``--seed``; ``--temperature=0``: greedy only), then
the prefill and decode throughput of the last generation and the cache bytes (live arrays, and
``accounting.kv_cache_bytes`` for the same length). A checkpoint trained with any
``attention_impl`` is served on any backend (``auto`` and ``pallas`` use the Pallas kernels on
TPU and GPU; ``auto`` uses XLA on CPU).
``--num_iterations`` runs a looped model at another depth than it was trained with.
``--mesh`` serves on every device, sharded as the trainer shards (params by their logical names;
the batch or the ``--rows`` over the data and fsdp axes, heads over 'tensor'): the prompts of one
batch, or the rows, must be a multiple of the data x fsdp size.
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Training run directory (required).")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "A prompt (repeat the flag for a batch).")
_PROMPT_FILE = flags.DEFINE_string("prompt_file", None, "A file whose whole text is one prompt.")
_PROMPTS_FILE = flags.DEFINE_string(
    "prompts_file", None, "Many prompts: one per line, or JSONL ({'prompt', 'max_new_tokens'}).")
_ROWS = flags.DEFINE_integer(
    "rows", 0, "Continuous batching through this many cache rows (0: all prompts in one batch).")
_JSON_OUT = flags.DEFINE_string("json_out", None, "With --rows: write one JSON line per request.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "Tokens to generate per prompt.")
_TEMPERATURE = flags.DEFINE_float(
    "temperature", 0.6, "Temperature of the sampled continuation (0: greedy only).")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample from the k most likely tokens (0: all).")
_TOP_P = flags.DEFINE_float("top_p", 0.9, "Nucleus sampling mass (1: all).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling PRNG seed.")
_ITERATIONS = flags.DEFINE_integer("num_iterations", 0, "Loop count T at inference (0: trained).")
_CHUNK = flags.DEFINE_integer(
    "chunk_size", None, "Prefill chunk length (default: config.inference.chunk_size, else 512).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_MESH = flags.DEFINE_string("mesh", None, "Serve sharded over every device: data:D,fsdp:F,tensor:T "
                            "(one may be -1; default: one device).")
_WARMUP = flags.DEFINE_bool("warmup", True, "Compile first, so the reported speeds exclude it.")


def _read_prompts(path: str) -> list[tuple[str, int]]:
  """(prompt, max_new_tokens) per line of ``path`` (see the module docstring)."""
  if not os.path.isfile(path):
    raise ValueError(f"--prompts_file={path} does not exist")
  prompts = []
  with open(path) as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      if not path.endswith(".jsonl"):
        prompts.append((line.rstrip("\n"), _MAX_NEW.value))
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"--prompts_file={path} line {n}: not JSON ({e.msg})") from None
      budget = record.get("max_new_tokens", _MAX_NEW.value) if isinstance(record, dict) else None
      if (not isinstance(record, dict) or not isinstance(record.get("prompt"), str)
          or not isinstance(budget, int) or budget <= 0):
        raise ValueError(f"--prompts_file={path} line {n}: expected an object with a string "
                         f"'prompt' and optionally a positive integer 'max_new_tokens'")
      prompts.append((record["prompt"], budget))
  return prompts


def _on_mesh(run) -> str:
  return "" if run.mesh is None else f" on the mesh {dict(run.mesh.shape)}"


def _serve(text, run, prompts, sampling) -> None:
  """Continuous batching through --rows rows; prints (and with --json_out writes) each request."""
  from yocou_jax import files  # pylint: disable=g-import-not-at-top

  start, records = time.perf_counter(), []
  texts, budgets = [p for p, _ in prompts], [n for _, n in prompts]
  for i, continuation in text.serve(run, texts, budgets, rows=_ROWS.value, sampling=sampling,
                                    seed=_SEED.value, chunk_size=_CHUNK.value):
    print(f"\n--- request {i} [{sampling.describe(_SEED.value)}]: {texts[i]!r}\n"
          f"{texts[i]}{continuation}", flush=True)
    records.append({"index": i, "prompt": texts[i], "continuation": continuation})
  print(f"\n{len(prompts)} requests through {_ROWS.value} rows{_on_mesh(run)} in "
        f"{time.perf_counter() - start:.3f} s (compilation included)")
  if _JSON_OUT.value:
    with files.atomic_write(_JSON_OUT.value) as f:  # Never a half-written file.
      for record in sorted(records, key=lambda r: r["index"]):
        f.write(json.dumps(record) + "\n")
    print(f"wrote {_JSON_OUT.value}")


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
  if _ROWS.value < 0:
    raise ValueError(f"--rows={_ROWS.value} must be >= 0 (0: one batch)")
  if _JSON_OUT.value and not _ROWS.value:
    raise ValueError("--json_out needs --rows (continuous batching)")
  prompts = [(p, _MAX_NEW.value) for p in _PROMPT.value]
  if _PROMPT_FILE.value:
    if not os.path.isfile(_PROMPT_FILE.value):
      raise ValueError(f"--prompt_file={_PROMPT_FILE.value} does not exist")
    with open(_PROMPT_FILE.value) as f:
      prompts.append((f.read(), _MAX_NEW.value))
  if _PROMPTS_FILE.value:
    prompts += _read_prompts(_PROMPTS_FILE.value)
  if not prompts:
    raise ValueError("give --prompt (one or more), --prompt_file or --prompts_file")
  if not _ROWS.value and any(n != _MAX_NEW.value for _, n in prompts):
    raise ValueError("per-request max_new_tokens in --prompts_file needs --rows")
  try:
    sampling = sampling_lib.SamplingConfig(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
  except ValueError as e:
    raise ValueError(f"--{e}") from None
  return prompts, sampling


def _mesh(num_rows: int):
  """The --mesh over every device (None without it); ValueError names a spec the devices or the
  batch (``num_rows``: the prompts of one batch, or --rows) cannot take."""
  if not _MESH.value:
    return None
  from yocou_jax import aot  # pylint: disable=g-import-not-at-top
  from yocou_jax import sharding  # pylint: disable=g-import-not-at-top
  from yocou_jax.inference import cache  # pylint: disable=g-import-not-at-top

  sizes = aot.parse_mesh(_MESH.value)
  try:
    mesh = sharding.make_mesh(sizes, name="mesh")
  except ValueError as e:
    raise ValueError(f"--mesh={_MESH.value}: {e}") from None
  shards = cache.batch_shards(mesh, sharding.LOGICAL_AXIS_RULES)
  if num_rows % shards:
    what = f"--rows={num_rows}" if _ROWS.value else f"the number of prompts ({num_rows})"
    raise ValueError(f"--mesh={_MESH.value} splits the batch {shards} ways (data x fsdp): "
                     f"{what} must be a multiple of {shards}")
  return mesh


def _load(mesh):
  """The run of --workdir, its params on ``mesh``; ValueError names the --mesh a model's
  dimension does not divide."""
  from yocou_jax.config import ConfigError  # pylint: disable=g-import-not-at-top
  from yocou_jax.inference import text  # pylint: disable=g-import-not-at-top

  try:
    return text.load_run(_WORKDIR.value, _STEP.value, _ITERATIONS.value, mesh=mesh)
  except ConfigError as e:
    if mesh is None:
      raise
    raise ValueError(f"--mesh={_MESH.value}: {e}") from None


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
    run = _load(_mesh(_ROWS.value or len(prompts)))
  except (ValueError, OSError) as e:  # Bad flags, workdir or checkpoint: one line, no traceback.
    raise SystemExit(f"error: {e}") from None
  if _ROWS.value:
    _serve(text, run, prompts, sampling)
    return
  prompts = [p for p, _ in prompts]
  settings = [sampling_lib.SamplingConfig()] + ([sampling] if sampling.temperature > 0 else [])
  outputs = []
  for setting in settings:
    continuations, result = text.generate(run, prompts, _MAX_NEW.value, sampling=setting,
                                          seed=_SEED.value, chunk_size=_CHUNK.value,
                                          warmup=_WARMUP.value)
    outputs.append((setting.describe(_SEED.value), continuations))
  cfg = run.model_cfg
  print(f"checkpoint step {run.step}: {cfg.arch}, {cfg.num_layers} layers, "
        f"T={cfg.iterations}, window {cfg.window}{_on_mesh(run)}")
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
