"""kernels.ops around the kernels: model dispatch, shard_map under a mesh, lowering for TPU/GPU,
and a model-level check that training with ``attention_impl="pallas"`` matches ``xla``."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import export

from kernels import ops
from tests.kernels.common import FAST_COMPILE, assert_close, random_inputs, run_fast
from yocou_jax import attention
from yocou_jax import sharding as sharding_lib
from yocou_jax.model import Model
from yocou_jax.train import step as step_lib


def _value_and_grads(fn, q, k, v, do):
  out, vjp = jax.vjp(fn, q, k, v)
  return (out, *vjp(do))


def test_self_attention_dispatch_on_cpu():
  """On CPU ``auto`` is the XLA path and ``pallas`` runs the TPU kernels in interpret mode."""
  assert jax.default_backend() == "cpu"
  assert ops.resolve_impl("auto") == "xla" and ops.resolve_impl("pallas") == "pallas"
  q, k, v, _, segment_ids = random_inputs(0, 2, 24, 4, 2, 8, jnp.float32)
  calls = {impl: functools.partial(attention.self_attention, window=5, segment_ids=segment_ids,
                                   impl=impl, block_size=8) for impl in ("xla", "auto", "pallas")}
  assert "pallas_call" in str(jax.make_jaxpr(calls["pallas"])(q, k, v))
  assert "pallas_call" not in str(jax.make_jaxpr(calls["auto"])(q, k, v))
  xla = run_fast(calls["xla"], q, k, v)
  np.testing.assert_array_equal(run_fast(calls["auto"], q, k, v), xla)
  assert_close(run_fast(calls["pallas"], q, k, v), xla, jnp.float32, "pallas vs xla")


def test_kernels_run_per_shard_under_the_trainer_mesh():
  """Under jax.set_mesh + the logical rules the kernels run in shard_map (batch over
  data x fsdp, heads over tensor) and give the unsharded values and gradients."""
  q, k, v, do, segment_ids = random_inputs(1, 4, 24, 4, 2, 8, jnp.float32)
  fn = functools.partial(_value_and_grads, functools.partial(
      ops.local_attention, window=7, segment_ids=segment_ids, block_q=8, block_kv=8,
      interpret=True))
  expected = run_fast(fn, q, k, v, do)
  mesh = sharding_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  with sharding_lib.activate(mesh):
    jaxpr = str(jax.make_jaxpr(fn)(q, k, v, do))
    got = run_fast(fn, q, k, v, do)
  assert "shard_map" in jaxpr and "pallas_call" in jaxpr
  for a, e in zip(got, expected):
    np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-6)


def _lowered_text(fn, platform, *shapes, disabled=()):
  checks = [export.DisabledSafetyCheck.custom_call(name) for name in disabled]
  return export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(
      *shapes).mlir_module()


def _training_and_decode(kernel):
  """Forward + backward of the local and cross kernels, and the decode kernel."""

  def fn(q, k, v, do, segment_ids, cache, positions):
    kw = dict(segment_ids=segment_ids, kernel=kernel, interpret=False)
    local = _value_and_grads(functools.partial(ops.local_attention, window=512, **kw), q, k, v, do)
    cross = _value_and_grads(functools.partial(ops.cross_attention, **kw), q, k, v, do)
    decode = ops.decode_attention(q[:, :2], cache, cache, q_positions_BxT=positions,
                                  kernel=kernel, interpret=False)
    return local, cross, decode

  b, n, h, kv_heads, d = 1, 1024, 4, 2, 128
  shape = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)  # pylint: disable=unnecessary-lambda-assignment
  return fn, (shape(b, n, h, d), shape(b, n, kv_heads, d), shape(b, n, kv_heads, d),
              shape(b, n, h, d), jax.ShapeDtypeStruct((b, n), jnp.int32),
              shape(b, 4096, kv_heads, d), jax.ShapeDtypeStruct((b, 2), jnp.int32))


def test_tpu_kernels_lower_to_mosaic():
  """Lowering for TPU on this CPU machine: every kernel becomes a Mosaic custom call."""
  fn, shapes = _training_and_decode("tpu")
  text = _lowered_text(fn, "tpu", *shapes)
  assert text.count("stablehlo.custom_call @tpu_custom_call") == 7  # 2 x (fwd, dq, dkv) + decode


def test_triton_kernels_lower_for_cuda():
  """Lowering for CUDA on this CPU machine: every kernel becomes Triton IR (not compiled)."""
  fn, shapes = _training_and_decode("triton")
  text = _lowered_text(fn, "cuda", *shapes, disabled=["__gpu$xla.gpu.triton"])
  assert text.count("stablehlo.custom_call @__gpu$xla.gpu.triton") == 7


def _batch(batch_size=2, seq_len=32, vocab=64):
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, vocab, size=(batch_size, seq_len)).astype(np.int32)
  cut = np.array([13, 21])[:, None]
  segment_ids = np.where(np.arange(seq_len) < cut, 1, 2).astype(np.int32)
  positions = np.where(segment_ids == 1, np.arange(seq_len), np.arange(seq_len) - cut)
  return {"tokens": jnp.asarray(tokens), "segment_ids": jnp.asarray(segment_ids),
          "positions": jnp.asarray(positions.astype(np.int32))}


def test_training_steps_with_pallas_match_xla(tiny_config):
  """Three SGD steps of a tiny YOCO-U (sliding-window self-decoder looped twice, cross-decoder
  over the global KV, GQA, packed segments) from the same parameters: the interpreted kernels
  track the XLA path in loss and parameters."""
  batch, tx = _batch(), optax.sgd(0.5)
  models = {impl: Model(tiny_config("yocou", attention_impl=impl, num_layers=2))
            for impl in ("xla", "pallas")}
  initial = run_fast(step_lib.init_state_fn(models["xla"], tx, 8), jax.random.key(0))
  results = {}
  for impl, model in models.items():
    state = initial
    step = functools.partial(step_lib.train_step, model=model, tx=tx,
                             schedule=optax.constant_schedule(0.5))
    step = jax.jit(step).lower(state, batch).compile(FAST_COMPILE)
    losses = []
    for _ in range(3):
      state, metrics = step(state, batch)
      losses.append(float(metrics["loss"]))
    results[impl] = (losses, state.params)
  (xla_losses, xla_params), (pallas_losses, pallas_params) = results["xla"], results["pallas"]
  assert xla_losses[-1] < xla_losses[0] - 0.05  # The steps did train.
  np.testing.assert_allclose(pallas_losses, xla_losses, rtol=2e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), pallas_params,
               xla_params)
