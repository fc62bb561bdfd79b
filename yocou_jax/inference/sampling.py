"""Next-token sampling: greedy, temperature, top-k and top-p (nucleus), in that order.

``SamplingConfig`` is static (hashable) so a jitted decode step compiles once per setting.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  temperature: float = 0.0  # 0: greedy (argmax); otherwise logits are divided by it.
  top_k: int = 0  # Keep the k most likely tokens (0: all). Ties at the k-th logit are kept.
  top_p: float = 1.0  # Keep the smallest most-likely set whose probability reaches p (1: all).

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature={self.temperature} must be >= 0")
    if self.top_k < 0:
      raise ValueError(f"top_k={self.top_k} must be >= 0")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p={self.top_p} must be in (0, 1]")

  def describe(self, seed: Optional[int] = None) -> str:
    """"greedy", or the sampling settings in use ("temperature 0.8, top-p 0.95, seed 0")."""
    if self.temperature == 0.0:
      return "greedy"
    parts = [f"temperature {self.temperature:g}"]
    parts += [f"top-k {self.top_k}"] if self.top_k else []
    parts += [f"top-p {self.top_p:g}"] if self.top_p < 1.0 else []
    parts += [f"seed {seed}"] if seed is not None else []
    return ", ".join(parts)


def filter_logits(logits_BxV: Array, cfg: SamplingConfig) -> Array:
  """Temperature-scaled float32 logits with -inf outside the top-k / top-p set."""
  logits = logits_BxV.astype(jnp.float32) / max(cfg.temperature, 1e-6)
  if 0 < cfg.top_k < logits.shape[-1]:
    kth_Bx1 = jax.lax.top_k(logits, cfg.top_k)[0][:, -1:]
    logits = jnp.where(logits >= kth_Bx1, logits, -jnp.inf)
  if cfg.top_p < 1.0:
    sorted_BxV = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_BxV, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # Mass of the strictly more likely tokens.
    keep = before < cfg.top_p  # Always keeps the most likely token.
    threshold_Bx1 = jnp.min(jnp.where(keep, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits >= threshold_Bx1, logits, -jnp.inf)
  return logits


def sample(logits_BxV: Array, rng: Array, cfg: SamplingConfig) -> Array:
  """Token ids [B] (int32)."""
  if cfg.temperature == 0.0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  return jax.random.categorical(rng, filter_logits(logits_BxV, cfg), axis=-1).astype(jnp.int32)
