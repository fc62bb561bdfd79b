"""Decode kernel (a few query tokens against a K/V cache, split over the cache and combined).

Checked against the float64 NumPy reference and ``kernels.reference.decode_reference`` for both
kernel families in interpret mode, and against the prefill kernel: decoding the tokens of a
prompt one position at a time reproduces the rows of full causal attention.
Tolerances as in ``test_flash_attention`` (float32 2e-5, bfloat16 2e-2, relative to the largest
reference magnitude).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from kernels import ops
from kernels import reference
from tests.kernels import reference64
from tests.kernels.common import assert_close, random_inputs, run_fast

# (kernel, T, H, K, D, S, window, kv_length, block_kv, num_splits, cache layout, dtype)
CASES = {
    "tpu-causal-gqa2-part-filled-cache": ("tpu", 2, 4, 2, 16, 128, None, (70, 0), 16, 4, "BSKD",
                                          jnp.float32),
    "tpu-window-gqa4-bf16-bksd": ("tpu", 3, 4, 1, 32, 96, 20, None, 32, 3, "BKSD",
                                  jnp.bfloat16),
    "triton-causal-gqa1-bksd": ("triton", 1, 2, 2, 16, 64, None, (64, 17), 16, 4, "BKSD",
                                jnp.float32),
    "triton-window-gqa4-d24-bf16": ("triton", 4, 8, 2, 24, 80, 9, (80, 40), 16, 2, "BSKD",
                                    jnp.bfloat16),
}


@pytest.mark.parametrize("case", list(CASES))
def test_decode_matches_float64_and_reference(case):
  kernel, t, h, kv_heads, d, s, window, kv_length, block_kv, splits, layout, dtype = CASES[case]
  q, _, _, _, _ = random_inputs(1, 2, t, h, kv_heads, d, dtype)
  _, k_cache, v_cache, _, _ = random_inputs(2, 2, s, h, kv_heads, d, dtype)
  last = s - 1 if kv_length is None else max(kv_length[0] - 1, t)
  positions = jnp.asarray([np.arange(last - t + 1, last + 1), np.arange(t) + s // 3])
  kv_length = None if kv_length is None else jnp.asarray(kv_length, jnp.int32)
  fn = functools.partial(ops.decode_attention, kv_length_B=kv_length, window=window,
                         block_kv=block_kv, num_splits=splits, cache_layout=layout,
                         kernel=kernel, interpret=True)
  as_layout = (lambda x: x) if layout == "BSKD" else (lambda x: x.swapaxes(1, 2))
  got = run_fast(lambda q, k, v, p: fn(q, as_layout(k), as_layout(v), q_positions_BxT=p), q,
                 k_cache, v_cache, positions)
  ref = reference.decode_reference(q, k_cache, v_cache, q_positions_BxT=positions,
                                   kv_length_B=kv_length, window=window)
  mask = reference64.mask(positions, s, window=window, kv_length=kv_length)
  exact = reference64.attention(q, k_cache, v_cache, mask)
  assert got.shape == q.shape and got.dtype == dtype
  assert_close(got, exact, dtype, "decode vs float64")
  assert_close(got, ref, dtype, "decode vs reference")
  if kv_length is not None and int(kv_length[1]) == 0:  # An empty cache: zeros, not NaN.
    np.testing.assert_array_equal(np.asarray(got[1], np.float32), 0.0)


def test_decode_steps_reproduce_prefill_rows():
  """Token-by-token decoding against the growing cache == the causal prefill kernel's rows."""
  n, dtype = 24, jnp.float32
  q, k, v, _, _ = random_inputs(5, 1, n, 4, 2, 16, dtype)
  prefill = ops.cross_attention(q, k, v, block_q=8, block_kv=8, interpret=True)

  def decode_all(q, k, v):
    def step(_, i):
      q_i = jax.lax.dynamic_slice_in_dim(q, i, 1, axis=1)
      return None, ops.decode_attention(q_i, k, v, q_positions_BxT=jnp.full((1, 1), i),
                                        kv_length_B=jnp.full((1,), i + 1), block_kv=8,
                                        num_splits=3, interpret=True)[:, 0]
    return jax.lax.scan(step, None, jnp.arange(n))[1].transpose(1, 0, 2, 3)

  assert_close(run_fast(decode_all, q, k, v), prefill, dtype, "decode vs prefill")


def test_decode_in_tpu_interpreter():
  """Mosaic decode kernel under TPU memory simulation (2 cores, NaN-filled memory, raising
  out-of-bounds reads): the key range 12..22 of a 48-entry cache in 6 chunks, so the chunks
  before the window and past kv_length are clamped away (scalar-prefetched index maps)."""
  q, _, _, _, _ = random_inputs(8, 1, 2, 2, 1, 8, jnp.float32)
  _, k_cache, v_cache, _, _ = random_inputs(9, 1, 48, 2, 1, 8, jnp.float32)
  positions, kv_length = jnp.asarray([[20, 24]]), jnp.asarray([23])
  params = pltpu.InterpretParams(num_cores_or_threads=2, uninitialized_memory="nan",
                                 out_of_bounds_reads="raise")
  got = run_fast(lambda q, k, v, p: ops.decode_attention(
      q, k, v, q_positions_BxT=p, kv_length_B=kv_length, window=9, block_kv=8, num_splits=6,
      kernel="tpu", interpret=params), q, k_cache, v_cache, positions)
  mask = reference64.mask(positions, 48, window=9, kv_length=kv_length)
  assert_close(got, reference64.attention(q, k_cache, v_cache, mask), jnp.float32, "decode")


def test_cache_attention_adapter_matches_the_engine_xla_path():
  """``ops.cache_attention`` is a drop-in for the inference engine's XLA cache attention."""
  from yocou_jax.inference import attention as inference_attention  # pylint: disable=g-import-not-at-top
  q, _, _, _, _ = random_inputs(10, 2, 3, 4, 2, 16, jnp.float32)
  _, k, v, _, _ = random_inputs(11, 2, 40, 4, 2, 16, jnp.float32)
  k_BxKxSxD, v_BxKxSxD = k.swapaxes(1, 2), v.swapaxes(1, 2)
  positions = jnp.asarray([[10, 11, 12], [30, 31, 32]])
  got = run_fast(functools.partial(ops.cache_attention, block_size=8), q, positions, k_BxKxSxD,
                 v_BxKxSxD)
  expected = inference_attention.xla_cache_attention(q, positions, k_BxKxSxD, v_BxKxSxD,
                                                     block_size=8)
  assert_close(got, expected, jnp.float32, "cache attention")
