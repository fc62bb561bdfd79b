"""A trained model at other depths: validation loss at other loop counts T, and the angular
distance between the residual stream after consecutive layer applications (the paper's Fig. 8).

Both read a training workdir (its checkpoint, config and tokenizer) and the run's own fixed
validation batches, so the loss at the trained T is the trainer's validation loss.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from yocou_jax import sharding as sharding_lib
from yocou_jax.config import ModelConfig
from yocou_jax.inference import text as text_lib
from yocou_jax.model import INTERMEDIATES, Model
from yocou_jax.train import step as step_lib
from yocou_jax.train import trainer


def eval_batches(run: text_lib.Run) -> list[dict]:
  """The run's fixed validation batches (as the trainer built them)."""
  from yocou_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  config = run.config
  return pipeline.make_eval_batches(config.data, run.tokenizer,
                                    global_batch_size=config.eval.batch_size,
                                    num_batches=config.eval.num_batches)


def loss_at_depths(workdir: str, iterations: Sequence[int],
                   step: Optional[int] = None) -> list[dict[str, Any]]:
  """Validation loss of ``workdir``'s checkpoint evaluated at each T in ``iterations``."""
  run = text_lib.load_run(workdir, step)
  batches = eval_batches(run)
  mesh = sharding_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  rows = []
  with sharding_lib.activate(mesh):
    for t in iterations:
      model_cfg = run.model_cfg.replace(num_iterations=int(t))
      replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
      eval_fn = step_lib.jit_eval_step(Model(model_cfg), mesh,
                                       jax.tree.map(lambda _: replicated, run.params))
      result = trainer.evaluate(eval_fn, run.params, batches, sharding_lib.batch_sharding(mesh))
      rows.append({"num_iterations": int(t), "trained": model_cfg.iterations == run.model_cfg.iterations,
                   "eval_loss": result["eval_loss"], "eval_tokens": result["eval_tokens"],
                   "step": run.step})
  return rows


@dataclasses.dataclass(frozen=True)
class Transition:
  """One layer application: its label, the part it belongs to and its mean angular distance."""

  label: str
  part: str
  distance: float


def _stack(tree: Any, *keys: str) -> Optional[jnp.ndarray]:
  """The sown residuals under ``keys``: [T?, layers, B, N, D] (None if the part is absent)."""
  for key in keys:
    if key not in tree:
      return None
    tree = tree[key]
  return tree["residual"][0]


def residual_states(model_cfg: ModelConfig, params: Any,
                    batch: dict) -> list[tuple[str, str, jnp.ndarray]]:
  """(label, part, residual [B, N, D]) after every layer application, from the embedding on."""
  model = Model(model_cfg)
  args = (batch["tokens"], batch["segment_ids"], batch["positions"])
  _, state = model.apply({"params": params}, *args, mutable=[INTERMEDIATES])
  inter = state[INTERMEDIATES]
  states = [("embedding", "embedding",
             model.apply({"params": params}, batch["tokens"], method=Model.embed))]
  looped_parts = {"yocou": "self_decoder", "rins": "recursive", "looped": "decoder",
                  "yoco_upper_loop": "cross_decoder", "yoco_upper_loop_nokv": "cross_decoder"}
  order = (("self_decoder", ("self_decoder", "stack", "layers")),
           ("recursive", ("recursive", "stack", "layers")),
           ("decoder", ("decoder", "stack", "layers")),
           ("cross_decoder", ("cross_decoder", "layers")))
  for part, keys in order:
    stack = _stack(inter, *keys)
    if stack is None:
      continue
    if looped_parts.get(model_cfg.arch) != part:
      stack = stack[None]  # One application: [1, layers, B, N, D].
    for t in range(stack.shape[0]):
      for layer in range(stack.shape[1]):
        label = f"{part} T{t + 1} L{layer}" if stack.shape[0] > 1 else f"{part} L{layer}"
        states.append((label, part, stack[t, layer]))
  return states


def angular_distances(model_cfg: ModelConfig, params: Any,
                      batches: Sequence[dict]) -> list[Transition]:
  """Mean over valid tokens of arccos(cos(x_prev, x_next)) / pi for each layer application.

  The distances are those of Gromov et al. (arXiv 2403.17887), between the residual stream
  before and after each layer application; the first cross-decoder layer's is measured from the
  self-decoder's output, the point where the global K/V is produced.
  """
  sums, count, labels = None, 0.0, None
  for batch in batches:
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    states = residual_states(model_cfg, params, batch)
    labels = [(label, part) for label, part, _ in states[1:]]
    mask = np.asarray(batch["segment_ids"] > 0, np.float64)
    per_transition = []
    for (_, _, prev), (_, _, nxt) in zip(states, states[1:]):
      prev64, nxt64 = np.asarray(prev, np.float64), np.asarray(nxt, np.float64)
      cos = (prev64 * nxt64).sum(-1) / (np.linalg.norm(prev64, axis=-1)
                                        * np.linalg.norm(nxt64, axis=-1))
      angle = np.arccos(np.clip(cos, -1.0, 1.0)) / np.pi
      per_transition.append((angle * mask).sum())
    sums = np.array(per_transition) if sums is None else sums + np.array(per_transition)
    count += mask.sum()
  return [Transition(label, part, float(s / count)) for (label, part), s in zip(labels, sums)]


def representation_analysis(workdir: str, step: Optional[int] = None,
                            num_iterations: int = 0) -> tuple[ModelConfig, list[Transition]]:
  """:func:`angular_distances` of a trained run on its validation batches."""
  run = text_lib.load_run(workdir, step, num_iterations)
  return run.model_cfg, angular_distances(run.model_cfg, run.params, eval_batches(run))
