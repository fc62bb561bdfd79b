"""MoE models through the train step: sharded (both modes) equals one device, losses, learning."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.train.synthetic import SEQ_LEN, synthetic_row, tiny_config
from yocou_jax import sharding as sharding_lib
from yocou_jax.config import ModelConfig
from yocou_jax.model import Model
from yocou_jax.train import optimizer as optimizer_lib
from yocou_jax.train import step as step_lib

MOE_FIELDS = dict(ffn="moe", num_experts=4, num_experts_per_token=2, expert_d_ff=16,
                  num_shared_experts=1, num_layers=2)


def moe_train_config(steps=30, **model):
  config = tiny_config("yocou", steps=steps)
  config.model.update(**{**MOE_FIELDS, **model})
  return config


def _batch(start=0, rows=8):
  rows = [synthetic_row(start + i) for i in range(rows)]
  return {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}


def _run_steps(config, mesh, batches, tx):
  """Steps of jit_train_step on ``mesh`` from the seed-0 init; (states' params, metrics)."""
  model = Model(ModelConfig.from_config(config.model))
  schedule = optimizer_lib.learning_rate_schedule(config.train)
  with sharding_lib.activate(mesh):
    abstract, shardings = step_lib.state_shardings(model, tx, mesh, SEQ_LEN)
    state = jax.jit(step_lib.init_state_fn(model, tx, SEQ_LEN), out_shardings=shardings)(
        jax.random.key(0))
    step = step_lib.jit_train_step(model, tx, schedule, mesh, shardings)
    history = []
    for batch in batches:
      state, metrics = step(state, jax.device_put(batch, sharding_lib.batch_sharding(mesh)))
      history.append(jax.device_get(metrics))
  del abstract
  return jax.device_get(state.params), history, state


@functools.cache
def _one_device_step():
  """(params, metrics) of one SGD step on one device: the reference of both sharding modes
  (expert_sharding only places the experts; on one device there is nothing to place)."""
  mesh1 = sharding_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices("cpu")[:1])
  params1, m1, _ = _run_steps(moe_train_config(), mesh1, [_batch()], optax.sgd(1.0))
  return params1, m1


@pytest.mark.parametrize("expert_sharding", ["fsdp", "expert"])
def test_sharded_moe_step_equals_one_device(expert_sharding):
  """A (data 2, fsdp 2, tensor 2) mesh; in 'expert' mode each device holds 2 of the 4 experts."""
  config = moe_train_config(expert_sharding=expert_sharding)
  tx = optax.sgd(1.0)  # The parameter change is exactly the gradient.
  mesh8 = sharding_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices("cpu")[:8])
  params8, m8, state8 = _run_steps(config, mesh8, [_batch()], tx)
  params1, m1 = _one_device_step()
  gate = state8.params["cross_decoder"]["layers"]["mlp"]["gate"]  # [layers, E, D, F]
  expected = (1, 2, 1, 2) if expert_sharding == "expert" else (1, 1, 2, 2)
  assert tuple(a // b for a, b in zip(gate.shape, gate.addressable_shards[0].data.shape)) == \
      expected
  for key in ("loss", "grad_norm", "moe_load_balance", "moe_router_z", "moe_max_load"):
    np.testing.assert_allclose(m8[0][key], m1[0][key], rtol=1e-5, err_msg=key)
  assert m1[0]["moe_dropped_fraction"] == 0.0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0), params8,
               params1)


def test_microbatched_moe_step_equals_one_batch_in_loss_and_router_metrics():
  config = moe_train_config(arch="transformer", num_layers=1)
  tx = optax.sgd(1.0)
  model = Model(ModelConfig.from_config(config.model))
  schedule = optimizer_lib.learning_rate_schedule(config.train)
  state = step_lib.init_state_fn(model, tx, SEQ_LEN)(jax.random.key(0))
  batch = _batch()
  steps = [jax.jit(functools.partial(step_lib.train_step, model=model, tx=tx, schedule=schedule,
                                     microbatches=m)) for m in (1, 2)]
  (new1, m1), (new2, m2) = (step(state, batch) for step in steps)
  np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
  assert m1["moe_load_balance"] >= 1.0 and m1["moe_router_z"] > 0  # K=2: >= 1 is a loose floor.
  # Router statistics are per-microbatch means, averaged with token weights: close, not equal.
  np.testing.assert_allclose(m1["moe_router_z"], m2["moe_router_z"], rtol=0.05)
  del new1, new2


def test_tiny_moe_yocou_learns_in_30_steps():
  config = moe_train_config(steps=30)
  tx = optimizer_lib.make_optimizer(config.train)
  mesh = sharding_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices("cpu")[:1])
  _, history, _ = _run_steps(config, mesh, [_batch(8 * s) for s in range(30)], tx)
  losses = [float(h["loss"]) for h in history]
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5, losses
  assert all(h["moe_dropped_fraction"] == 0.0 for h in history)
  assert all(1.0 <= h["moe_max_load"] <= 4.0 for h in history)  # Between balance and all-on-one.
