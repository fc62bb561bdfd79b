"""Prefill + token-by-token decode equals the training model's full forward pass, for every arch."""

import jax
import numpy as np
import pytest

from yocou_jax import accounting
from yocou_jax.inference import cache as cache_lib
from yocou_jax.inference import engine as engine_lib
from tests.inference import reference as ref_lib

SEQ_LEN = 40
MAX_LEN = 42  # Not a multiple of the key block: the last cache block overlaps the one before.
ATOL = 1e-5


def _tokens(batch: int, seed: int = 1) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 64, (batch, SEQ_LEN)).astype(np.int32)


@pytest.mark.parametrize("arch", ref_lib.ARCHS)
def test_mixed_lengths_chunked_prefill_and_decode_match_forward(arch):
  # W = 4, chunks of 3 (boundaries inside windows), prompts of 5, 13 and 22 tokens in one
  # right-padded batch, decoded to position 36 (9 window wraps); T = 2 for the looped archs.
  cfg = ref_lib.tiny(arch)
  params = ref_lib.random_params(cfg)
  tokens = _tokens(3)
  lengths, steps = [5, 13, 22], 14
  opts = engine_lib.Options(chunk_size=3, kv_block=4, decode_kv_block=8, window_block=4)
  engine = engine_lib.Engine(cfg, opts)
  got, state = ref_lib.cached_logits(engine, params, tokens, lengths, steps, MAX_LEN)
  want = ref_lib.reference_at(ref_lib.reference_logits(cfg, params, tokens), lengths, steps)
  assert np.abs(want).max() > 1.0  # Logits far from uniform: the comparison is meaningful.
  np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
  np.testing.assert_array_equal(state.lengths, np.asarray(lengths) + steps)
  assert cache_lib.cache_bytes(state.cache) == accounting.kv_cache_bytes(cfg, MAX_LEN, 3)


def test_chunks_longer_than_window_in_query_blocks():
  # Chunks of 8 tokens > W = 4, attended in query sub-blocks of 4; one whole-prompt chunk too.
  cfg = ref_lib.tiny("yocou")
  params = ref_lib.random_params(cfg, seed=3)
  tokens = _tokens(2, seed=4)
  lengths, steps = [17, 30], 6
  want = ref_lib.reference_at(ref_lib.reference_logits(cfg, params, tokens), lengths, steps)
  for opts in (engine_lib.Options(chunk_size=8, kv_block=4, window_block=4),
               engine_lib.Options(chunk_size=64, kv_block=64, window_block=64)):
    got, _ = ref_lib.cached_logits(engine_lib.Engine(cfg, opts), params, tokens, lengths, steps,
                                   SEQ_LEN)
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)


@pytest.mark.parametrize("iterations,cross_rope", [(1, False), (4, True)])
def test_test_time_depth(iterations, cross_rope):
  # A yocou model with T = 2 parameters run at another depth equals the model built at that
  # depth (the loop shares one parameter set), and the cache follows: T ring buffers per layer.
  trained = ref_lib.tiny("yocou", cross_rope=cross_rope)
  params = ref_lib.random_params(trained, seed=5)
  cfg = trained.replace(num_iterations=iterations)
  tokens = _tokens(2, seed=6)
  lengths, steps = [9, 14], 5
  opts = engine_lib.Options(chunk_size=4, kv_block=4, decode_kv_block=4, window_block=2)
  engine = engine_lib.Engine(cfg, opts)
  got, state = ref_lib.cached_logits(engine, params, tokens, lengths, steps, 24)
  want = ref_lib.reference_at(ref_lib.reference_logits(cfg, params, tokens), lengths, steps)
  np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
  assert len(state.cache["self_decoder"]) == 2 * iterations
  assert state.cache["self_decoder"][0]["k"].shape == (2, 2, 4, 8)
  assert cache_lib.cache_bytes(state.cache) == accounting.kv_cache_bytes(cfg, 24, 2)
