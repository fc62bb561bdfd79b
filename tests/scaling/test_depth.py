"""Test-time depth and the representation analysis of a tiny trained yocou (T=2).

The run is ``corpus_run`` (tests/conftest.py): 1 self + 1 cross layer, 8 steps of the real text
pipeline.
"""

import jax
import numpy as np
import pytest

from yocou_jax.model import Model
from yocou_jax.scaling import depth


def test_loss_at_the_trained_depth_is_the_trainers_validation_loss(corpus_run):
  config, workdir, result = corpus_run  # tests/conftest.py
  rows = depth.loss_at_depths(workdir, [1, 2, 3])
  assert [r["num_iterations"] for r in rows] == [1, 2, 3]
  assert [r["trained"] for r in rows] == [False, True, False]
  final = [r for r in result.history if "eval_loss" in r][-1]
  assert rows[1]["eval_loss"] == pytest.approx(final["eval_loss"], rel=1e-6)
  assert rows[1]["eval_tokens"] == final["eval_tokens"]
  assert rows[0]["eval_loss"] != pytest.approx(rows[1]["eval_loss"], rel=1e-6)
  del config


def test_angular_distances_count_and_a_direct_reference(corpus_run):
  config, workdir, _ = corpus_run  # tests/conftest.py
  model_cfg, transitions = depth.representation_analysis(workdir)
  t, self_layers, cross_layers = 2, model_cfg.num_self_layers, model_cfg.num_cross_layers
  assert len(transitions) == t * self_layers + cross_layers
  assert [x.part for x in transitions] == (["self_decoder"] * t * self_layers
                                           + ["cross_decoder"] * cross_layers)
  distances = np.array([x.distance for x in transitions])
  assert np.all(np.isfinite(distances)) and np.all((distances > 0) & (distances < 1))

  # The captured states are the model's own: the last one, through the final norm and head,
  # gives the model's logits.
  run = depth.text_lib.load_run(workdir)
  batch = {k: jax.numpy.asarray(v) for k, v in depth.eval_batches(run)[0].items()}
  states = depth.residual_states(model_cfg, run.params, batch)
  model = Model(model_cfg)  # Jitted: one compile each rather than one per operation.
  logits = jax.jit(model.apply)({"params": run.params}, batch["tokens"], batch["segment_ids"],
                                batch["positions"])
  head = jax.jit(lambda p, x: model.apply({"params": p}, x, method=Model.logits))(
      run.params, states[-1][2])
  np.testing.assert_allclose(np.asarray(head), np.asarray(logits), rtol=1e-5, atol=1e-5)
  del config
