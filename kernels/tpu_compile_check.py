r"""Ahead-of-time Mosaic compile of the TPU kernels for a TPU topology, on a machine without TPUs.

  pip install "jax[tpu]"   # libtpu (the ``tpu`` extra of setup.cfg); a separate venv is fine
  JAX_PLATFORMS=cpu python -m kernels.tpu_compile_check [--topology=v5e:2x2] [--seq_len=2048]

(``ALLOW_MULTIPLE_LIBTPU_LOAD=1`` when another JAX process on the machine holds
``/tmp/libtpu_lockfile``.)

CPU interpret mode checks what the kernels compute; only Mosaic's own compiler (inside libtpu)
checks that they compile for a TPU core: block shapes and layouts, VMEM use, supported ops.
This compiles, for one device of the topology, the forward and backward of the local-window
and causal (cross) kernels (bfloat16 and float32, with and without segment ids, soft-cap) and
the decode kernel, and prints one line per configuration. Exit status 1 if any failed.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time

import jax
import jax.numpy as jnp
from jax.experimental import topologies
from jax.sharding import SingleDeviceSharding

from kernels import ops


def _configs(n: int):
  """(name, dtype, H, K, D, window, segments, softcap, blocks)."""
  return [
      ("local bf16 gqa4 seg", jnp.bfloat16, 8, 2, 128, 512, True, None, None),
      ("local bf16 gqa1 softcap", jnp.bfloat16, 4, 4, 128, 512, False, 30.0, None),
      ("local f32 d64 blocks 128", jnp.float32, 4, 2, 64, 200, True, None, 128),
      ("cross bf16 gqa4 seg", jnp.bfloat16, 8, 2, 128, None, True, None, None),
      ("cross f32 d256", jnp.float32, 2, 1, 256, None, False, None, 256),
  ], n


def _compile(fn, sharding, *shapes):
  args = [jax.ShapeDtypeStruct(s, dt, sharding=sharding) for s, dt in shapes]
  return jax.jit(fn).lower(*args).compile()


def _training_fn(window, use_segments, softcap, block):
  sizes = {} if block is None else dict(block_q=block, block_kv=block, block_q_bwd=block,
                                        block_kv_bwd=block)

  def fn(q, k, v, do, segment_ids):
    attn = functools.partial(ops.flash_attention, window=window,
                             segment_ids=segment_ids if use_segments else None,
                             softcap=softcap, kernel="tpu", interpret=False, **sizes)
    out, vjp = jax.vjp(attn, q, k, v)
    return out, vjp(do)

  return fn


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--topology", default="v5e:2x2", help="e.g. v5e:2x2, v6e:2x2, v5p:2x2x1")
  parser.add_argument("--seq_len", type=int, default=2048)
  args = parser.parse_args()
  topology = topologies.get_topology_desc(platform="tpu", topology_name=args.topology)
  device = topology.devices[0]
  sharding = SingleDeviceSharding(device)
  print(f"compiling for {device.device_kind} ({args.topology}), N={args.seq_len}")
  failures = 0
  configs, n = _configs(args.seq_len)
  for name, dtype, h, kv_heads, d, window, use_seg, softcap, block in configs:
    shapes = [((1, n, h, d), dtype), ((1, n, kv_heads, d), dtype), ((1, n, kv_heads, d), dtype),
              ((1, n, h, d), dtype), ((1, n), jnp.int32)]
    failures += _report(name, lambda: _compile(  # pylint: disable=cell-var-from-loop
        _training_fn(window, use_seg, softcap, block), sharding, *shapes))
  decode = functools.partial(ops.decode_attention, window=512, kernel="tpu", interpret=False)
  decode_shapes = [((2, 4, 8, 128), jnp.bfloat16), ((2, 8192, 2, 128), jnp.bfloat16),
                   ((2, 8192, 2, 128), jnp.bfloat16), ((2, 4), jnp.int32)]
  failures += _report("decode bf16 T=4 gqa4 S=8K", lambda: _compile(
      lambda q, k, v, p: decode(q, k, v, q_positions_BxT=p), sharding, *decode_shapes))
  bksd = [decode_shapes[0], ((2, 2, 8192, 128), jnp.bfloat16), ((2, 2, 8192, 128), jnp.bfloat16),
          decode_shapes[3]]
  failures += _report("decode bf16 T=4 gqa4 S=8K [B, K, S, D] cache", lambda: _compile(
      lambda q, k, v, p: decode(q, k, v, q_positions_BxT=p, cache_layout="BKSD"), sharding,
      *bksd))
  failures += _report("local bf16 under a (data 2, fsdp 1, tensor 2) mesh, shard_map",
                      lambda: _compile_sharded(topology, n))
  return 1 if failures else 0


def _compile_sharded(topology, n: int):
  """The trainer's setting: jax.set_mesh + logical rules, inputs sharded batch/heads."""
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from yocou_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  devices = topologies.make_mesh(topology, (2, 1, 2), ("data", "fsdp", "tensor")).devices
  mesh = jax.sharding.Mesh(devices, ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
  heads = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
  shapes = [((4, n, 8, 128), heads), ((4, n, 2, 128), heads), ((4, n, 2, 128), heads),
            ((4, n, 8, 128), heads), ((4, n), NamedSharding(mesh, P(("data", "fsdp"), None)))]
  args = [jax.ShapeDtypeStruct(s, jnp.int32 if len(s) == 2 else jnp.bfloat16, sharding=sh)
          for s, sh in shapes]
  with sharding_lib.activate(mesh):
    lowered = jax.jit(_training_fn(512, True, None, None)).lower(*args)
  if "shard_map" not in lowered.as_text() and "manual" not in lowered.as_text():
    raise AssertionError("the kernels did not run inside shard_map")
  return lowered.compile()


def _report(name: str, compile_fn) -> int:
  start = time.perf_counter()
  try:
    compile_fn()
  except Exception as e:  # pylint: disable=broad-except
    print(f"FAIL {name}: {type(e).__name__}: {str(e)[:2000]}")
    return 1
  print(f"ok   {name} ({time.perf_counter() - start:.1f} s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
