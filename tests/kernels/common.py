"""Shared helpers of the kernel tests: inputs, fast compiles, tolerances by dtype."""

import jax
import jax.numpy as jnp
import numpy as np

TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}
FAST_COMPILE = {"xla_backend_optimization_level": 0}  # Interpret-mode kernels compile 2x faster.


def run_fast(fn, *args):
  """jit + a cheap XLA compile (the interpreted kernels are large, the shapes tiny)."""
  return jax.jit(fn).lower(*args).compile(FAST_COMPILE)(*args)


def random_inputs(seed, b, n, h, kv_heads, d, dtype, num_segments=3):
  keys = jax.random.split(jax.random.key(seed), 5)
  q = jax.random.normal(keys[0], (b, n, h, d), jnp.float32).astype(dtype)
  k = jax.random.normal(keys[1], (b, n, kv_heads, d), jnp.float32).astype(dtype)
  v = jax.random.normal(keys[2], (b, n, kv_heads, d), jnp.float32).astype(dtype)
  do = jax.random.normal(keys[3], (b, n, h, d), jnp.float32).astype(dtype)
  # Packed documents: sorted random cut points, a different packing per row.
  cuts = jnp.sort(jax.random.randint(keys[4], (b, num_segments - 1), 1, n), axis=1)
  segment_ids = jnp.sum(jnp.arange(n)[None, :, None] >= cuts[:, None, :], axis=-1)
  return q, k, v, do, segment_ids.astype(jnp.int32)


def assert_close(actual, expected, dtype, name):
  actual = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
  expected = np.asarray(expected, np.float64)
  assert not np.isnan(actual).any(), f"{name}: NaN"
  scale = max(1.0, float(np.abs(expected).max()))
  err = float(np.abs(actual - expected).max()) / scale
  assert err <= TOLERANCE[dtype], f"{name}: relative error {err:.2e} > {TOLERANCE[dtype]:.0e}"
