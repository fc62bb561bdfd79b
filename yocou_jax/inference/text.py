"""Text in, text out for a training run: load a checkpoint and its tokenizer, generate.

Only the params of a checkpoint are read (:func:`yocou_jax.export.exporter.load_checkpoint`:
no optimizer state, whatever mesh saved it, shapes checked against the config); the inference
engine reads the training param tree unchanged.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterator, Optional, Sequence

import jax
import ml_collections

from yocou_jax.config import ModelConfig
from yocou_jax.data import run_tokenizer
from yocou_jax.data import tokenizers
from yocou_jax.export import exporter
from yocou_jax.inference import engine as engine_lib
from yocou_jax.inference import sampling as sampling_lib
from yocou_jax.inference import serving


@dataclasses.dataclass
class Run:
  config: ml_collections.ConfigDict  # The run's full config, as saved with the checkpoint.
  model_cfg: ModelConfig  # Its model, num_iterations possibly overridden.
  params: Any
  tokenizer: tokenizers.Tokenizer
  step: int
  mesh: Optional[jax.sharding.Mesh] = None  # Serve sharded: batch over data, heads over tensor.


def load_run(workdir: str, step: Optional[int] = None, num_iterations: int = 0,
             mesh: Optional[jax.sharding.Mesh] = None) -> Run:
  """The latest (or ``step``) checkpoint of ``workdir``; ``num_iterations`` > 0 overrides T.

  With a ``mesh`` the params are sharded on it as the trainer shards them
  (:func:`~yocou_jax.inference.engine.param_shardings`) and every generation runs on it.
  """
  checkpoint = exporter.load_checkpoint(workdir, step)
  trained_cfg = checkpoint.model_cfg
  model_cfg = trained_cfg.replace(num_iterations=num_iterations or trained_cfg.num_iterations)
  shardings = None if mesh is None else engine_lib.param_shardings(model_cfg, mesh)
  tokenizer = tokenizers.tokenizer_from_directory(
      os.path.join(workdir, run_tokenizer.TOKENIZER_DIR))
  params = jax.device_put(checkpoint.params, shardings)  # Once, not on every jitted call.
  return Run(ml_collections.ConfigDict(checkpoint.config), model_cfg, params, tokenizer,
             checkpoint.step, mesh)


def _engine(run: Run, chunk_size: Optional[int]) -> engine_lib.Engine:
  """``chunk_size`` defaults to the run's ``config.inference.chunk_size``, else the engine's."""
  if chunk_size is None:
    chunk_size = run.config.get("inference", {}).get("chunk_size", engine_lib.Options.chunk_size)
  return engine_lib.Engine(run.model_cfg, engine_lib.Options(chunk_size=chunk_size),
                           mesh=run.mesh)


def _encode(run: Run, prompts: Sequence[str]) -> list[list[int]]:
  """Each prompt's ids, starting with BOS when the tokenizer has one (as in training)."""
  tok = run.tokenizer
  return [([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(p) for p in prompts]


def _stop_tokens(run: Run) -> list[int]:
  return [run.tokenizer.eos_id] if run.tokenizer.eos_id is not None else []


def generate(run: Run, prompts: Sequence[str], max_new_tokens: int, *,
             sampling: sampling_lib.SamplingConfig = sampling_lib.SamplingConfig(),
             seed: int = 0, chunk_size: Optional[int] = None,
             warmup: bool = True) -> tuple[list[str], engine_lib.Generation]:
  """(continuations, Generation) for ``prompts`` in one batch, stopping at the tokenizer's EOS.

  Each prompt starts with BOS when the tokenizer has one (as in training). ``chunk_size``
  defaults to the run's ``config.inference.chunk_size``, else the engine's default. ``warmup``
  first compiles on the same shapes, so the reported speeds exclude compilation.
  """
  ids = _encode(run, prompts)
  max_len = max(map(len, ids)) + max_new_tokens
  engine = _engine(run, chunk_size)
  kwargs = dict(sampling=sampling, max_len=max_len, stop_tokens=_stop_tokens(run))
  if warmup:
    engine.generate(run.params, ids, min(2, max_new_tokens), **kwargs)
  result = engine.generate(run.params, ids, max_new_tokens, rng=jax.random.key(seed), **kwargs)
  return [run.tokenizer.decode(t) for t in result.tokens], result


def serve(run: Run, prompts: Sequence[str], max_new_tokens: Sequence[int], *, rows: int,
          sampling: sampling_lib.SamplingConfig = sampling_lib.SamplingConfig(),
          seed: int = 0, chunk_size: Optional[int] = None) -> Iterator[tuple[int, str]]:
  """Yields (prompt index, continuation) as each request finishes (EOS or its budget), the
  prompts running through ``rows`` cache rows by continuous batching
  (:func:`yocou_jax.inference.serving.stream`)."""
  requests = [serving.Request(ids, n) for ids, n in zip(_encode(run, prompts), max_new_tokens)]
  partial: dict[int, list[int]] = {}
  for t in serving.stream(_engine(run, chunk_size), run.params, requests, rows=rows,
                          sampling=sampling, rng=jax.random.key(seed),
                          stop_tokens=_stop_tokens(run)):
    partial.setdefault(t.request, []).append(t.token)
    if t.done:
      yield t.request, run.tokenizer.decode(partial.pop(t.request))
