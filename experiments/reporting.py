"""End-of-run reporting of experiment binaries: loss curve, greedy and sampled text, a summary."""

from __future__ import annotations

import os

import jax

from yocou_jax.config import ModelConfig
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


def print_samples(run, prompt: str, num_tokens: int, sampled, seed: int) -> None:
  """Prints the greedy continuation of ``prompt`` and, unless ``sampled`` (a ``SamplingConfig``)
  is greedy, a seeded sampled one; cached decoding of ``run`` (a ``text.Run``), stopping at EOS."""
  from yocou_jax.inference import sampling as sampling_lib  # pylint: disable=g-import-not-at-top
  from yocou_jax.inference import text  # pylint: disable=g-import-not-at-top

  settings = [sampling_lib.SamplingConfig()] + ([sampled] if sampled.temperature > 0 else [])
  for sampling in settings:
    (continuation,), _ = text.generate(run, [prompt], num_tokens, sampling=sampling, seed=seed,
                                       warmup=False)
    print(f"{sampling.describe(seed)} sample ({num_tokens} tokens):\n{prompt}{continuation}")


def summarize_run(config, workdir: str, result, *, sample_prompt: str, sample_tokens: int,
                  sampling=None, sample_seed: int = 0):
  """Prints the run's first/last losses, writes loss_curve.png and prints a greedy and a
  sampled continuation of ``sample_prompt`` (``sampling``: a ``SamplingConfig``, None: greedy
  only)."""
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
    from yocou_jax.data import run_tokenizer  # pylint: disable=g-import-not-at-top
    from yocou_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
    from yocou_jax.inference import sampling as sampling_lib  # pylint: disable=g-import-not-at-top
    from yocou_jax.inference import text  # pylint: disable=g-import-not-at-top

    tokenizer = tokenizers.tokenizer_from_directory(
        os.path.join(workdir, run_tokenizer.TOKENIZER_DIR))
    params = jax.device_put(jax.device_get(result.state.params))  # Off the training mesh.
    run = text.Run(config, ModelConfig.from_config(config.model), params, tokenizer,
                   int(result.state.step))
    print_samples(run, sample_prompt, sample_tokens, sampling or sampling_lib.SamplingConfig(),
                  sample_seed)
