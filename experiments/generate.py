r"""Generates continuations from the latest checkpoint of a training run.

  python -m experiments.generate --workdir=runs/default --prompt="def " --prompt="import os"
  python -m experiments.generate --workdir=runs/default --prompt_file=prompt.txt \
      --temperature=0.8 --top_p=0.95 --num_iterations=6

Loads ``workdir/checkpoints/<latest>/{config,state}`` and the tokenizer saved in
``workdir/tokenizer``, prefills every prompt (one batch, mixed lengths) in chunks, decodes with
the K/V cache and prints each continuation, then the prefill and decode throughput and the
cache bytes (live arrays, and ``accounting.kv_cache_bytes`` for the same length).
``--num_iterations`` runs a looped model at another depth than it was trained with.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional, Sequence

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Training run directory.", required=True)
_PROMPT = flags.DEFINE_multi_string("prompt", [], "A prompt (repeat the flag for a batch).")
_PROMPT_FILE = flags.DEFINE_string("prompt_file", None, "A file whose whole text is one prompt.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "Tokens to generate per prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Sampling temperature (0: greedy).")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample from the k most likely tokens (0: all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1: all).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling PRNG seed.")
_ITERATIONS = flags.DEFINE_integer("num_iterations", 0, "Loop count T at inference (0: trained).")
_CHUNK = flags.DEFINE_integer(
    "chunk_size", None, "Prefill chunk length (default: config.inference.chunk_size, else 512).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_WARMUP = flags.DEFINE_bool("warmup", True, "Compile first, so the reported speeds exclude it.")


@dataclasses.dataclass
class Loaded:
  config: Any  # The run's ConfigDict.
  model_cfg: Any  # ModelConfig (num_iterations possibly overridden).
  params: Any
  tokenizer: Any
  step: int


def load(workdir: str, step: Optional[int] = None, num_iterations: int = 0) -> Loaded:
  """The params of a checkpoint (restored as the trainer saved them) and the run's tokenizer."""
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top

  from yocou_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from yocou_jax.config import ModelConfig  # pylint: disable=g-import-not-at-top
  from yocou_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
  from yocou_jax.model import Model  # pylint: disable=g-import-not-at-top
  from yocou_jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from yocou_jax.train import optimizer as optimizer_lib  # pylint: disable=g-import-not-at-top
  from yocou_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top

  checkpointer = ckpt_lib.Checkpointer(workdir, keep=1_000_000, use_async=False)
  step = checkpointer.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {checkpointer.directory}")
  config = ml_collections.ConfigDict(checkpointer.restore_config(step))
  trained_cfg = ModelConfig.from_config(config.model)
  mesh = sharding_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  abstract, shardings = step_lib.state_shardings(
      Model(trained_cfg), optimizer_lib.make_optimizer(config.train), mesh, config.data.seq_len)
  state = checkpointer.restore(step, ckpt_lib.abstract_with_shardings(abstract, shardings))
  checkpointer.close()
  model_cfg = trained_cfg.replace(num_iterations=num_iterations or trained_cfg.num_iterations)
  tokenizer = tokenizers.tokenizer_from_directory(os.path.join(workdir, "tokenizer"))
  return Loaded(config, model_cfg, state.params, tokenizer, step)


def generate(loaded: Loaded, prompts: Sequence[str], max_new_tokens: int, *, sampling=None,
             seed: int = 0, chunk_size: int = 512, warmup: bool = True):
  """(continuation texts, Generation) for ``prompts`` in one batch."""
  import jax  # pylint: disable=g-import-not-at-top

  from yocou_jax.inference import engine as engine_lib  # pylint: disable=g-import-not-at-top
  from yocou_jax.inference import sampling as sampling_lib  # pylint: disable=g-import-not-at-top

  tok = loaded.tokenizer
  ids = [([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(p) for p in prompts]
  max_len = max(map(len, ids)) + max_new_tokens
  engine = engine_lib.Engine(loaded.model_cfg, engine_lib.Options(chunk_size=chunk_size))
  kwargs = dict(sampling=sampling or sampling_lib.SamplingConfig(), max_len=max_len,
                stop_tokens=[tok.eos_id] if tok.eos_id is not None else [])
  if warmup:
    engine.generate(loaded.params, ids, min(2, max_new_tokens), **kwargs)
  result = engine.generate(loaded.params, ids, max_new_tokens, rng=jax.random.key(seed),
                           **kwargs)
  return [tok.decode(t) for t in result.tokens], result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from yocou_jax import accounting  # pylint: disable=g-import-not-at-top
  from yocou_jax.inference import sampling as sampling_lib  # pylint: disable=g-import-not-at-top

  prompts = list(_PROMPT.value)
  if _PROMPT_FILE.value:
    with open(_PROMPT_FILE.value) as f:
      prompts.append(f.read())
  if not prompts:
    raise app.UsageError("give --prompt (one or more) or --prompt_file")
  loaded = load(_WORKDIR.value, _STEP.value, _ITERATIONS.value)
  sampling = sampling_lib.SamplingConfig(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
  chunk_size = _CHUNK.value or loaded.config.get("inference", {}).get("chunk_size", 512)
  texts, result = generate(loaded, prompts, _MAX_NEW.value, sampling=sampling, seed=_SEED.value,
                           chunk_size=chunk_size, warmup=_WARMUP.value)
  cfg = loaded.model_cfg
  print(f"checkpoint step {loaded.step}: {cfg.arch}, {cfg.num_layers} layers, "
        f"T={cfg.iterations}, window {cfg.window}")
  for prompt, text in zip(prompts, texts):
    print(f"\n--- prompt: {prompt!r}\n{prompt}{text}")
  formula = accounting.kv_cache_bytes(cfg, result.max_len, len(prompts))
  print(f"\nprefill: {result.prompt_tokens} tokens in {result.prefill_seconds:.3f} s "
        f"({result.prefill_tokens_per_sec:,.0f} tokens/s)")
  print(f"decode: {result.decode_steps} steps x {len(prompts)} sequences in "
        f"{result.decode_seconds:.3f} s ({result.decode_tokens_per_sec:,.1f} tokens/s)")
  print(f"kv cache: {result.cache_bytes:,} bytes for {len(prompts)} x {result.max_len} tokens "
        f"(accounting.kv_cache_bytes: {formula:,})")


if __name__ == "__main__":
  app.run(main)
