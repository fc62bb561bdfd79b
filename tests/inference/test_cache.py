"""Cache layout: bytes equal the accounting formula; a sharded cache decodes like the forward."""

import itertools

import jax
import numpy as np
import pytest

from yocou_jax import accounting
from yocou_jax import sharding as sharding_lib
from yocou_jax.inference import cache as cache_lib
from yocou_jax.inference import engine as engine_lib
from tests.inference import reference as ref_lib


@pytest.mark.parametrize("arch", ref_lib.ARCHS)
def test_cache_bytes_equal_accounting(arch):
  for max_len, dtype, iterations, batch in itertools.product(
      (3, 4, 57), ("float32", "bfloat16"), (1, 3, 6), (1, 5)):
    cfg = ref_lib.tiny(arch, dtype=dtype, num_iterations=iterations)
    cache = jax.eval_shape(lambda: cache_lib.init_cache(cfg, batch, max_len))
    assert cache_lib.cache_bytes(cache) == accounting.kv_cache_bytes(cfg, max_len, batch), (
        max_len, dtype, iterations, batch)


def test_yocou_cache_is_one_global_buffer_and_a_ring_per_layer_iteration():
  cfg = ref_lib.tiny("yocou", num_iterations=3)
  cache = jax.eval_shape(lambda: cache_lib.init_cache(cfg, 2, 50))
  assert [x["k"].shape for x in cache["global_kv"]] == [(2, 2, 50, 8)]
  assert [x["k"].shape for x in cache["self_decoder"]] == [(2, 2, 4, 8)] * (3 * 2)


def test_sharded_cache_decode_matches_forward():
  # Batch over 'data', kv heads over 'tensor': the cache shards like the activations.
  cfg = ref_lib.tiny("yocou")
  params = ref_lib.random_params(cfg, seed=9)
  tokens = np.random.default_rng(2).integers(0, 64, (2, 20)).astype(np.int32)
  lengths, steps = [6, 11], 4
  opts = engine_lib.Options(chunk_size=4, kv_block=4, window_block=2)
  want = ref_lib.reference_at(ref_lib.reference_logits(cfg, params, tokens), lengths, steps)
  mesh = sharding_lib.make_mesh({"data": 2, "fsdp": 1, "tensor": 2}, jax.devices()[:4])
  replicated = jax.sharding.NamedSharding(mesh, jax.P())
  sharded_params = jax.device_put(params, replicated)
  engine = engine_lib.Engine(cfg, opts, mesh=mesh)
  got, state = ref_lib.cached_logits(engine, sharded_params, tokens, lengths, steps, 20)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
  want_sharding = cache_lib.shardings(state.cache, mesh, sharding_lib.LOGICAL_AXIS_RULES)
  for leaf, sharding in zip(jax.tree.leaves(state.cache), jax.tree.leaves(want_sharding)):
    assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
    assert leaf.addressable_shards[0].data.shape[:2] == (1, 1)  # Batch and kv heads split.
