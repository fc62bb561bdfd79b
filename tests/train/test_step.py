"""Train-step pieces: gradient accumulation, the schedule, the weight-decay mask, z-loss."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.train.synthetic import SEQ_LEN, synthetic_row, tiny_config
from yocou_jax.config import ModelConfig
from yocou_jax.loss import cross_entropy, next_token_targets
from yocou_jax.model import Model
from yocou_jax.train import optimizer as optimizer_lib
from yocou_jax.train import step as step_lib


def _batch(rows=8):
  rows = [synthetic_row(i) for i in range(rows)]
  return {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}


def _state_and_step(config, microbatches):
  """With SGD(lr=1) the parameter change is exactly the (accumulated) gradient."""
  model = Model(ModelConfig.from_config(config.model))
  tx = optax.sgd(1.0)
  state = step_lib.init_state_fn(model, tx, SEQ_LEN)(jax.random.key(0))
  step = jax.jit(lambda s, b: step_lib.train_step(
      s, b, model=model, tx=tx, schedule=optimizer_lib.learning_rate_schedule(config.train),
      microbatches=microbatches, z_loss=config.train.z_loss))
  return state, step


@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_gradient_accumulation_equals_one_big_batch(z_loss):
  config = tiny_config()
  config.train.z_loss = z_loss
  batch = _batch()
  # Uneven token counts per microbatch: mask out part of one row.
  batch["segment_ids"] = batch["segment_ids"].at[0, 20:].set(0)
  state, step1 = _state_and_step(config, 1)
  _, step4 = _state_and_step(config, 4)
  new1, m1 = step1(state, batch)
  new4, m4 = step4(state, batch)
  np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-6)
  np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6),
               new1.params, new4.params)
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), new1.params, state.params)
  assert max(jax.tree.leaves(moved)) > 1e-3  # The gradients compared are not all zero.


def test_schedule_warmup_then_cosine_to_min():
  t = tiny_config(steps=100).train
  t.update(learning_rate=1.0, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
  lr = optimizer_lib.learning_rate_schedule(t)
  np.testing.assert_allclose([lr(0), lr(9)], [0.1, 1.0], rtol=1e-6)
  np.testing.assert_allclose(lr(10 + 45), 0.1 + 0.9 * 0.5, rtol=1e-5)  # Half-way: cosine = 0.5.
  np.testing.assert_allclose(lr(100), 0.1, rtol=1e-6)
  t.schedule = "linear"
  lr = optimizer_lib.learning_rate_schedule(t)
  np.testing.assert_allclose(lr(55), 1.0 - 0.9 * 0.5, rtol=1e-5)


def test_weight_decay_skips_norms_and_embeddings():
  config = tiny_config()
  params = step_lib.init_state_fn(Model(ModelConfig.from_config(config.model)),
                                  optimizer_lib.make_optimizer(config.train),
                                  SEQ_LEN)(jax.random.key(0)).params
  mask = optimizer_lib.weight_decay_mask(params, config.train)
  assert not mask["embedding"] and not mask["lm_head"] and not mask["final_norm"]["scale"]
  layers = mask["self_decoder"]["stack"]["layers"]
  assert layers["attn"]["query"]["kernel"] and not layers["attn_norm"]["scale"]
  # Decay really is skipped: with zero gradients only decayed weights move.
  config.train.update(weight_decay=0.5, learning_rate=0.1, warmup_steps=0, grad_clip=0.0)
  tx = optimizer_lib.make_optimizer(config.train)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  assert float(jnp.abs(updates["embedding"]).max()) == 0.0
  np.testing.assert_allclose(updates["self_decoder"]["stack"]["layers"]["mlp"]["up"]["kernel"],
                             -0.1 * 0.5 * layers_value(params), rtol=1e-6)


def layers_value(params):
  return params["self_decoder"]["stack"]["layers"]["mlp"]["up"]["kernel"]


def test_cross_entropy_matches_numpy_reference_with_z_loss():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 6, 11)).astype(np.float32)
  tokens = rng.integers(0, 11, size=(2, 6)).astype(np.int32)
  segments = np.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]], np.int32)
  targets, weights = next_token_targets(jnp.asarray(tokens), jnp.asarray(segments))
  loss, aux = cross_entropy(jnp.asarray(logits), targets, weights, z_loss=0.1)
  # Reference: predict t+1 from t only inside one document.
  terms, zs = [], []
  for b in range(2):
    for t in range(5):
      if segments[b, t] > 0 and segments[b, t + 1] == segments[b, t]:
        x = logits[b, t].astype(np.float64)
        log_z = np.log(np.exp(x - x.max()).sum()) + x.max()
        terms.append(log_z - x[tokens[b, t + 1]])
        zs.append(log_z ** 2)
  assert float(aux["num_tokens"]) == len(terms) == 3 + 5
  np.testing.assert_allclose(loss, np.mean(terms) + 0.1 * np.mean(zs), rtol=1e-5)
