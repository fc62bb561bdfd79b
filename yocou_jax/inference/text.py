"""Text in, text out for a training run: load a checkpoint and its tokenizer, generate.

A checkpoint is restored exactly as the trainer saved it (``TrainState`` onto the trainer's
abstract state, on one device), so the inference engine reads the training param tree unchanged.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional, Sequence

import jax
import ml_collections

from yocou_jax import sharding as sharding_lib
from yocou_jax.config import ModelConfig
from yocou_jax.data import tokenizers
from yocou_jax.inference import engine as engine_lib
from yocou_jax.inference import sampling as sampling_lib
from yocou_jax.model import Model
from yocou_jax.train import checkpoint as ckpt_lib
from yocou_jax.train import optimizer as optimizer_lib
from yocou_jax.train import step as step_lib


@dataclasses.dataclass
class Run:
  config: ml_collections.ConfigDict  # The run's full config, as saved with the checkpoint.
  model_cfg: ModelConfig  # Its model, num_iterations possibly overridden.
  params: Any
  tokenizer: tokenizers.Tokenizer
  step: int


def load_run(workdir: str, step: Optional[int] = None, num_iterations: int = 0) -> Run:
  """The latest (or ``step``) checkpoint of ``workdir``; ``num_iterations`` > 0 overrides T."""
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
  return Run(config, model_cfg, state.params, tokenizer, step)


def generate(run: Run, prompts: Sequence[str], max_new_tokens: int, *,
             sampling: sampling_lib.SamplingConfig = sampling_lib.SamplingConfig(),
             seed: int = 0, chunk_size: int = 512,
             warmup: bool = True) -> tuple[list[str], engine_lib.Generation]:
  """(continuations, Generation) for ``prompts`` in one batch, stopping at the tokenizer's EOS.

  Each prompt starts with BOS when the tokenizer has one (as in training). ``warmup`` first
  compiles on the same shapes, so the reported speeds exclude compilation.
  """
  tok = run.tokenizer
  ids = [([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(p) for p in prompts]
  max_len = max(map(len, ids)) + max_new_tokens
  engine = engine_lib.Engine(run.model_cfg, engine_lib.Options(chunk_size=chunk_size))
  kwargs = dict(sampling=sampling, max_len=max_len,
                stop_tokens=[tok.eos_id] if tok.eos_id is not None else [])
  if warmup:
    engine.generate(run.params, ids, min(2, max_new_tokens), **kwargs)
  result = engine.generate(run.params, ids, max_new_tokens, rng=jax.random.key(seed), **kwargs)
  return [tok.decode(t) for t in result.tokens], result
