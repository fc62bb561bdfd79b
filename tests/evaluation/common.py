"""Helpers of the evaluation tests: a tiny trainer-layout run on disk, the float64 reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from tests.inference import reference as ref_lib
from yocou_jax.config import ModelConfig
from yocou_jax.model import Model


def write_run(workdir: str, arch: str = "yocou", seed: int = 11):
  """A checkpoint as the trainer writes it (step 5, random weights) plus the byte tokenizer."""
  return ref_lib.write_run(workdir, arch, seed=seed)


@functools.lru_cache(maxsize=None)
def forward(cfg: ModelConfig):
  """The training forward, jitted once per config."""
  return jax.jit(lambda p, t: Model(cfg).apply({"params": p}, t))


def token_logprobs(cfg: ModelConfig, params, tokens) -> np.ndarray:
  """log p(tokens[i] | tokens[:i]) for i >= 1, from the training forward, in float64."""
  logits = np.asarray(forward(cfg)(params, jnp.asarray([tokens], jnp.int32))[0], np.float64)
  logits = logits[:-1]
  log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  return logits[np.arange(len(tokens) - 1), np.asarray(tokens[1:])] - log_z
