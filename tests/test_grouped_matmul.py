"""moe.grouped_matmul (every ``moe_matmul``) against a float64 per-row reference and ragged_dot.

The reference multiplies each row by its group's matrix in numpy float64; its gradients of
``sum(out * cotangent)`` are the closed forms ``dlhs[i] = cot[i] rhs[g(i)]^T`` and
``drhs[g] = sum_{i in g} lhs[i]^T cot[i]``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from yocou_jax import moe
from yocou_jax.config import ConfigError, ModelConfig

G, M, K, N = 5, 45, 12, 7
# Skewed: an empty group, groups over several row blocks of 8, and 5 rows past the last group.
GROUP_SIZES = np.array([0, 17, 3, 20, 0], np.int32)


def per_row_reference(lhs, rhs, group_sizes, cot):
  lhs, rhs, cot = (np.asarray(a, np.float64) for a in (lhs, rhs, cot))
  out, dlhs, drhs = np.zeros((M, N)), np.zeros_like(lhs), np.zeros_like(rhs)
  row = 0
  for g, size in enumerate(group_sizes):
    for i in range(row, row + size):
      out[i] = lhs[i] @ rhs[g]
      dlhs[i] = cot[i] @ rhs[g].T
      drhs[g] += np.outer(lhs[i], cot[i])
    row += size
  return out, dlhs, drhs


@pytest.fixture(scope="module")
def operands():
  rng = np.random.default_rng(0)
  lhs = jnp.asarray(rng.normal(size=(M, K)), jnp.float32)
  rhs = jnp.asarray(rng.normal(size=(G, K, N)), jnp.float32)
  cot = jnp.asarray(rng.normal(size=(M, N)), jnp.float32)
  return lhs, rhs, cot


def value_and_grads(impl, lhs, rhs, cot, block_rows=8):
  def loss(lhs_, rhs_):
    out = moe.grouped_matmul(lhs_, rhs_, jnp.asarray(GROUP_SIZES), impl=impl,
                             block_rows=block_rows)
    return jnp.sum(out * cot), out
  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(lhs, rhs)
  return out, *grads


@pytest.mark.parametrize("impl", ["blocked", "megablox", "ragged_dot"])
def test_grouped_matmul_equals_the_per_row_reference_forward_and_gradients(operands, impl):
  """Megablox runs interpreted here; rows past the last group give 0 and get no gradient."""
  lhs, rhs, cot = operands
  got = value_and_grads(impl, lhs, rhs, cot)
  for g, r, name in zip(got, per_row_reference(lhs, rhs, GROUP_SIZES, cot),
                        ("out", "dlhs", "drhs")):
    np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-5, err_msg=f"{impl} {name}")
    assert np.all(np.isfinite(g)), name
  assert np.all(got[0][GROUP_SIZES.sum():] == 0) and np.all(got[1][GROUP_SIZES.sum():] == 0)


def test_blocked_equals_ragged_dot_for_any_block_size(operands):
  lhs, rhs, cot = operands
  want = value_and_grads("ragged_dot", lhs, rhs, cot)
  for block_rows in (8, 16, 64):  # Blocks within a group, a group in a block, one block.
    for g, w in zip(value_and_grads("blocked", lhs, rhs, cot, block_rows), want):
      np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5, err_msg=f"block_rows={block_rows}")


def test_auto_matmul_is_blocked_on_cpu_and_megablox_for_a_tpu_target():
  from yocou_jax import aot  # pylint: disable=g-import-not-at-top

  assert moe.resolve_matmul("auto") == "blocked"
  assert moe.resolve_matmul("ragged_dot") == "ragged_dot"
  with aot.target_kernels("tpu"):
    assert moe.resolve_matmul("auto") == "megablox"


@pytest.mark.parametrize("field,value,match", [
    ("moe_matmul", "dense", "allowed: auto, ragged_dot, blocked, megablox"),
    ("moe_block_rows", 12, "must be a positive multiple of 8"),
])
def test_bad_matmul_fields_fail_with_one_line_naming_the_field(field, value, match):
  with pytest.raises(ConfigError, match=f"config.model.{field}=.*{match}"):
    ModelConfig(arch="transformer", ffn="moe", **{field: value})
