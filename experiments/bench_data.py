r"""Input-pipeline throughput from Parquet and zstd JSONL sources, over the trainer's tokens/s.

  python -m experiments.bench_data [--windows=2] [--trainer_tokens_per_sec=X] [--json_out=PATH]

Writes the `python_stdlib` corpus (the TFDS path's default corpus) as Parquet shards (row groups
of `--row_group_size` rows) and as `.jsonl.zst` shards into a temporary directory, then times
`make_train_iterator` on each as a `config.data.sources` source, and on the TFDS ArrayRecord
path (`config.data.tfds_name`) for reference, with the byte tokenizer and with a byte-level BPE
(trained here on the corpus, `--bpe_vocab_size`), at the `bench_train` shape (seq_len, batch
size) and the default `config.data` settings (`num_workers` = 0: in-process). Start-up (opening
the files, building the line indices, the first shuffle window of rows) is reported apart from
the steady rate (`time_pipeline`: whole windows, since the row shuffle fills a window of
`shuffle_window` rows before it gives one). The trainer's tokens/s is that of `bench_train`'s
fastest arch (timed here with its flags: `--archs`, `--d_model`, ...), or
`--trainer_tokens_per_sec`.

Target: pipeline tokens/s >= 20x the trainer's for every source format and tokenizer.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

from absl import app, flags
import numpy as np

from experiments import bench_train
from yocou_jax import files
from yocou_jax.data import corpora
from yocou_jax.data import pipeline
from yocou_jax.data import tokenizers

TARGET = 20.0
_WINDOWS = flags.DEFINE_integer("windows", 2, "Shuffle windows of rows timed per pipeline.")
_SHARDS = flags.DEFINE_integer("shards", 4, "Files per format.")
_ROW_GROUP = flags.DEFINE_integer("row_group_size", 64, "Parquet rows per row group.")
_BPE_VOCAB = flags.DEFINE_integer("bpe_vocab_size", 4096, "Vocabulary of the BPE tokenizer.")
_TRAINER_TPS = flags.DEFINE_float("trainer_tokens_per_sec", 0.0,
                                  ">0: the trainer's tokens/s (skips timing bench_train's model).")
FLAGS = flags.FLAGS  # Also bench_train's flags: --archs, --d_model, ..., --json_out.

def write_corpus(texts: list[str], directory: str, shards: int, row_group_size: int) -> dict:
  """The texts as Parquet and as .jsonl.zst shards; returns the glob of each format."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  import zstandard  # pylint: disable=g-import-not-at-top

  for i, part in enumerate(np.array_split(np.arange(len(texts)), shards)):
    part_texts = [texts[j] for j in part]
    pq.write_table(pa.table({"text": part_texts}),
                   os.path.join(directory, f"part-{i:03d}.parquet"), row_group_size=row_group_size)
    lines = "".join(json.dumps({"text": t}) + "\n" for t in part_texts).encode()
    with open(os.path.join(directory, f"part-{i:03d}.jsonl.zst"), "wb") as f:
      f.write(zstandard.ZstdCompressor(level=3).compress(lines))
  return {"parquet": os.path.join(directory, "*.parquet"),
          "jsonl.zst": os.path.join(directory, "*.jsonl.zst")}


def time_pipeline(data_config, tokenizer, batch_size: int, windows: int) -> dict:
  """Start-up seconds and steady tokens/s of the configured pipeline.

  The row shuffle fills a window of `shuffle_window` rows before it gives any: start-up is the
  time to the end of the first window's batches, and the steady rate is timed over the batches
  of the next `windows` windows, their fills included.
  """
  batches_per_window = max(1, -(-data_config.shuffle_window // batch_size))
  start = time.perf_counter()
  iterator = pipeline.make_train_iterator(data_config, tokenizer, global_batch_size=batch_size,
                                          seed=0)
  for _ in range(batches_per_window):
    next(iterator)
  startup = time.perf_counter() - start
  num_batches = windows * batches_per_window
  start = time.perf_counter()
  for _ in range(num_batches):
    next(iterator)
  elapsed = time.perf_counter() - start
  return {"startup_s": startup, "timed_batches": num_batches,
          "tokens_per_sec": num_batches * batch_size * data_config.seq_len / elapsed}


def main(argv):
  del argv
  config = bench_train.bench_config(FLAGS.archs[0])
  seq_len, batch_size = config.data.seq_len, config.train.batch_size
  texts = list(corpora.iterate_texts("python_stdlib", config.data.tfds_data_dir, "train"))
  if _TRAINER_TPS.value > 0:
    trainer_tps, trainer_source = _TRAINER_TPS.value, "--trainer_tokens_per_sec"
  else:
    configs = [bench_train.bench_config(arch) for arch in FLAGS.archs]
    rows = bench_train.time_train_steps(configs)
    best = max(rows, key=lambda r: r["tokens_per_sec"])
    trainer_tps, trainer_source = best["tokens_per_sec"], f"bench_train {best['arch']}"
  rows = []
  with tempfile.TemporaryDirectory() as directory:
    globs = write_corpus(texts, directory, _SHARDS.value, _ROW_GROUP.value)
    bpe = tokenizers.train_tokenizer("bpe", texts[:300], _BPE_VOCAB.value,
                                     os.path.join(directory, "bpe"))
    for tokenizer_name, tokenizer in (("byte", tokenizers.ByteTokenizer()), ("bpe", bpe)):
      for data_format, glob in {"arrayrecord": None, **globs}.items():
        data_config = config.data.copy_and_resolve_references()
        if glob:  # Otherwise the one-source TFDS path (tfds_name=python_stdlib) for reference.
          kind = "parquet" if data_format == "parquet" else "jsonl"
          data_config.sources = f"name={data_format},kind={kind},path={glob}"
          data_config.index_dir = os.path.join(directory, "index")
        figures = time_pipeline(data_config, tokenizer, batch_size, _WINDOWS.value)
        rows.append({"format": data_format, "tokenizer": tokenizer_name, **figures,
                     "headroom": figures["tokens_per_sec"] / trainer_tps})
  result = {"trainer_tokens_per_sec": trainer_tps, "trainer": trainer_source,
            "target_headroom": TARGET, "rows": rows, "documents": len(texts),
            "shape": {"seq_len": seq_len, "batch_size": batch_size},
            "num_workers": config.data.num_workers, "loadavg": os.getloadavg()}
  print(f"\ntrainer: {trainer_tps:,.0f} tokens/s ({trainer_source}); seq_len {seq_len}, batch "
        f"{batch_size}, num_workers {config.data.num_workers}; {len(texts)} documents; "
        f"load average {os.getloadavg()[0]:.1f}")
  print(f"{'format':<13}{'tokenizer':<11}{'start-up s':>11}{'tokens/s':>12}{'x trainer':>11}"
        f"{'>=20x':>7}")
  for r in rows:
    print(f"{r['format']:<13}{r['tokenizer']:<11}{r['startup_s']:>11.2f}"
          f"{r['tokens_per_sec']:>12,.0f}{r['headroom']:>11.1f}"
          f"{'yes' if r['headroom'] >= TARGET else 'NO':>7}")
  if FLAGS.json_out:
    with files.atomic_write(FLAGS.json_out) as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  app.run(main)
