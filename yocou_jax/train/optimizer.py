"""AdamW with warmup + decay, global-norm clipping and a weight-decay mask (optax)."""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
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


class SkipNonFiniteState(NamedTuple):
  """Counters kept next to ``optax.apply_if_finite``'s, all int32 scalars."""
  updates: jax.Array  # Updates seen (skipped or not): the 1-based optimizer step.
  longest_run: jax.Array  # Longest run of consecutive skipped updates so far.
  last_skipped: jax.Array  # 1-based step of the last skipped update (0: none).
  inner_state: optax.ApplyIfFiniteState


def skip_nonfinite(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """``optax.apply_if_finite`` that never gives up, plus the counters the trainer acts on.

  A gradient with a NaN or Inf anywhere leaves the parameters and the inner optimizer state
  untouched (a ``lax.cond`` inside the jitted step, no host round trip). Deciding to stop is the
  trainer's job (``config.train.nonfinite``): it reads the counters at its logging and
  checkpoint steps, and the longest run survives until then.
  """
  never = jnp.iinfo(jnp.int32).max  # apply_if_finite's counter saturates below this.
  guarded = optax.apply_if_finite(inner, max_consecutive_errors=never)

  def init(params):
    zero = jnp.zeros([], jnp.int32)
    return SkipNonFiniteState(zero, zero, zero, guarded.init(params))

  def update(updates, state, params=None):
    updates, inner_state = guarded.update(updates, state.inner_state, params)
    step = state.updates + 1
    return updates, SkipNonFiniteState(
        updates=step,
        longest_run=jnp.maximum(state.longest_run, inner_state.notfinite_count),
        last_skipped=jnp.where(inner_state.last_finite, state.last_skipped, step),
        inner_state=inner_state)

  return optax.GradientTransformation(init, update)


def skip_metrics(opt_state: Any) -> dict[str, jax.Array]:
  """The skip counters of ``make_optimizer``'s state, as train-step metrics ({} for others)."""
  if not isinstance(opt_state, SkipNonFiniteState):
    return {}
  return {"skipped_consecutive": opt_state.inner_state.notfinite_count,
          "skipped_total": opt_state.inner_state.total_notfinite,
          "skipped_longest_run": opt_state.longest_run,
          "skipped_last_step": opt_state.last_skipped}


def make_optimizer(train_config: Any) -> optax.GradientTransformation:
  """AdamW behind global-norm clipping; a non-finite gradient skips the whole update."""
  t = train_config
  return skip_nonfinite(optax.chain(
      optax.clip_by_global_norm(t.grad_clip) if t.grad_clip > 0 else optax.identity(),
      optax.adamw(
          learning_rate=learning_rate_schedule(t),
          b1=t.b1, b2=t.b2, eps=t.eps,
          weight_decay=t.weight_decay,
          mask=lambda params: weight_decay_mask(params, t),
      ),
  ))
