"""Parameter counts, matmul FLOPs and KV-cache sizes of every arch, from abstract shapes only.

Everything is derived from the parameter tree of ``jax.eval_shape(Model(cfg).init, ...)``, which
allocates nothing (a 10B-parameter config plans in about a second), so the accounting cannot drift
from the model. The rules are those of ``shared/design/architecture.md``:

* section 5 (FLOPs): a matmul costs 2 FLOPs per parameter per token, and a looped block counts every
  time it runs (yocou's self-decoder, rins' recursive block and looped's whole stack T times);
  causal attention costs ``4 * (N/2) * heads * head_dim`` per token and layer application,
  sliding-window attention ``4 * avg_keys * heads * head_dim`` with
  ``avg_keys = W - W^2/(2N)`` (``N/2`` when ``N < W``); the cross-decoder attends over the whole
  causal prefix; the output projection counts (tied or not), the embedding lookup and norms do not.
  Training costs 3x the forward pass.
* section 2 (KV cache): ``bytes_per_token = 2 * kv_heads * head_dim * bytes(cfg.dtype)``; every
  full-attention layer application keeps N tokens, every sliding-window (layer, iteration) pair a
  ring buffer of ``min(W, N)`` tokens, and YOCO's global K/V is one N-token cache.

A model is described by its top-level parameter entries ("parts"): how many matmul parameters each
holds, how many times it runs per token, how many attention layers it contains and of which kind.

Mixture-of-Experts layers (``ffn="moe"``): a token uses the router, K of the E routed experts and
the shared experts, so a part's *active* parameters count the routed expert weights at K/E (exact
when dropless) and every FLOPs figure is computed from active parameters, router included.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from yocou_jax import moe as moe_lib
from yocou_jax.config import ModelConfig, maybe_window
from yocou_jax.model import Model

# Attention kinds of a part's layers.
CAUSAL = "causal"  # Full causal self-attention, one N-token KV cache per layer application.
WINDOW = "window"  # Sliding-window self-attention, one min(W, N)-token ring buffer per application.
CROSS = "cross"  # Causal attention to YOCO's global K/V; no cache of its own.
GLOBAL_KV = "global_kv"  # Produces the global K/V: one N-token cache, no attention.

# Parts in forward order (the order of tables and breakdowns).
PART_ORDER = ("embedding", "self_decoder", "global_kv", "cross_decoder", "recursive", "decoder",
              "final_norm", "stream_aggregation", "lm_head")


@dataclasses.dataclass(frozen=True)
class Part:
  """One top-level parameter entry of the model and how a forward pass uses it."""

  name: str
  params: int  # Every parameter in the entry.
  matmul_params: int  # Parameters used as matmul weights (kernels; the embedding only when tied).
  active_params: int  # Parameters one token uses (routed experts at K/E); = params when dense.
  active_matmul_params: int  # Matmul parameters one token uses; what FLOPs count.
  applications: int  # How many times the part runs per token (T for looped blocks).
  attention_layers: int  # Attention layers per application.
  attention: Optional[str]  # CAUSAL, WINDOW, CROSS, GLOBAL_KV or None.
  last_token_only_in_prefill: bool  # yoco/yocou early exit: the cross-decoder and the head.
  prefix_keys: int = 0  # ParScale: learned prefix keys every query of the part also reads.


# --- the abstract parameter tree -------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def abstract_params(cfg: ModelConfig) -> Mapping[str, Any]:
  """The model's parameter tree as ``jax.ShapeDtypeStruct`` leaves (nothing is allocated)."""
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  variables = jax.eval_shape(Model(cfg).init, jax.random.key(0), tokens)
  return nn.meta.unbox(variables["params"])


def _size(tree: Any) -> int:
  return sum(leaf.size for leaf in jax.tree_util.tree_leaves(tree))


def _kernels(tree: Any) -> list[tuple[tuple[str, ...], Any]]:
  """(path, leaf) of every projection kernel in ``tree``."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  named = [(tuple(str(getattr(k, "key", k)) for k in path), leaf) for path, leaf in flat]
  return [(path, leaf) for path, leaf in named if path and path[-1] == "kernel"]


def _moe_weights(tree: Any, names: tuple[str, ...]) -> list[Any]:
  """The MoE layers' weight leaves ``.../mlp/<name>`` (not the shared experts' kernels)."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  keys = [(tuple(str(getattr(k, "key", k)) for k in path), leaf) for path, leaf in flat]
  return [leaf for path, leaf in keys if path[-2:-1] == ("mlp",) and path[-1] in names]


def _attention_layers(tree: Any) -> int:
  """Layers holding a query projection: the leading 'layers' axis of the query kernels."""
  queries = [leaf for path, leaf in _kernels(tree) if "query" in path]
  return sum(leaf.shape[0] for leaf in queries)


def _applications(cfg: ModelConfig, name: str) -> int:
  looped = {"self_decoder": cfg.arch == "yocou", "recursive": cfg.arch == "rins",
            "decoder": cfg.arch == "looped"}
  if name == "decoder" and cfg.arch == "parscale":
    return cfg.num_streams  # Every stream runs the whole stack.
  if name == "cross_decoder":
    return cfg.cross_iterations  # T for the upper loops.
  if name == "global_kv":
    return cfg.global_kv_iterations  # T without shared KV.
  return cfg.num_iterations if looped.get(name, False) else 1


def _attention_kind(cfg: ModelConfig, name: str) -> Optional[str]:
  if name in ("decoder", "recursive"):
    return CAUSAL
  if name == "self_decoder":
    return WINDOW if maybe_window(cfg) is not None else CAUSAL
  return {"cross_decoder": CROSS, "global_kv": GLOBAL_KV}.get(name)


def _part_rank(name: str) -> int:
  return PART_ORDER.index(name) if name in PART_ORDER else len(PART_ORDER)


def model_parts(cfg: ModelConfig) -> tuple[Part, ...]:
  """Every top-level parameter entry of ``cfg``'s model, with how it is used."""
  params = abstract_params(cfg)
  parts = []
  for name in sorted(params, key=_part_rank):
    tree = params[name]
    matmul = _size([leaf for _, leaf in _kernels(tree)])
    if name == "lm_head" or (name == "embedding" and cfg.tie_embeddings):
      matmul = _size(tree)  # The output projection [D, V] (the embedding's transpose if tied).
    kind = _attention_kind(cfg, name)
    routed = _size(_moe_weights(tree, moe_lib.EXPERT_PARAMS)) if cfg.ffn == "moe" else 0
    if cfg.ffn == "moe":
      matmul += routed + _size(_moe_weights(tree, (moe_lib.ROUTER_PARAM,)))
    inactive = routed - routed * cfg.num_experts_per_token // cfg.num_experts if routed else 0
    parts.append(Part(
        name=name, params=_size(tree), matmul_params=matmul,
        active_params=_size(tree) - inactive, active_matmul_params=matmul - inactive,
        applications=_applications(cfg, name),
        attention_layers=_attention_layers(tree) if kind in (CAUSAL, WINDOW, CROSS) else 0,
        attention=kind,
        last_token_only_in_prefill=(name in ("lm_head", "cross_decoder", "stream_aggregation")
                                    or (name == "embedding" and cfg.tie_embeddings)),
        prefix_keys=cfg.stream_prefix_length if kind == CAUSAL else 0))
  return tuple(parts)


def param_counts(cfg: ModelConfig) -> dict[str, int]:
  """{"total": n, <part>: n, ...} over the parts the arch has. Independent of T."""
  counts = {part.name: part.params for part in model_parts(cfg)}
  return {"total": sum(counts.values()), **counts}


def active_params(cfg: ModelConfig) -> int:
  """Parameters one token uses: all of a dense model; router, K routed and shared experts of MoE."""
  return sum(part.active_params for part in model_parts(cfg))


# --- FLOPs ------------------------------------------------------------------------------------

def _flops_per_key(cfg: ModelConfig) -> int:
  """Scores and weighted sum: 2 matmuls x 2 FLOPs x heads x head_dim per (query, key) pair."""
  return 4 * cfg.num_heads * cfg.head_dim


def average_keys(cfg: ModelConfig, kind: str, seq_len: int) -> float:
  """Keys a query reads, averaged over a causal sequence of ``seq_len`` tokens (section 5)."""
  if kind == WINDOW and seq_len >= cfg.window:
    return cfg.window - cfg.window ** 2 / (2 * seq_len)
  return seq_len / 2


def _part_flops_per_token(cfg: ModelConfig, part: Part, seq_len: int) -> dict[str, float]:
  matmul = 2.0 * part.active_matmul_params * part.applications
  attention = 0.0
  if part.attention_layers:
    attention = (part.attention_layers * part.applications * _flops_per_key(cfg)
                 * (average_keys(cfg, part.attention, seq_len) + part.prefix_keys))
  return {"matmul": matmul, "attention": attention}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> dict[str, Any]:
  """Matmul FLOPs per token of a training row of ``seq_len`` tokens.

  Returns {"matmul", "attention", "forward", "train" (= 3 x forward), "by_part": {part: forward}}.
  """
  by_part = {part.name: _part_flops_per_token(cfg, part, seq_len) for part in model_parts(cfg)}
  matmul = sum(f["matmul"] for f in by_part.values())
  attention = sum(f["attention"] for f in by_part.values())
  forward = matmul + attention
  return {"matmul": matmul, "attention": attention, "forward": forward, "train": 3.0 * forward,
          "by_part": {name: f["matmul"] + f["attention"] for name, f in by_part.items()
                      if f["matmul"] or f["attention"]}}


def train_flops_per_step(cfg: ModelConfig, seq_len: int, batch_size: int) -> float:
  """Training FLOPs of one optimizer step over ``batch_size`` rows of ``seq_len`` tokens."""
  return flops_per_token(cfg, seq_len)["train"] * seq_len * batch_size


def prefill_flops(cfg: ModelConfig, prompt_len: int) -> float:
  """Forward FLOPs of prefilling a ``prompt_len``-token prompt and predicting the next token.

  Transformer-like archs run every layer over all N tokens; yoco/yocou run the self-decoder (all
  T iterations) and the global K/V projection over all N tokens and, by early exit, the
  cross-decoder over the last token only (reading all N keys). The head runs on the last token.
  yoco_upper_loop_nokv runs its first T - 1 cross-decoder iterations over all N tokens (the
  next iteration's K/V need their outputs everywhere) and only the last on the last token.
  """
  total = 0.0
  for part in model_parts(cfg):
    last_only = part.applications if part.last_token_only_in_prefill else 0
    if part.name == "cross_decoder" and cfg.global_kv_iterations > 1:
      last_only = 1
    if last_only:
      total += decode_part_flops(cfg, dataclasses.replace(part, applications=last_only),
                                 prompt_len)
    if part.applications > last_only:
      per_token = _part_flops_per_token(
          cfg, dataclasses.replace(part, applications=part.applications - last_only), prompt_len)
      total += prompt_len * (per_token["matmul"] + per_token["attention"])
  return total


def decode_part_flops(cfg: ModelConfig, part: Part, context: int) -> float:
  """One new token through ``part`` at ``context`` cached tokens (full: N keys, SWA: min(W, N))."""
  keys = min(cfg.window, context) if part.attention == WINDOW else context + part.prefix_keys
  attention = part.attention_layers * part.applications * _flops_per_key(cfg) * keys
  return 2.0 * part.active_matmul_params * part.applications + attention


def decode_flops_per_token(cfg: ModelConfig, context: int) -> float:
  """Forward FLOPs of generating one token at a context of ``context`` tokens."""
  return sum(decode_part_flops(cfg, part, context) for part in model_parts(cfg))


# --- KV cache ---------------------------------------------------------------------------------

def kv_bytes_per_token(cfg: ModelConfig) -> int:
  """K and V of one token in one cache: 2 * kv_heads * head_dim * bytes(cfg.dtype)."""
  return 2 * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize


def kv_cache_breakdown(cfg: ModelConfig, context: int, batch: int = 1) -> dict[str, int]:
  """Inference cache bytes at ``context`` tokens: {"global", "local", "total", "bytes_per_token"}.

  "global" holds the caches that grow with the context (every full-attention layer application,
  ParScale's P streams each with its prefix in front; YOCO's global K/V, once, or once per
  upper-loop iteration without shared KV), "local" the sliding-window ring buffers of
  min(W, context) tokens, one per (self-decoder layer, iteration) pair.
  """
  global_tokens = local_tokens = 0
  for part in model_parts(cfg):
    if part.attention == CAUSAL:
      global_tokens += part.attention_layers * part.applications * (context + part.prefix_keys)
    elif part.attention == GLOBAL_KV:
      global_tokens += part.applications * context
    elif part.attention == WINDOW:
      local_tokens += part.attention_layers * part.applications * min(cfg.window, context)
  per_token = kv_bytes_per_token(cfg) * batch
  return {"global": global_tokens * per_token, "local": local_tokens * per_token,
          "total": (global_tokens + local_tokens) * per_token,
          "bytes_per_token": kv_bytes_per_token(cfg)}


def kv_cache_bytes(cfg: ModelConfig, context: int, batch: int = 1) -> int:
  """Total inference KV-cache bytes at ``context`` tokens (architecture.md section 2)."""
  return kv_cache_breakdown(cfg, context, batch)["total"]


# --- decode memory traffic -------------------------------------------------------------------

def decode_cache_read_bytes(cfg: ModelConfig, context: int, batch: int = 1) -> int:
  """Cache bytes one decode step reads with buffers of ``context`` tokens: every layer
  application's buffer once (window rings: min(W, context) tokens), and YOCO's global K/V once
  per cross-decoder layer application (every one of them attends to it)."""
  caches = kv_cache_breakdown(cfg, context, batch)
  if not cfg.is_decoder_decoder:
    return caches["total"]
  global_reads = cfg.cross_iterations * cfg.num_cross_layers * context
  return caches["local"] + global_reads * kv_bytes_per_token(cfg) * batch


def decode_weight_read_bytes(cfg: ModelConfig) -> int:
  """Parameter bytes one decode step reads, whatever its batch: every matmul weight once per
  application (a looped block once per loop; ParScale's P streams run as rows of one batch, so
  once), at the params' stored dtype; MoE counts every expert (a batch of many tokens routes to
  all of them); the embedding lookup gathers rows and is not counted (the output projection is).
  """
  itemsize = jnp.dtype(jax.tree.leaves(abstract_params(cfg))[0].dtype).itemsize
  reads = 0
  for part in model_parts(cfg):
    applications = 1 if cfg.arch == "parscale" and part.name == "decoder" else part.applications
    reads += part.matmul_params * applications
  return reads * itemsize


# --- the plan ---------------------------------------------------------------------------------

def plan(cfg: ModelConfig, seq_len: int, batch_size: int,
         contexts: Iterable[int]) -> dict[str, Any]:
  """Everything above for one config, JSON-ready (context keys are strings)."""
  counts = param_counts(cfg)
  flops = flops_per_token(cfg, seq_len)
  contexts = [int(c) for c in contexts]
  caches = {str(c): kv_cache_breakdown(cfg, c) for c in contexts}
  return {
      "arch": cfg.arch,
      "params": counts["total"],
      "active_params": active_params(cfg),
      "ffn": cfg.ffn,
      **({"moe": {"num_experts": cfg.num_experts, "num_experts_per_token":
                  cfg.num_experts_per_token, "num_shared_experts": cfg.num_shared_experts,
                  "expert_d_ff": cfg.expert_d_ff, "shared_expert_d_ff": cfg.shared_width,
                  "capacity_factor": cfg.capacity_factor, "moe_layers": cfg.moe_layers,
                  "expert_sharding": cfg.expert_sharding}} if cfg.ffn == "moe" else {}),
      "params_by_part": {k: v for k, v in counts.items() if k != "total"},
      "seq_len": seq_len,
      "batch_size": batch_size,
      "forward_flops_per_token": flops["forward"],
      "forward_flops_per_token_by_part": flops["by_part"],
      "train_flops_per_token": flops["train"],
      "train_flops_per_step": flops["train"] * seq_len * batch_size,
      "kv_bytes_per_token": kv_bytes_per_token(cfg),
      "kv_cache_bytes": {c: b["total"] for c, b in caches.items()},
      "kv_cache_global_bytes": {c: b["global"] for c, b in caches.items()},
      "kv_cache_local_bytes": {c: b["local"] for c, b in caches.items()},
      "prefill_flops": {str(c): prefill_flops(cfg, c) for c in contexts},
      "decode_flops_per_token": {str(c): decode_flops_per_token(cfg, c) for c in contexts},
  }


def _si(value: float, unit: str = "") -> str:
  for scale, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"),
                        (1e3, "K")):
    if abs(value) >= scale:
      return f"{value / scale:.3f} {prefix}{unit}"
  return f"{value:.0f} {unit}".rstrip()


def _binary_bytes(value: int) -> str:
  for scale, prefix in ((2 ** 40, "TiB"), (2 ** 30, "GiB"), (2 ** 20, "MiB"), (2 ** 10, "KiB")):
    if value >= scale:
      return f"{value / scale:.2f} {prefix} ({value})"
  return f"{value} B"


def format_table(plans: Mapping[str, Mapping[str, Any]]) -> str:
  """A side-by-side text table of ``{arch: plan(...)}``."""
  archs = list(plans)
  first = plans[archs[0]]
  parts = sorted({p for arch in archs for p in plans[arch]["params_by_part"]}, key=_part_rank)
  rows: list[tuple[str, list[str]]] = [("arch", archs)]

  def row(label: str, fn):
    rows.append((label, [fn(plans[arch]) for arch in archs]))

  row("params", lambda p: _si(p["params"]))
  if any("moe" in plans[arch] for arch in archs):
    row("active params", lambda p: _si(p["active_params"]))
    row("experts (routed top-k + shared)",
        lambda p: (f"{p['moe']['num_experts']} top-{p['moe']['num_experts_per_token']} + "
                   f"{p['moe']['num_shared_experts']}" if "moe" in p else "dense"))
    row("expert / shared width",
        lambda p: (f"{p['moe']['expert_d_ff']} / {p['moe']['shared_expert_d_ff']}"
                   if "moe" in p else "-"))
    row("MoE layers", lambda p: (f"1 in {p['moe']['moe_layers']}" if "moe" in p else "-"))
  for part in parts:
    row(f"  {part}", lambda p, part=part: (_si(p["params_by_part"][part])
                                           if part in p["params_by_part"] else "-"))
  seq, batch = first["seq_len"], first["batch_size"]
  row(f"train FLOPs/token (N={seq})", lambda p: _si(p["train_flops_per_token"], "FLOP"))
  if len(archs) > 1:
    base = first["train_flops_per_token"]
    row(f"  x {archs[0]}", lambda p: f"{p['train_flops_per_token'] / base:.2f}x")
  row(f"train FLOPs/step (B={batch})", lambda p: _si(p["train_flops_per_step"], "FLOP"))
  for context in first["kv_cache_bytes"]:
    row(f"KV cache @ {context}", lambda p, c=context: _binary_bytes(p["kv_cache_bytes"][c]))
  for context in first["prefill_flops"]:
    row(f"prefill FLOPs @ {context}", lambda p, c=context: _si(p["prefill_flops"][c], "FLOP"))
  for context in first["decode_flops_per_token"]:
    row(f"decode FLOPs/token @ {context}",
        lambda p, c=context: _si(p["decode_flops_per_token"][c], "FLOP"))

  label_width = max(len(label) for label, _ in rows)
  widths = [max(len(cells[i]) for _, cells in rows) for i in range(len(archs))]
  lines = []
  for label, cells in rows:
    lines.append("  ".join([label.ljust(label_width)]
                           + [cell.rjust(width) for cell, width in zip(cells, widths)]))
  return "\n".join(lines)
