"""Checks an export against the JAX model: logits on random batches and greedy generation.

Used by ``experiments/export.py --verify`` after every export and by the tests. The JAX side is a
plain full forward (no cache); greedy decoding recomputes the whole prefix each step inside one
fixed-length buffer (one compilation), which is exact because the model is causal.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from yocou_jax.config import ModelConfig
from yocou_jax.model import Model


@functools.lru_cache(maxsize=16)
def _forward_fn(cfg: ModelConfig):
  """One jitted float32 forward per config (compiled once per input shape)."""
  model = Model(cfg.replace(dtype="float32", remat="none", attention_impl="xla"))
  return jax.jit(lambda params, tokens: model.apply({"params": params}, tokens))


def jax_logits(cfg: ModelConfig, params: Any, tokens: np.ndarray) -> np.ndarray:
  """float32 logits [B, N, V] of the JAX model (one unpacked document per row)."""
  return np.asarray(_forward_fn(cfg)(params, jnp.asarray(tokens, jnp.int32)))


def jax_greedy(cfg: ModelConfig, params: Any, prompt: np.ndarray, num_tokens: int) -> np.ndarray:
  """Greedy continuation [B, num_tokens] of ``prompt`` [B, P] by repeated full forwards."""
  forward = _forward_fn(cfg)
  batch, length = prompt.shape
  buffer = np.zeros((batch, length + num_tokens), np.int32)
  buffer[:, :length] = prompt
  params = jax.device_put(params)
  for position in range(length, length + num_tokens):
    logits = np.asarray(forward(params, buffer))
    buffer[:, position] = logits[:, position - 1].argmax(axis=-1)
  return buffer[:, length:]


def round_params(params: Any, dtype: str) -> Any:
  """The params as stored in an export of ``dtype``, back in float32."""
  return jax.tree.map(lambda x: np.asarray(jnp.asarray(x, jnp.dtype(dtype)), np.float32), params)


def load_torch_model(export_dir: str | Path, dtype: str = "float32"):
  """``AutoModelForCausalLM.from_pretrained(export_dir)`` in eval mode, computing in ``dtype``."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  model = transformers.AutoModelForCausalLM.from_pretrained(
      str(export_dir), trust_remote_code=True, dtype=getattr(torch, dtype))
  return model.eval()


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
  """float32 logits [B, N, V] of a PyTorch causal LM (full forward, no cache)."""
  import torch  # pylint: disable=g-import-not-at-top

  with torch.no_grad():
    out = model(torch.as_tensor(np.asarray(tokens), dtype=torch.long), use_cache=False)
  return out.logits.float().numpy()


def max_logit_difference(export_dir: str | Path, cfg: ModelConfig, params: Any, *,
                         export_dtype: str = "float32", batches: int = 3, batch_size: int = 2,
                         seq_len: int = 64, seed: int = 0) -> float:
  """Max |logits_torch - logits_jax| over random token batches (weights rounded alike)."""
  model = load_torch_model(export_dir)
  params = round_params(params, export_dtype)
  rng = np.random.default_rng(seed)
  worst = 0.0
  for _ in range(batches):
    tokens = rng.integers(0, cfg.vocab_size, size=(batch_size, seq_len))
    diff = np.abs(torch_logits(model, tokens) - jax_logits(cfg, params, tokens))
    worst = max(worst, float(diff.max()))
  return worst
