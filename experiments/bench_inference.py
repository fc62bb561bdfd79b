r"""Inference benchmark: prefill time, decode tokens/s and K/V-cache bytes against context length.

  python -m experiments.bench_inference [--json_out=PATH] [--plot_out=PATH]

Every arch gets the same width, heads, layers and window (default d 256, 8 layers, 8 heads of 32,
4 kv heads, d_ff 768, W 512, T 3; rins loops its first half T times), random weights, batch 1.
For each
context N it prefills an N-token prompt in chunks (``--chunk_size``; full attention reads only
the causal prefix of its cache) and then decodes ``--decode_steps`` tokens greedily, in rounds
interleaved across the archs; decode tokens/s is one over the median step time (both keep
other processes on a shared machine from favouring one arch).
Compilation is excluded: each arch compiles its chunk and decode steps for each context's cache
length (context + decode steps; decode reads the whole buffer) before anything is timed.
Prints a table and the inference targets (prefill, cache bytes, decode ratios), writes a PNG of
throughput against context.

Batch 1 measures latency. Serving throughput is set by how many sequences' caches fit in memory,
so at the largest context each arch also decodes the largest batch (up to
``--budget_max_batch``) whose cache fits ``--cache_budget_mib``, and reports tokens/s over the
whole batch. Those caches are filled with random K/V instead of prefilled (decode time does not
depend on the values, only on the positions, which are set to the context length).

Past the largest prefilled context, ``--long_decode_contexts`` (64K, 128K, 256K) times batch-1
decode alone from such random caches, and a least-squares fit ``step = fixed + per_token x
context`` per arch separates the context-independent work from the cache reads: the decode
ratio of two archs tends to the ratio of their slopes as the context grows.

Targets, each printed with its figure and PASS/MISS: yocou prefill at the largest context >= 5x
faster than the transformer; yocou / transformer decode tokens/s at equal cache memory >= 2;
yocou's per-sequence decode step at its equal-memory batch no longer than at batch 1; the XLA
decode attention over one full cache buffer at the largest context (batch 1 and that batch)
>= 50% of the rate of a plain reduction over the same bytes, timed alternately in the same run
(the streaming-read limit).

Both modes end with the memory-traffic bound of the equal-memory ratio: a decode step reads
the weights once (a looped block once per loop) and each sequence's cache (yocou's global K/V
once per cross layer), so an arch at its equal-memory batch B makes B tokens per
``weights + B x cache read`` bytes. The bound is printed for the bench model at its budget,
with the GB/s each arch's steps attained (measured ratio = bound x yocou's GB/s / the
transformer's), and for the paper's 1.3B shapes on a ``--bound_device_gib`` accelerator. With
equal layer counts the cache term alone is below 2 at any finite context (the transformer's L
caches against yocou's L/2 reads of the global cache plus its rings); the weights term helps
yocou only as far as its larger batch amortises weights the transformer's small batch cannot.
At 32K with the default 1 GiB budget the bound is 1.94 (batches 26 / 3; 1.91 from the cache
alone), so the equal-memory target of 2 is out of this model's reach there however fast the
decode; for the 1.3B shapes on 80 GiB it is 1.99 at 32K and 2.08 at 256K (the paper: 2.2).

The defaults take about 30 minutes on two shared CPU cores, almost all of it the quadratic 32K
prefills of transformer (~10 min) and rins (~13 min); ``--archs`` and ``--contexts`` shorten it.

``--protocol=paper`` is the serving protocol instead: for every arch (all of them unless
``--archs``) and ``--paper_contexts`` (8K, 16K, 32K), a batch-1 prefill (up to
``--paper_prefill_max_context``), then decode at batch ``--paper_batch`` (32; the largest batch
whose caches fit ``--paper_memory_gib`` where 32 do not, stated in the row) and at the largest
batch whose cache fits ``--cache_budget_mib`` (the equal-memory throughput), from random caches
of context + ``--paper_new_tokens`` (128) tokens. Rows give prefill seconds, decode tokens/s
over the batch, the batch's cache bytes, and the ratios to the transformer. Its cost is the
prefills (transformer ~10 min, rins ~13 min and looped longer at 32K on two cores) plus a
minute or two of decoding per arch and context.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Optional

from absl import app, flags

_ARCHS = flags.DEFINE_list("archs", ["transformer", "yoco", "yocou", "rins"], "Archs to run "
                           "(the paper protocol runs all five unless this is given).")
_CONTEXTS = flags.DEFINE_list("contexts", ["2048", "8192", "32768"], "Prompt lengths.")
_DECODE_STEPS = flags.DEFINE_integer("decode_steps", 32, "Timed decode steps per context.")
_ROUNDS = flags.DEFINE_integer("decode_rounds", 4, "Decode steps are split in rounds, archs "
                               "interleaved, so every arch decodes under the same load.")
_CHUNK = flags.DEFINE_integer("chunk_size", 512, "Prefill chunk length.")
_KV_BLOCK = flags.DEFINE_integer("kv_block", 512, "Key block of cached attention in prefill.")
_DECODE_BLOCK = flags.DEFINE_integer("decode_kv_block", 2048, "Key block of decode attention.")
_WINDOW_BLOCK = flags.DEFINE_integer("window_block", 128, "Query sub-block of window attention.")
_D_MODEL = flags.DEFINE_integer("d_model", 256, "Width.")
_LAYERS = flags.DEFINE_integer("num_layers", 8, "Layers.")
_HEADS = flags.DEFINE_integer("num_heads", 8, "Query heads (head_dim = d_model / heads).")
_KV_HEADS = flags.DEFINE_integer("num_kv_heads", 4, "K/V heads.")
_WINDOW = flags.DEFINE_integer("window", 512, "Sliding window of the self-decoder.")
_ITERATIONS = flags.DEFINE_integer("num_iterations", 3, "T: loops of yocou / rins.")
_BUDGET = flags.DEFINE_integer(
    "cache_budget_mib", 1024, "Equal-memory decode: at the largest context every arch also "
    "decodes the largest batch whose K/V cache fits in this many MiB (0: skip).")
_BUDGET_MAX_BATCH = flags.DEFINE_integer("budget_max_batch", 64,
                                         "Cap on the equal-memory decode batch.")
_LONG = flags.DEFINE_list(
    "long_decode_contexts", ["65536", "131072", "262144"], "Batch-1 decode only (no prefill: "
    "caches filled with random K/V) at these longer contexts, to show how the decode ratio "
    "grows with the context; empty to skip.")
_PROTOCOL = flags.DEFINE_enum(
    "protocol", "sweep", ["sweep", "paper"], "sweep: batch-1 prefill/decode against context, "
    "equal-memory and long-context decode; paper: the serving protocol (batch --paper_batch, "
    "--paper_new_tokens per sequence, --paper_contexts, every arch of --archs).")
_PAPER_BATCH = flags.DEFINE_integer("paper_batch", 32, "paper: decode batch.")
_PAPER_NEW = flags.DEFINE_integer("paper_new_tokens", 128, "paper: new tokens per sequence (the "
                                  "cache holds context + this many).")
_PAPER_CONTEXTS = flags.DEFINE_list("paper_contexts", ["8192", "16384", "32768"],
                                    "paper: contexts (64K-256K too where memory allows).")
_PAPER_MEMORY = flags.DEFINE_float(
    "paper_memory_gib", 8.0, "paper: cap on one decode batch's cache; an arch whose batch of "
    "--paper_batch does not fit decodes the largest batch that does (stated in its row).")
_PAPER_PREFILL_MAX = flags.DEFINE_integer(
    "paper_prefill_max_context", 32768, "paper: prefill (batch 1, timed) only up to this "
    "context; decode runs from random caches at every context.")
_BOUND_DEVICE = flags.DEFINE_float(
    "bound_device_gib", 80.0, "Memory of the accelerator the 1.3B equal-memory bound is worked "
    "out for (the paper's H100: 80); its caches get what the weights leave.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Write the results as JSON here.")
_PLOT_OUT = flags.DEFINE_string("plot_out", "runs/bench_inference.png", "Throughput plot (PNG).")


def model_config(arch: str):
  from yocou_jax.config import ModelConfig  # pylint: disable=g-import-not-at-top

  d, heads = _D_MODEL.value, _HEADS.value
  return ModelConfig(arch=arch, num_layers=_LAYERS.value, d_model=d, num_heads=heads,
                     num_kv_heads=_KV_HEADS.value, head_dim=d // heads, d_ff=3 * d,
                     vocab_size=384, window=_WINDOW.value, num_iterations=_ITERATIONS.value,
                     num_recursive_layers=_LAYERS.value // 2)


def random_params(cfg, seed: int = 0):
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from yocou_jax import accounting  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda a: jax.numpy.asarray((cfg.init_std * rng.standard_normal(a.shape)).astype(a.dtype)),
      accounting.abstract_params(cfg))


def warm_up(engine, params, max_len: int) -> None:
  """Compiles the prefill chunk, the prefill head and the decode step for ``max_len``."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  prompt = np.full((1, engine.opts.chunk_size), 7, np.int32)
  logits, state = engine.prefill(params, prompt, [prompt.shape[1]], max_len)
  for _ in range(2):
    logits, state = engine.decode(params, state, np.argmax(logits, -1))
  jax.block_until_ready(logits)


def live_cache_bytes(cfg, state, max_len: int) -> int:
  """Bytes of the state's cache arrays, checked against ``accounting.kv_cache_bytes``."""
  from yocou_jax import accounting  # pylint: disable=g-import-not-at-top
  from yocou_jax.inference import cache as cache_lib  # pylint: disable=g-import-not-at-top

  live = cache_lib.cache_bytes(state.cache)
  if live != accounting.kv_cache_bytes(cfg, max_len, state.lengths.shape[0]):
    raise AssertionError(f"{cfg.arch}: live cache bytes {live} differ from "
                         "accounting.kv_cache_bytes")
  return live


def prefill(engine, params, context: int, max_len: int):
  """(seconds, last logits, state) of one timed prefill of a random ``context``-token prompt."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  prompt = np.random.default_rng(1).integers(3, 259, (1, context)).astype(np.int32)
  start = time.perf_counter()
  logits, state = engine.prefill(params, prompt, [context], max_len)
  jax.block_until_ready(logits)
  return time.perf_counter() - start, logits, state


def decode_steps(engine, params, logits, state, steps: int):
  """(per-step seconds, logits, state) of ``steps`` greedy decode steps, each timed alone."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  step_s = []
  for _ in range(steps):
    start = time.perf_counter()
    logits, state = engine.decode(params, state, np.argmax(logits, -1))
    jax.block_until_ready(logits)
    step_s.append(time.perf_counter() - start)
  return step_s, logits, state


def interleaved_decode(models, live, rounds: int, per_round: int) -> dict[str, list[float]]:
  """Decode step times per arch, ``per_round`` steps of each arch in turn, ``rounds`` times.

  ``live[arch]`` is that arch's (logits, state) and is advanced in place. Interleaving puts
  every arch's steps under the same background load of a shared machine.
  """
  step_s: dict[str, list[float]] = {arch: [] for arch in models}
  for _ in range(rounds):
    for arch, (_, engine, params) in models.items():
      times, *live[arch] = decode_steps(engine, params, *live[arch], per_round)
      step_s[arch] += times
  return step_s


def run() -> tuple[dict[str, list[dict[str, Any]]], list[dict[str, Any]],
                   dict[str, list[dict[str, Any]]]]:
  """Per context: every arch's prefill, then decode rounds interleaved across the archs.

  Compilation is excluded: every arch compiles its chunk and decode steps for the context's
  cache length before anything is timed. Interleaving puts every arch's decode steps under the same background load (this is a shared
  machine); decode tokens/s is one over the median step time over all rounds.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top

  from yocou_jax import accounting  # pylint: disable=g-import-not-at-top
  from yocou_jax.inference import engine as engine_lib  # pylint: disable=g-import-not-at-top

  opts = engine_lib.Options(chunk_size=_CHUNK.value, kv_block=_KV_BLOCK.value,
                            decode_kv_block=_DECODE_BLOCK.value, window_block=_WINDOW_BLOCK.value)
  contexts = [int(c) for c in _CONTEXTS.value]
  rounds = _ROUNDS.value
  steps = -(-_DECODE_STEPS.value // rounds)
  models = {}
  for arch in _ARCHS.value:
    cfg = model_config(arch)
    models[arch] = (cfg, engine_lib.Engine(cfg, opts), random_params(cfg))
  results: dict[str, list[dict[str, Any]]] = {arch: [] for arch in models}
  for context in contexts:
    # Each context gets a cache of its own length: decode reads the whole buffer.
    max_len = context + rounds * steps + 1
    for _, engine, params in models.values():
      warm_up(engine, params, max_len)
    live = {}
    for arch, (cfg, engine, params) in models.items():
      seconds, logits, state = prefill(engine, params, context, max_len)
      live[arch] = (logits, state)
      results[arch].append({"context": context, "prefill_s": seconds,
                            "prefill_tokens_per_s": context / seconds,
                            "cache_bytes": accounting.kv_cache_bytes(cfg, context),
                            "cache_bytes_live": live_cache_bytes(cfg, state, max_len),
                            "max_len": max_len})
      print(f"{arch:12s} {context:6d}: prefill {seconds:8.2f} s", flush=True)
    step_s = interleaved_decode(models, live, rounds, steps)
    for arch in models:
      row = results[arch][-1]
      row["decode_step_s"] = step_s[arch]
      row["decode_tokens_per_s"] = 1.0 / float(np.median(step_s[arch]))
      print(f"{arch:12s} {context:6d}: decode {row['decode_tokens_per_s']:7.1f} tokens/s",
            flush=True)
    del live
  budget_rows = []
  if _BUDGET.value > 0:  # At the largest context, with its cache length.
    budget_rows = budget_decode(models, context, max_len, _DECODE_STEPS.value)
  long_rows = {}
  if _LONG.value:
    long_rows = long_decode(models, [int(c) for c in _LONG.value], _DECODE_STEPS.value)
  return results, budget_rows, long_rows


def random_state(cfg, batch: int, context: int, max_len: int):
  """A decode state of ``batch`` sequences at position ``context``, caches random.

  Decode time depends on the positions (how far the cache attention reads), not on the values.
  The cache is drawn at its shapes directly (no zero-filled buffer first).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from yocou_jax.inference import engine as engine_lib  # pylint: disable=g-import-not-at-top

  shapes = jax.eval_shape(lambda: engine_lib.init_state(cfg, batch, max_len))
  leaves, treedef = jax.tree.flatten(shapes.cache)
  keys = jax.random.split(jax.random.key(3), len(leaves))
  cache = treedef.unflatten([jax.random.normal(key, a.shape, a.dtype)
                             for key, a in zip(keys, leaves)])
  return shapes.replace(cache=cache, lengths=jnp.full((batch,), context, jnp.int32))


def long_decode(models, contexts: list[int], steps: int) -> dict[str, list[dict[str, Any]]]:
  """Batch-1 decode tokens/s at long contexts, from random caches.

  Each context gets random caches of its own length (decode reads the whole buffer, so a
  server sizes it to what it serves; one compile per context). Steps are interleaved one at a time across the archs (a, b, c, a, b, c,
  ...): a step takes up to a second here, and a shared machine that slows down for a while then
  slows every arch's steps alike instead of one arch's whole round.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top

  from yocou_jax import accounting  # pylint: disable=g-import-not-at-top

  out: dict[str, list[dict[str, Any]]] = {arch: [] for arch in models}
  for context in contexts:
    max_len = context + 2 + steps + 1  # Decode reads the whole buffer: one per context.
    live = {}
    for arch, (cfg, engine, params) in models.items():
      state = random_state(cfg, 1, context, max_len)
      logits = np.zeros((1, cfg.vocab_size), np.float32)
      _, *live[arch] = decode_steps(engine, params, logits, state, 2)  # Compiles max_len.
    step_s = interleaved_decode(models, live, steps, 1)
    for arch, (cfg, _, _) in models.items():
      row = {"context": context, "decode_step_s": step_s[arch],
             "decode_tokens_per_s": 1.0 / float(np.median(step_s[arch])),
             "cache_bytes": accounting.kv_cache_bytes(cfg, context)}
      out[arch].append(row)
      print(f"{arch:12s} {context:6d}: decode {row['decode_tokens_per_s']:7.1f} tokens/s "
            "(random cache)", flush=True)
  return out


def full_cache_reads(cfg) -> int:
  """Attentions over a context-length cache per decoded token (window rings not counted)."""
  if cfg.is_decoder_decoder:
    return cfg.num_cross_layers
  if cfg.arch == "rins":
    return cfg.num_layers + (cfg.num_iterations - 1) * cfg.num_recursive_layers
  return cfg.num_layers * cfg.iterations


def decode_fit(rows_by_arch) -> dict[str, dict[str, float]]:
  """Least-squares ``step_s = fixed_s + per_token_s * context`` per arch (batch 1).

  ``fixed_s`` is the per-token work that does not grow with the context (weights, window rings,
  per-op overhead); ``per_token_s * context`` the full-length cache reads. The decode ratio of
  two archs tends to the ratio of their slopes as the context grows, and stays below it when
  the faster-growing arch also has the smaller fixed cost.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top

  fits = {}
  for arch, rows in rows_by_arch.items():
    if len(rows) < 2:
      continue
    n = np.array([r["context"] for r in rows], np.float64)
    t = np.array([1.0 / r["decode_tokens_per_s"] for r in rows], np.float64)
    slope, fixed = np.polyfit(n, t, 1)
    fits[arch] = {"fixed_s": float(fixed), "per_token_s": float(slope)}
  return fits


def decode_batches(engine, params, cfg, batches, context: int, max_len: int,
                   steps: int) -> tuple[dict[int, list[float]], dict[int, int]]:
  """Decode step times at each batch (random caches at position ``context``), interleaved,
  and each batch's live cache bytes.

  One step of every batch in turn, ``steps`` times, so a batch and batch 1 see the same load.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top

  live, cache_bytes = {}, {}
  for batch in dict.fromkeys(batches):
    state = random_state(cfg, batch, context, max_len)
    cache_bytes[batch] = live_cache_bytes(cfg, state, max_len)
    logits = np.zeros((batch, cfg.vocab_size), np.float32)
    _, *live[batch] = decode_steps(engine, params, logits, state, 2)  # Compiles this batch.
  step_s: dict[int, list[float]] = {batch: [] for batch in live}
  for _ in range(steps):
    for batch in live:
      times, *live[batch] = decode_steps(engine, params, *live[batch], 1)
      step_s[batch] += times
  return step_s, cache_bytes


def per_sequence_ratio(step_s: dict[int, list[float]], batch: int) -> float:
  """Per-sequence step time at ``batch`` over the step time at batch 1 (medians)."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  return float(np.median(step_s[batch])) / batch / float(np.median(step_s[1]))


def fitting_batch(cfg, max_len: int, budget_bytes: int, max_batch: int) -> int:
  """The largest batch (up to ``max_batch``) whose caches of ``max_len`` tokens fit the budget."""
  from yocou_jax import accounting  # pylint: disable=g-import-not-at-top

  return int(min(max_batch, budget_bytes // accounting.kv_cache_bytes(cfg, max_len)))


def decode_fitting_batches(engine, params, cfg, context: int, max_len: int,
                           budgets: dict[str, tuple[int, int]],
                           steps: int) -> dict[str, dict[str, Any]]:
  """For each named budget ``(bytes, max batch)``, the largest batch whose cache fits it, decoded
  from random caches at position ``context`` with batch 1 interleaved (:func:`decode_batches`).

  Returns ``{name: {"batch", "cache_bytes", "decode_step_s", "decode_tokens_per_s",
  "per_sequence_step_ratio", "batch1_decode_step_s"}}``; a budget that not one sequence fits
  has ``batch`` 0 and nothing else.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top

  fits = {name: fitting_batch(cfg, max_len, *budget) for name, budget in budgets.items()}
  batches = [b for b in fits.values() if b]
  if not batches:
    return {name: {"batch": 0} for name in fits}
  step_s, cache_bytes = decode_batches(engine, params, cfg, [*batches, 1], context, max_len,
                                       steps)
  out = {}
  for name, batch in fits.items():
    out[name] = {"batch": batch}
    if batch:
      out[name].update(cache_bytes=cache_bytes[batch], decode_step_s=step_s[batch],
                       decode_tokens_per_s=batch / float(np.median(step_s[batch])),
                       per_sequence_step_ratio=per_sequence_ratio(step_s, batch),
                       batch1_decode_step_s=step_s[1])
  return out


def budget_decode(models, context: int, max_len: int, steps: int) -> list[dict[str, Any]]:
  """Decode tokens/s of each arch at the largest batch whose cache fits the memory budget, and
  its per-sequence step time against batch 1 (steps interleaved)."""
  from yocou_jax import accounting  # pylint: disable=g-import-not-at-top

  budget = _BUDGET.value * 2**20
  rows = []
  for arch, (cfg, engine, params) in models.items():
    per_sequence = accounting.kv_cache_bytes(cfg, max_len)
    fit = decode_fitting_batches(engine, params, cfg, context, max_len,
                                 {"budget": (budget, _BUDGET_MAX_BATCH.value)}, steps)["budget"]
    row = {"arch": arch, "context": context, "budget_bytes": budget, "max_len": max_len,
           "cache_bytes_per_sequence": per_sequence, **fit}
    rows.append(row)
    if not fit["batch"]:
      print(f"{arch:12s} budget: one sequence's cache ({per_sequence / 2**20:.0f} MiB) exceeds "
            f"--cache_budget_mib={_BUDGET.value}", flush=True)
      continue
    print(f"{arch:12s} budget: batch {row['batch']:3d}, {row['cache_bytes'] / 2**20:8.1f} MiB, "
          f"decode {row['decode_tokens_per_s']:8.1f} tokens/s, per-sequence step / batch 1: "
          f"{row['per_sequence_step_ratio']:.2f}", flush=True)
  return rows


def cache_read_rate(cfg, batch: int, context: int, reps: int) -> dict[str, Any]:
  """The XLA decode attention over one full cache buffer against a plain reduction over it.

  Both read the same ``[batch, kv heads, context, head dim]`` K and V arrays; the reduction
  (a sum over the length axis) is this machine's streaming-read limit for those bytes. Calls
  alternate (same load), medians compared.
  """
  import functools  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from yocou_jax.inference import attention as attn_lib  # pylint: disable=g-import-not-at-top

  shape = (batch, cfg.num_kv_heads, context, cfg.head_dim)
  k, v = (jax.random.normal(key, shape, cfg.compute_dtype)
          for key in jax.random.split(jax.random.key(5)))
  q = jax.random.normal(jax.random.key(6), (batch, 1, cfg.num_heads, cfg.head_dim),
                        cfg.compute_dtype)
  positions = jnp.full((batch, 1), context - 1, jnp.int32)
  attend = jax.jit(functools.partial(attn_lib.xla_cache_attention, block_size=_DECODE_BLOCK.value))
  reduce = jax.jit(lambda k, v: jnp.sum(k, axis=2) + jnp.sum(v, axis=2))
  calls = {"attention": lambda: attend(q, positions, k, v), "reduction": lambda: reduce(k, v)}
  step_s: dict[str, list[float]] = {name: [] for name in calls}
  for call in calls.values():
    jax.block_until_ready(call())  # Compiles.
  for _ in range(reps):
    for name, call in calls.items():
      start = time.perf_counter()
      jax.block_until_ready(call())
      step_s[name].append(time.perf_counter() - start)
  row = {"batch": batch, "context": context, "bytes": 2 * k.nbytes}
  for name, times in step_s.items():
    row[f"{name}_s"] = float(np.median(times))
    row[f"{name}_gb_per_s"] = row["bytes"] / row[f"{name}_s"] / 1e9
  row["fraction"] = row["reduction_s"] / row["attention_s"]
  print(f"cache read at {context}, batch {batch:3d}: attention {row['attention_gb_per_s']:6.2f} "
        f"GB/s, plain reduction {row['reduction_gb_per_s']:6.2f} GB/s: "
        f"{100 * row['fraction']:.0f}%", flush=True)
  return row


def equal_memory_bound(cfgs, max_len: int, budget_bytes: int, max_batch: int,
                       label: str) -> Optional[dict[str, Any]]:
  """The memory-traffic bound of yocou / transformer decode tokens/s at equal cache memory.

  A decode step bound by memory traffic reads the weights once, whatever its batch, and each
  sequence's cache (``accounting.decode_weight_read_bytes`` / ``decode_cache_read_bytes``:
  yocou's global K/V once per cross layer). At its equal-memory batch B an arch makes B tokens
  per ``weights + B x cache read`` bytes; the ratio of the two archs' tokens per byte is the
  decode ratio when both stream memory at the same rate. Without the weights (B -> infinity)
  it is the ratio of cache bytes read per token. ``cfgs`` maps arch -> ModelConfig.
  """
  from yocou_jax import accounting  # pylint: disable=g-import-not-at-top

  if not {"transformer", "yocou"} <= set(cfgs):
    return None
  archs = {}
  for arch in ("transformer", "yocou"):
    cfg = cfgs[arch]
    batch = fitting_batch(cfg, max_len, budget_bytes, max_batch)
    weights = accounting.decode_weight_read_bytes(cfg)
    cache = accounting.decode_cache_read_bytes(cfg, max_len)
    archs[arch] = {"batch": batch, "weight_bytes": weights, "cache_read_bytes_per_sequence": cache,
                   "step_bytes": weights + batch * cache,
                   "tokens_per_gb": 1e9 * batch / (weights + batch * cache)}
  t, y = archs["transformer"], archs["yocou"]
  bound = {"label": label, "max_len": max_len, "budget_bytes": budget_bytes, "archs": archs,
           "cache_only": t["cache_read_bytes_per_sequence"] / y["cache_read_bytes_per_sequence"],
           "with_weights": y["tokens_per_gb"] / t["tokens_per_gb"] if t["batch"] else None}
  lines = [f"{label}: memory-traffic bound at {max_len} tokens, cache budget "
           f"{budget_bytes / 2**30:.2f} GiB"]
  for arch, a in archs.items():
    lines.append(f"  {arch:12s} batch {a['batch']:5d}: weights {a['weight_bytes'] / 2**20:8.1f} "
                 f"MiB + batch x cache read {a['cache_read_bytes_per_sequence'] / 2**20:8.1f} MiB "
                 f"= {a['step_bytes'] / 2**30:7.2f} GiB a step, {a['tokens_per_gb']:.3f} "
                 "tokens per GB")
  with_weights = "-" if bound["with_weights"] is None else f"{bound['with_weights']:.2f}"
  lines.append(f"  yocou / transformer tokens/s: {with_weights} with the weights, "
               f"{bound['cache_only']:.2f} from the cache reads alone (the limit of large batches)")
  print("\n".join(lines))
  return bound


def measured_traffic(bound: Optional[dict[str, Any]], measured: dict[str, dict[str, Any]]) -> None:
  """Adds each arch's attained GB/s (its step bytes over its median step) to ``bound`` and
  prints how the measured ratio departs from the bound. ``measured[arch]`` has batch and
  decode_tokens_per_s at the bound's max_len and budget."""
  if bound is None or not {"transformer", "yocou"} <= set(measured):
    return
  rates = {}
  for arch, a in bound["archs"].items():
    m = measured[arch]
    if m["batch"] != a["batch"]:
      return
    rates[arch] = a["attained_gb_per_s"] = a["step_bytes"] * m["decode_tokens_per_s"] / (
        m["batch"] * 1e9)
  ratio = measured["yocou"]["decode_tokens_per_s"] / measured["transformer"]["decode_tokens_per_s"]
  bound["measured"] = ratio
  print(f"  measured {ratio:.2f}: the steps streamed {rates['transformer']:.1f} GB/s "
        f"(transformer, batch {measured['transformer']['batch']}) and {rates['yocou']:.1f} GB/s "
        f"(yocou, batch {measured['yocou']['batch']}); bound x {rates['yocou']:.1f} / "
        f"{rates['transformer']:.1f} = {bound['with_weights'] * rates['yocou'] / rates['transformer']:.2f}")


def paper_scale_bounds(contexts) -> list[dict[str, Any]]:
  """:func:`equal_memory_bound` for the paper's 1.3B shapes (``experiments/configs/
  yocou_1p3b.py``) on a ``--bound_device_gib`` accelerator: the caches get what the stored
  transformer weights leave, batches uncapped."""
  import jax  # pylint: disable=g-import-not-at-top

  from experiments.configs import yocou_1p3b  # pylint: disable=g-import-not-at-top
  from yocou_jax import accounting  # pylint: disable=g-import-not-at-top
  from yocou_jax.config import ModelConfig  # pylint: disable=g-import-not-at-top

  base = ModelConfig.from_config(yocou_1p3b.get_config().model)
  cfgs = {arch: base.replace(arch=arch) for arch in ("transformer", "yocou")}
  weights = max(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(
      accounting.abstract_params(c))) for c in cfgs.values())  # Stored, not read, bytes.
  budget = int(_BOUND_DEVICE.value * 2**30) - weights
  return [equal_memory_bound(cfgs, context + _PAPER_NEW.value, budget, 2**31,
                             f"1.3B ({base.dtype} caches) on {_BOUND_DEVICE.value:g} GiB")
          for context in contexts]


def serving_targets(equal_memory: dict[str, dict[str, Any]],
                    read_rows: list[dict[str, Any]]) -> list[tuple[str, float, str, bool]]:
  """The batched-decode targets: ``equal_memory[arch]`` has context, batch,
  decode_tokens_per_s (at that batch) and per_sequence_step_ratio; ``read_rows`` come from
  :func:`cache_read_rate`."""
  out = []
  if {"transformer", "yocou"} <= set(equal_memory):
    y, t = equal_memory["yocou"], equal_memory["transformer"]
    ratio = y["decode_tokens_per_s"] / t["decode_tokens_per_s"]
    out.append((f"yocou / transformer decode tokens/s at equal cache memory at {y['context']} "
                f"(batches {y['batch']} / {t['batch']})", ratio, ">= 2", ratio >= 2.0))
  if "yocou" in equal_memory:
    y = equal_memory["yocou"]
    out.append((f"yocou per-sequence decode step, batch {y['batch']} / batch 1, at "
                f"{y['context']}", y["per_sequence_step_ratio"], "<= 1",
                y["per_sequence_step_ratio"] <= 1.0))
  for r in read_rows:
    out.append((f"XLA cache attention / streaming read at {r['context']}, batch {r['batch']}",
                r["fraction"], ">= 0.5", r["fraction"] >= 0.5))
  return out


def paper_archs() -> list[str]:
  """--archs when given, else every arch of the config."""
  from yocou_jax.config import ARCHS  # pylint: disable=g-import-not-at-top

  return _ARCHS.value if _ARCHS.present else list(ARCHS)


def paper_protocol(opts) -> list[dict[str, Any]]:
  """The serving protocol: per context and arch, a batch-1 prefill, then decode at the paper's
  batch and at the largest batch whose cache fits ``--cache_budget_mib`` (and batch 1),
  interleaved, from random caches at the context's position.

  The cache holds context + ``--paper_new_tokens`` tokens per sequence; a few of those steps
  are timed (``--decode_steps``), and the batch's time for all its new tokens is that many
  median steps. An arch whose ``--paper_batch`` caches exceed ``--paper_memory_gib`` decodes
  the largest batch that fits instead (its row says which).
  """
  import numpy as np  # pylint: disable=g-import-not-at-top

  from yocou_jax import accounting  # pylint: disable=g-import-not-at-top
  from yocou_jax.inference import engine as engine_lib  # pylint: disable=g-import-not-at-top

  archs = paper_archs()
  budget, cap = _BUDGET.value * 2**20, int(_PAPER_MEMORY.value * 2**30)
  rows = []
  for context in (int(c) for c in _PAPER_CONTEXTS.value):
    max_len = context + _PAPER_NEW.value
    for arch in archs:
      cfg = model_config(arch)
      engine, params = engine_lib.Engine(cfg, opts), random_params(cfg)
      per_sequence = accounting.kv_cache_bytes(cfg, max_len)
      batch = fitting_batch(cfg, max_len, cap, _PAPER_BATCH.value)
      row = {"arch": arch, "context": context, "batch": batch, "max_len": max_len,
             "new_tokens": _PAPER_NEW.value, "cache_bytes_per_sequence": per_sequence,
             "prefill_s": None, "prefill_batch": 1,
             "batch_equal_memory": fitting_batch(cfg, max_len, budget, _BUDGET_MAX_BATCH.value),
             "budget_bytes": budget}
      rows.append(row)
      if batch == 0:
        print(f"{arch:12s} {context:7d}: one sequence's cache ({per_sequence / 2**30:.1f} GiB) "
              f"exceeds --paper_memory_gib={_PAPER_MEMORY.value}", flush=True)
        continue
      if context <= _PAPER_PREFILL_MAX.value:
        warm_up(engine, params, max_len)
        row["prefill_s"], _, _ = prefill(engine, params, context, max_len)
      fits = decode_fitting_batches(
          engine, params, cfg, context, max_len,
          {"paper": (cap, _PAPER_BATCH.value), "equal": (budget, _BUDGET_MAX_BATCH.value)},
          _DECODE_STEPS.value)
      paper, equal = fits["paper"], fits["equal"]
      row.update(decode_step_s=paper["decode_step_s"],
                 decode_tokens_per_s=paper["decode_tokens_per_s"],
                 decode_s_new_tokens=_PAPER_NEW.value * float(np.median(paper["decode_step_s"])),
                 cache_bytes=paper["cache_bytes"],
                 batch1_decode_step_s=paper["batch1_decode_step_s"])
      if equal["batch"]:
        row.update(decode_step_s_equal_memory=equal["decode_step_s"],
                   decode_tokens_per_s_equal_memory=equal["decode_tokens_per_s"],
                   cache_bytes_equal_memory=equal["cache_bytes"],
                   per_sequence_step_ratio_equal_memory=equal["per_sequence_step_ratio"])
      prefill_s = "-" if row["prefill_s"] is None else f"{row['prefill_s']:.2f} s"
      print(f"{arch:12s} {context:7d}: prefill {prefill_s}, batch {batch}: decode "
            f"{row['decode_tokens_per_s']:.1f} tokens/s, cache {row['cache_bytes'] / 2**30:.2f} "
            f"GiB; equal memory batch {equal['batch']}: "
            f"{row.get('decode_tokens_per_s_equal_memory', 0):.1f} tokens/s", flush=True)
      del engine, params
  add_ratios(rows)
  return rows


def add_ratios(rows) -> None:
  """Each row's ratios to the transformer row of its context (prefill time, decode tokens/s,
  cache bytes per sequence, equal-memory decode tokens/s), where both were measured."""
  base = {r["context"]: r for r in rows if r["arch"] == "transformer"}
  for r in rows:
    t = base.get(r["context"])
    if t is None:
      continue
    r["cache_ratio_vs_transformer"] = t["cache_bytes_per_sequence"] / r["cache_bytes_per_sequence"]
    if r.get("prefill_s") and t.get("prefill_s"):
      r["prefill_speedup_vs_transformer"] = t["prefill_s"] / r["prefill_s"]
    for key in ("decode_tokens_per_s", "decode_tokens_per_s_equal_memory"):
      if key in r and key in t:
        r[f"{key}_vs_transformer"] = r[key] / t[key]


def paper_table(rows) -> str:
  def fmt(value, spec):
    return format("-", ">" + spec.split(".")[0]) if value is None else format(value, spec)

  lines = [f"{'arch':12s} {'context':>8s} {'batch':>5s} {'prefill s':>10s} {'x':>6s} "
           f"{'decode tok/s':>13s} {'x':>6s} {'cache GiB':>10s} {'x':>6s} {'eq batch':>8s} "
           f"{'eq tok/s':>10s} {'x':>6s}"]
  for r in rows:
    lines.append(
        f"{r['arch']:12s} {r['context']:8d} {r['batch']:5d} {fmt(r['prefill_s'], '10.2f')} "
        f"{fmt(r.get('prefill_speedup_vs_transformer'), '6.2f')} "
        f"{fmt(r.get('decode_tokens_per_s'), '13.1f')} "
        f"{fmt(r.get('decode_tokens_per_s_vs_transformer'), '6.2f')} "
        f"{fmt(r.get('cache_bytes', 0) / 2**30, '10.3f')} "
        f"{fmt(r.get('cache_ratio_vs_transformer'), '6.2f')} {r['batch_equal_memory']:8d} "
        f"{fmt(r.get('decode_tokens_per_s_equal_memory'), '10.1f')} "
        f"{fmt(r.get('decode_tokens_per_s_equal_memory_vs_transformer'), '6.2f')}")
  return "\n".join(lines)


def paper_targets(rows) -> list[tuple[str, float, str, bool]]:
  """Prefill at the largest context where both were timed; the batched-decode targets at the
  largest context (see :func:`serving_targets`)."""
  by = {(r["arch"], r["context"]): r for r in rows if "decode_tokens_per_s" in r}
  out = []
  timed = [c for (a, c), r in by.items() if a == "yocou" and r["prefill_s"]
           and by.get(("transformer", c), {}).get("prefill_s")]
  if timed:
    c = max(timed)
    ratio = by[("transformer", c)]["prefill_s"] / by[("yocou", c)]["prefill_s"]
    out.append((f"transformer / yocou prefill time at {c}", ratio, ">= 5", ratio >= 5.0))
  equal_memory = {}
  for arch in ("transformer", "yocou"):
    mine = [c for (a, c), r in by.items() if a == arch and "decode_tokens_per_s_equal_memory" in r]
    if mine:
      r = by[(arch, max(mine))]
      equal_memory[arch] = {"context": r["context"], "batch": r["batch_equal_memory"],
                            "decode_tokens_per_s": r["decode_tokens_per_s_equal_memory"],
                            "per_sequence_step_ratio": r["per_sequence_step_ratio_equal_memory"]}
  if len({r["context"] for r in equal_memory.values()}) > 1:
    equal_memory.pop("transformer")  # Not the same context: no ratio.
  return out + serving_targets(equal_memory, [])


def budget_table(rows) -> str:
  lines = [f"{'arch':12s} {'context':>8s} {'batch':>6s} {'cache MiB':>10s} {'step ms':>9s} "
           f"{'decode tok/s':>13s} {'per-seq step / batch 1':>23s}"]
  for r in rows:
    if r["batch"]:
      lines.append(f"{r['arch']:12s} {r['context']:8d} {r['batch']:6d} "
                   f"{r['cache_bytes'] / 2**20:10.1f} "
                   f"{1e3 * r['batch'] / r['decode_tokens_per_s']:9.1f} "
                   f"{r['decode_tokens_per_s']:13.1f} {r['per_sequence_step_ratio']:23.2f}")
  return "\n".join(lines)


def long_table(long_rows) -> str:
  lines = [f"{'arch':12s} {'context':>8s} {'step ms':>9s} {'decode tok/s':>13s} "
           f"{'cache MiB':>10s}"]
  for arch, rows in long_rows.items():
    for r in rows:
      lines.append(f"{arch:12s} {r['context']:8d} {1e3 / r['decode_tokens_per_s']:9.1f} "
                   f"{r['decode_tokens_per_s']:13.1f} {r['cache_bytes'] / 2**20:10.1f}")
  by_ctx = {arch: {r["context"]: r for r in rows} for arch, rows in long_rows.items()}
  if {"transformer", "yocou"} <= set(by_ctx):
    for context, y in by_ctx["yocou"].items():
      ratio = y["decode_tokens_per_s"] / by_ctx["transformer"][context]["decode_tokens_per_s"]
      lines.append(f"yocou / transformer decode tokens/s at {context}: {ratio:.2f}")
  return "\n".join(lines)


def table(results) -> str:
  lines = [f"{'arch':12s} {'context':>8s} {'prefill s':>10s} {'prefill tok/s':>14s} "
           f"{'decode tok/s':>13s} {'cache MiB':>10s}"]
  for arch, rows in results.items():
    for r in rows:
      lines.append(f"{arch:12s} {r['context']:8d} {r['prefill_s']:10.2f} "
                   f"{r['prefill_tokens_per_s']:14,.0f} {r['decode_tokens_per_s']:13.1f} "
                   f"{r['cache_bytes'] / 2**20:10.2f}")
  return "\n".join(lines)


def targets(results) -> list[tuple[str, float, str, bool]]:
  """(target, measured value, threshold, met) for the inference claims."""
  if not {"transformer", "yocou"} <= set(results):
    return []
  by_ctx = {arch: {r["context"]: r for r in rows} for arch, rows in results.items()}
  top = max(by_ctx["yocou"])
  y, t = by_ctx["yocou"][top], by_ctx["transformer"][top]
  checks = [("transformer / yocou prefill time", t["prefill_s"] / y["prefill_s"], ">= 5", 5.0),
            ("yocou / transformer decode tokens/s",
             y["decode_tokens_per_s"] / t["decode_tokens_per_s"], ">= 2", 2.0),
            ("transformer / yocou cache bytes", t["cache_bytes"] / y["cache_bytes"], ">= 5", 5.0)]
  out = [(f"{name} at {top}", value, thr, value >= bound) for name, value, thr, bound in checks]
  if top // 4 in by_ctx["yocou"]:
    ratio = y["prefill_s"] / by_ctx["yocou"][top // 4]["prefill_s"]
    out.append((f"yocou prefill time {top} / {top // 4}", ratio, "<= 4.6", ratio <= 4.6))
  return out


def plot(results, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  for arch, rows in results.items():
    ctx = [r["context"] for r in rows]
    axes[0].plot(ctx, [r["prefill_tokens_per_s"] for r in rows], "o-", label=arch)
    axes[1].plot(ctx, [r["decode_tokens_per_s"] for r in rows], "o-", label=arch)
    axes[2].plot(ctx, [r["cache_bytes"] / 2**20 for r in rows], "o-", label=arch)
  for ax, title in zip(axes, ("prefill tokens/s", "decode tokens/s (batch 1)", "KV cache MiB")):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def read_rates(context: int, batches) -> list[dict[str, Any]]:
  """:func:`cache_read_rate` of one full buffer at ``context`` for each batch."""
  cfg = model_config(_ARCHS.value[0])  # Every arch's full buffers have the same shape.
  return [cache_read_rate(cfg, b, context, _DECODE_STEPS.value) for b in dict.fromkeys(batches)]


def print_targets(checks) -> None:
  for name, value, threshold, met in checks:
    print(f"target {name}: {value:.2f} ({threshold}) {'PASS' if met else 'MISS'}")


def write_json(payload, checks) -> None:
  if _JSON_OUT.value:
    from yocou_jax import files  # pylint: disable=g-import-not-at-top

    payload["targets"] = [dict(name=n, value=v, threshold=t, met=m) for n, v, t, m in checks]
    with files.atomic_write(_JSON_OUT.value) as f:
      json.dump(payload, f, indent=2)


def paper_main(start: float) -> None:
  from yocou_jax.inference import engine as engine_lib  # pylint: disable=g-import-not-at-top

  opts = engine_lib.Options(chunk_size=_CHUNK.value, kv_block=_KV_BLOCK.value,
                            decode_kv_block=_DECODE_BLOCK.value, window_block=_WINDOW_BLOCK.value)
  rows = paper_protocol(opts)
  top = max(r["context"] for r in rows)
  equal = [r["batch_equal_memory"] for r in rows if r["arch"] == "yocou" and r["context"] == top]
  reads = read_rates(top, [1, *[b for b in equal if b]])
  print(f"\nserving protocol: decode batch {_PAPER_BATCH.value} (less where the caches exceed "
        f"{_PAPER_MEMORY.value} GiB: see batch), {_PAPER_NEW.value} new tokens per sequence, "
        f"prefill at batch 1; equal memory: largest batch whose cache fits {_BUDGET.value} MiB "
        f"(<= {_BUDGET_MAX_BATCH.value}); x: ratio to the transformer (prefill speed-up, "
        "decode tokens/s, cache bytes saved)\n" + paper_table(rows))
  print()
  bound = equal_memory_bound({a: model_config(a) for a in paper_archs()}, top + _PAPER_NEW.value,
                             _BUDGET.value * 2**20, _BUDGET_MAX_BATCH.value, "bench model")
  measured_traffic(bound, {r["arch"]: {"batch": r["batch_equal_memory"], "decode_tokens_per_s":
                                       r["decode_tokens_per_s_equal_memory"]}
                           for r in rows if r["context"] == top
                           and "decode_tokens_per_s_equal_memory" in r})
  scale = paper_scale_bounds(sorted({top, 262144}))
  checks = paper_targets(rows) + serving_targets({}, reads)
  print_targets(checks)
  print(f"total {time.perf_counter() - start:.0f} s")
  write_json({"protocol": "paper", "rows": rows, "cache_read": reads,
              "equal_memory_read_bound": bound and bound["cache_only"],
              "equal_memory_bound": bound, "equal_memory_bound_1p3b": scale}, checks)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  start = time.perf_counter()
  if _PROTOCOL.value == "paper":
    paper_main(start)
    return
  results, budget_rows, long_rows = run()
  print("\n" + table(results))
  fits = {}
  if long_rows:
    print("\nbatch-1 decode at longer contexts (random caches; no target):\n"
          + long_table(long_rows))
    fits = decode_fit({arch: results[arch] + long_rows[arch] for arch in results})
    print("\ndecode step = fixed + per_token x context (least squares over every context):")
    for arch, f in fits.items():
      print(f"{arch:12s} fixed {1e3 * f['fixed_s']:7.2f} ms, per 1K context tokens "
            f"{1e6 * f['per_token_s']:6.3f} ms")
    if {"transformer", "yocou"} <= set(fits):
      t, y = fits["transformer"], fits["yocou"]
      reads = {arch: full_cache_reads(model_config(arch)) for arch in ("transformer", "yocou")}
      print(f"full-length cache attentions per decoded token: transformer {reads['transformer']},"
            f" yocou {reads['yocou']} (its cross layers, all over the one global cache), so "
            f"yocou / transformer decode tokens/s tends to {reads['transformer'] / reads['yocou']:.0f}"
            f" as the context grows (fitted slopes: {t['per_token_s'] / y['per_token_s']:.2f}), "
            f"from below while transformer's fixed cost ({1e3 * t['fixed_s']:.1f} ms) is less than "
            f"{reads['transformer'] / reads['yocou']:.0f}x yocou's ({1e3 * y['fixed_s']:.1f} ms)")
  if budget_rows:
    print(f"\nequal-memory decode (cache budget {_BUDGET.value} MiB, batch <= "
          f"{_BUDGET_MAX_BATCH.value}):\n" + budget_table(budget_rows))
    by_arch = {r["arch"]: r for r in budget_rows if r["batch"]}
    if {"transformer", "yocou"} <= set(by_arch):
      print("yocou / transformer decode tokens/s at equal cache memory: "
            f"{by_arch['yocou']['decode_tokens_per_s'] / by_arch['transformer']['decode_tokens_per_s']:.2f}")
  top = max(int(c) for c in _CONTEXTS.value)
  read_rows = read_rates(top, [1, *[r["batch"] for r in budget_rows
                                    if r["arch"] == "yocou" and r["batch"]]])
  equal_memory = {r["arch"]: r for r in budget_rows if r["batch"]}
  print()
  bound = equal_memory_bound({a: model_config(a) for a in _ARCHS.value},
                             results[next(iter(results))][-1]["max_len"],
                             _BUDGET.value * 2**20, _BUDGET_MAX_BATCH.value, "bench model")
  measured_traffic(bound, equal_memory)
  scale = paper_scale_bounds(sorted({top, 262144}))
  checks = targets(results) + serving_targets(equal_memory, read_rows)
  print_targets(checks)
  print(f"total {time.perf_counter() - start:.0f} s")
  if _PLOT_OUT.value:
    os.makedirs(os.path.dirname(os.path.abspath(_PLOT_OUT.value)), exist_ok=True)
    plot(results, _PLOT_OUT.value)
    print(f"plot: {_PLOT_OUT.value}")
  write_json({"results": results, "equal_memory_decode": budget_rows,
              "long_context_decode": long_rows, "decode_fit": fits, "cache_read": read_rows,
              "equal_memory_read_bound": bound and bound["cache_only"],
              "equal_memory_bound": bound, "equal_memory_bound_1p3b": scale}, checks)


if __name__ == "__main__":
  app.run(main)
