"""The tokenizer of a training run: made once from `config.data.tokenizer`, then read from the run.

`config.data.tokenizer` names a tokenizer that exists (`tokenizers.load_tokenizer`: "byte", a
SentencePiece `.model`, a `tokenizer.json`, a saved directory) or one to train: "bpe:N", a
byte-level BPE of N ids (special tokens included) trained by `tokenizers.train_tokenizer` on a
sample of the run's own training text (`training_sample`): the documents of the training split,
in stored order, up to `SAMPLE_BYTES` of UTF-8 (with `config.data.sources`, every training source
gives its share of that by weight). The sample is a pure function of the config and the data.

A run's tokenizer lives in `WORKDIR/tokenizer` (`TOKENIZER_DIR`). The first start of a run writes
it there whole or not at all (`files.atomic_directory`: a temporary sibling renamed into place),
so a run killed while training or writing it leaves no tokenizer that a restart would take for
good: the restart makes it again. Every later start (a resume) and every reader of the run
(`inference.text.load_run` for generation and evaluation, the exporter) reads that directory,
never the spec again.

Processes: every process makes the tokenizer itself and process 0 writes it, so no process waits
for a file that another one writes and the workdir need not be shared. "bpe:N" gives every
process the same bytes: the same sample in the same order, and the Hugging Face BPE trainer is
deterministic (the same `tokenizer.json` whatever the hash seed and thread count). A
multi-process run compares the SHA-256 fingerprints of all processes' tokenizers once
(`check_same_everywhere`): a tokenizer that differs between processes stops the run with one
line instead of training on batches the processes tokenized differently.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
import hashlib
import os
import tempfile
import time
from typing import Any

from absl import logging
import numpy as np

from yocou_jax import files
from yocou_jax.data import corpora
from yocou_jax.data import tokenizers

TOKENIZER_DIR = "tokenizer"  # Under the workdir.
SAMPLE_BYTES = 16 << 20  # "bpe:N" trains on at most this much training text (UTF-8 bytes).


def saved_tokenizer_dir(workdir: str) -> str | None:
  """`WORKDIR/tokenizer` when it holds a complete saved tokenizer, else None."""
  directory = os.path.join(workdir, TOKENIZER_DIR)
  return directory if os.path.isfile(os.path.join(directory, tokenizers.CONFIG_FILENAME)) else None


def _first_bytes(texts: Iterable[str], max_bytes: int) -> list[str]:
  """The non-empty `texts` in order up to `max_bytes` of UTF-8; the last one cut to fit."""
  sample, size = [], 0
  for text in texts:
    if size >= max_bytes:
      break
    data = text.encode("utf-8", errors="replace")
    if size + len(data) > max_bytes:
      data = data[:max_bytes - size]
      text = data.decode("utf-8", errors="ignore")  # A character cut in two is dropped.
    if text:
      sample.append(text)
      size += len(data)
  return sample


def _source_texts(spec: Any, data_config: Any) -> Iterable[str]:
  """The texts of one source of `config.data.sources` (chat: its messages' contents)."""
  from yocou_jax.data import chat  # pylint: disable=g-import-not-at-top
  from yocou_jax.data import sources  # pylint: disable=g-import-not-at-top

  records = sources.open_source(spec, data_config, spec.split or data_config.train_split)
  for index in range(len(records)):
    if spec.kind == "chat":
      yield "\n".join(m["content"] for m in chat.messages_of(records[index]))
    else:
      yield corpora.record_text(records[index], spec.text_key)


def training_sample(data_config: Any, max_bytes: int = SAMPLE_BYTES) -> list[str]:
  """The first documents of the training text, in stored order, up to `max_bytes` of UTF-8.

  With `config.data.sources`, each training source gives `max_bytes * weight / total weight`.
  """
  try:
    if not data_config.get("sources"):
      return _first_bytes(corpora.iterate_texts(
          data_config.tfds_name, data_config.tfds_data_dir, data_config.train_split,
          data_config.text_glob, data_config.text_key), max_bytes)
    from yocou_jax.data import mixture  # pylint: disable=g-import-not-at-top

    specs = mixture.train_sources(data_config)
    total = sum(spec.weight for spec in specs)
    return [text for spec in specs
            for text in _first_bytes(_source_texts(spec, data_config),
                                     int(max_bytes * spec.weight / total))]
  except KeyError as e:  # A record without the text feature.
    raise ValueError(f"a training record has no feature {e} (config.data.text_key="
                     f"{data_config.text_key!r}, or a source's text_key)") from e


def make_tokenizer(data_config: Any, out_dir: str) -> None:
  """Saves the tokenizer `config.data.tokenizer` names into `out_dir` ("bpe:N": trains it)."""
  vocab_size = tokenizers.trained_bpe_vocab_size(data_config.tokenizer)
  if vocab_size is None:
    tokenizers.load_tokenizer(data_config.tokenizer).save(out_dir)
    return
  start = time.perf_counter()
  sample = training_sample(data_config)
  tokenizer = tokenizers.train_tokenizer("bpe", sample, vocab_size, out_dir)
  logging.info("config.data.tokenizer=%r: a byte-level BPE of %d ids trained on %d documents "
               "(%.1f MB) of the training text in %.1f s", data_config.tokenizer,
               tokenizer.vocab_size, len(sample),
               sum(len(t.encode("utf-8", errors="replace")) for t in sample) / 1e6,
               time.perf_counter() - start)


def fingerprint(directory: str) -> bytes:
  """SHA-256 over the names and contents of the files of a saved tokenizer."""
  digest = hashlib.sha256()
  for name in sorted(os.listdir(directory)):
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      with open(path, "rb") as f:
        data = f.read()
      digest.update(f"{name}\0{len(data)}\0".encode())
      digest.update(data)
  return digest.digest()


def check_same_everywhere(directory: str) -> None:
  """Raises a one-line ValueError unless every process holds the tokenizer saved in `directory`
  (compared by `fingerprint`).

  A collective: every process of a multi-process run calls it; a single process returns without
  reading the files.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  if jax.process_count() == 1:
    return
  gathered = multihost_utils.process_allgather(np.frombuffer(fingerprint(directory), np.uint8))
  digests = [bytes(row) for row in np.asarray(gathered, np.uint8)]
  differ = [p for p, other in enumerate(digests) if other != digests[0]]
  if differ:
    raise ValueError(f"the tokenizer of process{'es' if len(differ) > 1 else ''} "
                     f"{', '.join(map(str, differ))} differs from process 0's (SHA-256 "
                     f"{digests[0].hex()[:16]}...): give every process the same "
                     f"config.data.tokenizer and training data")


def prepare(data_config: Any, workdir: str, *, write: bool,
            check: Callable[[tokenizers.Tokenizer], None] = lambda tokenizer: None
            ) -> tokenizers.Tokenizer:
  """The run's tokenizer: the one saved in `workdir`, else made from `config.data.tokenizer`.

  Args:
    data_config: `config.data`.
    workdir: the run directory.
    write: save a newly made tokenizer into `WORKDIR/tokenizer` (process 0); other processes
      make the same one in a scratch directory. Nothing is saved unless every process made the
      same tokenizer.
    check: raises if the run cannot use a newly made tokenizer (its model's vocabulary, a
      fine-tuning source's tokenizer); called before it is saved, so a refused one is not kept.

  Returns:
    The tokenizer, read back from its saved files.
  """
  directory = saved_tokenizer_dir(workdir)
  if directory is not None:
    check_same_everywhere(directory)
    return tokenizers.tokenizer_from_directory(directory)
  if write:
    directory = os.path.join(workdir, TOKENIZER_DIR)
    with files.atomic_directory(directory) as scratch:
      check(_make_and_compare(data_config, scratch))
    return tokenizers.tokenizer_from_directory(directory)
  with tempfile.TemporaryDirectory(prefix="yocou_tokenizer_") as scratch:
    tokenizer = _make_and_compare(data_config, scratch)
    check(tokenizer)
    return tokenizer


def _make_and_compare(data_config: Any, directory: str) -> tokenizers.Tokenizer:
  make_tokenizer(data_config, directory)
  check_same_everywhere(directory)
  return tokenizers.tokenizer_from_directory(directory)
