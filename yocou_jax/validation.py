"""The whole experiment config, checked in one place before anything is built or compiled.

``validate(config, num_devices=..., process_count=...)`` checks every field of the schema in
``experiments/configs/default.py`` (its type and range), the model through
:class:`yocou_jax.config.ModelConfig` (which owns the model fields and their arch-specific rules),
and the rules that tie sections together: mesh vs devices, batch vs the data-parallel axes,
microbatches and processes, the self-decoder window vs the row length. Every error is one line
naming the field, its value and what is allowed; all of them are reported at once.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Optional

from yocou_jax import sharding as sharding_lib
from yocou_jax.config import ConfigError, ModelConfig
from yocou_jax import profiling
from yocou_jax.train.optimizer import SCHEDULES

NONFINITE_MODES = ("skip", "stop")
WANDB_MODES = ("disabled", "offline", "online")


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def positive_int(v) -> bool:
  return _is_int(v) and v > 0


def non_negative_int(v) -> bool:
  return _is_int(v) and v >= 0


def positive_number(v) -> bool:
  return _is_number(v) and v > 0


def non_negative_number(v) -> bool:
  return _is_number(v) and v >= 0


def fraction(v) -> bool:
  return _is_number(v) and 0 <= v <= 1


def beta(v) -> bool:
  return _is_number(v) and 0 <= v < 1


def boolean(v) -> bool:
  return isinstance(v, bool)


def non_empty_str(v) -> bool:
  return isinstance(v, str) and bool(v.strip())


def optional_str(v) -> bool:
  return v is None or non_empty_str(v)


def one_of(*choices) -> Callable[[Any], bool]:
  return lambda v: v in choices


def mesh_size(v) -> bool:
  return _is_int(v) and (v > 0 or v == -1)


def profile_steps(v) -> bool:
  try:
    profiling.parse_steps(v)
  except (ValueError, AttributeError):
    return False
  return True


# Every non-model field of the schema: (check, what is allowed). Model fields are ModelConfig's.
FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seed": (non_negative_int, "a non-negative integer"),
    "data.seq_len": (positive_int, "a positive integer"),
    "data.tfds_name": (non_empty_str, "a dataset name (python_stdlib, text_files, ...)"),
    "data.tfds_data_dir": (optional_str, "None or a directory"),
    "data.text_glob": (optional_str, "None or a directory or glob"),
    "data.text_key": (non_empty_str, "a feature name"),
    "data.tokenizer": (non_empty_str,
                       "'byte', 'bpe:N', a .model or tokenizer.json file, or a directory"),
    "data.num_workers": (non_negative_int, "a non-negative integer"),
    "data.train_split": (non_empty_str, "a split name"),
    "data.eval_split": (non_empty_str, "a split name"),
    "data.packing_bins": (positive_int, "a positive integer"),
    "data.shuffle_window": (positive_int, "a positive integer"),
    "train.batch_size": (positive_int, "a positive integer"),
    "train.steps": (positive_int, "a positive integer"),
    "train.flops_budget": (non_negative_number, "a non-negative number (0 = off)"),
    "train.tokens_budget": (non_negative_number, "a non-negative number (0 = off)"),
    "train.learning_rate": (positive_number, "a positive number"),
    "train.warmup_steps": (non_negative_int, "a non-negative integer"),
    "train.schedule": (one_of(*SCHEDULES), f"one of {', '.join(SCHEDULES)}"),
    "train.min_lr_ratio": (fraction, "a number in [0, 1]"),
    "train.b1": (beta, "a number in [0, 1)"),
    "train.b2": (beta, "a number in [0, 1)"),
    "train.eps": (positive_number, "a positive number"),
    "train.weight_decay": (non_negative_number, "a non-negative number"),
    "train.decay_embeddings": (boolean, "True or False"),
    "train.decay_norms": (boolean, "True or False"),
    "train.grad_clip": (non_negative_number, "a non-negative number (0 disables)"),
    "train.microbatches": (positive_int, "a positive integer"),
    "train.z_loss": (non_negative_number, "a non-negative number"),
    "train.nonfinite": (one_of(*NONFINITE_MODES), f"one of {', '.join(NONFINITE_MODES)}"),
    "train.max_skipped_steps": (positive_int, "a positive integer"),
    "train.collective_timeout_s": (positive_int, "a positive integer (seconds)"),
    "train.init_from": (optional_str, "None or a run's workdir"),
    "eval.every_steps": (positive_int, "a positive integer"),
    "eval.num_batches": (non_negative_int, "a non-negative integer"),
    "eval.batch_size": (positive_int, "a positive integer"),
    "checkpoint.every_steps": (positive_int, "a positive integer"),
    "checkpoint.keep": (positive_int, "a positive integer"),
    "checkpoint.use_async": (boolean, "True or False"),
    "logging.every_steps": (positive_int, "a positive integer"),
    "logging.tensorboard": (boolean, "True or False"),
    "logging.progress": (boolean, "True or False"),
    "logging.wandb.mode": (one_of(*WANDB_MODES), f"one of {', '.join(WANDB_MODES)}"),
    "logging.wandb.project": (non_empty_str, "a project name"),
    "logging.wandb.entity": (optional_str, "None or a team/user name"),
    "logging.wandb.name": (optional_str, "None or a run name"),
    "logging.wandb.dir": (optional_str, "None or a directory"),
    "profile.steps": (profile_steps, "'' (off) or 'START,STOP' with 1 <= START <= STOP, e.g. "
                      "'10,15'"),
    "profile.all_processes": (boolean, "True or False"),
    "inference.chunk_size": (positive_int, "a positive integer"),
    "mesh.data": (mesh_size, "a positive size or -1 (the rest of the devices)"),
    "mesh.fsdp": (mesh_size, "a positive size or -1 (the rest of the devices)"),
    "mesh.tensor": (mesh_size, "a positive size or -1 (the rest of the devices)"),
}
_MISSING = object()


def _get(config: Any, path: str) -> Any:
  node = config
  for key in path.split("."):
    try:
      node = node[key]
    except (KeyError, TypeError, AttributeError):
      return _MISSING
  return node


def config_errors(config: Any, *, num_devices: Optional[int] = None, process_count: int = 1,
                  check_data: bool = True) -> tuple[Optional[ModelConfig], list[str]]:
  """(the ModelConfig or None, every error as one line); no error means the config can run.

  ``num_devices=None`` skips the rules that need the device count (planning tools);
  ``check_data=False`` those about the configured corpus and tokenizer (runs fed other data).
  """
  errors = []
  bad = set()
  for path, (ok, allowed) in FIELDS.items():
    value = _get(config, path)
    if value is _MISSING:
      errors.append(f"config.{path} is missing: must be {allowed}")
      bad.add(path)
    elif not ok(value):
      errors.append(f"config.{path}={value!r} is invalid: must be {allowed}")
      bad.add(path)
  model_cfg = None
  try:
    model_cfg = ModelConfig.from_config(config.model)
  except ConfigError as e:
    errors.append(str(e))
  except TypeError as e:  # A value of the wrong kind that ModelConfig's checks tripped on.
    errors.append(f"config.model has a value of the wrong type: {e}")

  ok = lambda *paths: not bad.intersection(paths)
  if model_cfg is not None and ok("data.seq_len") and model_cfg.is_decoder_decoder and (
      model_cfg.window > config.data.seq_len):
    errors.append(f"config.model.window={model_cfg.window} is invalid: must be <= "
                  f"config.data.seq_len={config.data.seq_len} (a longer window is never trained)")
  if (check_data and ok("data.tfds_name", "data.text_glob")
      and config.data.tfds_name == "text_files" and not config.data.text_glob):
    errors.append("config.data.text_glob=None is invalid: tfds_name='text_files' needs a "
                  "directory or glob of text files")
  if check_data and ok("data.tokenizer"):
    errors.extend(_tokenizer_errors(config.data.tokenizer, model_cfg))
  if check_data:
    errors.extend(_sources_errors(config.data))
  t = config.train
  if ok("train.batch_size", "train.microbatches") and t.batch_size % t.microbatches:
    errors.append(f"config.train.batch_size={t.batch_size} is not divisible by "
                  f"config.train.microbatches={t.microbatches}")
    bad.add("train.batch_size")
  if ok("train.batch_size") and t.batch_size % process_count:
    errors.append(f"config.train.batch_size={t.batch_size} is not divisible by the "
                  f"{process_count} processes")
  if num_devices is not None and ok("mesh.data", "mesh.fsdp", "mesh.tensor"):
    try:
      mesh_shape = sharding_lib.resolve_mesh_shape(config.mesh, num_devices)
    except ConfigError as e:
      errors.append(str(e))
    else:
      data_parallel = mesh_shape[0] * mesh_shape[1]
      if ok("train.batch_size", "train.microbatches") and (
          t.batch_size // t.microbatches) % data_parallel:
        errors.append(
            f"config.train.batch_size={t.batch_size} (per microbatch "
            f"{t.batch_size // t.microbatches}) is not divisible by the data-parallel mesh axes "
            f"data x fsdp = {data_parallel}")
      if ok("eval.batch_size") and config.eval.batch_size % data_parallel:
        errors.append(f"config.eval.batch_size={config.eval.batch_size} is not divisible by "
                      f"data x fsdp = {data_parallel}")
  errors.extend(_tooling_errors(config, ok))
  return model_cfg, errors


def _sources_errors(data: Any) -> list[str]:
  """The spec errors of config.data.sources / eval_sources / chat_template (when sources is set)."""
  from yocou_jax.data import chat, sources  # pylint: disable=g-import-not-at-top

  if not data.get("sources"):
    return []
  errors = []
  for field in ("sources", "eval_sources"):
    try:
      sources.parse_sources(data.get(field) or "", field=field)
    except ValueError as e:
      errors.append(str(e))
  if data.get("process_sharding", "global") not in ("global", "shard"):
    errors.append(f"config.data.process_sharding={data.get('process_sharding')!r} is invalid: "
                  f"must be one of global, shard")
  if not positive_int(data.get("shuffle_blocks")):
    errors.append(f"config.data.shuffle_blocks={data.get('shuffle_blocks')!r} is invalid: must "
                  f"be a positive integer")
  try:
    chat.check_template(data.get("chat_template") or "")
  except ValueError as e:
    errors.append(str(e))
  return errors


def _tokenizer_errors(spec: str, model_cfg: Optional[ModelConfig]) -> list[str]:
  """The tokenizer must load and fit in the model's vocabulary."""
  from yocou_jax.data import tokenizers  # pylint: disable=g-import-not-at-top

  try:
    trained_vocab_size = tokenizers.trained_bpe_vocab_size(spec)
  except ValueError:
    return [f"config.data.tokenizer={spec!r} is invalid: {tokenizers.TRAINED_BPE_RULE}"]
  if trained_vocab_size is None and spec != "byte" and not os.path.exists(
      os.path.expanduser(spec)):
    return [f"config.data.tokenizer={spec!r} is invalid: no such file or directory (allowed: "
            "'byte', 'bpe:N', a .model or tokenizer.json file, a directory)"]
  try:
    vocab_size = trained_vocab_size or tokenizers.load_tokenizer(spec).vocab_size
  except Exception as e:  # pylint: disable=broad-except  (a corrupt file: any library error)
    return [f"config.data.tokenizer={spec!r} cannot be loaded ({type(e).__name__}: "
            f"{(str(e).strip().splitlines() or [''])[0][:160]})"]
  if model_cfg is not None and vocab_size > model_cfg.vocab_size:
    return [f"config.model.vocab_size={model_cfg.vocab_size} is invalid: must be >= the "
            f"vocabulary of config.data.tokenizer={spec!r} ({vocab_size} ids)"]
  return []


def _tooling_errors(config: Any, ok: Callable[..., bool]) -> list[str]:
  """A profile range the run reaches; the wandb package when a tracker is on."""
  errors = []
  t = config.train
  if (ok("profile.steps", "train.steps", "train.flops_budget", "train.tokens_budget")
      and config.profile.steps and not (t.flops_budget or t.tokens_budget)):
    _, last = profiling.parse_steps(config.profile.steps)
    if last > t.steps:
      errors.append(f"config.profile.steps={config.profile.steps!r} is invalid: STOP={last} is "
                    f"after the last step (config.train.steps={t.steps})")
  if ok("logging.wandb.mode") and config.logging.wandb.mode != "disabled":
    try:
      import wandb  # pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
      errors.append(f"config.logging.wandb.mode={config.logging.wandb.mode!r} needs the wandb "
                    "package: pip install 'yocou_jax[wandb]' (or set mode='disabled')")
  return errors


def validate(config: Any, *, num_devices: Optional[int] = None, process_count: int = 1,
             check_data: bool = True) -> ModelConfig:
  """The ModelConfig of a config that can run; else a ConfigError with one line per error."""
  model_cfg, errors = config_errors(config, num_devices=num_devices, process_count=process_count,
                                    check_data=check_data)
  if errors:
    raise ConfigError("\n".join(errors))
  return model_cfg


def error_lines(error: BaseException) -> str:
  """``error: ...`` for each line of a (possibly multi-error) message: what binaries print."""
  return "\n".join(f"error: {line}" for line in str(error).splitlines() or [""])
