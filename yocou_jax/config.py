"""The model's typed, validated view of ``config.model`` (an ``ml_collections.ConfigDict``).

Experiments configure everything through one ConfigDict schema (``experiments/configs/``); the
Flax modules take the frozen :class:`ModelConfig` built from it, which checks every field once and
fails with a one-line error naming the field, its value and what is allowed.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax.numpy as jnp

ARCHS = ("transformer", "yoco", "yocou", "rins", "looped")
DTYPES = ("float32", "bfloat16")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "offload")
ATTENTION_IMPLS = ("xla", "pallas", "cudnn", "auto")
FFNS = ("dense", "moe")
EXPERT_SHARDINGS = ("fsdp", "expert")


class ConfigError(ValueError):
  """A configuration value that cannot work; the message names the field."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyper-parameters of one model of the family. See experiments/configs/default.py."""

  arch: str = "yocou"
  num_layers: int = 4
  d_model: int = 128
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 32
  d_ff: int = 384
  vocab_size: int = 384
  window: int = 64
  num_iterations: int = 3
  num_recursive_layers: int = 2
  cross_rope: bool = False
  tie_embeddings: bool = False
  dtype: str = "float32"
  attention_impl: str = "xla"
  remat: str = "none"
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-6
  init_std: float = 0.02
  attention_block_size: int = 128
  unroll_loops: bool = True
  loss_chunk_size: int = 0  # 0: per backend; -1: materialised logits (see yocou_jax/loss.py).
  # Mixture-of-Experts feed-forward (ffn="moe"); see yocou_jax/moe.py.
  ffn: str = "dense"
  num_experts: int = 8
  num_experts_per_token: int = 2
  num_shared_experts: int = 1
  expert_d_ff: int = 128
  shared_expert_d_ff: int = 0  # 0: expert_d_ff.
  router_aux_loss: float = 0.01
  router_z_loss: float = 1e-3
  capacity_factor: float = 0.0  # 0: dropless.
  moe_layers: int = 1  # Every k-th layer is MoE (1: all).
  expert_sharding: str = "fsdp"

  def __post_init__(self):
    self.validate()

  @classmethod
  def from_config(cls, model_config: Any, **overrides) -> "ModelConfig":
    """Builds from ``config.model`` (ConfigDict or mapping); unknown fields are an error."""
    values = dict(model_config.items() if hasattr(model_config, "items") else model_config)
    values.update(overrides)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ConfigError(f"config.model.{unknown[0]} is not a model field; known: {sorted(known)}")
    return cls(**values)

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  # --- derived -----------------------------------------------------------------------------
  @property
  def is_decoder_decoder(self) -> bool:
    return self.arch in ("yoco", "yocou")

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def num_self_layers(self) -> int:
    """yoco/yocou: layers in the self-decoder (the first half)."""
    return self.num_layers // 2

  @property
  def num_cross_layers(self) -> int:
    return self.num_layers - self.num_layers // 2

  @property
  def shared_width(self) -> int:
    """Width of one shared expert."""
    return self.shared_expert_d_ff or self.expert_d_ff

  @property
  def iterations(self) -> int:
    """How many times the looped block runs (1 for the non-looped archs)."""
    return self.num_iterations if self.arch in ("yocou", "rins", "looped") else 1

  def validate(self) -> None:
    def fail(field: str, allowed: str):
      raise ConfigError(f"config.model.{field}={getattr(self, field)!r} is invalid: {allowed}")

    if self.arch not in ARCHS:
      fail("arch", f"allowed: {', '.join(ARCHS)}")
    for field in ("num_layers", "d_model", "num_heads", "num_kv_heads", "head_dim", "d_ff",
                  "vocab_size", "num_iterations", "attention_block_size"):
      value = getattr(self, field)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        fail(field, "must be a positive integer")
    if self.num_heads % self.num_kv_heads:
      fail("num_kv_heads", f"must divide num_heads={self.num_heads}")
    if self.d_model % self.num_heads:
      fail("num_heads", f"must divide d_model={self.d_model}")
    if self.head_dim % 2:
      fail("head_dim", "must be even (rotate-half RoPE)")
    if self.is_decoder_decoder:
      if not isinstance(self.window, int) or self.window <= 0:
        fail("window", "must be a positive integer (sliding-window length W)")
      if self.num_layers < 2 or self.num_layers % 2:
        fail("num_layers", "must be even and >= 2 for yoco/yocou (half self-, half cross-decoder)")
    if self.arch == "rins" and not 1 <= self.num_recursive_layers <= self.num_layers:
      fail("num_recursive_layers", f"must be in [1, num_layers={self.num_layers}]")
    if self.dtype not in DTYPES:
      fail("dtype", f"allowed: {', '.join(DTYPES)}")
    if self.remat not in REMAT_POLICIES:
      fail("remat", f"allowed: {', '.join(REMAT_POLICIES)}")
    if self.attention_impl not in ATTENTION_IMPLS:
      fail("attention_impl", f"allowed: {', '.join(ATTENTION_IMPLS)}")
    if not isinstance(self.unroll_loops, bool):
      fail("unroll_loops", "must be True or False")
    if (not isinstance(self.loss_chunk_size, int) or isinstance(self.loss_chunk_size, bool)
        or self.loss_chunk_size < -1):
      fail("loss_chunk_size", "must be an integer >= -1 (0: per backend, -1: materialised logits)")
    if self.rope_theta <= 0:
      fail("rope_theta", "must be positive")
    if self.ffn not in FFNS:
      fail("ffn", f"allowed: {', '.join(FFNS)}")
    if self.ffn == "moe":
      self._validate_moe(fail)

  def _validate_moe(self, fail) -> None:
    for field in ("num_experts", "num_experts_per_token", "expert_d_ff"):
      value = getattr(self, field)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        fail(field, "must be a positive integer")
    for field in ("num_shared_experts", "shared_expert_d_ff"):
      value = getattr(self, field)
      if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        fail(field, "must be a non-negative integer")
    if self.num_experts_per_token > self.num_experts:
      fail("num_experts_per_token", f"must be <= num_experts={self.num_experts}")
    for field in ("router_aux_loss", "router_z_loss", "capacity_factor"):
      if getattr(self, field) < 0:
        fail(field, "must be >= 0")
    if self.moe_layers != 1:
      fail("moe_layers", "only 1 (every layer is MoE) is implemented")
    if self.expert_sharding not in EXPERT_SHARDINGS:
      fail("expert_sharding", f"allowed: {', '.join(EXPERT_SHARDINGS)}")


def maybe_window(cfg: ModelConfig) -> Optional[int]:
  """The self-attention window of the arch's (self-)decoder layers; None = full causal."""
  return cfg.window if cfg.is_decoder_decoder else None
