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
  yoco_upper_loop       yoco with the cross-decoder applied T times over the one global K,V
                        (:class:`UpperLoop`, the same shared-weight scan as LoopedStack).
  yoco_upper_loop_nokv  the same, each iteration making its own K,V from its input.
  parscale      P copies of the transformer (P x B rows, a learned K/V prefix per stream and
                layer), final norm, learned weighted sum of the streams -> head
                (yocou_jax/parscale.py).

Inputs are packed rows: ``tokens``, ``segment_ids`` (documents 1, 2, ...; 0 = padding) and
``positions`` (restarting at 0 per document; RoPE uses them). Attention never crosses documents.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from yocou_jax import attention as attention_lib
from yocou_jax import moe as moe_lib
from yocou_jax import parscale as parscale_lib
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
    prefix = None
    if cfg.stream_prefix_length:  # ParScale: this stream's learned prefix K/V.
      prefix = parscale_lib.StreamPrefix(cfg, name="prefix")(x_BxNxD.shape[0])
    out_BxNxHxD = attention_lib.self_attention(
        q_BxNxHxD, k_BxNxKxD, v, window=self.window, segment_ids=segment_ids_BxN,
        impl=cfg.attention_impl, block_size=cfg.attention_block_size, prefix=prefix)
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
  """``num_layers`` distinct copies of ``layer_cls`` stacked on a leading 'layers' param axis.

  With MoE in every k-th layer (``moe_layers`` = k > 1) it scans ``num_layers / k`` blocks of
  k layers instead (:func:`_layer_block`), so compile time stays flat in depth.
  """
  k = cfg.moe_layers if cfg.ffn == "moe" else 1
  return nn.scan(
      _maybe_remat(layer_cls, cfg) if k == 1 else _layer_block(layer_cls),
      variable_axes={"params": 0, INTERMEDIATES: 0},  # Residuals and MoE statistics, per layer.
      split_rngs={"params": True},
      in_axes=(nn.broadcast,) * num_broadcast,
      length=num_layers // k,
      # Unrolled, each layer keeps its own residuals (no [layers, ...] stacks in a while loop);
      # the parameters keep their stacked 'layers' axis either way.
      unroll=num_layers // k if cfg.unroll_layers else 1,
      metadata_params={nn.PARTITION_NAME: "layers"},
  )


@functools.cache
def _layer_block(layer_cls):
  """The scan unit of ``moe_layers`` = k > 1 layers of ``layer_cls``: k - 1 with the dense
  feed-forward (params ``dense_0`` .. ``dense_{k-2}``), then one with the MoE (``moe``).

  Each layer is rematerialised on its own, as in the k = 1 stack. Takes the layer's own
  constructor arguments (``cfg``, and ``window`` where the layer has one).
  """

  class LayerBlock(nn.Module):
    cfg: ModelConfig
    window: Optional[int] = None

    @nn.compact
    def __call__(self, x_BxNxD, *inputs):
      cfg = self.cfg
      args = (self.window,) if "window" in layer_cls.__dataclass_fields__ else ()
      layer = _maybe_remat(layer_cls, cfg)
      for j in range(cfg.moe_layers - 1):
        x_BxNxD, _ = layer(cfg.replace(ffn="dense"), *args, name=f"dense_{j}")(x_BxNxD, *inputs)
      x_BxNxD, _ = layer(cfg, *args, name="moe")(x_BxNxD, *inputs)
      return x_BxNxD, None

  LayerBlock.__name__ = LayerBlock.__qualname__ = f"{layer_cls.__name__}Block"
  return LayerBlock


def stack_depth(cfg: ModelConfig, stack: Any) -> int:
  """Layers held by a scanned stack's ``layers`` tree."""
  return jax.tree.leaves(stack)[0].shape[0] * (cfg.moe_layers if cfg.ffn == "moe" else 1)


def layer_params(cfg: ModelConfig, stack: Any, layer: int) -> tuple[ModelConfig, Any]:
  """(config, parameters) of layer ``layer`` (0-based) of a scanned stack's ``layers`` tree.

  The config has ``ffn="dense"`` for the dense layers of an interleaved MoE stack.
  """
  k = cfg.moe_layers if cfg.ffn == "moe" else 1
  if k == 1:
    return cfg, jax.tree.map(lambda w: w[layer], stack)
  moe = cfg.is_moe_layer(layer)
  block = stack["moe" if moe else f"dense_{layer % k}"]
  return (cfg if moe else cfg.replace(ffn="dense")), jax.tree.map(lambda w: w[layer // k], block)


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


def shared_loop(target, cfg: ModelConfig, num_iterations: int, num_broadcast: int):
  """``target`` (a scan-shaped module class or ``fn(module, carry, *args)``) applied
  ``num_iterations`` times with one parameter set; the trailing ``num_broadcast`` args are
  passed unchanged to every iteration."""
  return nn.scan(
      target,
      variable_broadcast="params",  # One parameter set, shared by every iteration.
      variable_axes={INTERMEDIATES: 0},  # Residuals and MoE statistics, per iteration.
      split_rngs={"params": False},
      in_axes=(nn.broadcast,) * num_broadcast,
      length=num_iterations,
      # Unrolled, each application keeps its own residuals; as a while loop XLA stacks them
      # into [T, ...] buffers, which costs ~20% of a yocou training step on CPU.
      unroll=num_iterations if cfg.unroll_loops else 1,
  )


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
      stack_cls = shared_loop(LayerStack, self.cfg, self.num_iterations, num_broadcast=2)
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


class UpperLoop(nn.Module):
  """The cross-decoder applied T times with one set of weights (Table 5's upper loop).

  yoco_upper_loop: every iteration reads the one global K/V made from the self-decoder's
  output. yoco_upper_loop_nokv: each iteration makes its own K/V from its own input with the
  shared GlobalKV (norm, W_K, W_V), so iteration 1 reads yoco's K/V and iteration t the K/V of
  the (t-1)-th cross-decoder output; inference keeps one global cache per iteration.

  The model's own ``global_kv`` and ``cross_decoder`` are passed in (shared modules), so their
  parameters sit where yoco has them; this module holds none. (A scan over the Model itself
  would also lift every intermediate the self-decoder has already sown into the loop.)
  """

  cfg: ModelConfig
  global_kv: GlobalKV
  cross_decoder: CrossDecoder

  @nn.compact
  def __call__(self, x_BxNxD: Array, segment_ids_BxN: Array, positions_BxN: Array) -> Array:
    def shared_kv(loop, x, k, v, segment_ids, positions):
      return loop.cross_decoder(x, k, v, segment_ids, positions), None

    def own_kv(loop, x, segment_ids, positions):
      k, v = loop.global_kv(x, positions)
      return loop.cross_decoder(x, k, v, segment_ids, positions), None

    t = self.cfg.num_iterations
    if self.cfg.arch == "yoco_upper_loop_nokv":
      x_BxNxD, _ = shared_loop(own_kv, self.cfg, t, 2)(self, x_BxNxD, segment_ids_BxN,
                                                        positions_BxN)
    else:
      kv = self.global_kv(x_BxNxD, positions_BxN)
      x_BxNxD, _ = shared_loop(shared_kv, self.cfg, t, 4)(self, x_BxNxD, *kv, segment_ids_BxN,
                                                           positions_BxN)
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
      if cfg.is_upper_loop:
        self.upper_loop = UpperLoop(cfg, self.global_kv, self.cross_decoder)
    elif cfg.arch in ("transformer", "parscale"):
      self.decoder = LoopedStack(cfg, cfg.num_layers, None)
    elif cfg.arch == "looped":
      self.decoder = LoopedStack(cfg, cfg.num_layers, None, cfg.num_iterations, looped=True)
    elif cfg.arch == "rins":
      self.recursive = LoopedStack(cfg, cfg.num_recursive_layers, None, cfg.num_iterations,
                                   looped=True)
      if cfg.num_layers > cfg.num_recursive_layers:
        self.decoder = LoopedStack(cfg, cfg.num_layers - cfg.num_recursive_layers, None)
    self.final_norm = RMSNorm(cfg)
    if cfg.streams > 1:
      self.stream_aggregation = parscale_lib.StreamAggregation(cfg)
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
    if self.cfg.arch == "parscale":  # P streams as P x B rows.
      x_BxNxD, segment_ids_BxN, positions_BxN = parscale_lib.replicate_streams(
          self.cfg.num_streams, x_BxNxD, segment_ids_BxN, positions_BxN)
    if self.cfg.is_upper_loop:
      x_BxNxD = self.self_decoder(x_BxNxD, segment_ids_BxN, positions_BxN)
      x_BxNxD = self.upper_loop(x_BxNxD, segment_ids_BxN, positions_BxN)
    elif self.cfg.is_decoder_decoder:
      x_BxNxD = self.self_decoder(x_BxNxD, segment_ids_BxN, positions_BxN)
      k_BxNxKxD, v_BxNxKxD = self.global_kv(x_BxNxD, positions_BxN)
      x_BxNxD = self.cross_decoder(x_BxNxD, k_BxNxKxD, v_BxNxKxD, segment_ids_BxN, positions_BxN)
    else:
      if self.cfg.arch == "rins":
        x_BxNxD = self.recursive(x_BxNxD, segment_ids_BxN, positions_BxN)
      if hasattr(self, "decoder"):
        x_BxNxD = self.decoder(x_BxNxD, segment_ids_BxN, positions_BxN)
    if self.cfg.arch == "parscale":  # Normed per stream, then aggregated.
      x_BxNxD = self.aggregate_streams(x_BxNxD)
    return x_BxNxD

  def aggregate_streams(self, x_PBxNxD: Array) -> Array:
    """ParScale: final norm of each stream, then their learned weighted sum (already normed)."""
    h_PBxNxD = self.final_norm(x_PBxNxD)
    if self.cfg.streams == 1:
      return h_PBxNxD
    return self.stream_aggregation(h_PBxNxD)

  def embed(self, tokens_BxN: Array) -> Array:
    # Gather from a table that is whole along 'embed' (FSDP all-gathers it, as for any weight),
    # so the lookup partitions cleanly over the batch.
    table_VxD = activation(self.embedding, "vocab", None)
    x_BxNxD = jnp.take(table_VxD, tokens_BxN, axis=0).astype(self.cfg.compute_dtype)
    return _residual(x_BxNxD)

  def head(self, x_BxNxD: Array) -> tuple[Array, Array]:
    """(final-normed features [B, N, D], output projection [D, V]), both in the compute dtype:
    the inputs of ``loss.fused_cross_entropy``, which never materialises the logits.

    For parscale the features are the aggregated streams, normed before aggregation (as
    officially), so they are not normed again.
    """
    h = x_BxNxD if self.cfg.arch == "parscale" else self.final_norm(x_BxNxD)
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
