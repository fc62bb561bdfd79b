"""Ahead-of-time compilation for TPU pod slices on a machine without TPUs.

With libtpu installed (``pip install "jax[tpu]"``) and ``JAX_PLATFORMS=cpu``,
``jax.experimental.topologies`` describes any TPU slice (``v5p:4x4x4``: 64 chips) without the
hardware. This module builds the trainer's own jitted train step (``step.jit_train_step`` under
the same ``jax.set_mesh`` and logical-axis-rules contexts, the config's remat policy) and the
inference prefill/decode steps over abstract inputs carrying ``NamedSharding``s on that slice's
mesh, compiles them without allocating anything, and reports:

* per-device bytes: parameters, optimizer state and inputs (from the argument shardings), the
  compiler's arguments, outputs, donated (aliased) bytes, temporaries (activations, gradients,
  collectives' buffers) and generated code; ``total = arguments + outputs - aliased +
  temporaries + code``, against the chip's HBM (:data:`HBM_BYTES`);
* FLOPs: XLA's ``cost_analysis`` per device times the devices, against ``yocou_jax.accounting``.
  XLA counts a while loop's body once, not per trip (the layer and loop ``nn.scan``s, gradient
  accumulation, the inference cache attention's ``fori_loop``), so the raw figure is compared
  with the analytic count *on the same basis* (every scanned part divided by its trip count,
  rematerialised layers' forward counted twice); the ratio of those two checks the compiled
  program, and ``ratio x analytic`` is the scan-corrected estimate of the compiled FLOPs;
* the sharding of the largest state tensors.

Set ``ALLOW_MULTIPLE_LIBTPU_LOAD`` (done here) so that several such processes can run at once:
no process touches a TPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import re
import time
from typing import Any, Callable, Mapping, Optional
from unittest import mock

import jax
import jax.numpy as jnp
from jax.experimental import mesh_utils
from jax.experimental import topologies
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from yocou_jax import accounting
from yocou_jax import loss as loss_lib
from yocou_jax import sharding as sharding_lib
from yocou_jax.config import ConfigError, ModelConfig
from yocou_jax.inference import cache as cache_lib
from yocou_jax.inference import engine as engine_lib
from yocou_jax.model import Model
from yocou_jax.train import optimizer as optimizer_lib
from yocou_jax.train import step as step_lib

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # AOT only: no process owns a TPU.
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

GiB = 2 ** 30
# HBM per chip (one JAX device per chip: v4 and v5p run their two TensorCores as one megacore).
HBM_BYTES = {"v4": 32 * GiB, "v5e": 16 * GiB, "v5p": 95 * GiB, "v6e": 32 * GiB}
MODES = ("train", "prefill", "decode")


# --- topology and mesh ------------------------------------------------------------------------

def generation(topology: str) -> str:
  """'v5p:4x4x4' -> 'v5p' (a key of HBM_BYTES); a one-line ConfigError otherwise."""
  gen = topology.split(":")[0].lower()
  if gen not in HBM_BYTES or ":" not in topology:
    raise ConfigError(f"--topology={topology!r} is invalid: expected GEN:AxB[xC] with GEN one "
                      f"of {sorted(HBM_BYTES)}, e.g. v5p:4x4x4")
  return gen


def parse_mesh(spec: Optional[str]) -> Optional[dict[str, int]]:
  """'data:-1,fsdp:16,tensor:1' -> {'data': -1, 'fsdp': 16, 'tensor': 1} (missing axes: 1)."""
  if not spec:
    return None
  sizes = {axis: 1 for axis in sharding_lib.MESH_AXES}
  for item in spec.split(","):
    axis, _, size = item.partition(":")
    if axis not in sizes or not re.fullmatch(r"-?\d+", size):
      raise ConfigError(f"--mesh item {item!r} is invalid: expected AXIS:SIZE with AXIS one of "
                        f"{sharding_lib.MESH_AXES}")
    sizes[axis] = int(size)
  return sizes


def topology_mesh(topology: str, sizes: Mapping[str, int]) -> Mesh:
  """The (data, fsdp, tensor) mesh over the chips of ``topology`` (no TPU needed)."""
  generation(topology)
  dims = [int(d) for d in topology.split(":")[1].split("x")]
  kwargs = {}
  if math.prod(dims) < 4:  # Smaller than one host (2x2x1 chips): the slice is its own host.
    kwargs["chips_per_host_bounds"] = tuple(dims + [1] * (3 - len(dims)))
  desc = topologies.get_topology_desc(platform="tpu", topology_name=topology, **kwargs)
  # v4 topologies list both TensorCores of a chip; JAX on a v4 runs one megacore device per chip.
  devices = [d for d in desc.devices if getattr(d, "core_on_chip", 0) == 0]
  shape = sharding_lib.resolve_mesh_shape(sizes, len(devices))
  grid = mesh_utils.create_device_mesh(shape, devices=devices)
  return Mesh(grid, sharding_lib.MESH_AXES,
              axis_types=(AxisType.Auto,) * len(sharding_lib.MESH_AXES))


@contextlib.contextmanager
def target_kernels(platform: str):
  """Resolve ``attention_impl=auto`` and the Pallas kernels as on ``platform``, not this host.

  ``kernels.ops`` picks kernels by ``jax.default_backend()``, which is 'cpu' here; on a TPU the
  trainer runs the compiled Mosaic kernels (``auto`` -> ``pallas``, not interpreted).
  """
  if platform != "tpu":
    yield
    return
  from kernels import ops  # pylint: disable=g-import-not-at-top
  resolve = lambda impl: "pallas" if impl == "auto" else impl  # pylint: disable=unnecessary-lambda-assignment
  with mock.patch.object(ops, "default_kernel", lambda: ("tpu", False)), \
       mock.patch.object(ops, "resolve_impl", resolve):
    yield


# --- reports ----------------------------------------------------------------------------------

@dataclasses.dataclass
class Report:
  """One compiled step on one slice: JSON-ready via ``dataclasses.asdict``."""

  mode: str
  arch: str
  topology: str
  mesh: dict[str, int]
  num_devices: int
  hbm_bytes: int
  bytes: dict[str, int]  # Per device.
  fits: bool
  flops: dict[str, float]
  largest_tensors: list[dict[str, Any]]
  compile_seconds: float
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)
  error: Optional[str] = None

  def verdict(self) -> str:
    """'fits' or 'does NOT fit: ... over by X GiB; dominated by ...' (one line)."""
    if self.fits:
      return f"fits ({self.bytes['total'] / self.hbm_bytes:.0%} of HBM)"
    over = (self.bytes["total"] - self.hbm_bytes) / GiB
    parts = {k: v for k, v in self.bytes.items() if k in _CATEGORIES}
    top = max(parts, key=parts.get)
    return (f"does NOT fit: {self.mode} needs {self.bytes['total'] / GiB:.2f} GiB per device, "
            f"{over:.2f} GiB over the {self.hbm_bytes / GiB:.0f} GiB HBM of "
            f"{self.topology.split(':')[0]}; dominated by {top} ({parts[top] / GiB:.2f} GiB)")


# The categories of a per-device memory breakdown that add up to (about) the total.
_CATEGORIES = ("parameters", "optimizer_state", "kv_cache", "inputs", "temporaries",
               "outputs_not_aliased", "generated_code")


def _shard_bytes(tree: Any) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape)
    total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
  return total


def _with_shardings(abstract: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def largest_tensors(tree: Any, count: int = 6) -> list[dict[str, Any]]:
  """The ``count`` largest leaves: name, global shape, dtype, PartitionSpec, bytes per device."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  rows = []
  for path, leaf in flat:
    rows.append({"name": jax.tree_util.keystr(path), "shape": list(leaf.shape),
                 "dtype": str(jnp.dtype(leaf.dtype)), "spec": str(leaf.sharding.spec),
                 "global_bytes": math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize,
                 "bytes_per_device": _shard_bytes(leaf)})
  return sorted(rows, key=lambda r: -r["global_bytes"])[:count]


def _memory(compiled) -> dict[str, int]:
  stats = compiled.memory_analysis()
  code = stats.generated_code_size_in_bytes
  memory = {"arguments": stats.argument_size_in_bytes, "outputs": stats.output_size_in_bytes,
            "aliased": stats.alias_size_in_bytes, "temporaries": stats.temp_size_in_bytes,
            "generated_code": code}
  memory["outputs_not_aliased"] = memory["outputs"] - memory["aliased"]
  memory["total"] = (memory["arguments"] + memory["outputs_not_aliased"] + memory["temporaries"]
                     + code)
  # Pinned host memory (remat="offload": the layer inputs kept for the backward pass); not HBM,
  # so not in the total.
  memory["host_temporaries"] = stats.host_temp_size_in_bytes
  return memory


_OOM = re.compile(r"(?:Ran out of memory|RESOURCE_EXHAUSTED)", re.IGNORECASE)
_SIZE = re.compile(r"([\d.]+)([KMG])\b")


def _oom_bytes(message: str, known: int) -> Optional[int]:
  """The HBM a step needs per device from a TPU compiler out-of-memory error, if it says.

  Either its 'Used 120.5G of 95.7G hbm' figure, or its 'required for HLO temporaries (116.15G)'
  plus ``known`` (the bytes of the arguments it does not count).
  """
  scale = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}
  used = re.search(r"Used ([\d.]+)([KMG]) of ([\d.]+)([KMG]) hbm", message)
  if used:
    return int(float(used.group(1)) * scale[used.group(2)])
  temporaries = re.search(r"required for HLO temporaries \(([\d.]+)([KMG])\)", message)
  if temporaries:
    return int(float(temporaries.group(1)) * scale[temporaries.group(2)]) + known
  return None


def _compile(fn: Callable[[], Any]):
  """(compiled or None, seconds, error message or None); only out-of-memory errors are caught."""
  start = time.perf_counter()
  try:
    compiled = fn()
  except Exception as e:  # pylint: disable=broad-except
    if not _OOM.search(str(e)):
      raise
    return None, time.perf_counter() - start, str(e)
  return compiled, time.perf_counter() - start, None


def _xla_flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get("flops", 0.0))


def _report(mode: str, cfg: ModelConfig, topology: str, mesh: Mesh, compiled, seconds: float,
            error: Optional[str], known: dict[str, int], flops: dict[str, float],
            tensors: list, extra: dict[str, Any]) -> Report:
  """Assembles a Report from a compiled step (or a compiler out-of-memory error)."""
  hbm = HBM_BYTES[generation(topology)]
  num_devices = mesh.devices.size
  if compiled is None:
    total = _oom_bytes(error or "", sum(known.values())) or hbm + 1
    memory = {**known, "temporaries": max(total - sum(known.values()), 0), "total": total}
  else:
    memory = _memory(compiled)
    memory.update(known)
    # Arguments beyond the known state (the batch); TPU layouts pad small arrays, so clamp.
    memory["inputs"] = max(memory["arguments"] - sum(known.values()), 0)
    raw = _xla_flops(compiled) * num_devices
    flops = {**flops, "xla_raw": raw}
    if flops.get("analytic_loops_once"):
      flops["xla_over_analytic_loops_once"] = raw / flops["analytic_loops_once"]
      flops["xla_scan_corrected"] = flops["xla_over_analytic_loops_once"] * flops["analytic"]
  return Report(mode=mode, arch=cfg.arch, topology=topology, mesh=dict(mesh.shape),
                num_devices=num_devices, hbm_bytes=hbm, bytes=memory,
                fits=compiled is not None and memory["total"] <= hbm, flops=flops,
                largest_tensors=tensors, compile_seconds=seconds,
                extra=extra, error=error.splitlines()[0][:500] if error else None)


# --- analytic FLOPs on XLA's counting basis ---------------------------------------------------

def _trip_count(cfg: ModelConfig, part: accounting.Part) -> int:
  """How many times XLA's cost analysis under-counts a part: its scan trip counts."""
  if not part.attention_layers and part.attention != accounting.GLOBAL_KV:
    return 1  # Embedding, head, final norm: not scanned.
  # Each scan loops unless it is unrolled. ParScale's streams are batch rows, not a loop.
  iterations = 1 if cfg.unroll_loops or cfg.arch == "parscale" else part.applications
  if part.attention == accounting.GLOBAL_KV:
    return iterations  # Looped only by the upper loop without shared KV.
  return (1 if cfg.unroll_layers else part.attention_layers) * iterations


def train_flops(cfg: ModelConfig, seq_len: int, batch_size: int, microbatches: int,
                attention_visible: bool = True) -> dict[str, float]:
  """{'analytic': 3 x forward, 'analytic_loops_once': the same counted as XLA counts loops}.

  On XLA's basis a scanned part counts one layer application, rematerialised layers count their
  forward twice under ``remat=full`` (4x forward instead of 3x), the fused loss's output
  projection one chunk of positions, 4x (its backward recomputes the logits), gradient
  accumulation one microbatch, and Pallas attention nothing (``attention_visible=False``: a Mosaic custom call
  has no FLOPs in XLA's cost analysis).
  """
  tokens = seq_len * batch_size
  per_token = accounting.flops_per_token(cfg, seq_len)["by_part"]
  once = 0.0
  for part in accounting.model_parts(cfg):
    forward = per_token.get(part.name, 0.0)
    if not attention_visible:
      forward = 2.0 * part.active_matmul_params * part.applications
    trips = _trip_count(cfg, part)
    factor = 4.0 if (trips > 1 and cfg.remat in ("full", "offload")) else 3.0
    is_head = part.name == "lm_head" or (part.name == "embedding" and cfg.tie_embeddings)
    if is_head and cfg.loss_chunk_size >= 0:
      # The fused loss: a scan over chunks of positions whose backward recomputes the logits.
      chunk = min(cfg.loss_chunk_size or loss_lib.ACCELERATOR_CHUNK_SIZE, seq_len)
      factor, trips = 4.0, -(-seq_len // chunk)
    once += factor * forward / trips
  return {"analytic": accounting.train_flops_per_step(cfg, seq_len, batch_size),
          "analytic_loops_once": once * tokens / microbatches}


# --- the train step ---------------------------------------------------------------------------

def compile_train(config: Any, topology: str, mesh: Mesh) -> Report:
  """Compiles the trainer's jitted train step for ``mesh`` (abstract inputs, nothing allocated)."""
  cfg = ModelConfig.from_config(config.model)
  t, seq_len = config.train, config.data.seq_len
  data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
  if (t.batch_size // t.microbatches) % data_parallel or t.batch_size % t.microbatches:
    raise ConfigError(f"config.train.batch_size={t.batch_size} (microbatches {t.microbatches}) "
                      f"is not divisible by data x fsdp = {data_parallel}")
  model, rules = Model(cfg), sharding_lib.LOGICAL_AXIS_RULES
  tx, schedule = optimizer_lib.make_optimizer(t), optimizer_lib.learning_rate_schedule(t)
  abstract, shardings = step_lib.state_shardings(model, tx, mesh, seq_len, rules)
  state = _with_shardings(abstract, shardings)
  batch_spec = jax.ShapeDtypeStruct((t.batch_size, seq_len), jnp.int32,
                                    sharding=sharding_lib.batch_sharding(mesh))
  batch = {k: batch_spec for k in ("tokens", "segment_ids", "positions")}

  def lower_and_compile():
    with sharding_lib.activate(mesh, rules), target_kernels("tpu"):
      step = step_lib.jit_train_step(model, tx, schedule, mesh, shardings,
                                     microbatches=t.microbatches, z_loss=t.z_loss)
      return step.lower(state, batch).compile()

  compiled, seconds, error = _compile(lower_and_compile)
  known = {"parameters": _shard_bytes(state.params),
           "optimizer_state": _shard_bytes(state.opt_state) + _shard_bytes(state.step)}
  # auto -> pallas on TPU, except ParScale's prefix attention (always XLA).
  pallas = cfg.attention_impl in ("pallas", "auto") and not cfg.stream_prefix_length
  flops = train_flops(cfg, seq_len, t.batch_size, t.microbatches, attention_visible=not pallas)
  extra = {"params": accounting.param_counts(cfg)["total"], "seq_len": seq_len,
           "batch_size": t.batch_size, "microbatches": t.microbatches, "remat": cfg.remat,
           "attention_impl": cfg.attention_impl}
  return _report("train", cfg, topology, mesh, compiled, seconds, error, known, flops,
                 largest_tensors(state), extra)


# --- inference --------------------------------------------------------------------------------

def _inference_cfg(cfg: ModelConfig) -> ModelConfig:
  # The cached attention has an XLA implementation only (kernels register others by name).
  return cfg.replace(attention_impl="xla", remat="none")


def compile_inference(config: Any, topology: str, mesh: Mesh, mode: str, batch: int,
                      context: int, opts: engine_lib.Options = engine_lib.Options()) -> Report:
  """Compiles the engine's prefill chunk (the last one) or decode step at ``context`` tokens.

  Parameters are the trainer's (float32, sharded by the same rules); the cache is ``batch`` x
  ``context`` tokens, sharded by its logical names. The compiled cache bytes (arguments minus
  parameters and token inputs) are checked against ``accounting.kv_cache_bytes``.
  """
  if mode not in ("prefill", "decode"):
    raise ValueError(f"mode={mode!r}")
  cfg = _inference_cfg(ModelConfig.from_config(config.model))
  model, rules = Model(cfg), sharding_lib.LOGICAL_AXIS_RULES
  tx = optimizer_lib.make_optimizer(config.train)
  abstract, shardings = step_lib.state_shardings(model, tx, mesh, 1, rules)
  params = _with_shardings(abstract.params, shardings.params)
  data = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
  replicated = NamedSharding(mesh, PartitionSpec())
  abstract_state = jax.eval_shape(functools.partial(engine_lib.init_state, cfg, batch, context))
  state = _with_shardings(abstract_state, engine_lib.DecodeState(
      cache=cache_lib.shardings(abstract_state.cache, mesh, rules), lengths=replicated))
  sharded_rows = batch % (mesh.shape["data"] * mesh.shape["fsdp"]) == 0
  rows = data if sharded_rows else replicated
  chunk = min(opts.chunk_size, context)

  if mode == "decode":
    fn = lambda p, s, tok: engine_lib.decode_step(p, s, tok, cfg=cfg, opts=opts)  # pylint: disable=unnecessary-lambda-assignment
    args = (params, state, jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=rows))
    donate = (1,)
  else:
    fn = lambda p, s, x, tok, n: engine_lib.prefill_chunk(p, s, x, tok, n, cfg=cfg, opts=opts)  # pylint: disable=unnecessary-lambda-assignment
    args = (params, state,
            jax.ShapeDtypeStruct((cfg.streams * batch, cfg.d_model), cfg.compute_dtype,
                                 sharding=rows),
            jax.ShapeDtypeStruct((batch, chunk), jnp.int32,
                                 sharding=data if sharded_rows else replicated),
            jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=rows))
    donate = (1, 2)

  def lower_and_compile():
    with sharding_lib.activate(mesh, rules):
      return jax.jit(fn, donate_argnums=donate).lower(*args).compile()

  compiled, seconds, error = _compile(lower_and_compile)
  planned = accounting.kv_cache_bytes(cfg, context, batch)
  cache_per_device = _shard_bytes(state.cache)
  known = {"parameters": _shard_bytes(params), "kv_cache": cache_per_device}
  if mode == "decode":
    analytic = batch * accounting.decode_flops_per_token(cfg, context)
  else:  # The last chunk: chunk tokens at the end of a context-token prompt.
    analytic = batch * (accounting.prefill_flops(cfg, context)
                        - accounting.prefill_flops(cfg, context - chunk)) if context > chunk \
        else batch * accounting.prefill_flops(cfg, context)
  extra = {"batch": batch, "context": context, "chunk": chunk if mode == "prefill" else 1,
           "kv_cache_planned_bytes": planned, "kv_cache_copies": _cache_copies(state.cache)}
  report = _report(mode, cfg, topology, mesh, compiled, seconds, error, known,
                   {"analytic": analytic}, largest_tensors(state.cache, 3)
                   + largest_tensors(params, 3), extra)
  if compiled is not None:  # The cache arguments of the compiled program's signature.
    cache_args = compiled.args_info[0][1].cache
    extra["kv_cache_compiled_bytes"] = sum(
        math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(cache_args))
  return report


def _cache_copies(cache: Any) -> int:
  """Distinct shards of the cache (devices / replication): per-device bytes x this = global."""
  leaf = jax.tree.leaves(cache)[0]
  return math.prod(leaf.shape) // math.prod(leaf.sharding.shard_shape(leaf.shape))


# --- text -------------------------------------------------------------------------------------

def _gib(n: float) -> str:
  return f"{n / GiB:.2f} GiB"


def format_report(report: Report) -> str:
  """A few aligned lines: memory by category, verdict, FLOPs, largest tensors."""
  lines = [f"== {report.mode} {report.arch} on {report.topology} ({report.num_devices} chips), "
           f"mesh {report.mesh}; compile {report.compile_seconds:.1f} s"]
  for key in ("parameters", "optimizer_state", "kv_cache", "inputs", "arguments", "temporaries",
              "outputs_not_aliased", "generated_code", "total", "host_temporaries"):
    if key in report.bytes and (key != "host_temporaries" or report.bytes[key]):
      lines.append(f"  {key:<22}{_gib(report.bytes[key]):>14} per device")
  lines.append(f"  HBM {report.topology.split(':')[0]:<18}{_gib(report.hbm_bytes):>14}: "
               f"{report.verdict()}")
  f = report.flops
  if "xla_raw" in f:
    lines.append(f"  FLOPs analytic {f['analytic']:.4g}; XLA raw (loop bodies once) "
                 f"{f['xla_raw']:.4g}" + (
                     f"; analytic on XLA's basis {f['analytic_loops_once']:.4g} (XLA/that = "
                     f"{f['xla_over_analytic_loops_once']:.3f}); scan-corrected XLA "
                     f"{f['xla_scan_corrected']:.4g}" if "analytic_loops_once" in f else ""))
  if "kv_cache_compiled_bytes" in report.extra:
    e = report.extra
    lines.append(f"  KV cache planned {_gib(e['kv_cache_planned_bytes'])}, compiled "
                 f"{_gib(e['kv_cache_compiled_bytes'])} (batch {e['batch']}, context "
                 f"{e['context']})")
  for row in report.largest_tensors:
    lines.append(f"  {row['name']:<60} {str(row['shape']):<22} {row['spec']:<36} "
                 f"{_gib(row['bytes_per_device'])}/device")
  return "\n".join(lines)
