"""Next-token cross-entropy over packed rows, in float32, with optional z-loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

Array = jax.Array


def next_token_targets(tokens_BxN: Array, segment_ids_BxN: Array) -> tuple[Array, Array]:
  """Targets ``tokens[t+1]`` and weights that are 1 where t+1 is in the same (non-padding) document.

  The last token of every document (and of the row) has no target and weight 0.
  """
  targets = jnp.concatenate([tokens_BxN[:, 1:], jnp.zeros_like(tokens_BxN[:, :1])], axis=1)
  next_seg = jnp.concatenate([segment_ids_BxN[:, 1:], jnp.zeros_like(segment_ids_BxN[:, :1])],
                             axis=1)
  weights = (segment_ids_BxN > 0) & (next_seg == segment_ids_BxN)
  return targets, weights.astype(jnp.float32)


def cross_entropy(logits_BxNxV: Array, targets_BxN: Array, weights_BxN: Array,
                  z_loss: float = 0.0) -> tuple[Array, dict[str, Array]]:
  """Mean weighted cross-entropy (+ z_loss * mean log(Z)^2); also returns sums for logging.

  Returns ``(loss, aux)`` where aux holds ``loss_sum`` (cross-entropy only), ``z_loss_sum`` and
  ``num_tokens``, so that gradient-accumulation and evaluation can average exactly over tokens.
  """
  logits = logits_BxNxV.astype(jnp.float32)
  ce_BxN = optax.softmax_cross_entropy_with_integer_labels(logits, targets_BxN)
  num_tokens = jnp.sum(weights_BxN)
  ce_sum = jnp.sum(ce_BxN * weights_BxN)
  log_z_BxN = jax.nn.logsumexp(logits, axis=-1)
  z_sum = jnp.sum(jnp.square(log_z_BxN) * weights_BxN)
  denom = jnp.maximum(num_tokens, 1.0)
  loss = (ce_sum + z_loss * z_sum) / denom
  return loss, {"loss_sum": ce_sum, "z_loss_sum": z_sum, "num_tokens": num_tokens}
