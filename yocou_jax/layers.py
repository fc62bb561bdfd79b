"""Building blocks shared by every architecture: RMSNorm, rotate-half RoPE, SwiGLU, projections.

Parameters are float32 and carry logical axis names (``nn.with_logical_partitioning``); compute
happens in the configured activation dtype, with norms and RoPE in float32.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from yocou_jax.config import ModelConfig

Array = jax.Array


def param_init(cfg: ModelConfig, axes: Sequence[str]):
  """Normal(init_std) initialiser annotated with logical axis names."""
  return nn.with_logical_partitioning(nn.initializers.normal(stddev=cfg.init_std), tuple(axes))


def activation(x: Array, *axes: str) -> Array:
  """Constrains an activation's sharding by logical names (a no-op outside a mesh/rules scope)."""
  return nn.with_logical_constraint(x, axes)


class RMSNorm(nn.Module):
  """y = x / rms(x) * scale, computed in float32, returned in the activation dtype."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.cfg.norm_eps)
    return (y * scale).astype(self.cfg.compute_dtype)


def apply_rope(x_BxNxHxD: Array, positions_BxN: Array, theta: float) -> Array:
  """Rotate-half RoPE (the Llama / Hugging Face convention): pairs (i, i + D/2) rotate together.

  Computed in float32 (at least) and returned in the dtype of ``x``. The gradient is the inverse
  rotation of the cotangent, computed the same way (a custom VJP): autodiff's transpose of the
  halves and their concatenation made the TPU compiler keep float32 copies of the cotangent
  (two [B, N, H, D] float32 buffers a layer) where this is one fused elementwise pass.
  """
  return _rope(x_BxNxHxD, positions_BxN, theta)


def _rope_tables(positions_BxN: Array, d: int, theta: float) -> tuple[Array, Array]:
  """cos and sin of every position's D/2 RoPE angles, [B, N, 1, D/2] each, as one buffer.

  XLA's CPU backend fuses the sin and cos into each rotation that reads them and so evaluates
  them once per head and per half of the head dim (four rotations of a [4, 1024, 8, 64] query:
  46-51 ms, against 5-8 ms from tables). A gather is never fused into its consumers, so the two
  tables are read through one (of both rows of their [2, B, N, D/2] stack, in order): they are
  computed once, and on every backend the gather costs one copy of B x N x D floats.
  """
  inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  angles_BxNxF = positions_BxN.astype(jnp.float32)[..., None] * inv_freq
  tables = jnp.take(jnp.stack([jnp.cos(angles_BxNxF), jnp.sin(angles_BxNxF)]), jnp.arange(2),
                    axis=0)
  return tables[0][:, :, None, :], tables[1][:, :, None, :]


def _rotate(x_BxNxHxD: Array, positions_BxN: Array, theta: float, sign: float) -> Array:
  """Rotates every pair (i, i + D/2) by ``sign`` x its RoPE angle."""
  d = x_BxNxHxD.shape[-1]
  cos, sin = _rope_tables(positions_BxN, d, theta)
  sin = sign * sin
  x = x_BxNxHxD.astype(jnp.promote_types(x_BxNxHxD.dtype, jnp.float32))
  x1, x2 = x[..., : d // 2], x[..., d // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxNxHxD.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _rope(x_BxNxHxD: Array, positions_BxN: Array, theta: float) -> Array:
  return _rotate(x_BxNxHxD, positions_BxN, theta, 1.0)


def _rope_fwd(x_BxNxHxD, positions_BxN, theta):
  return _rotate(x_BxNxHxD, positions_BxN, theta, 1.0), positions_BxN


def _rope_bwd(theta, positions_BxN, g_BxNxHxD):
  return _rotate(g_BxNxHxD, positions_BxN, theta, -1.0), None


_rope.defvjp(_rope_fwd, _rope_bwd)


class Projection(nn.Module):
  """A bias-free linear map ``x[..., in] -> y[..., out_shape]`` with a logically named kernel.

  ``in_axes`` counts the trailing input dims contracted (1 for [.., D], 2 for [.., H, Dh]).
  """

  cfg: ModelConfig
  out_shape: tuple[int, ...]
  axes: tuple[str, ...]
  in_axes: int = 1

  @nn.compact
  def __call__(self, x: Array) -> Array:
    in_shape = x.shape[-self.in_axes:]
    kernel = self.param("kernel", param_init(self.cfg, self.axes), (*in_shape, *self.out_shape),
                        jnp.float32)
    dtype = self.cfg.compute_dtype
    # The kernel whole along 'embed' (FSDP all-gathers it in the compute dtype) before the matmul:
    # left sharded along a contracted dim, the partitioner runs a windowed matmul whose float32
    # partial sums are a full-size float32 output. So the float32 accumulation is rounded once to
    # the compute dtype inside the matmul and a bfloat16 model keeps no float32 [tokens, d_ff]
    # buffers. (XLA:CPU has no fast bfloat16-output matmul: asking for one made every bfloat16
    # compile and step slower.)
    kernel = activation(kernel.astype(dtype), *(None if a == "embed" else a for a in self.axes))
    return _project(x.astype(dtype), kernel, self.in_axes).astype(dtype)


def _contract(x: Array, kernel: Array, in_axes: int) -> Array:
  """x[..., in] . kernel[in, out] -> [..., out], accumulated (and returned) in float32."""
  contract = tuple(range(x.ndim - in_axes, x.ndim))
  return jax.lax.dot_general(x, kernel, ((contract, tuple(range(in_axes))), ((), ())),
                             preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _project(x: Array, kernel: Array, in_axes: int) -> Array:
  """:func:`_contract` whose kernel gradient is one 2-D matmul over all the rows.

  Autodiff writes the kernel gradient as a contraction over the leading [B, N] dims of the
  output cotangent and the input. XLA lowers a contraction over two dims by first transposing
  one operand (on CPU the larger one, the [tokens, d_ff] cotangent of the SwiGLU projections,
  with the SwiGLU backward fused into that strided copy: a quarter of a training step). Here
  both are flattened to [rows, features] (free: the rows are the leading, contiguous dims) and
  contracted over the rows, which every backend's matmul takes without a copy.
  """
  return _contract(x, kernel, in_axes)


def _project_fwd(x, kernel, in_axes):
  return _contract(x, kernel, in_axes), (x, kernel)


def _project_bwd(in_axes, residuals, g):
  x, kernel = residuals
  g = g.astype(x.dtype)  # The cotangent of the compute-dtype output: exact in x's dtype.
  out_dims = tuple(range(in_axes, kernel.ndim))
  dx = jax.lax.dot_general(g, kernel, ((tuple(range(g.ndim - len(out_dims), g.ndim)), out_dims),
                                       ((), ())), preferred_element_type=jnp.float32)
  dk = jax.lax.dot_general(x.reshape(-1, math.prod(kernel.shape[:in_axes])),
                           g.reshape(-1, math.prod(kernel.shape[in_axes:])),
                           (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
  return dx.astype(x.dtype), dk.reshape(kernel.shape).astype(kernel.dtype)


_project.defvjp(_project_fwd, _project_bwd)


class SwiGLU(nn.Module):
  """down(silu(gate(x)) * up(x)), Llama's feed-forward block.

  With ``cfg.ffn_chunk_size`` = C (and rows longer than C, a multiple of it) the block runs over
  chunks of C positions of every row, one after the other (``nn.scan``), each chunk
  rematerialised: the backward pass then holds the [rows, C, d_ff] intermediates of one chunk,
  not of the whole row. The parameters and the result are the same.
  """

  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    self.gate = Projection(cfg, (cfg.d_ff,), ("embed", "mlp"))
    self.up = Projection(cfg, (cfg.d_ff,), ("embed", "mlp"))
    self.down = Projection(cfg, (cfg.d_model,), ("mlp", "embed"))

  def __call__(self, x_BxNxD: Array) -> Array:
    b, n, d = x_BxNxD.shape
    c = self.cfg.ffn_chunk_size
    if not c or n <= c or n % c:
      return self.ffn(x_BxNxD)
    chunks = nn.scan(nn.remat(lambda mdl, carry, x: (carry, mdl.ffn(x)), prevent_cse=False),
                     variable_broadcast="params", split_rngs={"params": False},
                     in_axes=1, out_axes=1, length=n // c)
    _, y_BxLxCxD = chunks(self, None, x_BxNxD.reshape(b, n // c, c, d))
    return y_BxLxCxD.reshape(b, n, -1)

  def ffn(self, x_BxNxD: Array) -> Array:
    h_BxNxF = activation(nn.silu(self.gate(x_BxNxD)) * self.up(x_BxNxD),
                         "activation_batch", "activation_length", "activation_mlp")
    return self.down(h_BxNxF)
