"""Pretraining the 1.3B YOCO-U on a web / code / math mixture read in place from a bucket.

  --config=experiments/configs/pretrain_mixture.py:gs://BUCKET/corpora

The argument is the root of the corpora (a ``gs://`` URL, any other fsspec URL, or a local
directory); under it the sources of ``SOURCES`` (path, text field, weight) and the held-out
shards of ``EVAL_SOURCES``. The model and training recipe are ``yocou_1p3b.py``'s (the paper's
1.3B comparison: 4M-token steps of 8192-token rows, full FSDP over every chip). The tokenizer is
a byte-level BPE of ``ladder.VOCAB_SIZE`` ids trained with ``experiments.train_tokenizer`` and
copied to ``~/tokenizer`` on every host. BUILD.md ("Recipe") runs it end to end on a TPU pod.
"""

import ml_collections

from experiments.configs import ladder

# (name, kind, path under the root, weight, text field): documents are drawn by weight.
SOURCES = (
    ("web", "parquet", "fineweb_edu/train/*.parquet", 0.70, "text"),
    ("code", "parquet", "the_stack/train/*.parquet", 0.20, "content"),
    ("math", "jsonl", "open_web_math/train/*.jsonl.zst", 0.10, "text"),
)
# Validation: one held-out shard per source; eval_loss/NAME is reported for each.
EVAL_SOURCES = (
    ("web", "parquet", "fineweb_edu/validation/*.parquet", 1.0, "text"),
    ("code", "parquet", "the_stack/validation/*.parquet", 1.0, "content"),
    ("math", "jsonl", "open_web_math/validation/*.jsonl.zst", 1.0, "text"),
)


def sources_spec(root: str, sources) -> str:
  """The ``config.data.sources`` string of ``sources`` under ``root``."""
  return ";".join(f"name={name},kind={kind},path={root.rstrip('/')}/{path},weight={weight},"
                  f"text_key={text_key}" for name, kind, path, weight, text_key in sources)


def get_config(root: str = "gs://BUCKET/corpora") -> ml_collections.ConfigDict:
  config = ladder.get_config("yocou,s4,tpu")  # = yocou_1p3b.py
  config.data.sources = sources_spec(root, SOURCES)
  config.data.eval_sources = sources_spec(root, EVAL_SOURCES)
  config.data.tokenizer = "~/tokenizer"  # experiments.train_tokenizer --vocab_size=100352.
  config.data.num_workers = 8  # grain worker processes per host (Parquet decoding, tokenizing).
  return config
