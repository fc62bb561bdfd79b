"""Projection and SwiGLU: float64 references, compute-dtype outputs, the chunked feed-forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from yocou_jax.layers import Projection, SwiGLU, apply_rope
from yocou_jax.model import Model
from yocou_jax.train import step as step_lib


def _swiglu_reference(x, params):
  """down(silu(x W_gate) * (x W_up)) in float64 numpy."""
  w = {k: np.asarray(v["kernel"].unbox() if hasattr(v["kernel"], "unbox") else v["kernel"],
                     np.float64) for k, v in params["params"].items()}
  gate, up = x @ w["gate"], x @ w["up"]
  return (gate / (1.0 + np.exp(-gate)) * up) @ w["down"]


@pytest.mark.parametrize("in_axes", [1, 2])
def test_projection_matches_float64_and_keeps_the_compute_dtype(tiny_config, in_axes):
  """[B, N, in...] -> [B, N, out...]: float32 to 1e-5 of float64; bfloat16 is the float32
  result rounded to bfloat16 (the output dtype is the compute dtype: no float32 buffer)."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 4, 8)[:2 + in_axes]) if in_axes == 2 else rng.normal(size=(2, 5, 32))
  out_shape, axes = ((32,), ("q_heads", "head_dim", "embed")) if in_axes == 2 else (
      (4, 8), ("embed", "q_heads", "head_dim"))
  layer = Projection(tiny_config(), out_shape, axes, in_axes=in_axes)
  params = layer.init(jax.random.key(0), jnp.asarray(x, jnp.float32))
  kernel = np.asarray(params["params"]["kernel"].unbox(), np.float64)
  want = np.tensordot(x, kernel, axes=in_axes)
  got32 = layer.apply(params, jnp.asarray(x, jnp.float32))
  assert got32.dtype == jnp.float32 and got32.shape == want.shape
  np.testing.assert_allclose(np.asarray(got32), want, rtol=1e-5, atol=1e-6)
  bf16 = Projection(tiny_config(dtype="bfloat16"), out_shape, axes, in_axes=in_axes)
  got16 = bf16.apply(params, jnp.asarray(x, jnp.bfloat16))
  assert got16.dtype == jnp.bfloat16
  # The inputs rounded to bfloat16, the products summed in float32, the sum rounded once.
  x16 = np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64)
  k16 = np.asarray(jnp.asarray(kernel, jnp.bfloat16), np.float64)
  want16 = np.asarray(jnp.asarray(np.tensordot(x16, k16, axes=in_axes), jnp.bfloat16), np.float64)
  np.testing.assert_allclose(np.asarray(got16, np.float64), want16, rtol=2 ** -7)


@pytest.mark.parametrize("in_axes,lead", [(1, (2, 5)), (2, (2, 5)), (1, (2, 3, 5))])
def test_projection_gradients_match_float64(tiny_config, in_axes, lead):
  """The custom VJP's input and kernel gradients (the kernel's one matmul over all leading
  rows) against float64: float32 to 1e-5; bfloat16 within its rounding, float32 kernel grad."""
  rng = np.random.default_rng(1)
  in_shape, out_shape = ((4, 8), (32,)) if in_axes == 2 else ((32,), (4, 8))
  axes = ("q_heads", "head_dim", "embed") if in_axes == 2 else ("embed", "q_heads", "head_dim")
  x, cotangent = rng.normal(size=lead + in_shape), rng.normal(size=lead + out_shape)
  kernel = rng.normal(size=in_shape + out_shape) * 0.1

  def grads(dtype):
    layer = Projection(tiny_config(dtype=dtype), out_shape, axes, in_axes=in_axes)
    _, vjp = jax.vjp(lambda x, k: layer.apply({"params": {"kernel": k}}, x),
                     jnp.asarray(x, dtype), jnp.asarray(kernel, jnp.float32))
    return vjp(jnp.asarray(cotangent, dtype))

  # y = x . K contracted over in: dx = g . K^T over out, dK = sum over rows of x (outer) g.
  rows = int(np.prod(lead))
  want_dx = np.tensordot(cotangent, kernel, axes=(tuple(range(len(lead), cotangent.ndim)),
                                                  tuple(range(in_axes, kernel.ndim))))
  want_dk = np.tensordot(x.reshape(rows, *in_shape), cotangent.reshape(rows, *out_shape),
                         axes=(0, 0))
  dx, dk = grads("float32")
  assert dx.shape == x.shape and dk.shape == kernel.shape and dk.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(dx), want_dx, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(dk), want_dk, rtol=1e-5, atol=1e-5)
  dx16, dk16 = grads("bfloat16")
  assert dx16.dtype == jnp.bfloat16 and dk16.dtype == jnp.float32
  scale = lambda a: np.abs(a).max()  # pylint: disable=unnecessary-lambda-assignment
  np.testing.assert_allclose(np.asarray(dx16, np.float64), want_dx, atol=2 ** -6 * scale(want_dx))
  np.testing.assert_allclose(np.asarray(dk16, np.float64), want_dk, atol=2 ** -6 * scale(want_dk))


def _rotate_reference(x, positions, theta, sign):
  """Rotate-half RoPE by ``sign`` x the angles, float64 numpy."""
  d = x.shape[-1]
  angles = positions[..., None] / theta ** (np.arange(0, d, 2) / d)
  cos, sin = np.cos(angles)[:, :, None], sign * np.sin(angles)[:, :, None]
  x1, x2 = x[..., :d // 2], x[..., d // 2:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def test_rope_and_its_gradient_match_float64():
  """RoPE is the float64 rotation; its gradient (custom VJP) the inverse rotation of the
  cotangent, float32 to 1e-6; bfloat16 in and out, cotangent included."""
  rng = np.random.default_rng(2)
  x, cotangent = rng.normal(size=(2, 9, 3, 16)), rng.normal(size=(2, 9, 3, 16))
  positions = rng.integers(0, 300, size=(2, 9))  # float32 angles: about 1e-7 x position.
  theta = 10000.0

  @jax.jit
  def rope_and_vjp(x, cotangent):
    out, vjp = jax.vjp(lambda x: apply_rope(x, jnp.asarray(positions, jnp.int32), theta), x)
    return out, vjp(cotangent)[0]

  out, grad = rope_and_vjp(jnp.asarray(x, jnp.float32), jnp.asarray(cotangent, jnp.float32))
  np.testing.assert_allclose(np.asarray(out), _rotate_reference(x, positions, theta, 1.0),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(grad), _rotate_reference(cotangent, positions, theta, -1.0),
                             rtol=1e-5, atol=1e-5)
  out16, grad16 = rope_and_vjp(jnp.asarray(x, jnp.bfloat16), jnp.asarray(cotangent, jnp.bfloat16))
  assert out16.dtype == grad16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(grad16, np.float64), np.asarray(grad), rtol=2 ** -6,
                             atol=2 ** -6)


@pytest.mark.parametrize("chunk", [4, 5])  # 5 does not divide 16: whole rows.
def test_chunked_swiglu_equals_the_whole_row(tiny_config, chunk):
  """ffn_chunk_size: same parameters, output (float64 reference) and gradients as whole rows."""
  cfg = tiny_config()
  x = np.random.default_rng(1).normal(size=(3, 16, cfg.d_model))
  whole = SwiGLU(cfg)
  chunked = SwiGLU(cfg.replace(ffn_chunk_size=chunk))
  params = whole.init(jax.random.key(0), jnp.asarray(x, jnp.float32))
  chunked_params = chunked.init(jax.random.key(0), jnp.asarray(x, jnp.float32))
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), params, chunked_params))
  out = chunked.apply(params, jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(np.asarray(out), _swiglu_reference(x, params), rtol=1e-5, atol=1e-6)

  def loss(module):
    return lambda p, x: jnp.sum(jnp.sin(module.apply(p, x)))

  want = jax.grad(loss(whole), argnums=(0, 1))(params, jnp.asarray(x, jnp.float32))
  got = jax.grad(loss(chunked), argnums=(0, 1))(params, jnp.asarray(x, jnp.float32))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)


def test_chunked_feed_forward_model_loss_and_gradients(tiny_config):
  """A yocou model with every SwiGLU chunked (and full remat) has the loss and gradients of the
  unchunked one."""
  cfg = tiny_config("yocou", num_layers=2)
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 16)), jnp.int32)
  params = Model(cfg).init(jax.random.key(0), tokens)["params"]

  def loss_and_grads(model_cfg):
    model = Model(model_cfg)

    def loss(p):
      x = model.apply({"params": p}, tokens, method="features")
      return step_lib.head_loss(model, p, x, tokens, jnp.ones(tokens.shape, jnp.float32))[0]

    return jax.jit(jax.value_and_grad(loss))(params)

  want_loss, want_grads = loss_and_grads(cfg)
  got_loss, got_grads = loss_and_grads(cfg.replace(ffn_chunk_size=4, remat="full"))
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got_grads,
               want_grads)
