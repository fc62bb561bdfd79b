"""Cached full/global attention against a float64 reference, and the decode step's cache update
in place (no copy of a cache buffer in the compiled step)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from yocou_jax import accounting
from yocou_jax.config import ModelConfig
from yocou_jax.inference import attention as attn_lib
from yocou_jax.inference import engine as engine_lib


def _reference(q_BxCxHxD, positions_BxC, k_BxKxSxD, v_BxKxSxD):
  """Causal attention in float64: query at position p sees buffer keys j <= p."""
  q, k, v = (np.asarray(x, np.float64) for x in (q_BxCxHxD, k_BxKxSxD, v_BxKxSxD))
  b, c, h, d = q.shape
  g = h // k.shape[1]
  k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)  # [B, H, S, D]
  s = np.einsum("bchd,bhsd->bhcs", q, k) / np.sqrt(d)
  visible = np.arange(k.shape[2])[None, None, :] <= np.asarray(positions_BxC)[:, :, None]
  s = np.where(visible[:, None], s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhcs,bhsd->bchd", p, v)


@pytest.mark.parametrize("c", [1, 3])
def test_cache_attention_matches_float64(c):
  """One decode token (single pass) and a chunk (blocked loop), mixed positions, GQA."""
  rng = np.random.default_rng(0)
  b, h, kv, s, d = 4, 6, 2, 40, 8
  q = rng.standard_normal((b, c, h, d)).astype(np.float32)
  k, v = (rng.standard_normal((b, kv, s, d)).astype(np.float32) for _ in range(2))
  positions = np.array([0, 7, 33, s - c])[:, None] + np.arange(c)[None, :]
  out = attn_lib.cache_attention(jnp.asarray(q), jnp.asarray(positions, jnp.int32),
                                 jnp.asarray(k), jnp.asarray(v), block_size=16)
  np.testing.assert_allclose(np.asarray(out), _reference(q, positions, k, v), atol=2e-6, rtol=0)


def _buffer_copies(hlo: str, shape: tuple[int, ...]) -> list[str]:
  pattern = re.compile(rf"f32\[{','.join(map(str, shape))}\]\{{[0-9,]+\}} copy\(")
  return [line.strip() for line in hlo.splitlines() if pattern.search(line)]


@pytest.mark.parametrize("arch,batch", [("transformer", 1), ("transformer", 3), ("yocou", 1),
                                        ("yocou", 3)])
def test_decode_step_updates_the_cache_in_place(arch, batch):
  """The donated cache is written where it lies: the compiled step copies no full buffer."""
  cfg = ModelConfig(arch=arch, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2,
                    head_dim=8, d_ff=64, vocab_size=64, window=12, num_iterations=2)
  max_len = 96
  params = accounting.abstract_params(cfg)
  state = jax.eval_shape(lambda: engine_lib.init_state(cfg, batch, max_len))
  hlo = engine_lib._jit_decode_step.lower(  # pylint: disable=protected-access
      params, state, jax.ShapeDtypeStruct((batch,), jnp.int32), cfg=cfg,
      opts=engine_lib.Options()).compile().as_text()
  for length in {max_len, cfg.window}:  # Full/global buffers and window rings.
    assert not _buffer_copies(hlo, (batch, cfg.num_kv_heads, length, cfg.head_dim))
