"""The sharded training state, train step and eval step.

``jit_train_step`` is the whole story of distribution: the state lives sharded by the logical
axis rules (parameters and Adam moments alike), batches are sharded over the data axes, and XLA's
SPMD partitioner inserts the collectives. The same function is what the AOT compiler compiles.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from yocou_jax import moe as moe_lib
from yocou_jax import sharding as sharding_lib
from yocou_jax.loss import cross_entropy, fused_cross_entropy, next_token_targets
from yocou_jax.train import optimizer as optimizer_lib

Batch = dict[str, jax.Array]


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  opt_state: Any


def dummy_tokens(batch_size: int, seq_len: int) -> jax.Array:
  return jnp.zeros((batch_size, seq_len), jnp.int32)


def init_state_fn(model: nn.Module, tx: optax.GradientTransformation, seq_len: int) -> Callable:
  """rng -> TrainState with plain (unboxed) float32 params."""

  def init(rng: jax.Array) -> TrainState:
    params = nn.meta.unbox(model.init(rng, dummy_tokens(1, seq_len))["params"])
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  return init


def state_shardings(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh,
                    seq_len: int, rules=sharding_lib.LOGICAL_AXIS_RULES):
  """(abstract TrainState, its NamedShardings), from shapes only: nothing is allocated.

  Adam's moments take the sharding of the parameter they belong to; scalars are replicated.
  Raises a one-line ValueError when a parameter dimension is not divisible by its mesh axes.
  """
  param_shardings = sharding_lib.param_shardings(model, mesh, rules, seq_len)
  abstract = jax.eval_shape(init_state_fn(model, tx, seq_len), jax.random.key(0))
  replicated = NamedSharding(mesh, PartitionSpec())
  opt_shardings = optax.tree_map_params(
      tx, lambda _, s: s, abstract.opt_state, param_shardings,
      transform_non_params=lambda _: replicated)
  shardings = TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings)
  return abstract, shardings


def _targets_and_weights(batch: Batch) -> tuple[jax.Array, jax.Array]:
  """Next-token targets and weights; a ``loss_weights`` row mask (SFT) weighs each target."""
  targets, weights = next_token_targets(batch["tokens"], batch["segment_ids"])
  if "loss_weights" in batch:  # loss_weights[t] weighs token t as the target of position t-1.
    target_weights = jnp.pad(batch["loss_weights"][:, 1:].astype(jnp.float32), ((0, 0), (0, 1)))
    weights = weights * target_weights
  return targets, weights


def _loss_and_grads(model: nn.Module, params: Any, batch: Batch, z_loss: float):
  """Summed (not averaged) loss and its gradient, so microbatches add up exactly."""

  def loss_fn(p):
    inputs = (batch["tokens"], batch["segment_ids"], batch["positions"])
    if _is_moe(model):
      x, sown = model.apply({"params": p}, *inputs, method="features", mutable=["intermediates"])
    else:
      x = model.apply({"params": p}, *inputs, method="features")
    targets, weights = _targets_and_weights(batch)
    _, aux = head_loss(model, p, x, targets, weights, z_loss)
    loss = aux["loss_sum"] + z_loss * aux["z_loss_sum"]
    if _is_moe(model):
      # Router losses are per-token means; weighted by the tokens so microbatches add up.
      stats = moe_lib.collect_stats(sown["intermediates"])
      loss += aux["num_tokens"] * moe_lib.auxiliary_loss(model.cfg, stats)
      aux.update({f"moe_{k}_sum": aux["num_tokens"] * v for k, v in stats.items()})
    return loss, aux

  (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return grads, aux


def head_loss(model: nn.Module, params: Any, x_BxNxD: jax.Array, targets_BxN: jax.Array,
              weights_BxN: jax.Array, z_loss: float = 0.0):
  """``cross_entropy``'s (loss, aux) of the model's final features (``Model.features``).

  Fused and chunked over positions (``loss.fused_cross_entropy``: the [B, N, V] logits are never
  materialised) unless ``cfg.loss_chunk_size`` is -1.
  """
  if model.cfg.loss_chunk_size < 0:
    logits = model.apply({"params": params}, x_BxNxD, method="logits")
    return cross_entropy(logits, targets_BxN, weights_BxN, z_loss)
  h_BxNxD, w_DxV = model.apply({"params": params}, x_BxNxD, method="head")
  return fused_cross_entropy(h_BxNxD, w_DxV, targets_BxN, weights_BxN, z_loss,
                             model.cfg.loss_chunk_size)


def _is_moe(model: nn.Module) -> bool:
  return model.cfg.ffn == "moe"


def _aux_keys(model: nn.Module) -> tuple[str, ...]:
  keys = ("loss_sum", "z_loss_sum", "num_tokens")
  return keys + tuple(f"moe_{k}_sum" for k in moe_lib.STAT_NAMES) if _is_moe(model) else keys


def train_step(state: TrainState, batch: Batch, *, model: nn.Module,
               tx: optax.GradientTransformation, schedule: optax.Schedule,
               microbatches: int = 1, z_loss: float = 0.0) -> tuple[TrainState, dict]:
  """One optimizer step over the global batch, accumulating ``microbatches`` gradients."""
  if microbatches == 1:
    grads, aux = _loss_and_grads(model, state.params, batch, z_loss)
  else:
    def split(x):  # [B, N] -> [M, B/M, N]; microbatch m takes rows m, m+M, ... (shard-local).
      x = x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:])
      return jnp.swapaxes(x, 0, 1)

    def accumulate(carry, mb):
      grads, aux = _loss_and_grads(model, state.params, mb, z_loss)
      return jax.tree.map(jnp.add, carry, (grads, aux)), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    zero_aux = {k: jnp.zeros((), jnp.float32) for k in _aux_keys(model)}
    (grads, aux), _ = jax.lax.scan(accumulate, (zeros, zero_aux), jax.tree.map(split, batch))
  num_tokens = jnp.maximum(aux["num_tokens"], 1.0)
  grads = jax.tree.map(lambda g: g / num_tokens, grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {
      "loss": aux["loss_sum"] / num_tokens,
      "log_z_squared": aux["z_loss_sum"] / num_tokens,  # Unweighted z-loss term.
      "grad_norm": optax.tree.norm(grads),
      "param_norm": optax.tree.norm(params),
      "num_tokens": aux["num_tokens"],
      "learning_rate": schedule(state.step),
      **optimizer_lib.skip_metrics(opt_state),  # Non-finite updates skipped (see optimizer).
  }
  if _is_moe(model):  # Router statistics, averaged over MoE applications and tokens.
    metrics.update({f"moe_{k}": aux[f"moe_{k}_sum"] / num_tokens for k in moe_lib.STAT_NAMES})
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params: Any, batch: Batch, *, model: nn.Module) -> dict:
  x_BxNxD = model.apply({"params": params}, batch["tokens"], batch["segment_ids"],
                        batch["positions"], method="features")
  targets, weights = _targets_and_weights(batch)
  _, aux = head_loss(model, params, x_BxNxD, targets, weights)
  return {"loss_sum": aux["loss_sum"], "num_tokens": aux["num_tokens"]}


def jit_train_step(model, tx, schedule, mesh: Mesh, state_shardings_: TrainState, *,
                   microbatches: int = 1, z_loss: float = 0.0):
  """``train_step`` jitted with state/batch shardings and the state donated."""
  step = functools.partial(train_step, model=model, tx=tx, schedule=schedule,
                           microbatches=microbatches, z_loss=z_loss)
  batch_sharding = sharding_lib.batch_sharding(mesh)
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(step, in_shardings=(state_shardings_, batch_sharding),
                 out_shardings=(state_shardings_, replicated), donate_argnums=(0,))


def jit_eval_step(model, mesh: Mesh, param_shardings: Any):
  batch_sharding = sharding_lib.batch_sharding(mesh)
  return jax.jit(functools.partial(eval_step, model=model),
                 in_shardings=(param_shardings, batch_sharding),
                 out_shardings=NamedSharding(mesh, PartitionSpec()))
