"""Orbax checkpoint -> Hugging Face directory (config.json, safetensors, tokenizer, generation).

``export_checkpoint(workdir, out_dir)`` reads only the parameters of a training checkpoint
(``workdir/checkpoints/<step>/state``), restored as host numpy arrays whatever mesh saved them,
and writes:

* ``config.json``: a native ``LlamaConfig`` for ``arch=transformer``; otherwise the YOCO-U config
  with an ``auto_map`` to the shipped ``modeling_yocou.py`` (``trust_remote_code=True``);
* ``model.safetensors``, or shards plus ``model.safetensors.index.json`` past ``max_shard_size``;
* the tokenizer (``tokenizer.json`` + ``tokenizer_config.json`` for byte and Hugging Face
  tokenizers, ``tokenizer.model`` for SentencePiece) and ``generation_config.json``.

The directory is written under a temporary sibling name and renamed at the end, so an
interrupted export never leaves a directory that looks complete. Nothing is pickled.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from yocou_jax.config import ModelConfig
from yocou_jax.data import tokenizers as tokenizers_lib
from yocou_jax.export import hf
from yocou_jax.export.hf import ExportError
from yocou_jax.train.checkpoint import CHECKPOINT_DIR

DTYPES = ("float32", "bfloat16")
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MODELING_PATH = Path(__file__).with_name(hf.MODELING_FILE)


@dataclasses.dataclass
class Checkpoint:
  """The parameters of one saved step, with the experiment config they were trained with."""

  step: int
  config: dict[str, Any]  # The full experiment ConfigDict, as saved (JSON).
  model_cfg: ModelConfig
  params: Any  # float32 numpy arrays in the Flax tree.


def _manager(directory: Path) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
  return ocp.CheckpointManager(directory, options=options)


def load_checkpoint(workdir: str, step: Optional[int] = None) -> Checkpoint:
  """Restores the params (not the optimizer state) of ``step`` (default: the latest) to host."""
  directory = Path(workdir).absolute() / CHECKPOINT_DIR
  if not directory.is_dir():
    raise ExportError(f"no checkpoint in {workdir}: {directory} does not exist")
  manager = _manager(directory)
  try:
    steps = sorted(manager.all_steps())
    if not steps:
      raise ExportError(f"no checkpoint in {workdir}: {directory} holds no committed step")
    if step is None:
      step = steps[-1]
    elif step not in steps:
      raise ExportError(f"step {step} is not in {directory}; saved steps: {steps}")
    if not (directory / str(step) / "config").is_dir():
      raise ExportError(f"checkpoint {directory / str(step)} has no config item")
    config = manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore()))["config"]
    model_cfg = ModelConfig.from_config(config["model"])
    params = _restore_params(manager, step, model_cfg)
  finally:
    manager.close()
  return Checkpoint(step, config, model_cfg, params)


def _restore_params(manager: ocp.CheckpointManager, step: int, model_cfg: ModelConfig) -> Any:
  """``state.params`` alone, as float32 host numpy whatever mesh saved it; shapes checked."""
  abstract = hf.abstract_params(model_cfg)
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), abstract)
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item={"params": abstract}, restore_args={"params": restore_args}, partial_restore=True)))
  params = restored["state"]["params"]
  for key_path, want in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    got = _get_path(params, key_path)
    if tuple(got.shape) != tuple(want.shape):
      raise ExportError(f"checkpoint step {step}: parameter {jax.tree_util.keystr(key_path)} has "
                        f"shape {got.shape}, config.model expects {want.shape}")
  return jax.tree.map(lambda x: np.asarray(x, np.float32), params)


def _get_path(tree: Any, key_path) -> Any:
  for key in key_path:
    tree = tree[key.key]
  return tree


# --- safetensors ---------------------------------------------------------------------------------

def write_safetensors(tensors: dict[str, np.ndarray], directory: Path, *, dtype: str,
                      max_shard_size: int | str, metadata: dict[str, str]) -> list[str]:
  """Writes ``tensors`` (cast to ``dtype``) as one file or shards + index; returns the files."""
  from huggingface_hub import split_state_dict_into_shards_factory  # pylint: disable=g-import-not-at-top
  import safetensors.flax  # pylint: disable=g-import-not-at-top

  arrays = {name: jnp.asarray(x, jnp.dtype(dtype)) for name, x in tensors.items()}
  split = split_state_dict_into_shards_factory(
      arrays, get_storage_size=lambda x: x.nbytes, filename_pattern="model{suffix}.safetensors",
      max_shard_size=max_shard_size)
  for filename, names in split.filename_to_tensors.items():
    safetensors.flax.save_file({n: arrays[n] for n in names}, directory / filename,
                               metadata={"format": "pt", **metadata})
  if split.is_sharded:
    _write_json(directory / INDEX_FILE,
                {"metadata": dict(split.metadata), "weight_map": split.tensor_to_filename})
  return sorted(split.filename_to_tensors)


def safetensors_files(directory: Path) -> list[Path]:
  """The weight files of an export: the index's shards, or the single file."""
  index = directory / INDEX_FILE
  if index.is_file():
    weight_map = json.loads(index.read_text())["weight_map"]
    return [directory / f for f in sorted(set(weight_map.values()))]
  if not (directory / SINGLE_FILE).is_file():
    raise ExportError(f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE}")
  return [directory / SINGLE_FILE]


def read_safetensors(directory: Path) -> dict[str, np.ndarray]:
  """Every tensor of a Hugging Face directory (single file or index + shards) as float32 numpy.

  A file that is not valid safetensors, or a tensor stored twice, is refused naming the file.
  """
  from safetensors import SafetensorError, safe_open  # pylint: disable=g-import-not-at-top

  tensors, owners = {}, {}
  for path in safetensors_files(directory):
    try:
      with safe_open(path, framework="flax") as f:
        for name in f.keys():
          if name in owners:
            raise ExportError(f"{path}: tensor {name} is also in {owners[name]}")
          tensors[name], owners[name] = np.asarray(f.get_tensor(name), np.float32), path
    except (SafetensorError, OSError) as e:
      raise ExportError(f"{path} is not a readable safetensors file: {e}") from e
  index = directory / INDEX_FILE
  if index.is_file():
    weight_map = json.loads(index.read_text())["weight_map"]
    mismatched = sorted(set(weight_map) ^ set(tensors))
    if mismatched:
      name = mismatched[0]
      raise ExportError(f"{index}: tensor {name} is " + (
          f"listed in {weight_map[name]} but not stored there" if name in weight_map
          else f"stored in {owners[name].name} but not listed"))
  return tensors


# --- tokenizer and generation config -------------------------------------------------------------

def byte_tokenizer_json():
  """The byte tokenizer as a Hugging Face ``tokenizers.Tokenizer`` with the same ids.

  A BPE with no merges whose vocabulary is the three specials and the 256 byte-fallback tokens
  ``<0x00>``..``<0xFF>`` at ids 3..258: every character falls back to its UTF-8 bytes.
  """
  import tokenizers  # pylint: disable=g-import-not-at-top

  byte_tokenizer = tokenizers_lib.ByteTokenizer()
  specials = [tokenizers_lib.PAD_TOKEN, tokenizers_lib.BOS_TOKEN, tokenizers_lib.EOS_TOKEN]
  vocab = {token: i for i, token in enumerate(specials)}
  vocab.update({f"<0x{b:02X}>": b + byte_tokenizer.NUM_SPECIAL for b in range(256)})
  tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[],
                                                         byte_fallback=True))
  tokenizer.decoder = tokenizers.decoders.Sequence(
      [tokenizers.decoders.ByteFallback(), tokenizers.decoders.Fuse()])
  tokenizer.add_special_tokens([tokenizers.AddedToken(t, special=True) for t in specials])
  return tokenizer


def write_tokenizer(source: Path, directory: Path, *, max_length: int,
                    vocab_size: int) -> dict[str, int]:
  """Writes the checkpoint's tokenizer in Hugging Face form; returns its special ids."""
  if not (source / tokenizers_lib.CONFIG_FILENAME).is_file():
    logging.warning("no tokenizer in %s: the export has no tokenizer files", source)
    return {}
  tokenizer = tokenizers_lib.tokenizer_from_directory(str(source))
  if tokenizer.vocab_size > vocab_size:
    raise ExportError(f"the tokenizer in {source} has {tokenizer.vocab_size} tokens, more than "
                      f"the model's vocab_size={vocab_size}")
  kind = json.loads((source / tokenizers_lib.CONFIG_FILENAME).read_text())["kind"]
  special = {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "pad": tokenizer.pad_id}
  if kind == "sentencepiece":
    shutil.copy(source / tokenizers_lib.SENTENCEPIECE_FILENAME, directory)
    logging.warning("SentencePiece tokenizer exported as tokenizer.model only (load it with "
                    "the sentencepiece package; AutoTokenizer would change its normalisation)")
    return special
  if kind == "byte":
    hf_tokenizer = byte_tokenizer_json()
    hf_tokenizer.save(str(directory / tokenizers_lib.HUGGINGFACE_FILENAME))
  else:
    shutil.copy(source / tokenizers_lib.HUGGINGFACE_FILENAME, directory)
    import tokenizers  # pylint: disable=g-import-not-at-top
    hf_tokenizer = tokenizers.Tokenizer.from_file(str(directory /
                                                      tokenizers_lib.HUGGINGFACE_FILENAME))
  tokens = {f"{role}_token": hf_tokenizer.id_to_token(i) for role, i in special.items()}
  _write_json(directory / "tokenizer_config.json", {
      "tokenizer_class": "PreTrainedTokenizerFast",
      "model_max_length": max_length,
      "clean_up_tokenization_spaces": False,
      **tokens,
  })
  _write_json(directory / "special_tokens_map.json", tokens)
  return special


def _write_json(path: Path, value: Any) -> None:
  path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


# --- the export ----------------------------------------------------------------------------------

def check_destination(out_dir: Path, overwrite: bool) -> None:
  """Refuses an existing non-empty destination unless ``overwrite``."""
  if out_dir.exists() and not out_dir.is_dir():
    raise ExportError(f"export directory {out_dir} exists and is not a directory")
  if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
    raise ExportError(f"export directory {out_dir} exists and is not empty; pass --overwrite "
                      "to replace it")


def temporary_sibling(out_dir: Path) -> Path:
  """A fresh hidden directory next to ``out_dir`` (same filesystem, so renames are atomic)."""
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))


def commit(tmp: Path, out_dir: Path) -> None:
  """Renames the finished temporary directory into place (replacing an old export)."""
  if out_dir.exists():
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    os.replace(out_dir, old / out_dir.name)
    os.replace(tmp, out_dir)
    shutil.rmtree(old)
  else:
    os.replace(tmp, out_dir)


def export_checkpoint(workdir: str, out_dir: str, *, step: Optional[int] = None,
                      dtype: str = "float32", overwrite: bool = False,
                      max_shard_size: int | str = "5GB") -> Checkpoint:
  """Exports ``step`` (default: latest) of ``workdir`` to ``out_dir``; returns what it read.

  Args:
    workdir: a training run directory (``checkpoints/`` and usually ``tokenizer/``).
    out_dir: the Hugging Face directory to create; must be absent or empty unless ``overwrite``.
    step: the checkpoint step; None for the latest.
    dtype: storage dtype of the weights, "float32" or "bfloat16".
    overwrite: replace a non-empty ``out_dir``.
    max_shard_size: bytes (or "5GB"-style) per safetensors file before sharding.
  """
  if dtype not in DTYPES:
    raise ExportError(f"dtype={dtype!r}; allowed: {', '.join(DTYPES)}")
  out = Path(out_dir).absolute()
  check_destination(out, overwrite)  # Refuse early, before the (long) restore.
  ckpt = load_checkpoint(workdir, step)
  tensors = hf.params_to_tensors(ckpt.model_cfg, ckpt.params)
  max_length = int(ckpt.config.get("data", {}).get("seq_len", 2048))
  check_destination(out, overwrite)
  tmp = temporary_sibling(out)
  try:
    write_safetensors(tensors, tmp, dtype=dtype, max_shard_size=max_shard_size,
                      metadata={"yocou_jax_arch": ckpt.model_cfg.arch,
                                "yocou_jax_step": str(ckpt.step)})
    special = write_tokenizer(Path(workdir) / "tokenizer", tmp, max_length=max_length,
                              vocab_size=ckpt.model_cfg.vocab_size)
    _write_json(tmp / "config.json", hf.hf_config(
        ckpt.model_cfg, dtype=dtype, max_position_embeddings=max_length, special_ids=special))
    _write_json(tmp / "generation_config.json",
                {"_from_model_config": False, **{f"{k}_token_id": v for k, v in special.items()}})
    if ckpt.model_cfg.arch != "transformer":
      shutil.copy(MODELING_PATH, tmp / hf.MODELING_FILE)
    commit(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  logging.info("exported %s step %d (%s, %d tensors, %s) to %s", workdir, ckpt.step,
               ckpt.model_cfg.arch, len(tensors), dtype, out)
  return ckpt
