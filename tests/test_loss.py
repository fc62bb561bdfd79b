"""The fused, chunked output projection + cross-entropy against the materialised-logits loss.

Values and gradients are compared with a float64 NumPy reference (and the plain float32 loss)
under the (data, fsdp, tensor) = (2, 2, 2) mesh, with padding, loss weights and z-loss, for
chunkings that divide the row, do not divide it (padded) and cover it whole.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from tests.train.synthetic import synthetic_data, tiny_config
from yocou_jax import loss as loss_lib
from yocou_jax import sharding as sharding_lib
from yocou_jax.train import trainer

B, N, D, V = 8, 24, 16, 64
Z_LOSS = 0.1


@pytest.fixture(scope="module")
def mesh():
  return sharding_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices("cpu")[:8])


@pytest.fixture(scope="module")
def problem():
  rng = np.random.default_rng(0)
  h = rng.normal(size=(B, N, D))
  w = rng.normal(size=(D, V)) / np.sqrt(D) * 3.0  # Logits of std ~3: a peaked softmax.
  tokens = rng.integers(0, V, (B, N)).astype(np.int32)
  segments = np.ones((B, N), np.int32)
  segments[:, N // 2:] = 2
  segments[0, 17:] = 0  # Padding.
  segments[3, :] = 0  # An all-padding row.
  targets, weights = loss_lib.next_token_targets(jnp.asarray(tokens), jnp.asarray(segments))
  weights = np.asarray(weights) * (rng.random((B, N)) > 0.25)  # Loss weights mask some tokens.
  return h, w, np.asarray(targets), weights.astype(np.float32)


def reference(h, w, targets, weights, z_loss):
  """float64 loss and its gradients in h and w, in closed form."""
  logits = h @ w
  log_z = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
  ce = log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
  denom = max(weights.sum(), 1.0)
  loss = np.sum(weights * (ce + z_loss * log_z ** 2)) / denom
  probs = np.exp(logits - log_z[..., None])
  onehot = np.eye(V)[targets]
  d_logits = (weights * (1 + 2 * z_loss * log_z))[..., None] * probs - weights[..., None] * onehot
  d_logits /= denom
  return loss, d_logits @ w.T, np.einsum("bnd,bnv->dv", h, d_logits)


def sharded_loss_and_grads(mesh, fn, *args):
  h, w, targets, weights = args
  with sharding_lib.activate(mesh):
    specs = (jax.P(("data", "fsdp")), jax.P("fsdp", "tensor"), jax.P(("data", "fsdp")),
             jax.P(("data", "fsdp")))
    shardings = tuple(NamedSharding(mesh, s) for s in specs)
    grad_fn = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)), in_shardings=shardings)
    return grad_fn(*(jax.device_put(a, s) for a, s in zip(args, shardings)))


def plain(h, w, targets, weights, z_loss=Z_LOSS):
  logits = jnp.einsum("bnd,dv->bnv", h, w, preferred_element_type=jnp.float32)
  return loss_lib.cross_entropy(logits, targets, weights, z_loss)[0]


def fused(h, w, targets, weights, z_loss=Z_LOSS, chunk_size=0):
  return loss_lib.fused_cross_entropy(h, w, targets, weights, z_loss, chunk_size)[0]


@pytest.mark.parametrize("chunk_size", [1, 5, 8, 0])  # 5 pads 24 to 25; 0 is the whole row.
def test_fused_loss_and_gradients_match_float64_and_plain(mesh, problem, chunk_size):
  h, w, targets, weights = problem
  want_loss, want_dh, want_dw = reference(h, w, targets, weights, Z_LOSS)
  args = (h.astype(np.float32), w.astype(np.float32), targets, weights)
  loss, (dh, dw) = sharded_loss_and_grads(
      mesh, functools.partial(fused, chunk_size=chunk_size), *args)
  plain_loss, (plain_dh, plain_dw) = sharded_loss_and_grads(mesh, plain, *args)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
  np.testing.assert_allclose(dh, want_dh, rtol=0, atol=1e-6 * np.abs(want_dh).max())
  np.testing.assert_allclose(dw, want_dw, rtol=0, atol=1e-6 * np.abs(want_dw).max())
  np.testing.assert_allclose(loss, plain_loss, rtol=1e-6)
  np.testing.assert_allclose(dh, plain_dh, rtol=0, atol=1e-6 * np.abs(want_dh).max())
  np.testing.assert_allclose(dw, plain_dw, rtol=0, atol=1e-6 * np.abs(want_dw).max())
  assert np.all(np.asarray(dh)[3] == 0)  # The all-padding row gets no gradient.


def test_fused_loss_in_bfloat16_is_as_close_as_the_plain_loss(mesh, problem):
  """bfloat16 features and weights (float32 logits): both losses within 1e-2 relative of float64
  (gradients within 2% of their largest entry), and of each other."""
  h, w, targets, weights = problem
  want_loss, want_dh, want_dw = reference(h, w, targets, weights, Z_LOSS)
  args = (jnp.asarray(h, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16), targets, weights)
  for fn in (functools.partial(fused, chunk_size=8), plain):
    loss, (dh, dw) = sharded_loss_and_grads(mesh, fn, *args)
    assert dh.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-2)
    np.testing.assert_allclose(np.float64(dh), want_dh, atol=2e-2 * np.abs(want_dh).max())
    np.testing.assert_allclose(np.float64(dw), want_dw, atol=2e-2 * np.abs(want_dw).max())


def test_token_logprobs_and_greedy_match_log_softmax(problem):
  h, w, targets, _ = problem
  logits = h @ w
  log_p = logits - np.log(np.sum(np.exp(logits), -1, keepdims=True))
  targets = targets.copy()
  targets[:, ::3] = np.argmax(logits, -1)[:, ::3]  # Some targets are the argmax.
  want = np.take_along_axis(log_p, targets[..., None], -1)[..., 0]
  logp, greedy = jax.jit(loss_lib.token_logprobs, static_argnums=3)(
      h.astype(np.float32), w.astype(np.float32), targets, 7)
  np.testing.assert_allclose(logp, want, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(greedy, np.argmax(logits, -1) == targets)


def test_bad_chunk_size_is_one_clear_error():
  with pytest.raises(ValueError, match="loss chunk size -3 is invalid"):
    loss_lib.resolve_chunk_size(-3, 16)


def test_training_with_the_fused_loss_matches_the_materialised_logits(tmp_path):
  """20 steps on the (2, 2, 2) mesh, chunks of 5 positions (rows of 32: padded), z-loss on,
  against the materialised-logits loss on one device."""
  chunked = tiny_config(arch="yoco", mesh=(2, 2, 2))
  chunked.model.loss_chunk_size = 5
  chunked.train.z_loss = 1e-2
  materialised = tiny_config(arch="yoco")
  materialised.model.loss_chunk_size = -1
  materialised.train.z_loss = 1e-2
  runs = [trainer.train(c, str(tmp_path / name), data=synthetic_data(), devices=devices)
          for c, name, devices in ((chunked, "chunked", None),
                                   (materialised, "materialised", jax.devices()[:1]))]
  losses = [np.array([r["loss"] for r in run.history if "loss" in r]) for run in runs]
  eval_losses = [np.array([r["eval_loss"] for r in run.history if "eval_loss" in r])
                 for run in runs]
  assert len(losses[0]) == 20 and len(eval_losses[0]) >= 2
  np.testing.assert_allclose(losses[0], losses[1], rtol=0, atol=1e-5)
  np.testing.assert_allclose(eval_losses[0], eval_losses[1], rtol=0, atol=1e-5)
  assert losses[1][-1] < 0.8 * losses[1][0]
