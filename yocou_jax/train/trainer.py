"""The training loop: mesh, data, sharded state, Orbax resume, eval, metrics, preemption.

``train(config, workdir)`` is everything ``experiments/train.py`` does after flag parsing. A run
is a pure function of the config: re-running it on a workdir that holds checkpoints resumes from
the latest committed step, including the data iterator, and continues bit for bit.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from yocou_jax import accounting
from yocou_jax import sharding as sharding_lib
from yocou_jax import validation
from yocou_jax.config import ConfigError, ModelConfig
from yocou_jax.model import Model
from yocou_jax.train import budget as budget_lib
from yocou_jax.train import checkpoint as checkpoint_lib
from yocou_jax.train import finetune
from yocou_jax.train import metrics as metrics_lib
from yocou_jax.train import optimizer as optimizer_lib
from yocou_jax import profiling
from yocou_jax.train import safety
from yocou_jax.train import step as step_lib


@dataclasses.dataclass
class TrainResult:
  state: step_lib.TrainState
  history: list[dict]  # Logged metrics, one dict per logging step (process 0 and others alike).
  preempted: bool = False


def validate_config(config: Any, num_devices: int, process_count: int, *,
                    check_data: bool = False) -> ModelConfig:
  """Checks the whole config before anything is allocated (see yocou_jax.validation)."""
  return validation.validate(config, num_devices=num_devices, process_count=process_count,
                             check_data=check_data)


class _PreemptionFlag:
  """Set by SIGTERM; the loop saves at the next step boundary and exits cleanly."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # Not the main thread (e.g. some test runners): no handler.
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def any_process(self) -> bool:
    if jax.process_count() == 1:
      return self.requested
    flags = multihost_utils.process_allgather(np.array([self.requested], np.int32))
    return bool(np.asarray(flags).any())


def _global_batch(local: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def evaluate(eval_fn, params, eval_batches, sharding) -> dict[str, float]:
  """Mean eval loss over a list of batches, or per source (``eval_loss/NAME``) and overall."""
  if isinstance(eval_batches, dict):  # {source name: batches} of config.data.sources.
    per_source = {name: evaluate(eval_fn, params, batches, sharding)
                  for name, batches in eval_batches.items()}
    tokens = sum(r["eval_tokens"] for r in per_source.values())
    loss = sum(r["eval_loss"] * r["eval_tokens"] for r in per_source.values()) / max(tokens, 1.0)
    record = {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 80.0)),
              "eval_tokens": tokens}
    for name, result in per_source.items():
      record.update({f"eval_loss/{name}": result["eval_loss"],
                     f"eval_tokens/{name}": result["eval_tokens"]})
    return record
  loss_sum, tokens = 0.0, 0.0
  for local in eval_batches:
    out = eval_fn(params, _global_batch(local, sharding))
    loss_sum += float(out["loss_sum"])
    tokens += float(out["num_tokens"])
  loss = loss_sum / max(tokens, 1.0)
  return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 80.0)), "eval_tokens": tokens}


Hook = Callable[[int, step_lib.TrainState], None]
SKIP_COUNTS = ("skipped_total", "skipped_longest_run", "skipped_last_step")
# Batch entries counting tokens per data source (yocou_jax.data.mixture, not imported here: the
# trainer runs without grain when it is given its data).
SOURCE_TOKENS_PREFIX = "source_tokens/"


def train(config: Any, workdir: str, *, data: Optional[Any] = None,
          devices: Optional[Sequence[jax.Device]] = None,
          hooks: Sequence[Hook] = ()) -> TrainResult:
  """Trains ``config`` in ``workdir`` (resuming if it holds a checkpoint).

  Args:
    config: the experiment ConfigDict (see experiments/configs/default.py).
    workdir: where checkpoints, metrics.jsonl, TensorBoard files and the tokenizer go.
    data: optional ``(train_iterator, eval_batches, tokenizer)`` overriding the configured
      grain pipeline (tests and benchmarks use synthetic data this way). The iterator must
      support ``get_state``/``set_state`` to be checkpointed; otherwise it is not saved.
    devices: the devices of the mesh (default: all).
    hooks: called as ``hook(step, state)`` after every step (custom evaluation, export, ...).
  """
  process_index, process_count = jax.process_index(), jax.process_count()
  is_chief = process_index == 0
  devices = list(jax.devices() if devices is None else devices)
  model_cfg = validate_config(config, len(devices), process_count, check_data=data is None)
  safety.check_workdir(workdir)
  config, step_budget = budget_lib.with_resolved_steps(config)  # train.steps from a budget.
  t = config.train
  seq_len = config.data.seq_len
  mesh = sharding_lib.make_mesh(config.mesh, devices)
  rules = sharding_lib.LOGICAL_AXIS_RULES

  def check_tokenizer(tokenizer) -> None:  # Also before a new run saves it: none refused is kept.
    if tokenizer.vocab_size > model_cfg.vocab_size:
      raise ConfigError(f"config.model.vocab_size={model_cfg.vocab_size} is smaller than the "
                        f"tokenizer's vocabulary ({tokenizer.vocab_size})")
    if t.init_from:
      finetune.check_tokenizer(t.init_from, tokenizer)  # The source's, or its params mean nothing.

  if data is None:
    try:
      data = _make_data(config, workdir, process_index, process_count, is_chief, check_tokenizer)
    except ConfigError:
      raise
    except (ValueError, OSError) as e:  # Empty corpus, missing split, unreadable tokenizer, ...
      raise ConfigError(f"bad training data ({type(e).__name__}): "
                        f"{str(e).strip().splitlines()[0]}") from e
  train_iter, eval_batches, tokenizer = data
  if tokenizer is not None:
    check_tokenizer(tokenizer)

  model = Model(model_cfg)
  schedule = optimizer_lib.learning_rate_schedule(t)
  tx = optimizer_lib.make_optimizer(t)
  abstract_state, shardings = step_lib.state_shardings(model, tx, mesh, seq_len, rules)
  batch_sharding = sharding_lib.batch_sharding(mesh)
  checkpointer = checkpoint_lib.Checkpointer(
      workdir, keep=config.checkpoint.keep, use_async=config.checkpoint.use_async)
  saveable_iter = train_iter if hasattr(train_iter, "get_state") else None

  flops_per_step = step_budget.flops_per_step  # The analytic count the budget used.
  peak, peak_source = metrics_lib.peak_flops_per_device(model_cfg.compute_dtype)
  writer = metrics_lib.MetricsWriter(
      workdir, enabled=is_chief, tensorboard=config.logging.tensorboard,
      sinks=metrics_lib.tracker_sinks(config, workdir) if is_chief else ())
  profiler = profiling.from_config(  # None unless config.profile.steps asks for a trace here.
      config.profile, os.path.join(workdir, metrics_lib.TENSORBOARD_DIR), process_index)
  progress = metrics_lib.Progress(t.steps, enabled=is_chief and config.logging.progress)
  if is_chief:
    logging.info("model %s: %s params; %.3e training FLOPs/step; MFU denominator %.3e FLOP/s "
                 "per device (%s); mesh %s", model_cfg.arch,
                 f"{accounting.param_counts(model_cfg)['total']:,}", flops_per_step, peak,
                 peak_source, dict(mesh.shape))
    logging.info("budget: %s", step_budget.describe())

  history: list[dict] = []
  preempted = False
  with sharding_lib.activate(mesh, rules):
    target = checkpoint_lib.abstract_with_shardings(abstract_state, shardings)

    def check_resume(step):  # Before any array is read: a different model would not even fit.
      safety.check_resume(checkpointer.restore_config(step), config.to_dict(), step=step,
                          directory=checkpointer.directory,
                          has_data_state=checkpointer.has_data_state(step))

    latest, state = checkpointer.restore_latest(target, data_iterator=saveable_iter,
                                                before_restore=check_resume)
    if latest is not None:
      logging.info("resumed from step %d in %s", latest, checkpointer.directory)
      if t.init_from:
        logging.info("config.train.init_from=%s not used: this workdir resumes its own run",
                     t.init_from)
    else:
      init_params = None
      if t.init_from:  # Params only; the optimizer, step and data stream start fresh.
        _, init_params = finetune.restore_params(t.init_from, target.params, config.to_dict())
      init = jax.jit(step_lib.init_state_fn(model, tx, seq_len), out_shardings=shardings)
      state = init(jax.random.key(config.seed))
      if init_params is not None:
        state = state.replace(params=init_params)
    train_step = step_lib.jit_train_step(model, tx, schedule, mesh, shardings,
                                         microbatches=t.microbatches, z_loss=t.z_loss)
    eval_fn = step_lib.jit_eval_step(model, mesh, shardings.params)

    start_step = int(state.step)
    if profiler is not None:  # Traces the steps config.profile.steps names.
      train_step = profiler.wrap(train_step, first_step=start_step + 1)
    if start_step == 0 and eval_batches:  # The starting point of the validation curve.
      record = {"cumulative_tokens": 0, "cumulative_train_flops": 0.0,
                **evaluate(eval_fn, state.params, eval_batches, batch_sharding)}
      writer.write(0, record)
      history.append({"step": 0, **record})
    config_json = config.to_dict()
    last_checkpoint = None if latest is None else f"step {latest} in {checkpointer.directory}"

    def check_finite(step_metrics, done):  # At logging and checkpoint steps only: no extra sync.
      counts = jax.device_get({k: step_metrics[k] for k in SKIP_COUNTS})
      try:
        safety.check_nonfinite(counts, mode=t.nonfinite, max_skipped_steps=t.max_skipped_steps,
                               step=done, last_checkpoint=last_checkpoint)
      except safety.NonFiniteError:
        checkpointer.wait_until_finished()  # The last good checkpoint is committed first.
        raise

    window_start, window_steps = time.perf_counter(), 0
    with _PreemptionFlag() as preemption:
      source_tokens = {}  # Tokens drawn from each source of config.data.sources this window.
      for step in range(start_step, t.steps):
        local = next(train_iter)
        for key in [k for k in local if k.startswith(SOURCE_TOKENS_PREFIX)]:
          source_tokens[key] = source_tokens.get(key, 0) + int(local.pop(key))
        batch = _global_batch(local, batch_sharding)
        state, step_metrics = train_step(state, batch)
        window_steps += 1
        done = step + 1
        log_now = done % config.logging.every_steps == 0 or done == t.steps
        eval_now = done % config.eval.every_steps == 0 or done == t.steps
        if log_now or eval_now:
          record = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
          elapsed = time.perf_counter() - window_start
          record.update(_throughput(window_steps, elapsed, t.batch_size * seq_len,
                                    flops_per_step, peak, len(devices)))
          record.update({"cumulative_tokens": done * t.batch_size * seq_len,
                         "cumulative_train_flops": done * float(flops_per_step), **source_tokens})
          source_tokens = {}
          if eval_now and eval_batches:
            record.update(evaluate(eval_fn, state.params, eval_batches, batch_sharding))
          writer.write(done, record)
          progress.update(done, record)
          history.append({"step": done, **record})
          check_finite(step_metrics, done)
          window_start, window_steps = time.perf_counter(), 0
        if done == start_step + 1:  # Leave the compilation out of the throughput figures.
          jax.block_until_ready(state)
          window_start, window_steps = time.perf_counter(), 0
        for hook in hooks:
          hook(done, state)
        stop = preemption.any_process()
        if stop or done == t.steps or done % config.checkpoint.every_steps == 0:
          check_finite(step_metrics, done)  # A run that must stop saves nothing.
          checkpointer.save(done, state, data_iterator=saveable_iter, config=config_json)
          last_checkpoint = f"step {done} in {checkpointer.directory}"
        if stop:
          logging.warning("SIGTERM received: saved step %d, exiting", done)
          preempted = True
          break
    checkpointer.wait_until_finished()
  if profiler is not None:
    profiler.close()  # A run that ended inside the range (preemption) keeps its partial trace.
  progress.finish()
  writer.close()
  checkpointer.close()
  return TrainResult(state=state, history=history, preempted=preempted)


def _throughput(steps: int, seconds: float, tokens_per_step: int, flops_per_step: float,
                peak_per_device: float, num_devices: int) -> dict[str, float]:
  seconds = max(seconds, 1e-9)
  flops_per_sec_per_device = steps * flops_per_step / seconds / num_devices
  return {
      "step_time": seconds / steps,
      "tokens_per_sec": steps * tokens_per_step / seconds,
      "tflops_per_device": flops_per_sec_per_device / 1e12,
      "mfu": flops_per_sec_per_device / peak_per_device,
  }


def _make_data(config, workdir: str, process_index: int, process_count: int, is_chief: bool,
               check_tokenizer: Callable[[Any], None]):
  """The configured grain pipeline and the run's tokenizer (saved in, or read from, the workdir)."""
  from yocou_jax.data import pipeline, run_tokenizer  # pylint: disable=g-import-not-at-top

  tokenizer = run_tokenizer.prepare(config.data, workdir, write=is_chief, check=check_tokenizer)
  train_iter = pipeline.make_train_iterator(
      config.data, tokenizer, global_batch_size=config.train.batch_size, seed=config.seed,
      process_index=process_index, process_count=process_count)
  eval_batches = pipeline.make_eval_batches(
      config.data, tokenizer, global_batch_size=config.eval.batch_size,
      num_batches=config.eval.num_batches, process_index=process_index,
      process_count=process_count)
  return train_iter, eval_batches, tokenizer
