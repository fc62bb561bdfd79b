"""Starting a run from another run's parameters (``config.train.init_from=DIR``).

Only the parameters are taken: the new run starts at step 0 with a fresh optimizer and its own
data stream (pretraining -> SFT, or continued training on a new mixture). The source is the
newest intact checkpoint step of ``DIR`` (the integrity checks of a resume; a bad newer step is
skipped with a warning but, being another run's, left where it is), and its model config must be
the one this run trains (the fields a resume may not change: see ``safety.RESUME_MAY_CHANGE``;
a model field added since the source was saved counts as its default), and so must its tokenizer
(the one saved in ``DIR/tokenizer``).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
from absl import logging

from yocou_jax.config import ConfigError
from yocou_jax.data.run_tokenizer import TOKENIZER_DIR
from yocou_jax.train import checkpoint as checkpoint_lib
from yocou_jax.train import integrity
from yocou_jax.train import safety

# Encoded by both tokenizers: prose, code, whitespace runs, digits and non-ASCII text.
_TOKENIZER_PROBE = ("The quick brown fox jumps over 13 lazy dogs.\n\tdef f(x):\n        return "
                    "x ** 2  # naïve café, 東京, ∑ 🙂")


def restore_params(init_from: str, abstract_params: Any,
                   config: Mapping[str, Any]) -> tuple[int, Any]:
  """(source step, params on ``abstract_params``' shardings) of the run in ``init_from``.

  Args:
    init_from: the source run's workdir (the one holding ``checkpoints/``).
    abstract_params: ``jax.ShapeDtypeStruct`` leaves with this run's shardings.
    config: this run's config as a dict (its ``model`` section is compared with the source's).

  Raises:
    ConfigError (one line): no intact checkpoint there, or the model differs (naming the field).
  """
  flag = f"config.train.init_from={init_from}"
  directory = os.path.join(os.path.abspath(init_from), checkpoint_lib.CHECKPOINT_DIR)
  if not os.path.isdir(directory):
    raise ConfigError(f"{flag} is invalid: {directory} does not exist (it must be a run's "
                      "workdir, the directory holding checkpoints/)")
  source = checkpoint_lib.Checkpointer(init_from, keep=1, use_async=False, read_only=True)
  try:
    for step in reversed(source.all_steps()):
      reason = source.check(step)
      if reason is None:
        diffs = safety.resume_differences(source.restore_config(step), config,
                                          has_data_state=False)
        if diffs:
          raise ConfigError(
              f"{flag}: its model (step {step}) differs from this run's config: "
              f"{'; '.join(diffs)} (fine-tuning keeps the model: restore these values)")
        try:
          params = source.restore_params(step, abstract_params)
        except Exception as e:  # pylint: disable=broad-except
          if jax.process_count() > 1:  # The processes must agree; no silent per-host fallback.
            raise
          reason = integrity.read_step(source.step_dir(step))
          if reason is None:
            raise ConfigError(f"{flag}: step {step} is intact but its params do not restore into "
                              f"this model ({type(e).__name__}: {integrity.first_line(e)})") from e
        else:
          logging.info("initialised the params from step %d in %s (fresh optimizer, step 0)",
                       step, directory)
          return step, params
      logging.warning("%s: checkpoint step %d is bad (%s); trying an older step", flag, step,
                      reason)
  finally:
    source.close()
  raise ConfigError(f"{flag} is invalid: {directory} holds no intact checkpoint step")


def check_tokenizer(init_from: str, tokenizer: Any) -> None:
  """Raises a one-line ConfigError when ``tokenizer`` is not the one the source run saved.

  Compared: vocabulary size, special ids and the ids of a probe text. A source without a saved
  tokenizer (trained on pre-tokenized data) is not checked.
  """
  from yocou_jax.data import tokenizers  # pylint: disable=g-import-not-at-top

  source_dir = os.path.join(init_from, TOKENIZER_DIR)
  if not os.path.exists(os.path.join(source_dir, tokenizers.CONFIG_FILENAME)):
    return
  source = tokenizers.tokenizer_from_directory(source_dir)
  describe = lambda tok: (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id)
  if (describe(source) != describe(tokenizer)
      or source.encode(_TOKENIZER_PROBE) != tokenizer.encode(_TOKENIZER_PROBE)):
    raise ConfigError(
        f"config.train.init_from={init_from} was trained with another tokenizer ({source!r}; "
        f"this run's: {tokenizer!r}): pass --config.data.tokenizer={source_dir}")
