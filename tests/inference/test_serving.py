"""Continuous batching: any number of rows gives the tokens of one request at a time."""

import jax
import numpy as np
import pytest

from yocou_jax import sharding as sharding_lib
from yocou_jax.inference import engine as engine_lib
from yocou_jax.inference import sampling as sampling_lib
from yocou_jax.inference import serving
from tests.inference import reference as ref_lib


def _requests(seed: int = 31) -> list:
  # Mixed prompt lengths (some past the window W = 4 and the chunk of 4) and budgets.
  rng = np.random.default_rng(seed)
  shapes = [(7, 6), (2, 3), (11, 5), (1, 1), (5, 8), (9, 2)]
  return [serving.Request(rng.integers(0, 64, n).tolist(), m) for n, m in shapes]


@pytest.fixture(scope="module")
def model():
  cfg = ref_lib.tiny("yocou")
  params = ref_lib.random_params(cfg, seed=32)
  opts = engine_lib.Options(chunk_size=4, kv_block=4, window_block=2)
  return engine_lib.Engine(cfg, opts), params


def test_greedy_rows_equal_one_prompt_at_a_time(model):
  engine, params = model
  requests = _requests()
  alone = [engine.generate(params, [r.prompt], r.max_new_tokens).tokens[0] for r in requests]
  stop = alone[4][2]  # Ends request 4 early (and any other that produces it).
  for rows in (1, 3):
    got = serving.serve(engine, params, requests, rows=rows)
    assert got == alone, rows
    stopped = serving.serve(engine, params, requests, rows=rows, stop_tokens=[stop])
    assert stopped == [out[:out.index(stop) + 1] if stop in out else out for out in alone]


def test_sampled_rows_equal_sequential_and_stream_in_order(model):
  engine, params = model
  requests = _requests(seed=33)
  sampling = sampling_lib.SamplingConfig(temperature=1.0, top_p=0.9)
  rng = jax.random.key(5)
  sequential = serving.serve(engine, params, requests, rows=1, sampling=sampling, rng=rng)
  events = list(serving.stream(engine, params, requests, rows=3, sampling=sampling, rng=rng))
  per_request = [[e.token for e in events if e.request == i] for i in range(len(requests))]
  assert per_request == sequential
  assert [len(o) for o in sequential] == [r.max_new_tokens for r in requests]
  assert sequential != serving.serve(engine, params, requests, rows=1, sampling=sampling,
                                     rng=jax.random.key(6))  # The draw depends on the seed.
  # Each request's last event and no other is marked done; a short request (index 3, one
  # token) finishes before the long one started with it (index 0) and frees its row.
  for i, out in enumerate(sequential):
    assert [e.done for e in events if e.request == i] == [False] * (len(out) - 1) + [True]
  done_order = [e.request for e in events if e.done]
  assert sorted(done_order) == list(range(len(requests)))
  assert done_order.index(3) < done_order.index(0)


def test_bad_requests_name_the_problem(model):
  engine, params = model
  with pytest.raises(ValueError, match="rows=0 must be a positive integer"):
    serving.serve(engine, params, _requests(), rows=0)
  with pytest.raises(ValueError, match="request 1: needs a non-empty prompt"):
    serving.serve(engine, params, [serving.Request([1], 2), serving.Request([], 2)], rows=2)


def test_rows_on_a_mesh_equal_one_device(model):
  # Rows over 'data' (1 row rounded up to 2, so a finished request's row is reused), kv heads
  # over 'tensor'; each new request is prefilled with its batch replicated, then copied into
  # its row's shard. Prompts of 5 to 7 tokens share one padded prefill width.
  engine, params = model
  requests = [r for r in _requests() if 5 <= len(r.prompt) <= 8]
  want = serving.serve(engine, params, requests, rows=2)
  mesh = sharding_lib.make_mesh({"data": 2, "fsdp": 1, "tensor": 2}, jax.devices()[:4])
  sharded = engine_lib.Engine(engine.cfg, engine.opts, mesh=mesh)
  params = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.P()))
  assert serving.serve(sharded, params, requests + requests[:1], rows=1) == want + want[:1]
  with pytest.raises(ValueError, match="batch=3 is not a multiple of 2, the number of ways"):
    sharded.init_state(3, 16)
