"""JAX parameters <-> Hugging Face tensor names, and the ``config.json`` of an export.

Every parameter of the Flax model has exactly one Hugging Face tensor, found from its path:

  embedding [V, D]                          model.embed_tokens.weight [V, D]
  <stack>/layers/attn_norm/scale [L, D]      model.layers.{i}.input_layernorm.weight [D]
  <stack>/layers/attn/query/kernel [L,D,H,Dh] model.layers.{i}.self_attn.q_proj.weight [H*Dh, D]
  <stack>/layers/attn/out/kernel [L,H,Dh,D]  model.layers.{i}.self_attn.o_proj.weight [D, H*Dh]
  <stack>/layers/mlp/gate/kernel [L, D, F]   model.layers.{i}.mlp.gate_proj.weight [F, D]
  global_kv/key/kernel [D, K, Dh]            model.global_kv.k_proj.weight [K*Dh, D]
  cross_decoder/layers/query/kernel          model.cross_layers.{i}.cross_attn.q_proj.weight
  final_norm/scale, lm_head [D, V]           model.norm.weight, lm_head.weight [V, D]

MoE layers (``ffn="moe"``) use the Qwen2-MoE names (``Qwen2MoeForCausalLM`` for the
transformer, the same names in the YOCO-U modeling file)::

  <stack>/layers/mlp/router [L, D, E]        model.layers.{i}.mlp.gate.weight [E, D]
  <stack>/layers/mlp/gate [L, E, D, F]       model.layers.{i}.mlp.experts.{e}.gate_proj.weight [F, D]
  <stack>/layers/mlp/down [L, E, F, D]       model.layers.{i}.mlp.experts.{e}.down_proj.weight [D, F]
  <stack>/layers/mlp/shared/up/kernel        model.layers.{i}.mlp.shared_expert.up_proj.weight

Qwen2-MoE gates its shared expert by ``sigmoid(x w)``; the exact export of an ungated one is
``w = 0`` (a constant tensor, no JAX parameter) and the shared ``down_proj`` times 2.

A kernel ``[in..., out...]`` becomes the PyTorch ``nn.Linear`` weight ``[prod(out), prod(in)]``
(flatten, transpose); head axes flatten head-major, as Llama's ``view(B, N, H, Dh)`` expects.
The stacked layer axis becomes the ``{i}`` of the name: the transformer, looped and yoco/yocou
self-decoder stacks number their layers from 0, and rins numbers the recursive block 0..R-1 and
the plain block R..L-1. A parameter that no rule names is an error, never silently dropped.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from yocou_jax.config import ModelConfig
from yocou_jax.model import Model

YOCOU_MODEL_TYPE = "yocou"
MODELING_FILE = "modeling_yocou.py"

# Path of a stacked block of layers -> the Hugging Face prefix of its layers.
_STACKS = {
    ("decoder", "stack", "layers"): "model.layers",
    ("recursive", "stack", "layers"): "model.layers",
    ("self_decoder", "stack", "layers"): "model.layers",
    ("cross_decoder", "layers"): "model.cross_layers",
}

_LAYER_LEAVES = {
    ("attn_norm", "scale"): "input_layernorm.weight",
    ("attn", "query", "kernel"): "self_attn.q_proj.weight",
    ("attn", "key", "kernel"): "self_attn.k_proj.weight",
    ("attn", "value", "kernel"): "self_attn.v_proj.weight",
    ("attn", "out", "kernel"): "self_attn.o_proj.weight",
    ("query", "kernel"): "cross_attn.q_proj.weight",  # Cross-decoder layers.
    ("out", "kernel"): "cross_attn.o_proj.weight",
    ("mlp_norm", "scale"): "post_attention_layernorm.weight",
    ("mlp", "gate", "kernel"): "mlp.gate_proj.weight",
    ("mlp", "up", "kernel"): "mlp.up_proj.weight",
    ("mlp", "down", "kernel"): "mlp.down_proj.weight",
    # MoE (yocou_jax/moe.py); {e} is the expert.
    ("mlp", "router"): "mlp.gate.weight",
    ("mlp", "gate"): "mlp.experts.{e}.gate_proj.weight",
    ("mlp", "up"): "mlp.experts.{e}.up_proj.weight",
    ("mlp", "down"): "mlp.experts.{e}.down_proj.weight",
    ("mlp", "shared", "gate", "kernel"): "mlp.shared_expert.gate_proj.weight",
    ("mlp", "shared", "up", "kernel"): "mlp.shared_expert.up_proj.weight",
    ("mlp", "shared", "down", "kernel"): "mlp.shared_expert.down_proj.weight",
    # ParScale's per-stream prefix [P, K, M, Dh] (official ParScale names and layout).
    ("attn", "prefix", "key"): "self_attn.prefix_k",
    ("attn", "prefix", "value"): "self_attn.prefix_v",
}
_MOE_EXPERT_LEAVES = (("mlp", "gate"), ("mlp", "up"), ("mlp", "down"))
# Qwen2-MoE's shared-expert gate: sigmoid(0) = 1/2, compensated in the shared down projection.
_QWEN_SHARED_GATE = "mlp.shared_expert_gate.weight"
_QWEN_SHARED_DOWN = ("mlp", "shared", "down", "kernel")

_TOP_LEAVES = {
    ("embedding",): "model.embed_tokens.weight",
    ("final_norm", "scale"): "model.norm.weight",
    ("lm_head",): "lm_head.weight",
    ("global_kv", "norm", "scale"): "model.global_kv.norm.weight",
    ("global_kv", "key", "kernel"): "model.global_kv.k_proj.weight",
    ("global_kv", "value", "kernel"): "model.global_kv.v_proj.weight",
    # ParScale's stream aggregation MLP (official: Linear, SiLU, Linear).
    ("stream_aggregation", "hidden", "linear", "kernel"): "model.aggregate_layer.0.weight",
    ("stream_aggregation", "hidden", "bias"): "model.aggregate_layer.0.bias",
    ("stream_aggregation", "weights", "linear", "kernel"): "model.aggregate_layer.2.weight",
    ("stream_aggregation", "weights", "bias"): "model.aggregate_layer.2.bias",
}


class ExportError(ValueError):
  """An export or import that cannot be done faithfully; the message names the cause."""


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """One Hugging Face tensor and the JAX parameter (or one layer of it) it comes from."""

  name: str
  path: tuple[str, ...]  # Path in the Flax params tree.
  layer: Optional[int]  # Index along the stacked 'layers' axis, or None.
  in_ndim: Optional[int]  # Input dims of a kernel (1 for [D, ...], 2 for [H, Dh, D]); None: copy.
  jax_shape: tuple[int, ...]  # Shape of the JAX slice (without the layer and expert axes).
  expert: Optional[int] = None  # Index along an MoE layer's expert axis, or None.
  scale: float = 1.0  # Hugging Face tensor = scale x JAX parameter (a power of 2: exact).

  @property
  def hf_shape(self) -> tuple[int, ...]:
    if self.in_ndim is None:
      return self.jax_shape
    return (math.prod(self.jax_shape[self.in_ndim:]), math.prod(self.jax_shape[:self.in_ndim]))


def abstract_params(cfg: ModelConfig) -> Any:
  """The params tree of ``cfg`` as ShapeDtypeStructs (nothing is allocated).

  The attention backend does not change the parameters; XLA's traces on any machine.
  """
  model = Model(cfg.replace(attention_impl="xla", remat="none"))
  tokens = jnp.zeros((1, 8), jnp.int32)
  return jax.eval_shape(
      lambda: nn.meta.unbox(model.init(jax.random.key(0), tokens)["params"]))


def _kernel_in_ndim(path: tuple[str, ...]) -> Optional[int]:
  if path[-1] == "lm_head":
    return 1
  if path[-2:-1] == ("mlp",) and path[-1] in ("router", "gate", "up", "down"):
    return 1  # MoE router [D, E] and expert slices [D, F] / [F, D].
  if path[-1] != "kernel":
    return None
  return 2 if path[-2] == "out" else 1


def tensor_specs(cfg: ModelConfig) -> list[TensorSpec]:
  """Every Hugging Face tensor of ``cfg``'s model, in a stable order."""
  specs = []
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params(cfg))[0]:
    path = tuple(k.key for k in key_path)
    in_ndim = _kernel_in_ndim(path)
    if path in _TOP_LEAVES:
      specs.append(TensorSpec(_TOP_LEAVES[path], path, None, in_ndim, tuple(leaf.shape)))
      continue
    stack = next((s for s in _STACKS if path[:len(s)] == s), None)
    rest = path[len(stack):] if stack else None
    k, position = _block_member(cfg, rest) if stack else (1, 0)
    rest = rest[1:] if k > 1 else rest
    if stack is None or rest not in _LAYER_LEAVES:
      raise ExportError(f"parameter {'/'.join(path)} {leaf.shape} has no Hugging Face name: "
                        "the exporter does not know this part of the model")
    offset = cfg.num_recursive_layers if cfg.arch == "rins" and stack[0] == "decoder" else 0
    scale = 2.0 if _qwen_moe(cfg) and rest == _QWEN_SHARED_DOWN else 1.0
    experts = range(leaf.shape[1]) if rest in _MOE_EXPERT_LEAVES else [None]
    for i in range(leaf.shape[0]):
      for e in experts:
        layer = offset + i * k + position
        name = f"{_STACKS[stack]}.{layer}.{_LAYER_LEAVES[rest]}".replace("{e}", str(e))
        shape = tuple(leaf.shape[1:] if e is None else leaf.shape[2:])
        specs.append(TensorSpec(name, path, i, in_ndim, shape, e, scale))
  return sorted(specs, key=lambda s: _natural_key(s.name))


def _block_member(cfg: ModelConfig, rest: tuple[str, ...]) -> tuple[int, int]:
  """(k, the layer's position in its block of k) for a path under a stack's ``layers``.

  With MoE in every k-th layer (``moe_layers`` = k > 1) the stack scans blocks of k layers,
  ``dense_0`` .. ``dense_{k-2}`` then ``moe`` (``yocou_jax.model._layer_block``).
  """
  k = cfg.moe_layers if cfg.ffn == "moe" else 1
  if k == 1:
    return 1, 0
  return k, (k - 1 if rest[0] == "moe" else int(rest[0].removeprefix("dense_")))


def _qwen_moe(cfg: ModelConfig) -> bool:
  """The transformer with MoE layers exports to Qwen2MoeForCausalLM."""
  return cfg.arch == "transformer" and cfg.ffn == "moe"


def constant_tensors(cfg: ModelConfig) -> dict[str, np.ndarray]:
  """Tensors of the Hugging Face model that no JAX parameter holds (Qwen2-MoE's shared gate)."""
  if not _qwen_moe(cfg):
    return {}
  return {f"model.layers.{i}.{_QWEN_SHARED_GATE}": np.zeros((1, cfg.d_model), np.float32)
          for i in range(cfg.num_layers) if cfg.is_moe_layer(i)}


def _natural_key(name: str) -> list:
  return [int(p) if p.isdigit() else p for p in name.split(".")]


def _get(tree: Any, path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def params_to_tensors(cfg: ModelConfig, params: Any) -> dict[str, np.ndarray]:
  """Flax params -> {Hugging Face name: float32 numpy array in PyTorch layout}."""
  tensors = {}
  for spec in tensor_specs(cfg):
    x = np.asarray(_get(params, spec.path), np.float32)
    if spec.layer is not None:
      x = x[spec.layer]
    if spec.expert is not None:
      x = x[spec.expert]
    if x.shape != spec.jax_shape:
      raise ExportError(f"parameter {'/'.join(spec.path)} has shape {x.shape}, the config "
                        f"expects {spec.jax_shape}")
    if spec.in_ndim is not None:
      x = x.reshape(spec.hf_shape[1], spec.hf_shape[0]).T
    tensors[spec.name] = np.ascontiguousarray(x * np.float32(spec.scale))
  tensors.update(constant_tensors(cfg))
  return dict(sorted(tensors.items(), key=lambda item: _natural_key(item[0])))


def check_tensor_names_and_shapes(cfg: ModelConfig, shapes: dict[str, tuple[int, ...]],
                                  source: str) -> None:
  """Refuses tensors that are missing, unexpected or of the wrong shape, naming the first."""
  expected = {s.name: s.hf_shape for s in tensor_specs(cfg)}
  expected.update({name: x.shape for name, x in constant_tensors(cfg).items()})
  missing = sorted(set(expected) - set(shapes), key=_natural_key)
  if missing:
    raise ExportError(f"{source}: tensor {missing[0]} is missing ({len(missing)} missing in all)")
  unexpected = sorted(set(shapes) - set(expected), key=_natural_key)
  if unexpected:
    raise ExportError(f"{source}: unexpected tensor {unexpected[0]} (not in a {cfg.arch} model "
                      f"with this config; {len(unexpected)} unexpected in all)")
  for name, shape in expected.items():
    if tuple(shapes[name]) != shape:
      raise ExportError(f"{source}: tensor {name} has shape {tuple(shapes[name])}, the config "
                        f"expects {shape}")


def tensors_to_params(cfg: ModelConfig, tensors: dict[str, Any], source: str = "tensors") -> Any:
  """{Hugging Face name: array} -> Flax params (float32 numpy); names and shapes are checked."""
  check_tensor_names_and_shapes(cfg, {k: tuple(v.shape) for k, v in tensors.items()}, source)
  for name, x in constant_tensors(cfg).items():
    if not np.array_equal(np.asarray(tensors[name], np.float32), x):
      raise ExportError(f"{source}: tensor {name} is not zero: a gated shared expert has no "
                        "yocou_jax equivalent")
  layers: dict[tuple[str, ...], dict[tuple, np.ndarray]] = {}
  flat: dict[tuple[str, ...], np.ndarray] = {}
  for spec in tensor_specs(cfg):
    x = np.asarray(tensors[spec.name], np.float32) / np.float32(spec.scale)
    if spec.in_ndim is not None:
      x = x.T.reshape(spec.jax_shape)
    if spec.layer is None:
      flat[spec.path] = x
    else:
      layers.setdefault(spec.path, {})[(spec.layer, spec.expert)] = x
  for path, pieces in layers.items():
    num_layers = 1 + max(layer for layer, _ in pieces)
    if (0, None) in pieces:
      flat[path] = np.stack([pieces[(i, None)] for i in range(num_layers)])
    else:  # MoE expert weights: [layers, experts, ...].
      num_experts = 1 + max(e for _, e in pieces)
      flat[path] = np.stack([np.stack([pieces[(i, e)] for e in range(num_experts)])
                             for i in range(num_layers)])
  params: dict[str, Any] = {}
  for path, x in flat.items():
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = x
  return params


# --- config.json ---------------------------------------------------------------------------------

def _common_config(cfg: ModelConfig, *, dtype: str, max_position_embeddings: int,
                   special_ids: dict[str, Optional[int]]) -> dict[str, Any]:
  return {
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.d_model,
      "intermediate_size": cfg.d_ff,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim,
      "hidden_act": "silu",
      "rms_norm_eps": cfg.norm_eps,
      "max_position_embeddings": max_position_embeddings,
      "initializer_range": cfg.init_std,
      "tie_word_embeddings": cfg.tie_embeddings,
      "use_cache": True,
      "dtype": dtype,
      **{f"{k}_token_id": v for k, v in special_ids.items()},
  }


def hf_config(cfg: ModelConfig, *, dtype: str = "float32", max_position_embeddings: int = 2048,
              special_ids: Optional[dict[str, Optional[int]]] = None) -> dict[str, Any]:
  """``config.json``: a native ``LlamaConfig`` for the transformer, else the YOCO-U config."""
  special = {"bos": None, "eos": None, "pad": None, **(special_ids or {})}
  config = _common_config(cfg, dtype=dtype, max_position_embeddings=max_position_embeddings,
                          special_ids=special)
  if _qwen_moe(cfg):
    return {
        "architectures": ["Qwen2MoeForCausalLM"],
        "model_type": "qwen2_moe",
        **config,
        **_moe_config(cfg),
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "qkv_bias": False,
        "use_sliding_window": False,
        "mlp_only_layers": [],
        "attention_dropout": 0.0,
    }
  if cfg.arch == "transformer":
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **config,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
    }
  module = MODELING_FILE.removesuffix(".py")
  return {
      "architectures": ["YocouForCausalLM"],
      "model_type": YOCOU_MODEL_TYPE,
      "auto_map": {"AutoConfig": f"{module}.YocouConfig",
                   "AutoModelForCausalLM": f"{module}.YocouForCausalLM"},
      **config,
      "arch": cfg.arch,
      "sliding_window": cfg.window if cfg.is_decoder_decoder else None,
      "num_iterations": cfg.iterations,
      "num_recursive_layers": cfg.num_recursive_layers if cfg.arch == "rins" else None,
      "cross_rope": cfg.cross_rope if cfg.is_decoder_decoder else False,
      "rope_theta": cfg.rope_theta,
      **(_moe_config(cfg) if cfg.ffn == "moe" else {}),
      **({"parscale_n": cfg.num_streams, "parscale_n_tokens": cfg.prefix_length,
          "parscale_attn_smooth": cfg.stream_weight_smoothing} if cfg.arch == "parscale" else {}),
  }


def _moe_config(cfg: ModelConfig) -> dict[str, Any]:
  """Qwen2-MoE's names for the MoE fields (softmax top-k, renormalised)."""
  return {
      "num_experts": cfg.num_experts,
      "num_experts_per_tok": cfg.num_experts_per_token,
      "moe_intermediate_size": cfg.expert_d_ff,
      "shared_expert_intermediate_size": cfg.num_shared_experts * cfg.shared_width,
      "norm_topk_prob": True,
      "router_aux_loss_coef": cfg.router_aux_loss,
      "decoder_sparse_step": cfg.moe_layers,
  }


def model_fields_from_llama(config: dict[str, Any], source: str = "config.json") -> dict[str, Any]:
  """``ModelConfig`` fields of a Hugging Face Llama ``config.json``; refuses what we cannot run."""
  def refuse(what: str):
    raise ExportError(f"{source}: {what} is not supported by the yocou_jax transformer "
                      "(Llama with RMSNorm, SwiGLU, rotate-half RoPE and no biases)")

  if config.get("model_type") != "llama":
    refuse(f"model_type={config.get('model_type')!r} (only 'llama')")
  for flag in ("attention_bias", "mlp_bias"):
    if config.get(flag):
      refuse(f"{flag}=true")
  if config.get("hidden_act", "silu") != "silu":
    refuse(f"hidden_act={config['hidden_act']!r}")
  if config.get("rope_scaling"):
    refuse(f"rope_scaling={config['rope_scaling']!r}")
  rope = config.get("rope_parameters") or {}
  if rope.get("rope_type", "default") != "default":
    refuse(f"rope_parameters.rope_type={rope['rope_type']!r}")
  extra_rope = sorted(set(rope) - {"rope_type", "rope_theta"})
  if extra_rope:
    refuse(f"rope_parameters.{extra_rope[0]}")
  theta = rope.get("rope_theta", config.get("rope_theta", 10_000.0))
  heads = int(config["num_attention_heads"])
  head_dim = config.get("head_dim") or int(config["hidden_size"]) // heads
  return dict(
      arch="transformer",
      vocab_size=int(config["vocab_size"]),
      d_model=int(config["hidden_size"]),
      d_ff=int(config["intermediate_size"]),
      num_layers=int(config["num_hidden_layers"]),
      num_heads=heads,
      num_kv_heads=int(config.get("num_key_value_heads") or heads),
      head_dim=int(head_dim),
      rope_theta=float(theta),
      norm_eps=float(config.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(config.get("tie_word_embeddings", False)),
      init_std=float(config.get("initializer_range", 0.02)),
  )
