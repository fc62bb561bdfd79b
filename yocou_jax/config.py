"""The model's typed, validated view of ``config.model`` (an ``ml_collections.ConfigDict``).

Experiments configure everything through one ConfigDict schema (``experiments/configs/``); the
Flax modules take the frozen :class:`ModelConfig` built from it, which checks every field once and
fails with a one-line error naming the field, its value and what is allowed.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax.numpy as jnp

ARCHS = ("transformer", "yoco", "yocou", "rins", "looped", "parscale", "yoco_upper_loop",
         "yoco_upper_loop_nokv")
# The decoder-decoder archs: a self-decoder, one global K/V and a cross-decoder.
DECODER_DECODER_ARCHS = ("yoco", "yocou", "yoco_upper_loop", "yoco_upper_loop_nokv")
DTYPES = ("float32", "bfloat16")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "offload")
ATTENTION_IMPLS = ("xla", "pallas", "cudnn", "auto")
FFNS = ("dense", "moe")
EXPERT_SHARDINGS = ("fsdp", "expert")
MOE_MATMULS = ("auto", "ragged_dot", "blocked", "megablox")


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
  unroll_layers: bool = False  # Layer stacks unrolled in the compiled step (see model.py).
  loss_chunk_size: int = 0  # 0: per backend; -1: materialised logits (see yocou_jax/loss.py).
  ffn_chunk_size: int = 0  # Dense SwiGLU over chunks of this many positions (0: whole rows).
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
  moe_layers: int = 1  # Every k-th layer of each stack is MoE (1: all), the others dense d_ff.
  expert_sharding: str = "fsdp"
  moe_matmul: str = "auto"  # Grouped matmul of the dropless experts; auto: per backend.
  moe_block_rows: int = 128  # Row block of the blocked and megablox grouped matmuls.
  # ParScale (arch="parscale"): P parallel streams of one transformer; see yocou_jax/parscale.py.
  num_streams: int = 2
  prefix_length: int = 48
  stream_weight_smoothing: float = 0.01

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
    return self.arch in DECODER_DECODER_ARCHS

  @property
  def is_upper_loop(self) -> bool:
    """yoco_upper_loop(_nokv): the cross-decoder, not the self-decoder, runs T times."""
    return self.arch in ("yoco_upper_loop", "yoco_upper_loop_nokv")

  @property
  def cross_iterations(self) -> int:
    """How many times the cross-decoder runs (T for the upper loops, else 1)."""
    return self.num_iterations if self.is_upper_loop else 1

  @property
  def global_kv_iterations(self) -> int:
    """How many global K/V the model computes and caches (T without shared KV, else 1)."""
    return self.num_iterations if self.arch == "yoco_upper_loop_nokv" else 1

  @property
  def streams(self) -> int:
    """ParScale's P parallel streams (1 for every other arch)."""
    return self.num_streams if self.arch == "parscale" else 1

  @property
  def stream_prefix_length(self) -> int:
    """Learned prefix K/V tokens per stream and layer (ParScale only; 0 otherwise)."""
    return self.prefix_length if self.arch == "parscale" else 0

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
  def stack_sizes(self) -> tuple[int, ...]:
    """Layers of each scanned stack (transformer/looped: one; yoco/yocou: self, cross; rins)."""
    if self.is_decoder_decoder:
      return self.num_self_layers, self.num_cross_layers
    if self.arch == "rins":
      rest = self.num_layers - self.num_recursive_layers
      return (self.num_recursive_layers,) + ((rest,) if rest else ())
    return (self.num_layers,)

  def is_moe_layer(self, layer: int) -> bool:
    """Whether layer ``layer`` of its stack (0-based) has the MoE feed-forward: every
    ``moe_layers``-th, the last of each block (Qwen2-MoE ``decoder_sparse_step``)."""
    return self.ffn == "moe" and (layer + 1) % self.moe_layers == 0

  @property
  def iterations(self) -> int:
    """How many times the looped block runs (1 for the non-looped archs)."""
    looped = ("yocou", "rins", "looped", "yoco_upper_loop", "yoco_upper_loop_nokv")
    return self.num_iterations if self.arch in looped else 1

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
    if self.arch == "parscale":
      self._validate_parscale(fail)
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
    if not isinstance(self.unroll_layers, bool):
      fail("unroll_layers", "must be True or False")
    if (not isinstance(self.loss_chunk_size, int) or isinstance(self.loss_chunk_size, bool)
        or self.loss_chunk_size < -1):
      fail("loss_chunk_size", "must be an integer >= -1 (0: per backend, -1: materialised logits)")
    if (not isinstance(self.ffn_chunk_size, int) or isinstance(self.ffn_chunk_size, bool)
        or self.ffn_chunk_size < 0):
      fail("ffn_chunk_size", "must be an integer >= 0 (0: whole rows)")
    if self.rope_theta <= 0:
      fail("rope_theta", "must be positive")
    if self.ffn not in FFNS:
      fail("ffn", f"allowed: {', '.join(FFNS)}")
    if self.ffn == "moe":
      self._validate_moe(fail)

  def _validate_parscale(self, fail) -> None:
    if not isinstance(self.num_streams, int) or isinstance(self.num_streams, bool) or (
        self.num_streams <= 0):
      fail("num_streams", "must be a positive integer (ParScale's P)")
    if not isinstance(self.prefix_length, int) or isinstance(self.prefix_length, bool) or (
        self.prefix_length < 0):
      fail("prefix_length", "must be a non-negative integer")
    if not 0.0 <= self.stream_weight_smoothing < 1.0:
      fail("stream_weight_smoothing", "must be in [0, 1)")
    if self.prefix_length and self.attention_impl in ("pallas", "cudnn"):
      fail("attention_impl", "parscale with prefix_length > 0 runs xla attention (or auto)")

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
    stacks = self.stack_sizes
    if (not isinstance(self.moe_layers, int) or self.moe_layers < 1
        or any(size % self.moe_layers for size in stacks)):
      fail("moe_layers", f"must be a positive integer dividing every stack's layer count {stacks}")
    if self.expert_sharding not in EXPERT_SHARDINGS:
      fail("expert_sharding", f"allowed: {', '.join(EXPERT_SHARDINGS)}")
    if self.moe_matmul not in MOE_MATMULS:
      fail("moe_matmul", f"allowed: {', '.join(MOE_MATMULS)}")
    if self.moe_block_rows < 8 or self.moe_block_rows % 8:
      fail("moe_block_rows", "must be a positive multiple of 8")


def maybe_window(cfg: ModelConfig) -> Optional[int]:
  """The self-attention window of the arch's (self-)decoder layers; None = full causal."""
  return cfg.window if cfg.is_decoder_decoder else None
