"""Local-window and cross (causal) attention kernels: forward and gradients against references.

Both kernel families run on CPU in Pallas interpret mode: the TPU (Mosaic) kernels of
``kernels/local_attention.py`` and the GPU (Triton) kernels of ``kernels/gpu.py``. Each case is
checked, output and (dq, dk, dv), against

* the float64 NumPy reference with closed-form gradients (``reference64``), and
* the XLA path the model uses without kernels (``yocou_jax.attention``; the pure-JAX
  ``kernels.reference`` where a soft-cap is involved), differentiated by JAX,

with tolerances by dtype (``TOLERANCE``, relative to the largest reference magnitude):
float32 2e-5, bfloat16 2e-2 (bfloat16 inputs, outputs and gradients carry 8-bit mantissas).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from kernels import blocks
from kernels import ops
from kernels import reference
from tests.kernels import reference64
from tests.kernels.common import assert_close, random_inputs, run_fast
from yocou_jax import attention


def value_and_grads(attn_fn, q, k, v, do):
  out, vjp = jax.vjp(attn_fn, q, k, v)
  return (out, *vjp(do))


def xla_attention(q, k, v, *, window, segment_ids, softcap):
  if softcap is not None:
    return reference.attention_reference(q, k, v, window=window, segment_ids=segment_ids,
                                         softcap=softcap)
  return attention.self_attention(q, k, v, window=window, segment_ids=segment_ids, impl="xla",
                                  block_size=16)


# (kernel, N, H, K, D, window, (fwd q, fwd kv, bwd q, bwd kv) blocks, segments, softcap, dtype)
CASES = {
    "tpu-window<block-gqa2-segments": ("tpu", 40, 4, 2, 16, 5, (16, 16, 16, 16), True, None,
                                       jnp.float32),
    "tpu-window=block-gqa4-bf16": ("tpu", 64, 4, 1, 32, 16, (16, 16, 16, 16), False, None,
                                   jnp.bfloat16),
    "tpu-window>seq-gqa1-softcap-ragged": ("tpu", 37, 2, 2, 16, 100, (16, 32, 32, 16), True, 5.0,
                                           jnp.float32),
    "tpu-cross-causal-gqa2-bf16": ("tpu", 50, 4, 2, 16, None, (32, 16, 16, 32), True, None,
                                   jnp.bfloat16),
    "triton-window<block-gqa2-segments": ("triton", 40, 4, 2, 16, 5, (16, 16, 16, 16), True, None,
                                          jnp.float32),
    "triton-cross-causal-gqa4-d24-bf16": ("triton", 50, 4, 1, 24, None, (16, 32, 32, 16), True,
                                          None, jnp.bfloat16),
    "triton-window>seq-softcap-ragged": ("triton", 33, 2, 2, 16, 40, (32, 16, 16, 16), False, 3.0,
                                         jnp.float32),
}


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_float64_and_xla(case):
  kernel, n, h, kv_heads, d, window, sizes, use_segments, softcap, dtype = CASES[case]
  q, k, v, do, segment_ids = random_inputs(len(case), 2, n, h, kv_heads, d, dtype)
  segment_ids = segment_ids if use_segments else None
  block_q, block_kv, block_q_bwd, block_kv_bwd = sizes
  op = ops.cross_attention if window is None else functools.partial(ops.local_attention,
                                                                    window=window)
  kernel_fn = functools.partial(
      op, segment_ids=segment_ids, softcap=softcap, block_q=block_q, block_kv=block_kv,
      block_q_bwd=block_q_bwd, block_kv_bwd=block_kv_bwd, kernel=kernel, interpret=True)
  xla_fn = functools.partial(xla_attention, window=window, segment_ids=segment_ids,
                             softcap=softcap)
  got = run_fast(functools.partial(value_and_grads, kernel_fn), q, k, v, do)
  xla = run_fast(functools.partial(value_and_grads, xla_fn), q, k, v, do)
  positions = np.broadcast_to(np.arange(n), (2, n))
  mask = reference64.mask(positions, n, window=window, q_segment_ids=segment_ids)
  exact = reference64.attention(q, k, v, mask, do, softcap=softcap)
  for name, a, x, e in zip(("out", "dq", "dk", "dv"), got, xla, exact):
    assert a.dtype == dtype
    assert_close(a, e, dtype, f"{name} vs float64")
    assert_close(a, x, dtype, f"{name} vs xla")


@pytest.mark.parametrize("kernel", ["tpu", "triton"])
def test_rows_without_visible_keys_are_zero_not_nan(kernel):
  """Queries whose segment has no key (kv ids differ) get 0 output and 0 gradients."""
  n, dtype = 24, jnp.float32
  q, k, v, do, _ = random_inputs(7, 1, n, 2, 1, 16, dtype)
  q_seg = jnp.asarray([[0] * 8 + [1] * 8 + [2] * 8], jnp.int32)
  kv_seg = jnp.asarray([[0] * 8 + [1] * 8 + [3] * 8], jnp.int32)  # Segment 2 has no keys.
  fn = functools.partial(ops.local_attention, window=6, segment_ids=q_seg, kv_segment_ids=kv_seg,
                         block_q=16, block_kv=16, kernel=kernel, interpret=True)
  got = run_fast(functools.partial(value_and_grads, fn), q, k, v, do)
  mask = reference64.mask(np.arange(n)[None], n, window=6, q_segment_ids=q_seg,
                          kv_segment_ids=kv_seg)
  exact = reference64.attention(q, k, v, mask, do)
  assert not mask[0, 16:].any()
  np.testing.assert_array_equal(np.asarray(got[0])[0, 16:], 0.0)
  np.testing.assert_array_equal(np.asarray(got[1])[0, 16:], 0.0)
  for name, a, e in zip(("out", "dq", "dk", "dv"), got, exact):
    assert_close(a, e, dtype, name)


def test_tpu_kernels_in_tpu_interpreter_without_races():
  """The Mosaic kernels under TPU memory simulation: 2 cores on the parallel grid axes,
  NaN-filled uninitialised memory, out-of-bounds reads raise, race detection on."""
  from jax._src.pallas.mosaic.interpret import interpret_pallas_call  # pylint: disable=g-import-not-at-top
  n, dtype = 16, jnp.float32
  q, k, v, do, segment_ids = random_inputs(3, 1, n, 2, 1, 8, dtype, num_segments=2)
  params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2,
                                 out_of_bounds_reads="raise", uninitialized_memory="nan")
  fn = functools.partial(ops.local_attention, window=6, segment_ids=segment_ids, block_q=8,
                         block_kv=8, kernel="tpu", interpret=params)
  pltpu.reset_tpu_interpret_mode_state()
  got = run_fast(functools.partial(value_and_grads, fn), q, k, v, do)
  assert not interpret_pallas_call.races.races_found
  mask = reference64.mask(np.arange(n)[None], n, window=6, q_segment_ids=segment_ids)
  for name, a, e in zip(("out", "dq", "dk", "dv"), got, reference64.attention(q, k, v, mask, do)):
    assert_close(a, e, dtype, name)


@pytest.mark.parametrize("window", [1, 7, 16, 40, None])
@pytest.mark.parametrize("block_q,block_kv", [(8, 8), (8, 16), (16, 8)])
def test_band_visits_exactly_the_blocks_with_visible_keys(window, block_q, block_kv):
  band = blocks.Band(48, block_q, block_kv, window)
  q_pos, k_pos = np.arange(48)[:, None], np.arange(48)[None, :]
  visible = (k_pos <= q_pos) & ((q_pos - k_pos < window) if window else True)
  needed = {(i // block_q, j // block_kv) for i, j in zip(*np.nonzero(visible))}
  by_query = {(i, int(band.kv_block(i, s))) for i in range(band.num_q_blocks)
              for s in range(band.kv_steps) if band.kv_visible(i, s)}
  by_key = {(int(band.q_block(j, s)), j) for j in range(band.num_kv_blocks)
            for s in range(band.q_steps) if band.q_visible(j, s)}
  assert by_query == needed == by_key
  assert band.visited_pairs() == len(needed)


def test_local_band_work_grows_linearly_causal_quadratically():
  """Visited score blocks at N and 4N (W = 512, blocks 128): 4x for the window, 16x causal
  (up to the first few blocks, which see fewer keys: 4.1x and 15.9x at N = 8K)."""
  visited = lambda n, w: blocks.Band(n, 128, 128, w).visited_pairs()  # pylint: disable=unnecessary-lambda-assignment
  assert visited(4 * 8192, 512) / visited(8192, 512) == pytest.approx(4.0, rel=0.03)
  assert visited(4 * 8192, None) / visited(8192, None) == pytest.approx(16.0, rel=0.03)
