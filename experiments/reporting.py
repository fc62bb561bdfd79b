"""End-of-run reporting for experiment binaries: loss-curve plot, a greedy sample, a summary."""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from yocou_jax.config import ModelConfig
from yocou_jax.model import Model
from yocou_jax.train import metrics as metrics_lib


def plot_loss_curve(workdir: str, path: str) -> bool:
  """Train and eval loss against step and cumulative training FLOPs; False if nothing logged."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.ticker  # pylint: disable=g-import-not-at-top
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  records = metrics_lib.read_metrics(workdir)
  if not records:
    return False
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, x_key, x_label in ((axes[0], "step", "step"),
                             (axes[1], "cumulative_train_flops", "training FLOPs")):
    train = [(r[x_key], r["loss"]) for r in records if "loss" in r and r[x_key] > 0]
    evals = [(r[x_key], r["eval_loss"]) for r in records if "eval_loss" in r]
    ax.plot(*zip(*train), label="train loss")
    if evals:
      ax.plot(*zip(*evals), "o-", label="validation loss")
    ax.set_xlabel(x_label)
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
  axes[1].set_xscale("log")
  axes[1].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # No crowded labels.
  fig.suptitle(os.path.basename(os.path.abspath(workdir)))
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def greedy_sample(model_cfg: ModelConfig, params: Any, prompt_ids: list[int],
                  num_tokens: int) -> list[int]:
  """Greedy continuation by re-running the full forward (fixed shape, one compile).

  Quadratic in the length, fine for a short sample after training; the inference module
  provides cached decoding.
  """
  params = jax.device_get(params)
  total = len(prompt_ids) + num_tokens
  tokens = np.zeros((1, total), np.int32)
  tokens[0, : len(prompt_ids)] = prompt_ids
  forward = jax.jit(lambda p, t: Model(model_cfg).apply({"params": p}, t))
  for pos in range(len(prompt_ids), total):
    logits = forward(params, jnp.asarray(tokens))
    tokens[0, pos] = int(jnp.argmax(logits[0, pos - 1]))
  return tokens[0, len(prompt_ids):].tolist()


def summarize_run(config, workdir: str, result, *, sample_prompt: str, sample_tokens: int):
  """Prints the run's first/last losses, writes loss_curve.png and prints a greedy sample."""
  trained = [r for r in result.history if "loss" in r]
  if trained:
    last = trained[-1]
    print(f"\nfinal step {last['step']}: train loss {last['loss']:.4f}, "
          f"{last['tokens_per_sec']:,.0f} tokens/s, MFU {100 * last['mfu']:.1f}%")
  records = metrics_lib.read_metrics(workdir)
  all_evals = [r for r in records if "eval_loss" in r]
  if all_evals:
    print(f"validation loss: {all_evals[0]['eval_loss']:.4f} at step {all_evals[0]['step']} -> "
          f"{all_evals[-1]['eval_loss']:.4f} at step {all_evals[-1]['step']}")
  curve = os.path.join(workdir, "loss_curve.png")
  if plot_loss_curve(workdir, curve):
    print(f"loss curve: {curve}")
  if sample_tokens > 0:
    from yocou_jax.data import tokenizers  # pylint: disable=g-import-not-at-top

    tokenizer = tokenizers.tokenizer_from_directory(os.path.join(workdir, "tokenizer"))
    model_cfg = ModelConfig.from_config(config.model)
    prompt = tokenizer.encode(sample_prompt)
    prompt = [tokenizer.bos_id] + prompt if tokenizer.bos_id is not None else prompt
    out = greedy_sample(model_cfg, result.state.params, prompt, sample_tokens)
    print(f"greedy sample ({sample_tokens} tokens):\n{sample_prompt}{tokenizer.decode(out)}")
