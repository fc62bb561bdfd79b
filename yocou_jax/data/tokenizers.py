"""Tokenizers: bytes, SentencePiece models and Hugging Face `tokenizer.json` files (BPEs).

Every tokenizer has the same small surface (`Tokenizer`): `vocab_size`, `pad_id`, `bos_id`,
`eos_id`, `encode(text) -> list[int]`, `decode(ids) -> str` and `save(directory)`. `decode` never
raises: ids outside the vocabulary and special ids are dropped, and invalid UTF-8 becomes U+FFFD.

The tokenizer travels with the checkpoint: `save(directory)` writes `tokenizer_config.json` (the
kind, the special ids and the name of the model file) plus the model file itself, and
`tokenizer_from_directory(directory)` rebuilds the same tokenizer from it.

`load_tokenizer(spec)` accepts `"byte"`, a path to a SentencePiece `.model`, a path to a Hugging
Face `tokenizer.json`, or a directory written by `save`. `train_tokenizer` trains a byte-level BPE
(Hugging Face `tokenizers`) or a byte-fallback SentencePiece BPE and saves it to a directory.
The spec `"bpe:N"` names a tokenizer still to be trained (`trained_bpe_vocab_size`): a training
run makes it from its own text (`yocou_jax.data.run_tokenizer`).
"""

from collections.abc import Iterable, Iterator
import json
import os
from typing import Any, Protocol, runtime_checkable

from absl import logging
import numpy as np

CONFIG_FILENAME = "tokenizer_config.json"
SENTENCEPIECE_FILENAME = "tokenizer.model"
HUGGINGFACE_FILENAME = "tokenizer.json"
CHAT_TEMPLATE_FILENAME = "chat_template.jinja"  # A Hugging Face tokenizer's chat template.
TRAINABLE_KINDS = ("bpe", "sentencepiece")
TRAINED_BPE_PREFIX = "bpe:"  # "bpe:N": a byte-level BPE of N ids, trained by the run itself.
MIN_BPE_VOCAB_SIZE = 256 + 3  # A byte-level BPE holds every byte and pad, bos, eos.
TRAINED_BPE_RULE = (f"'bpe:N' needs an integer N >= {MIN_BPE_VOCAB_SIZE} (the 256 byte tokens "
                    f"plus pad, bos and eos)")

# Special tokens of trained tokenizers: the same ids as the byte tokenizer.
PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<pad>", "<bos>", "<eos>"

# Names that common tokenizer.json files give their special tokens, most specific first.
_HF_SPECIAL_CANDIDATES = {
    "bos": (BOS_TOKEN, "<s>", "<|begin_of_text|>", "<|startoftext|>", "[BOS]", "<|endoftext|>"),
    "eos": (EOS_TOKEN, "</s>", "<|end_of_text|>", "<|endoftext|>", "[EOS]", "<|im_end|>"),
    "pad": (PAD_TOKEN, "[PAD]", "<|pad|>", "<|padding|>", "<|finetune_right_pad_id|>"),
}


@runtime_checkable
class Tokenizer(Protocol):
  """What the data pipeline, the trainer and generation need from a tokenizer."""

  @property
  def vocab_size(self) -> int:
    ...

  @property
  def pad_id(self) -> int:
    ...

  @property
  def bos_id(self) -> int:
    ...

  @property
  def eos_id(self) -> int:
    ...

  def encode(self, text: str) -> list[int]:
    ...

  def decode(self, ids: Iterable[int]) -> str:
    ...

  def save(self, directory: str) -> None:
    ...


def _valid_ids(ids: Iterable[int], vocab_size: int, special_ids: set[int]) -> list[int]:
  """The ids of `ids` that are inside the vocabulary and not special, as Python ints."""
  flat_ids = np.asarray(list(ids) if isinstance(ids, Iterator) else ids, np.int64).ravel()
  return [int(i) for i in flat_ids if 0 <= i < vocab_size and int(i) not in special_ids]


def _write_config(directory: str, config: dict[str, Any]) -> None:
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, CONFIG_FILENAME), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
    f.write("\n")


def _special_ids_config(tokenizer: Tokenizer) -> dict[str, int]:
  return {
      "vocab_size": tokenizer.vocab_size,
      "pad_id": tokenizer.pad_id,
      "bos_id": tokenizer.bos_id,
      "eos_id": tokenizer.eos_id,
  }


class ByteTokenizer:
  """UTF-8 bytes shifted past three special ids: pad=0, bos=1, eos=2, byte b -> b + 3."""

  NUM_SPECIAL = 3
  vocab_size = 256 + NUM_SPECIAL
  pad_id, bos_id, eos_id = 0, 1, 2

  def encode(self, text: str) -> list[int]:
    # Lone surrogates cannot be UTF-8: they become "?" rather than raising.
    data = text.encode("utf-8", errors="replace")
    return (np.frombuffer(data, np.uint8).astype(np.int32) + self.NUM_SPECIAL).tolist()

  def decode(self, ids: Iterable[int]) -> str:
    byte_ids = _valid_ids(ids, self.vocab_size, {self.pad_id, self.bos_id, self.eos_id})
    return bytes(i - self.NUM_SPECIAL for i in byte_ids).decode("utf-8", errors="replace")

  def save(self, directory: str) -> None:
    _write_config(directory, {"kind": "byte", **_special_ids_config(self)})

  def __repr__(self) -> str:
    return "ByteTokenizer()"


class SentencePieceTokenizer:
  """A SentencePiece model; without a pad (bos) piece, pad (bos) falls back to eos."""

  def __init__(self, model_file: str):
    import sentencepiece  # pylint: disable=g-import-not-at-top

    self._model_file = model_file
    self._processor = sentencepiece.SentencePieceProcessor(model_file=model_file)
    if self._processor.eos_id() < 0:
      raise ValueError(f"SentencePiece model {model_file} has no eos piece (eos_id=-1).")
    self.eos_id = self._processor.eos_id()
    self.bos_id = self._processor.bos_id() if self._processor.bos_id() >= 0 else self.eos_id
    self.pad_id = self._processor.pad_id() if self._processor.pad_id() >= 0 else self.eos_id
    self.vocab_size = self._processor.get_piece_size()
    self._special_ids = {self.pad_id, self.bos_id, self.eos_id}

  def encode(self, text: str) -> list[int]:
    return self._processor.encode(text, out_type=int)

  def decode(self, ids: Iterable[int]) -> str:
    return self._processor.decode(_valid_ids(ids, self.vocab_size, self._special_ids))

  def save(self, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, SENTENCEPIECE_FILENAME), "wb") as f:
      f.write(self._processor.serialized_model_proto())
    _write_config(
        directory,
        {"kind": "sentencepiece", "model_file": SENTENCEPIECE_FILENAME,
         **_special_ids_config(self)},
    )

  def __repr__(self) -> str:
    return f"SentencePieceTokenizer({self._model_file!r}, vocab_size={self.vocab_size})"


def _find_special_id(special_ids_by_token: dict[str, int], role: str) -> int | None:
  for token in _HF_SPECIAL_CANDIDATES[role]:
    if token in special_ids_by_token:
      return special_ids_by_token[token]
  return None


def _read_chat_template(directory: str) -> str | None:
  """The Jinja chat template saved beside a tokenizer.json, if any (Hugging Face layouts)."""
  path = os.path.join(directory, CHAT_TEMPLATE_FILENAME)
  if os.path.isfile(path):
    with open(path) as f:
      return f.read()
  config_path = os.path.join(directory, CONFIG_FILENAME)
  if os.path.isfile(config_path):
    with open(config_path) as f:
      template = json.load(f).get("chat_template")
    if isinstance(template, str):
      return template
  return None


class HuggingFaceTokenizer:
  """A Hugging Face `tokenizer.json`; bos/eos/pad are looked up among its special tokens."""

  def __init__(self, tokenizer_file: str):
    import tokenizers  # pylint: disable=g-import-not-at-top

    self._tokenizer_file = tokenizer_file
    self._tokenizer = tokenizers.Tokenizer.from_file(tokenizer_file)
    special_ids_by_token = {
        added.content: token_id
        for token_id, added in self._tokenizer.get_added_tokens_decoder().items()
        if added.special
    }
    eos_id = _find_special_id(special_ids_by_token, "eos")
    if eos_id is None:
      raise ValueError(
          f"{tokenizer_file} has no end-of-text special token: expected one of "
          f"{', '.join(_HF_SPECIAL_CANDIDATES['eos'])} among {sorted(special_ids_by_token)}."
      )
    bos_id = _find_special_id(special_ids_by_token, "bos")
    pad_id = _find_special_id(special_ids_by_token, "pad")
    self.eos_id = eos_id
    self.bos_id = eos_id if bos_id is None else bos_id
    self.pad_id = eos_id if pad_id is None else pad_id
    self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
    self._special_ids = set(special_ids_by_token.values())
    self.bos_token = self._tokenizer.id_to_token(self.bos_id)
    self.eos_token = self._tokenizer.id_to_token(self.eos_id)
    self.chat_template = _read_chat_template(os.path.dirname(os.path.abspath(tokenizer_file)))

  def encode(self, text: str) -> list[int]:
    return self._tokenizer.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Iterable[int]) -> str:
    valid_ids = _valid_ids(ids, self.vocab_size, self._special_ids)
    return self._tokenizer.decode(valid_ids, skip_special_tokens=True)

  def save(self, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    self._tokenizer.save(os.path.join(directory, HUGGINGFACE_FILENAME))
    if self.chat_template:
      with open(os.path.join(directory, CHAT_TEMPLATE_FILENAME), "w") as f:
        f.write(self.chat_template)
    _write_config(
        directory,
        {"kind": "huggingface", "tokenizer_file": HUGGINGFACE_FILENAME,
         **_special_ids_config(self)},
    )

  def __repr__(self) -> str:
    return f"HuggingFaceTokenizer({self._tokenizer_file!r}, vocab_size={self.vocab_size})"


def tokenizer_from_directory(directory: str) -> Tokenizer:
  """Rebuilds the tokenizer that `Tokenizer.save(directory)` wrote."""
  config_path = os.path.join(directory, CONFIG_FILENAME)
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"No {CONFIG_FILENAME} in {directory}: not a saved tokenizer.")
  with open(config_path) as f:
    config = json.load(f)
  kind = config.get("kind")
  if kind == "byte":
    tokenizer = ByteTokenizer()
  elif kind == "sentencepiece":
    tokenizer = SentencePieceTokenizer(os.path.join(directory, config["model_file"]))
  elif kind == "huggingface":
    tokenizer = HuggingFaceTokenizer(os.path.join(directory, config["tokenizer_file"]))
  else:
    raise ValueError(
        f"{config_path} has kind={kind!r}; expected one of: byte, sentencepiece, huggingface."
    )
  _check_special_ids(tokenizer, config, config_path)
  return tokenizer


def _check_special_ids(tokenizer: Tokenizer, config: dict[str, Any], config_path: str) -> None:
  rebuilt = _special_ids_config(tokenizer)
  recorded = {key: config[key] for key in rebuilt if key in config}
  mismatched = {key: (value, rebuilt[key]) for key, value in recorded.items()
                if value != rebuilt[key]}
  if mismatched:
    raise ValueError(
        f"{config_path} does not match its model file (recorded, rebuilt): {mismatched}.")


def trained_bpe_vocab_size(spec: str) -> int | None:
  """N for a `"bpe:N"` spec (a byte-level BPE a run trains on its own text), else None.

  Raises:
    ValueError: one line, for a `"bpe:..."` spec whose N is not an integer >= 259.
  """
  if not spec.startswith(TRAINED_BPE_PREFIX):
    return None
  size = spec[len(TRAINED_BPE_PREFIX):]
  if not (size.isascii() and size.isdigit() and int(size) >= MIN_BPE_VOCAB_SIZE):
    raise ValueError(f"tokenizer spec {spec!r} is invalid: {TRAINED_BPE_RULE}")
  return int(size)


def load_tokenizer(spec: str) -> Tokenizer:
  """Builds a tokenizer from `spec`: "byte", a `.model` or `.json` file, or a saved directory."""
  path = os.path.expanduser(spec)
  if spec == "byte":
    return ByteTokenizer()
  if trained_bpe_vocab_size(spec) is not None:
    raise ValueError(f"tokenizer spec {spec!r} names a BPE that a training run trains on its "
                     f"text (yocou_jax.data.run_tokenizer); load the run's saved tokenizer "
                     f"(WORKDIR/tokenizer) instead.")
  if os.path.isdir(path):
    return tokenizer_from_directory(path)
  if os.path.basename(path) == CONFIG_FILENAME:
    return tokenizer_from_directory(os.path.dirname(path))
  if path.endswith((".model", ".json")):
    if not os.path.isfile(path):
      raise FileNotFoundError(f"Tokenizer file {spec!r} does not exist.")
    return SentencePieceTokenizer(path) if path.endswith(".model") else HuggingFaceTokenizer(path)
  raise ValueError(
      f"Unknown tokenizer spec {spec!r}: expected 'byte', 'bpe:N', a SentencePiece .model file, a "
      f"Hugging Face tokenizer.json file or a directory holding {CONFIG_FILENAME}."
  )


def _train_byte_level_bpe(texts: Iterable[str], vocab_size: int, out_dir: str) -> None:
  import tokenizers  # pylint: disable=g-import-not-at-top

  byte_level = tokenizers.pre_tokenizers.ByteLevel
  special_tokens = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN]
  assert len(byte_level.alphabet()) + len(special_tokens) == MIN_BPE_VOCAB_SIZE
  if vocab_size < MIN_BPE_VOCAB_SIZE:
    raise ValueError(
        f"A byte-level BPE needs vocab_size >= {MIN_BPE_VOCAB_SIZE}, got {vocab_size}.")
  tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
  tokenizer.pre_tokenizer = byte_level(add_prefix_space=False)
  tokenizer.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=vocab_size,
      special_tokens=special_tokens,
      initial_alphabet=byte_level.alphabet(),  # Every byte is a token: no unknown tokens.
      show_progress=False,
  )
  tokenizer.train_from_iterator(texts, trainer=trainer)
  tokenizer.save(os.path.join(out_dir, HUGGINGFACE_FILENAME))


def _train_sentencepiece(texts: Iterable[str], vocab_size: int, out_dir: str) -> None:
  import sentencepiece  # pylint: disable=g-import-not-at-top

  try:
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_prefix=os.path.join(out_dir, "tokenizer"),
        vocab_size=vocab_size,
        model_type="bpe",
        pad_id=0, bos_id=1, eos_id=2, unk_id=3,
        byte_fallback=True,  # Unseen characters become byte pieces, never <unk>.
        character_coverage=1.0,
        # Exact round trips of code: no normalisation, no dummy prefix, keep whitespace runs.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        max_sentence_length=1 << 24,  # A "sentence" is a whole document.
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )
  except RuntimeError as e:
    first_line = str(e).strip().splitlines()[0]
    raise ValueError(f"SentencePiece could not train vocab_size={vocab_size}: {first_line}") from e


def train_tokenizer(kind: str, texts: Iterable[str], vocab_size: int, out_dir: str) -> Tokenizer:
  """Trains a tokenizer of `kind` ("bpe" or "sentencepiece") on `texts` and saves it to `out_dir`.

  Args:
    kind: "bpe" for a byte-level BPE (Hugging Face `tokenizers`, every byte is a token) or
      "sentencepiece" for a SentencePiece BPE with byte fallback. Both reserve pad=0, bos=1,
      eos=2 like the byte tokenizer.
    texts: the training documents.
    vocab_size: the vocabulary size, special tokens included.
    out_dir: where the tokenizer is saved (`tokenizer_config.json` plus the model file).

  Returns:
    The trained tokenizer, rebuilt from `out_dir`.
  """
  if kind not in TRAINABLE_KINDS:
    raise ValueError(
        f"Unknown tokenizer kind {kind!r}: expected one of {', '.join(TRAINABLE_KINDS)}.")
  os.makedirs(out_dir, exist_ok=True)
  texts = (text for text in texts if text)
  if kind == "bpe":
    _train_byte_level_bpe(texts, vocab_size, out_dir)
    tokenizer = HuggingFaceTokenizer(os.path.join(out_dir, HUGGINGFACE_FILENAME))
  else:
    _train_sentencepiece(texts, vocab_size, out_dir)
    tokenizer = SentencePieceTokenizer(os.path.join(out_dir, SENTENCEPIECE_FILENAME))
  tokenizer.save(out_dir)
  logging.info("Trained %r into %s.", tokenizer, out_dir)
  return tokenizer_from_directory(out_dir)

