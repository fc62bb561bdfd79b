"""Hugging Face Llama directory -> yocou_jax checkpoint (``arch=transformer``).

``import_llama(hf_dir, workdir, config)`` reads ``config.json`` and the safetensors weights (no
pickle: ``pytorch_model.bin`` files are not read), refuses what the yocou_jax transformer cannot
run exactly (RoPE scaling, attention or MLP biases, another activation), maps every tensor back
to the Flax tree (names and shapes checked), and saves a checkpoint in the trainer's layout,
``workdir/checkpoints/<step>/{state,config}``: ``state`` is a ``TrainState`` with a fresh
optimizer state built from ``config.train``, ``config`` the experiment config with
``config.model`` set from the Llama config. A ``tokenizer.json`` next to the weights is saved to
``workdir/tokenizer/`` when it has the special tokens the trainer needs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections

from yocou_jax.config import ModelConfig
from yocou_jax.data import run_tokenizer
from yocou_jax.data import tokenizers as tokenizers_lib
from yocou_jax.export import exporter, hf
from yocou_jax.export.hf import ExportError
from yocou_jax.train import checkpoint as checkpoint_lib
from yocou_jax.train import optimizer as optimizer_lib
from yocou_jax.train.step import TrainState

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # Buffers some old Llama checkpoints saved.


def read_llama(hf_dir: str | Path) -> tuple[dict[str, Any], Any]:
  """(``ModelConfig`` fields, Flax params as float32 numpy) of a Llama directory."""
  hf_dir = Path(hf_dir)
  config_path = hf_dir / "config.json"
  if not config_path.is_file():
    raise ExportError(f"{hf_dir} is not a Hugging Face model directory: no config.json")
  fields = hf.model_fields_from_llama(json.loads(config_path.read_text()), str(config_path))
  model_cfg = ModelConfig(**fields)
  tensors = {name: x for name, x in exporter.read_safetensors(hf_dir).items()
             if not name.endswith(_IGNORED_SUFFIXES)}
  if model_cfg.tie_embeddings and "lm_head.weight" in tensors:
    if not (tensors["lm_head.weight"] == tensors["model.embed_tokens.weight"]).all():
      raise ExportError(f"{hf_dir}: tie_word_embeddings=true but tensor lm_head.weight differs "
                        "from model.embed_tokens.weight")
    del tensors["lm_head.weight"]
  return fields, hf.tensors_to_params(model_cfg, tensors, str(hf_dir))


def _save_tokenizer(hf_dir: Path, workdir: Path) -> None:
  tokenizer_file = hf_dir / tokenizers_lib.HUGGINGFACE_FILENAME
  if not tokenizer_file.is_file():
    logging.warning("no %s in %s: the workdir gets no tokenizer", tokenizer_file.name, hf_dir)
    return
  try:
    tokenizer = tokenizers_lib.HuggingFaceTokenizer(str(tokenizer_file))
  except ValueError as e:
    logging.warning("tokenizer not imported: %s", e)
    return
  tokenizer.save(str(workdir / run_tokenizer.TOKENIZER_DIR))


def import_llama(hf_dir: str | Path, workdir: str | Path, config: ml_collections.ConfigDict, *,
                 step: int = 0, overwrite: bool = False) -> ModelConfig:
  """Writes ``hf_dir``'s Llama weights as checkpoint ``step`` of ``workdir``; returns its config.

  Args:
    hf_dir: a Hugging Face ``LlamaForCausalLM`` directory (config.json + safetensors).
    workdir: the yocou_jax run directory to create; it must hold no checkpoint unless
      ``overwrite`` (then its checkpoints are deleted first).
    config: the experiment config to train with afterwards; ``config.model`` is replaced by the
      Llama's hyper-parameters (other model fields, e.g. dtype or remat, are kept).
    step: the step number of the checkpoint.
    overwrite: replace existing checkpoints.
  """
  hf_dir, workdir = Path(hf_dir), Path(workdir)
  fields, params = read_llama(hf_dir)
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.update(fields)
  model_cfg = ModelConfig.from_config(config.model)
  checkpoints = workdir / checkpoint_lib.CHECKPOINT_DIR
  if checkpoints.exists() and any(checkpoints.iterdir()):
    if not overwrite:
      raise ExportError(f"{checkpoints} already holds checkpoints; pass --overwrite to replace "
                        "them")
    shutil.rmtree(checkpoints)
  params = jax.tree.map(jnp.asarray, params)
  tx = optimizer_lib.make_optimizer(config.train)
  state = TrainState(step=jnp.asarray(step, jnp.int32), params=params, opt_state=tx.init(params))
  checkpointer = checkpoint_lib.Checkpointer(str(workdir), keep=config.checkpoint.keep,
                                             use_async=False)
  checkpointer.save(step, state, config=config.to_dict())
  checkpointer.wait_until_finished()
  checkpointer.close()
  _save_tokenizer(hf_dir, workdir)
  logging.info("imported %s (%d layers, d_model %d) into %s step %d", hf_dir,
               model_cfg.num_layers, model_cfg.d_model, workdir, step)
  return model_cfg
