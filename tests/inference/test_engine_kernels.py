"""The engine through the Pallas kernels (interpret mode on CPU) equals the engine through XLA."""

import dataclasses

import jax
import numpy as np
import pytest

from kernels import ops
from yocou_jax import sharding as sharding_lib
from yocou_jax.inference import attention as attn_lib
from yocou_jax.inference import engine as engine_lib
from yocou_jax.inference import text
from tests.inference import reference as ref_lib

ATOL = 1e-5


def _tokens(batch: int, n: int, seed: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 64, (batch, n)).astype(np.int32)


def _served(attention_impl, cfg, *, seed, n, steps, max_len):
  """(logits, state) of prompts of 3, 6 and 11 tokens (in one right-padded batch of 3 rows of
  ``n``), chunks of 5 and ``steps`` decode steps, served with ``attention_impl``, then the same
  through ``cfg``'s own (XLA) attention."""
  params = ref_lib.random_params(cfg, seed=seed)
  tokens = _tokens(3, n, seed=seed + 1)
  opts = engine_lib.Options(chunk_size=5, kv_block=4, decode_kv_block=8, window_block=5)
  return tuple(ref_lib.cached_logits(engine_lib.Engine(c, opts), params, tokens, [3, 6, 11],
                                     steps, max_len)
               for c in (cfg.replace(attention_impl=attention_impl), cfg))


@pytest.mark.parametrize("arch", ref_lib.ARCHS)
def test_pallas_engine_matches_xla_engine(arch):
  # W = 4, GQA (4 query heads on 2 kv heads), prompts of 3, 6 and 11 tokens in one right-padded
  # batch, chunks of 5 (longer than the window: the run has empty ring slots and chunk padding),
  # then 6 decode steps (the window wraps several times); the cache is not a kernel-block multiple.
  (got, state), (want, want_state) = _served("pallas", ref_lib.tiny(arch), seed=21, n=18,
                                              steps=6, max_len=19)
  assert np.abs(want).max() > 1.0  # Logits far from uniform: the comparison is meaningful.
  np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=ATOL), state.cache,
               want_state.cache)


def test_auto_on_an_accelerator_serves_parscale_through_the_kernels(monkeypatch):
  # attention_impl=auto resolved as on TPU/GPU: the kernels (interpreted here). parscale with a
  # learned prefix trains through XLA attention only, so auto is how it reaches the kernels, its
  # prefix in the first cache slots. (The upper loops call the same cache kernels as yoco.)
  monkeypatch.setattr(ops, "resolve_impl", lambda impl: "pallas")
  cfg = ref_lib.tiny("parscale", num_layers=2, num_streams=2, prefix_length=3)
  assert attn_lib.kernel_impl("auto") == "pallas"
  (got, _), (want, _) = _served("auto", cfg, seed=23, n=16, steps=4, max_len=16)
  assert np.abs(want).max() > 1.0
  np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)


def test_kernel_impl_per_backend():
  # On this CPU backend only an explicit ``pallas`` runs the kernels; ``auto`` picks XLA like
  # training does, and cudnn (no cache kernel) serves through XLA.
  assert [attn_lib.kernel_impl(i) for i in ("xla", "pallas", "cudnn", "auto")] == [
      "xla", "pallas", "xla", "xla"]
  with pytest.raises(ValueError, match="attention_impl='flash' is not available"):
    attn_lib.kernel_impl("flash")


@pytest.mark.parametrize("attention_impl", ["auto", "pallas"])
def test_run_trained_with_kernels_generates_as_xla(tmp_path, attention_impl):
  # A checkpoint trained with a kernel attention_impl loads and generates (greedy) the same
  # continuations as the same params served through XLA.
  workdir = str(tmp_path)
  ref_lib.write_run(workdir, attention_impl=attention_impl)
  run = text.load_run(workdir)
  assert run.model_cfg.attention_impl == attention_impl
  got, result = text.generate(run, ["ab", "hello"], 4, chunk_size=4, warmup=False)
  xla_run = dataclasses.replace(run, model_cfg=run.model_cfg.replace(attention_impl="xla"))
  want, want_result = text.generate(xla_run, ["ab", "hello"], 4, chunk_size=4, warmup=False)
  assert got == want and result.tokens == want_result.tokens


@pytest.mark.parametrize("arch", ["transformer", "yocou"])
def test_pallas_engine_on_a_mesh_matches_forward(arch):
  # Batch over 'data', kv heads over 'tensor': the kernels run per shard (shard_map).
  cfg = ref_lib.tiny(arch, attention_impl="pallas")
  params = ref_lib.random_params(cfg, seed=9)
  tokens = _tokens(2, 20, seed=2)
  lengths, steps = [6, 11], 4
  opts = engine_lib.Options(chunk_size=4, kv_block=4, window_block=2)
  want = ref_lib.reference_at(
      ref_lib.reference_logits(cfg.replace(attention_impl="xla"), params, tokens), lengths, steps)
  mesh = sharding_lib.make_mesh({"data": 2, "fsdp": 1, "tensor": 2}, jax.devices()[:4])
  sharded_params = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.P()))
  engine = engine_lib.Engine(cfg, opts, mesh=mesh)
  got, state = ref_lib.cached_logits(engine, sharded_params, tokens, lengths, steps, 20)
  np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
  leaf = jax.tree.leaves(state.cache)[0]
  assert leaf.addressable_shards[0].data.shape[:2] == (1, 1)  # Batch and kv heads split.
