"""AdamW with warmup + decay, global-norm clipping and a weight-decay mask (optax)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import optax

from yocou_jax.config import ConfigError

SCHEDULES = ("cosine", "linear", "constant")


def learning_rate_schedule(train_config: Any) -> optax.Schedule:
  """Linear warmup to ``learning_rate``, then cosine/linear decay to ``min_lr_ratio`` x peak."""
  t = train_config
  if t.schedule not in SCHEDULES:
    raise ConfigError(f"config.train.schedule={t.schedule!r} is invalid; allowed: {SCHEDULES}")
  warmup = int(min(t.warmup_steps, t.steps))
  decay_steps = max(int(t.steps) - warmup, 1)
  end = t.learning_rate * t.min_lr_ratio
  if t.schedule == "cosine":
    decay = optax.cosine_decay_schedule(t.learning_rate, decay_steps, alpha=t.min_lr_ratio)
  elif t.schedule == "linear":
    decay = optax.linear_schedule(t.learning_rate, end, decay_steps)
  else:
    decay = optax.constant_schedule(t.learning_rate)
  if warmup == 0:
    return decay
  return optax.join_schedules(
      [optax.linear_schedule(t.learning_rate / warmup, t.learning_rate, warmup - 1), decay],
      [warmup])


def weight_decay_mask(params: Any, train_config: Any) -> Any:
  """True where weight decay applies: weight matrices; norms and embeddings only if configured."""
  def decays(path, leaf) -> bool:
    names = [getattr(k, "key", str(k)) for k in path]
    if any("norm" in n for n in names):
      return bool(train_config.decay_norms)
    if names and names[-1] in ("embedding", "lm_head"):
      return bool(train_config.decay_embeddings)
    return True

  return jax.tree_util.tree_map_with_path(decays, nn.meta.unbox(params))


def make_optimizer(train_config: Any) -> optax.GradientTransformation:
  t = train_config
  return optax.chain(
      optax.clip_by_global_norm(t.grad_clip) if t.grad_clip > 0 else optax.identity(),
      optax.adamw(
          learning_rate=learning_rate_schedule(t),
          b1=t.b1, b2=t.b2, eps=t.eps,
          weight_decay=t.weight_decay,
          mask=lambda params: weight_decay_mask(params, t),
      ),
  )
