r"""Trains a tokenizer on a corpus and saves it to a directory that `load_tokenizer` accepts.

  python -m experiments.train_tokenizer --kind=bpe --vocab_size=4096 --out_dir=/tmp/tok
  python -m experiments.train_tokenizer --kind=sentencepiece --vocab_size=8000 \
      --out_dir=/tmp/tok --text_glob='~/corpus/**/*.txt'

Then train with `--config.data.tokenizer=/tmp/tok` (and `--config.model.vocab_size` set to the
printed vocabulary size). A run can also train its own byte-level BPE on its training text at
start-up: `--config.data.tokenizer=bpe:4096` (the default config's is `bpe:1024`).
"""

import itertools
import time

from absl import app
from absl import flags
from absl import logging

from yocou_jax.data import corpora
from yocou_jax.data import tokenizers

_KIND = flags.DEFINE_enum("kind", "bpe", tokenizers.TRAINABLE_KINDS,
                          "bpe: byte-level BPE (Hugging Face tokenizers); sentencepiece: "
                          "SentencePiece BPE with byte fallback.")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 4096, "Vocabulary size, special tokens included.")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Directory to save the tokenizer into.",
                               required=True)
_TFDS_NAME = flags.DEFINE_string("tfds_name", "python_stdlib",
                                 "Corpus: python_stdlib, or any TFDS name prepared as ArrayRecord "
                                 "(text_files when --text_glob is given).")
_TFDS_DATA_DIR = flags.DEFINE_string("tfds_data_dir", None,
                                     "TFDS data directory (default: $TFDS_DATA_DIR or "
                                     "~/tensorflow_datasets).")
_TEXT_GLOB = flags.DEFINE_string("text_glob", None,
                                 "A directory or glob of text files to train on (implies "
                                 "--tfds_name=text_files).")
_TEXT_KEY = flags.DEFINE_string("text_key", "text", "The text feature of the records.")
_SPLIT = flags.DEFINE_string("split", "train", "The split to train on.")
_MAX_DOCUMENTS = flags.DEFINE_integer("max_documents", 100_000,
                                      "Train on at most this many documents (0: all).")


def main(argv: list[str]) -> None:
  del argv  # Unused.
  tfds_name = "text_files" if _TEXT_GLOB.value else _TFDS_NAME.value
  texts = corpora.iterate_texts(tfds_name, _TFDS_DATA_DIR.value, _SPLIT.value, _TEXT_GLOB.value,
                                _TEXT_KEY.value)
  texts = itertools.islice(texts, _MAX_DOCUMENTS.value or None)
  start = time.perf_counter()
  tokenizer = tokenizers.train_tokenizer(_KIND.value, texts, _VOCAB_SIZE.value, _OUT_DIR.value)
  logging.info("Trained in %.1f s.", time.perf_counter() - start)
  print(f"Saved {tokenizer!r} (pad={tokenizer.pad_id}, bos={tokenizer.bos_id}, "
        f"eos={tokenizer.eos_id}) to {_OUT_DIR.value}.")


if __name__ == "__main__":
  app.run(main)
