"""The YOCO-U model family in Flax Linen: transformer, yoco, yocou, rins and looped.

Every arch is built from the same two layers and one stacking primitive:

* :class:`DecoderLayer`: pre-norm self-attention (full causal, or sliding-window of W keys) and
  SwiGLU, each with a residual.
* :class:`CrossDecoderLayer`: pre-norm attention of this layer's own queries to the single global
  K/V, and SwiGLU. It has no K/V projections of its own.
* :class:`LoopedStack`: ``num_layers`` *distinct* layers stacked with ``nn.scan`` over a leading
  ``layers`` parameter axis (compile time does not grow with depth), the whole stack optionally
  applied ``num_iterations`` times with *shared* weights by an outer ``nn.scan`` whose params
  are broadcast (stored once; their gradients sum over iterations). The outer scan is unrolled
  unless ``unroll_loops=False`` (then it is one while loop whatever T is).

The archs (L = num_layers, T = num_iterations, W = window)::

  transformer   embed -> L causal layers -> norm -> head
  looped        embed -> (L causal layers) x T -> norm -> head
  rins          embed -> (first R layers) x T -> remaining L-R layers -> norm -> head
  yoco          embed -> self-decoder: L/2 SWA layers -> global K,V = norm(x) W_K, norm(x) W_V
                      -> cross-decoder: L/2 layers attending to K,V -> norm -> head
  yocou         yoco with the whole self-decoder applied T times (the Universal Self-Decoder);
                the global K,V are computed once, from the last iteration's output.

Inputs are packed rows: ``tokens``, ``segment_ids`` (documents 1, 2, ...; 0 = padding) and
``positions`` (restarting at 0 per document; RoPE uses them). Attention never crosses documents.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from yocou_jax import attention as attention_lib
from yocou_jax import moe as moe_lib
from yocou_jax.config import ModelConfig
from yocou_jax.layers import Projection, RMSNorm, activation, apply_rope, param_init

Array = jax.Array
# Collection of the residual stream after every layer application, [T, layers, B, N, D] per
# stack, filled only when applied with ``mutable=[INTERMEDIATES]`` (representation analysis).
INTERMEDIATES = "intermediates"
LAYER_INPUT = "layer_input"  # checkpoint_name of every layer's input (remat="offload").

_REMAT_POLICIES = {
    "full": None,  # Save nothing: recompute the whole layer in the backward pass.
    "dots": jax.checkpoint_policies.checkpoint_dots,  # Save every matmul output.
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # Projections only.
    # As "full", but each layer's input (what the layer scan keeps for the backward pass, one
    # [B, N, D] per layer application) is kept in pinned host memory, not in HBM.
    "offload": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=(), names_which_can_be_offloaded=(LAYER_INPUT,),
        offload_src="device", offload_dst="pinned_host"),
}


def _maybe_remat(layer_cls, cfg: ModelConfig):
  if cfg.remat == "none":
    return layer_cls
  return nn.remat(layer_cls, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=False)


def _residual(x: Array) -> Array:
  return activation(x, "activation_batch", "activation_length", "activation_embed")


class SelfAttention(nn.Module):
  """Multi-head GQA self-attention with RoPE; ``window=None`` is full causal attention."""

  cfg: ModelConfig
  window: Optional[int]

  @nn.compact
  def __call__(self, x_BxNxD: Array, segment_ids_BxN: Array, positions_BxN: Array) -> Array:
    cfg = self.cfg
    heads = ("embed", "q_heads", "head_dim")
    kv = ("embed", "kv_heads", "head_dim")
    q = Projection(cfg, (cfg.num_heads, cfg.head_dim), heads, name="query")(x_BxNxD)
    k = Projection(cfg, (cfg.num_kv_heads, cfg.head_dim), kv, name="key")(x_BxNxD)
    v = Projection(cfg, (cfg.num_kv_heads, cfg.head_dim), kv, name="value")(x_BxNxD)
    q_BxNxHxD = apply_rope(q, positions_BxN, cfg.rope_theta)
    k_BxNxKxD = apply_rope(k, positions_BxN, cfg.rope_theta)
    out_BxNxHxD = attention_lib.self_attention(
        q_BxNxHxD, k_BxNxKxD, v, window=self.window, segment_ids=segment_ids_BxN,
        impl=cfg.attention_impl, block_size=cfg.attention_block_size)
    return Projection(cfg, (cfg.d_model,), ("q_heads", "head_dim", "embed"), in_axes=2,
                      name="out")(out_BxNxHxD)


class DecoderLayer(nn.Module):
  """x + attn(norm(x)), then + swiglu(norm(.)). Scan-shaped: returns (carry, None)."""

  cfg: ModelConfig
  window: Optional[int]

  @nn.compact
  def __call__(self, x_BxNxD, segment_ids_BxN, positions_BxN):
    cfg = self.cfg
    x_BxNxD = checkpoint_name(x_BxNxD, LAYER_INPUT)
    h = RMSNorm(cfg, name="attn_norm")(x_BxNxD)
    x_BxNxD = x_BxNxD + SelfAttention(cfg, self.window, name="attn")(h, segment_ids_BxN,
                                                                     positions_BxN)
    h = RMSNorm(cfg, name="mlp_norm")(x_BxNxD)
    x_BxNxD = _residual(x_BxNxD + moe_lib.feed_forward(cfg)(h))
    self.sow(INTERMEDIATES, "residual", x_BxNxD)  # Only with mutable=[INTERMEDIATES].
    return x_BxNxD, None


class CrossDecoderLayer(nn.Module):
  """x + attn(W_Q norm(x); global K, V), then + swiglu(norm(.)). Scan-shaped."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxNxD, k_BxNxKxD, v_BxNxKxD, segment_ids_BxN, positions_BxN):
    cfg = self.cfg
    x_BxNxD = checkpoint_name(x_BxNxD, LAYER_INPUT)
    h = RMSNorm(cfg, name="attn_norm")(x_BxNxD)
    q_BxNxHxD = Projection(cfg, (cfg.num_heads, cfg.head_dim), ("embed", "q_heads", "head_dim"),
                           name="query")(h)
    if cfg.cross_rope:
      q_BxNxHxD = apply_rope(q_BxNxHxD, positions_BxN, cfg.rope_theta)
    out_BxNxHxD = attention_lib.self_attention(
        q_BxNxHxD, k_BxNxKxD, v_BxNxKxD, window=None, segment_ids=segment_ids_BxN,
        impl=cfg.attention_impl, block_size=cfg.attention_block_size)
    x_BxNxD = x_BxNxD + Projection(cfg, (cfg.d_model,), ("q_heads", "head_dim", "embed"),
                                   in_axes=2, name="out")(out_BxNxHxD)
    h = RMSNorm(cfg, name="mlp_norm")(x_BxNxD)
    x_BxNxD = _residual(x_BxNxD + moe_lib.feed_forward(cfg)(h))
    self.sow(INTERMEDIATES, "residual", x_BxNxD)
    return x_BxNxD, None


def _scan_layers(layer_cls, cfg: ModelConfig, num_layers: int, num_broadcast: int):
  """``num_layers`` distinct copies of ``layer_cls`` stacked on a leading 'layers' param axis."""
  return nn.scan(
      _maybe_remat(layer_cls, cfg),
      variable_axes={"params": 0, INTERMEDIATES: 0},  # Residuals and MoE statistics, per layer.
      split_rngs={"params": True},
      in_axes=(nn.broadcast,) * num_broadcast,
      length=num_layers,
      metadata_params={nn.PARTITION_NAME: "layers"},
  )


class LayerStack(nn.Module):
  """``num_layers`` distinct decoder layers (scanned). Scan-shaped so it can itself be looped."""

  cfg: ModelConfig
  num_layers: int
  window: Optional[int]

  @nn.compact
  def __call__(self, x_BxNxD, segment_ids_BxN, positions_BxN):
    layers = _scan_layers(DecoderLayer, self.cfg, self.num_layers, 2)(
        self.cfg, self.window, name="layers")
    x_BxNxD, _ = layers(x_BxNxD, segment_ids_BxN, positions_BxN)
    return x_BxNxD, None


class LoopedStack(nn.Module):
  """A :class:`LayerStack`, applied ``num_iterations`` times with one set of weights.

  ``looped=False`` applies it once without the outer scan. The parameter tree is the same either
  way ({"stack": {"layers": ...}}), so a yocou checkpoint loads into yoco and vice versa.
  """

  cfg: ModelConfig
  num_layers: int
  window: Optional[int]
  num_iterations: int = 1
  looped: bool = False

  @nn.compact
  def __call__(self, x_BxNxD, segment_ids_BxN, positions_BxN):
    stack_cls = LayerStack
    if self.looped:
      stack_cls = nn.scan(
          LayerStack,
          variable_broadcast="params",  # One parameter set, shared by every iteration.
          variable_axes={INTERMEDIATES: 0},  # Residuals and MoE statistics, per iteration.
          split_rngs={"params": False},
          in_axes=(nn.broadcast, nn.broadcast),
          length=self.num_iterations,
          # Unrolled, each application keeps its own residuals; as a while loop XLA stacks them
          # into [T, ...] buffers, which costs ~20% of a yocou training step on CPU.
          unroll=self.num_iterations if self.cfg.unroll_loops else 1,
      )
    x_BxNxD, _ = stack_cls(self.cfg, self.num_layers, self.window, name="stack")(
        x_BxNxD, segment_ids_BxN, positions_BxN)
    return x_BxNxD


class GlobalKV(nn.Module):
  """YOCO's single K/V, produced once: K = norm(x) W_K, V = norm(x) W_V."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxNxD: Array, positions_BxN: Array) -> tuple[Array, Array]:
    cfg = self.cfg
    h = RMSNorm(cfg, name="norm")(x_BxNxD)
    axes = ("embed", "kv_heads", "head_dim")
    k_BxNxKxD = Projection(cfg, (cfg.num_kv_heads, cfg.head_dim), axes, name="key")(h)
    v_BxNxKxD = Projection(cfg, (cfg.num_kv_heads, cfg.head_dim), axes, name="value")(h)
    if cfg.cross_rope:
      k_BxNxKxD = apply_rope(k_BxNxKxD, positions_BxN, cfg.rope_theta)
    return k_BxNxKxD, v_BxNxKxD


class CrossDecoder(nn.Module):
  """The cross-decoder: ``num_layers`` distinct cross layers (scanned), all reading one K/V."""

  cfg: ModelConfig
  num_layers: int

  @nn.compact
  def __call__(self, x_BxNxD, k_BxNxKxD, v_BxNxKxD, segment_ids_BxN, positions_BxN):
    layers = _scan_layers(CrossDecoderLayer, self.cfg, self.num_layers, 4)(self.cfg,
                                                                          name="layers")
    x_BxNxD, _ = layers(x_BxNxD, k_BxNxKxD, v_BxNxKxD, segment_ids_BxN, positions_BxN)
    return x_BxNxD


class Model(nn.Module):
  """One model of the family, chosen by ``cfg.arch``. ``__call__`` returns float32 logits."""

  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    self.embedding = self.param("embedding", param_init(cfg, ("vocab", "embed")),
                                (cfg.vocab_size, cfg.d_model), jnp.float32)
    if cfg.is_decoder_decoder:
      self.self_decoder = LoopedStack(cfg, cfg.num_self_layers, cfg.window, cfg.num_iterations,
                                      looped=cfg.arch == "yocou")
      self.global_kv = GlobalKV(cfg)
      self.cross_decoder = CrossDecoder(cfg, cfg.num_cross_layers)
    elif cfg.arch == "transformer":
      self.decoder = LoopedStack(cfg, cfg.num_layers, None)
    elif cfg.arch == "looped":
      self.decoder = LoopedStack(cfg, cfg.num_layers, None, cfg.num_iterations, looped=True)
    elif cfg.arch == "rins":
      self.recursive = LoopedStack(cfg, cfg.num_recursive_layers, None, cfg.num_iterations,
                                   looped=True)
      if cfg.num_layers > cfg.num_recursive_layers:
        self.decoder = LoopedStack(cfg, cfg.num_layers - cfg.num_recursive_layers, None)
    self.final_norm = RMSNorm(cfg)
    if not cfg.tie_embeddings:
      self.lm_head = self.param("lm_head", param_init(cfg, ("embed", "vocab")),
                                (cfg.d_model, cfg.vocab_size), jnp.float32)

  def __call__(self, tokens_BxN: Array, segment_ids_BxN: Optional[Array] = None,
               positions_BxN: Optional[Array] = None) -> Array:
    return self.logits(self.features(tokens_BxN, segment_ids_BxN, positions_BxN))

  def features(self, tokens_BxN: Array, segment_ids_BxN: Optional[Array] = None,
               positions_BxN: Optional[Array] = None) -> Array:
    """The residual stream after the last layer, before the final norm: [B, N, D]."""
    segment_ids_BxN, positions_BxN = default_segments(tokens_BxN, segment_ids_BxN, positions_BxN)
    x_BxNxD = self.embed(tokens_BxN)
    if self.cfg.is_decoder_decoder:
      x_BxNxD = self.self_decoder(x_BxNxD, segment_ids_BxN, positions_BxN)
      k_BxNxKxD, v_BxNxKxD = self.global_kv(x_BxNxD, positions_BxN)
      x_BxNxD = self.cross_decoder(x_BxNxD, k_BxNxKxD, v_BxNxKxD, segment_ids_BxN, positions_BxN)
    else:
      if self.cfg.arch == "rins":
        x_BxNxD = self.recursive(x_BxNxD, segment_ids_BxN, positions_BxN)
      if hasattr(self, "decoder"):
        x_BxNxD = self.decoder(x_BxNxD, segment_ids_BxN, positions_BxN)
    return x_BxNxD

  def embed(self, tokens_BxN: Array) -> Array:
    # Gather from a table that is whole along 'embed' (FSDP all-gathers it, as for any weight),
    # so the lookup partitions cleanly over the batch.
    table_VxD = activation(self.embedding, "vocab", None)
    x_BxNxD = jnp.take(table_VxD, tokens_BxN, axis=0).astype(self.cfg.compute_dtype)
    return _residual(x_BxNxD)

  def head(self, x_BxNxD: Array) -> tuple[Array, Array]:
    """(final-normed features [B, N, D], output projection [D, V]), both in the compute dtype:
    the inputs of ``loss.fused_cross_entropy``, which never materialises the logits."""
    h = self.final_norm(x_BxNxD)
    w_DxV = self.embedding.T if self.cfg.tie_embeddings else self.lm_head
    return h, w_DxV.astype(h.dtype)

  def logits(self, x_BxNxD: Array) -> Array:
    """final norm and output projection; float32 logits [B, N, V]."""
    h, w_DxV = self.head(x_BxNxD)
    logits = jnp.einsum("bnd,dv->bnv", h, w_DxV,
                        preferred_element_type=jnp.promote_types(h.dtype, jnp.float32))
    return activation(logits, "activation_batch", "activation_length", "activation_vocab")


def default_segments(tokens_BxN: Array, segment_ids_BxN: Optional[Array],
                     positions_BxN: Optional[Array]) -> tuple[Array, Array]:
  """One document per row when the input is not packed."""
  b, n = tokens_BxN.shape
  if segment_ids_BxN is None:
    segment_ids_BxN = jnp.ones((b, n), jnp.int32)
  if positions_BxN is None:
    positions_BxN = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
  return segment_ids_BxN, positions_BxN
