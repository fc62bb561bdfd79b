"""PyTorch implementation of the yocou_jax model family, shipped inside every non-Llama export.

Self-contained: it imports only torch and transformers, so a directory holding this file, its
``config.json`` and ``model.safetensors`` loads with
``AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)``, or with
``modeling_yocou.YocouForCausalLM.from_pretrained(directory)`` after a plain import.

The math is exactly the JAX model's (``yocou_jax/model.py``): pre-norm layers with RMSNorm
(computed in float32), rotate-half RoPE, GQA attention with scale head_dim ** -0.5 and a float32
softmax, SwiGLU, no biases. The archs (L layers, T iterations, W window):

  transformer  L causal layers
  looped       (L causal layers) x T, shared weights
  rins         (first R layers) x T, then layers R..L-1
  yoco         L/2 sliding-window layers (key j visible to query i when i - W < j <= i), one global
               K/V = norm(x) W_K, norm(x) W_V, then L/2 cross-decoder layers attending to it
  yocou        yoco with the self-decoder applied T times (shared weights)
  yoco_upper_loop       yoco with the cross-decoder applied T times over the one global K/V
  yoco_upper_loop_nokv  the same, each iteration making its own K/V (shared global_kv weights)
                        from its input: one global K/V cache per iteration
  parscale     P streams of the transformer (batch rows stream-major), each with a learned
               prefix K/V per layer (``self_attn.prefix_k/prefix_v``, seen by every query, no
               RoPE), final norm, then the learned weighted sum of the streams
               (``aggregate_layer``: Linear(P D, D), SiLU, Linear(D, P), softmax, smoothing);
               the names follow the official ParScale modeling file

Incremental decoding keeps YOCO-U's cache structure (:class:`YocouCache`): one global K/V for
all tokens (one per iteration for yoco_upper_loop_nokv; ParScale keeps P x batch rows and reads
its prefixes from the parameters), and for every (self-decoder layer, iteration) pair the last W tokens' K/V only. Prefill
runs the cross-decoder only on the positions whose logits are asked for (``logits_to_keep``), so
generation's prefill costs the self-decoder plus one cross-decoder position.
Positions are plain 0..N-1 (no packed documents, no padding).
"""

from __future__ import annotations

import inspect
from dataclasses import make_dataclass
from typing import Optional

import torch
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

ARCHS = ("transformer", "yoco", "yocou", "rins", "looped", "parscale", "yoco_upper_loop",
         "yoco_upper_loop_nokv")
UPPER_LOOPS = ("yoco_upper_loop", "yoco_upper_loop_nokv")
QUERY_CHUNK = 512  # Queries per attention block in long forwards (bounds the score memory).
# What generation utilities call the cache: "cache" in recent transformers 5, else the old name.
CACHE_KWARG = ("cache" if "cache" in inspect.signature(
    GenerationMixin.prepare_inputs_for_generation).parameters else "past_key_values")


class YocouConfig(PretrainedConfig):
    """Hyper-parameters of one model of the family (names follow LlamaConfig where they exist)."""

    model_type = "yocou"

    def __init__(
        self,
        arch: str = "yocou",
        vocab_size: int = 384,
        hidden_size: int = 128,
        intermediate_size: int = 384,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        num_key_value_heads: int = 2,
        head_dim: int = 32,
        sliding_window: Optional[int] = 64,
        num_iterations: int = 3,
        num_recursive_layers: Optional[int] = None,
        cross_rope: bool = False,
        rope_theta: float = 10_000.0,
        rms_norm_eps: float = 1e-6,
        max_position_embeddings: int = 2048,
        initializer_range: float = 0.02,
        hidden_act: str = "silu",
        tie_word_embeddings: bool = False,
        num_experts: int = 0,
        num_experts_per_tok: int = 0,
        moe_intermediate_size: int = 0,
        shared_expert_intermediate_size: int = 0,
        norm_topk_prob: bool = True,
        router_aux_loss_coef: float = 0.0,
        parscale_n: int = 1,
        parscale_n_tokens: int = 0,
        parscale_attn_smooth: float = 0.0,
        decoder_sparse_step: int = 1,
        use_cache: bool = True,
        **kwargs,
    ):
        if arch not in ARCHS:
            raise ValueError(f"arch={arch!r}; allowed: {ARCHS}")
        if hidden_act != "silu":
            raise ValueError(f"hidden_act={hidden_act!r}; only 'silu' (SwiGLU) is implemented")
        self.arch = arch
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.sliding_window = sliding_window
        self.num_iterations = num_iterations
        self.num_recursive_layers = num_recursive_layers
        self.cross_rope = cross_rope
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.use_cache = use_cache  # forward() without use_cache (lm-eval's hf model) reads it.
        self.hidden_act = hidden_act
        # Mixture-of-Experts feed-forward when num_experts > 0 (Qwen2-MoE's names and routing).
        if num_experts and not norm_topk_prob:
            raise ValueError("norm_topk_prob=False; only renormalised top-k routing is implemented")
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.moe_intermediate_size = moe_intermediate_size
        self.shared_expert_intermediate_size = shared_expert_intermediate_size
        self.norm_topk_prob = norm_topk_prob
        self.router_aux_loss_coef = router_aux_loss_coef
        # ParScale (arch="parscale"), the official names: streams, prefix tokens, smoothing.
        self.parscale_n = parscale_n
        self.parscale_n_tokens = parscale_n_tokens
        self.parscale_attn_smooth = parscale_attn_smooth
        # Layer i of each stack (0-based) is MoE when (i + 1) % decoder_sparse_step == 0.
        self.decoder_sparse_step = decoder_sparse_step
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def is_decoder_decoder(self) -> bool:
        return self.arch in ("yoco", "yocou", *UPPER_LOOPS)

    @property
    def cross_iterations(self) -> int:
        return self.num_iterations if self.arch in UPPER_LOOPS else 1

    @property
    def global_kv_iterations(self) -> int:
        return self.num_iterations if self.arch == "yoco_upper_loop_nokv" else 1

    @property
    def streams(self) -> int:
        return self.parscale_n if self.arch == "parscale" else 1

    def layer_schedule(self) -> list[int]:
        """Indices of the (self-)decoder layers in the order they run; loops repeat indices."""
        n, t = self.num_hidden_layers, self.num_iterations
        if self.arch in ("transformer", "parscale"):
            return list(range(n))
        if self.arch == "looped":
            return list(range(n)) * t
        if self.arch == "rins":
            r = self.num_recursive_layers
            return list(range(r)) * t + list(range(r, n))
        return list(range(n // 2)) * (t if self.arch == "yocou" else 1)

    def num_decoder_layers(self) -> int:
        return self.num_hidden_layers // 2 if self.is_decoder_decoder else self.num_hidden_layers


class YocouCache:
    """K/V cache: one entry per layer application, plus YOCO's global K/V.

    ``layers[s]`` holds the post-RoPE keys and values [B, S, K, Dh] of the s-th entry of
    ``config.layer_schedule()``: for yoco/yocou the W most recent tokens of each (self-decoder
    layer, iteration) pair, otherwise every token. ``global_kv`` holds the cross-decoder's K/V of
    every token, computed once (``global_kvs``: one per iteration without shared KV). ParScale's
    entries have P x batch rows, stream-major.
    """

    is_compileable = False
    is_croppable = False

    def __init__(self, config: YocouConfig):
        self.window = config.sliding_window if config.is_decoder_decoder else None
        self.layers: list[Optional[tuple[torch.Tensor, torch.Tensor]]] = [None] * len(
            config.layer_schedule())
        self.global_kvs: list[Optional[tuple[torch.Tensor, torch.Tensor]]] = [None] * (
            config.global_kv_iterations)
        self.streams = config.streams
        self.seq_length = 0

    @property
    def global_kv(self) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        return self.global_kvs[0]

    @property
    def is_linear(self) -> list[bool]:
        return [False]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        del layer_idx
        return self.seq_length

    def update(self, slot: int, k: torch.Tensor, v: torch.Tensor):
        """Appends this step's K/V; returns every cached + new K/V to attend to."""
        if self.layers[slot] is not None:
            k = torch.cat([self.layers[slot][0], k], dim=1)
            v = torch.cat([self.layers[slot][1], v], dim=1)
        keep = k.shape[1] if self.window is None else min(self.window, k.shape[1])
        self.layers[slot] = (k[:, -keep:], v[:, -keep:])
        return k, v

    def update_global(self, k: torch.Tensor, v: torch.Tensor, index: int = 0):
        if self.global_kvs[index] is not None:
            k = torch.cat([self.global_kvs[index][0], k], dim=1)
            v = torch.cat([self.global_kvs[index][1], v], dim=1)
        self.global_kvs[index] = (k, v)
        return k, v

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Selects batch rows (beam search); ParScale picks the same rows of every stream."""
        rows = beam_idx.shape[0]
        beam_idx = torch.cat([beam_idx + rows * i for i in range(self.streams)])

        def pick(kv):
            return None if kv is None else tuple(x.index_select(0, beam_idx) for x in kv)

        self.layers = [pick(kv) for kv in self.layers]
        self.global_kvs = [pick(kv) for kv in self.global_kvs]

    def num_bytes(self) -> int:
        entries = [kv for kv in self.layers + self.global_kvs if kv is not None]
        return sum(x.numel() * x.element_size() for kv in entries for x in kv)


# Logits and the cache, under the name CACHE_KWARG that this transformers version reads.
YocouCausalLMOutput = make_dataclass(
    "YocouCausalLMOutput",
    [("loss", Optional[torch.Tensor], None), ("logits", Optional[torch.Tensor], None),
     (CACHE_KWARG, Optional[YocouCache], None)],
    bases=(ModelOutput,))


class YocouRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def apply_rope(x_BxNxHxD: torch.Tensor, positions_N: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE: pairs (i, i + D/2) rotate together, in float32."""
    d = x_BxNxHxD.shape[-1]
    exponents = torch.arange(0, d, 2, dtype=torch.float32, device=x_BxNxHxD.device) / d
    inv_freq = 1.0 / (theta ** exponents)
    angles = positions_N.float()[:, None] * inv_freq
    cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]
    x = x_BxNxHxD.float()
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x_BxNxHxD.dtype)


def attend(q_BxNxHxD, k_BxSxKxD, v_BxSxKxD, q_start: int, k_start: int,
           window: Optional[int]) -> torch.Tensor:
    """Causal (optionally sliding-window) GQA attention over absolute positions.

    Query n is at position ``q_start + n`` and key s at ``k_start + s``; query i sees key j when
    j <= i and, with a window, i - j < W. Queries are processed in blocks that read only the keys
    they can see, so a long sliding-window forward costs O(N (W + block)).
    """
    b, n, h, d = q_BxNxHxD.shape
    kv_heads = k_BxSxKxD.shape[2]
    q = q_BxNxHxD.reshape(b, n, kv_heads, h // kv_heads, d)
    outs = []
    for start in range(0, n, QUERY_CHUNK):
        end = min(start + QUERY_CHUNK, n)
        first_visible = q_start + start - (window - 1) if window is not None else k_start
        lo = max(0, first_visible - k_start)
        hi = q_start + end - k_start
        k, v = k_BxSxKxD[:, lo:hi].float(), v_BxSxKxD[:, lo:hi].float()
        scores = torch.einsum("bnkgd,bskd->bkgns", q[:, start:end].float(), k) * d ** -0.5
        qi = torch.arange(q_start + start, q_start + end, device=q.device)[:, None]
        kj = torch.arange(k_start + lo, k_start + hi, device=q.device)[None, :]
        mask = kj <= qi
        if window is not None:
            mask &= qi - kj < window
        probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        outs.append(torch.einsum("bkgns,bskd->bnkgd", probs, v))
    return torch.cat(outs, dim=1).reshape(b, n, h, d).to(q_BxNxHxD.dtype)


class YocouMLP(nn.Module):
    def __init__(self, config: YocouConfig, intermediate_size: Optional[int] = None):
        super().__init__()
        width = intermediate_size or config.intermediate_size
        self.gate_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.down_proj = nn.Linear(width, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class YocouMoE(nn.Module):
    """Softmax top-k routed experts (weights renormalised, float32) plus an ungated shared expert."""

    def __init__(self, config: YocouConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(YocouMLP(config, config.moe_intermediate_size)
                                     for _ in range(config.num_experts))
        self.shared_expert = (YocouMLP(config, config.shared_expert_intermediate_size)
                              if config.shared_expert_intermediate_size else None)

    def forward(self, x_BxNxD: torch.Tensor) -> torch.Tensor:
        x_TxD = x_BxNxD.reshape(-1, x_BxNxD.shape[-1])
        logits_TxE = nn.functional.linear(x_TxD.float(), self.gate.weight.float())
        probs_TxE = logits_TxE.softmax(dim=-1)
        top_TxK, experts_TxK = probs_TxE.topk(self.top_k, dim=-1)
        weights_TxK = top_TxK / top_TxK.sum(dim=-1, keepdim=True)
        y_TxD = torch.zeros_like(x_TxD, dtype=torch.float32)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(experts_TxK == e)
            if token.numel():
                out = expert(x_TxD[token]).float() * weights_TxK[token, slot, None]
                y_TxD.index_add_(0, token, out)
        if self.shared_expert is not None:
            y_TxD = y_TxD + self.shared_expert(x_TxD).float()
        return y_TxD.to(x_BxNxD.dtype).reshape(x_BxNxD.shape)


def feed_forward(config: YocouConfig, layer: int) -> nn.Module:
    """Layer ``layer`` of its stack: MoE in every ``decoder_sparse_step``-th layer (the last of
    each group, as in Qwen2-MoE), else the dense MLP."""
    moe = config.num_experts and (layer + 1) % config.decoder_sparse_step == 0
    return YocouMoE(config) if moe else YocouMLP(config)


class YocouSelfAttention(nn.Module):
    def __init__(self, config: YocouConfig, window: Optional[int]):
        super().__init__()
        self.config, self.window = config, window
        h, k, d, dh = (config.num_attention_heads, config.num_key_value_heads,
                       config.hidden_size, config.head_dim)
        self.q_proj = nn.Linear(d, h * dh, bias=False)
        self.k_proj = nn.Linear(d, k * dh, bias=False)
        self.v_proj = nn.Linear(d, k * dh, bias=False)
        self.o_proj = nn.Linear(h * dh, d, bias=False)
        if config.arch == "parscale" and config.parscale_n_tokens:
            shape = (config.parscale_n, k, config.parscale_n_tokens, dh)
            self.prefix_k = nn.Parameter(torch.zeros(shape))
            self.prefix_v = nn.Parameter(torch.zeros(shape))

    def _with_prefix(self, k, v):
        """ParScale: each row's stream prefix [M, K, Dh] before its keys and values."""
        rows_per_stream = k.shape[0] // self.config.parscale_n
        prefix = [p.repeat_interleave(rows_per_stream, dim=0).transpose(1, 2).to(k.dtype)
                  for p in (self.prefix_k, self.prefix_v)]
        return torch.cat([prefix[0], k], dim=1), torch.cat([prefix[1], v], dim=1)

    def forward(self, x, positions, cache: Optional[YocouCache], slot: int):
        b, n, _ = x.shape
        c = self.config
        q = apply_rope(self.q_proj(x).view(b, n, c.num_attention_heads, c.head_dim), positions,
                       c.rope_theta)
        k = apply_rope(self.k_proj(x).view(b, n, c.num_key_value_heads, c.head_dim), positions,
                       c.rope_theta)
        v = self.v_proj(x).view(b, n, c.num_key_value_heads, c.head_dim)
        if cache is not None:
            k, v = cache.update(slot, k, v)
        if hasattr(self, "prefix_k"):  # At positions -M..-1: visible to every (causal) query.
            k, v = self._with_prefix(k, v)
        q_start = int(positions[0])
        out = attend(q, k, v, q_start, q_start + n - k.shape[1], self.window)
        return self.o_proj(out.reshape(b, n, -1))


class YocouDecoderLayer(nn.Module):
    def __init__(self, config: YocouConfig, window: Optional[int], layer: int):
        super().__init__()
        self.input_layernorm = YocouRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = YocouSelfAttention(config, window)
        self.post_attention_layernorm = YocouRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = feed_forward(config, layer)

    def forward(self, x, positions, cache, slot):
        x = x + self.self_attn(self.input_layernorm(x), positions, cache, slot)
        return x + self.mlp(self.post_attention_layernorm(x))


class YocouGlobalKV(nn.Module):
    """YOCO's single K/V: K = norm(x) W_K, V = norm(x) W_V (RoPE on K when cross_rope)."""

    def __init__(self, config: YocouConfig):
        super().__init__()
        self.config = config
        kv = config.num_key_value_heads * config.head_dim
        self.norm = YocouRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.k_proj = nn.Linear(config.hidden_size, kv, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, kv, bias=False)

    def forward(self, x, positions):
        b, n, _ = x.shape
        c = self.config
        h = self.norm(x)
        k = self.k_proj(h).view(b, n, c.num_key_value_heads, c.head_dim)
        v = self.v_proj(h).view(b, n, c.num_key_value_heads, c.head_dim)
        if c.cross_rope:
            k = apply_rope(k, positions, c.rope_theta)
        return k, v


class YocouCrossAttention(nn.Module):
    def __init__(self, config: YocouConfig):
        super().__init__()
        self.config = config
        hd = config.num_attention_heads * config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, hd, bias=False)
        self.o_proj = nn.Linear(hd, config.hidden_size, bias=False)

    def forward(self, x, positions, k, v):
        b, n, _ = x.shape
        c = self.config
        q = self.q_proj(x).view(b, n, c.num_attention_heads, c.head_dim)
        if c.cross_rope:
            q = apply_rope(q, positions, c.rope_theta)
        out = attend(q, k, v, int(positions[0]), 0, None)
        return self.o_proj(out.reshape(b, n, -1))


class YocouCrossDecoderLayer(nn.Module):
    def __init__(self, config: YocouConfig, layer: int):
        super().__init__()
        self.input_layernorm = YocouRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.cross_attn = YocouCrossAttention(config)
        self.post_attention_layernorm = YocouRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = feed_forward(config, layer)

    def forward(self, x, positions, k, v):
        x = x + self.cross_attn(self.input_layernorm(x), positions, k, v)
        return x + self.mlp(self.post_attention_layernorm(x))


class YocouPreTrainedModel(PreTrainedModel):
    config_class = YocouConfig
    base_model_prefix = "model"
    _no_split_modules = ["YocouDecoderLayer", "YocouCrossDecoderLayer"]
    supports_gradient_checkpointing = False


class YocouModel(YocouPreTrainedModel):
    """Embedding, the layer schedule and (yoco/yocou) the global K/V and cross-decoder."""

    def __init__(self, config: YocouConfig):
        super().__init__(config)
        window = config.sliding_window if config.is_decoder_decoder else None
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        # Every stack's depth is a multiple of decoder_sparse_step, so the index in this list
        # (rins: recursive layers, then the rest) places the MoE layers as in each stack.
        self.layers = nn.ModuleList(
            YocouDecoderLayer(config, window, i) for i in range(config.num_decoder_layers()))
        if config.is_decoder_decoder:
            self.global_kv = YocouGlobalKV(config)
            self.cross_layers = nn.ModuleList(
                YocouCrossDecoderLayer(config, i)
                for i in range(config.num_hidden_layers - config.num_hidden_layers // 2))
        self.norm = YocouRMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.streams > 1:
            d, p = config.hidden_size, config.parscale_n
            self.aggregate_layer = nn.Sequential(nn.Linear(p * d, d), nn.SiLU(), nn.Linear(d, p))
        self.post_init()

    def _cross_decoder(self, x, positions, k, v):
        for layer in self.cross_layers:
            x = layer(x, positions, k, v)
        return x

    def _aggregate_streams(self, h_RxNxD: torch.Tensor) -> torch.Tensor:
        """ParScale: softmax(MLP(streams)) weights, smoothed, times the normed streams."""
        p, smoothing = self.config.parscale_n, self.config.parscale_attn_smooth
        h_PxBxNxD = h_RxNxD.view(p, -1, *h_RxNxD.shape[1:])
        features = h_PxBxNxD.permute(1, 2, 3, 0).flatten(2)  # "b s (h n)", h-major.
        weights_BxNxP = self.aggregate_layer(features).float().softmax(dim=-1)
        weights_BxNxP = weights_BxNxP * (1 - smoothing) + smoothing / p
        out = (h_PxBxNxD.float() * weights_BxNxP.permute(2, 0, 1)[..., None]).sum(0)
        return out.to(h_RxNxD.dtype)

    def forward(self, input_ids: torch.LongTensor, cache: Optional[YocouCache] = None,
                logits_to_keep: int = 0) -> torch.Tensor:
        """Final-normed hidden states of the last ``logits_to_keep`` positions (0: all)."""
        past = cache.seq_length if cache is not None else 0
        n = input_ids.shape[1]
        positions = torch.arange(past, past + n, device=input_ids.device)
        c = self.config
        x = self.embed_tokens(input_ids).repeat(c.streams, 1, 1)  # ParScale: P x B rows.
        for slot, index in enumerate(c.layer_schedule()):
            x = self.layers[index](x, positions, cache, slot)
        if c.is_decoder_decoder:
            # Without shared KV, the first T - 1 cross-decoder iterations run on every position:
            # the next iteration's K/V are made from their outputs.
            for t in range(c.global_kv_iterations):
                if t:
                    x = self._cross_decoder(x, positions, k, v)
                k, v = self.global_kv(x, positions)
                if cache is not None:
                    k, v = cache.update_global(k, v, t)
        # Prefill early exit: the cross-decoder reads only the global K/V of the context, so it
        # runs on the kept positions alone.
        keep = n if not logits_to_keep else min(logits_to_keep, n)
        x, positions = x[:, n - keep:], positions[n - keep:]
        if c.is_decoder_decoder:
            for _ in range(c.cross_iterations - (c.global_kv_iterations - 1)):
                x = self._cross_decoder(x, positions, k, v)
        if cache is not None:
            cache.seq_length += n
        h = self.norm(x)
        return self._aggregate_streams(h) if c.streams > 1 else h


class YocouForCausalLM(YocouPreTrainedModel, GenerationMixin):
    """The language model: ``forward`` returns float logits and (with ``use_cache``) the cache."""

    def __init__(self, config: YocouConfig):
        super().__init__(config)
        self.model = YocouModel(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # The model builds its own YocouCache.

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """As PreTrainedModel's, but refuses checkpoints with missing or unexpected tensors."""
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
            names = sorted(info.get(kind) or ())
            if names:
                first = names[0] if isinstance(names[0], str) else names[0][0]
                raise ValueError(f"{cls.__name__}.from_pretrained: {kind.split('_')[0]} tensor "
                                 f"{first} ({len(names)} in all): the weights do not match "
                                 "config.json")
        return (model, info) if wants_info else model

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return None if self.config.tie_word_embeddings else self.lm_head

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: Optional[torch.Tensor] = None,
        cache: Optional[YocouCache] = None,
        past_key_values: Optional[YocouCache] = None,
        use_cache: Optional[bool] = None,
        labels: Optional[torch.LongTensor] = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> YocouCausalLMOutput:
        """Logits of the last ``logits_to_keep`` positions of ``input_ids`` (0: every position).

        With a cache, ``input_ids`` are the tokens after the cached ones. ``attention_mask`` may
        only mark every token as real (no padding).
        """
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("padded batches are not supported: attention_mask must be all ones")
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = YocouCache(self.config)
        hidden = self.model(input_ids, cache if use_cache else None, logits_to_keep)
        weight = self.model.embed_tokens.weight if self.config.tie_word_embeddings \
            else self.lm_head.weight
        logits = nn.functional.linear(hidden, weight).float()
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                ignore_index=-100)
        cache = cache if use_cache else None
        return YocouCausalLMOutput(loss=loss, logits=logits, **{CACHE_KWARG: cache})

    def prepare_inputs_for_generation(self, input_ids, cache=None, past_key_values=None,
                                      attention_mask=None, logits_to_keep=None, use_cache=True,
                                      **kwargs):
        """Feeds only the tokens the cache has not seen."""
        cache = cache if cache is not None else past_key_values
        if cache is not None:
            input_ids = input_ids[:, cache.seq_length:]
        inputs = {"input_ids": input_ids, CACHE_KWARG: cache, "use_cache": use_cache,
                  "attention_mask": attention_mask}
        if logits_to_keep is not None:
            inputs["logits_to_keep"] = logits_to_keep
        return inputs


YocouConfig.register_for_auto_class()
YocouForCausalLM.register_for_auto_class("AutoModelForCausalLM")
