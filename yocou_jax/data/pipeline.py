"""The grain input pipeline: documents -> tokens -> packed rows -> shuffled global batches.

Training (`make_train_iterator`), for every epoch of the train split, forever:

1. Global shuffle of the documents (`MapDataset.shuffle`, a fresh seeded permutation per epoch).
2. Tokenize: `[bos] + tokenizer.encode(text) + [eos]`; empty documents are dropped.
3. Split documents longer than `seq_len` into `seq_len` pieces (each piece its own segment).
4. First-fit packing (`grain.experimental.FirstFitPackIterDataset`) into rows of `seq_len`
   tokens with segment ids 1, 2, 3... (0 = padding) and positions restarting at 0 per segment.
5. Shuffle of the packed rows within windows of `shuffle_window` rows, so that the pieces of one
   long document do not fill a batch.
6. Global batches of `global_batch_size` rows, of which this process keeps its slice.

Batches are dicts of int32 numpy arrays `tokens`, `segment_ids`, `positions`, each
`[global_batch_size // process_count, seq_len]`. Padding has segment id 0, position 0 and token
`tokenizer.pad_id`; the trainer predicts the next token within the same segment.

Multi-host: every process builds the same deterministic global batch stream and keeps rows
`[process_index * B / P, (process_index + 1) * B / P)`. The data a run sees therefore does not
depend on the number of processes: a 2-process run sees exactly the rows of a 1-process run, and
since the iterator state is the same on every process, a run can resume on another process
count. The price is that every process tokenizes the whole global batch. On one CPU core the byte
pipeline streams about 0.5M tokens/s and a BPE one about 0.2M (tokenizers hold the GIL, so
threads do not help; `num_workers` processes do); beyond that, sharding the source per process
(`grain.sharding`) is the cheaper trade.

The stream depends only on the data, the tokenizer, `seed`, `seq_len`, `packing_bins`,
`shuffle_window`, `global_batch_size` and `num_workers` (worker processes each pack their own
slice of the documents). The iterator is a `grain.DatasetIterator`: `get_state()`/`set_state()`
resume exactly, and `grain.checkpoint.CheckpointSave/CheckpointRestore` store that state in an
Orbax checkpoint. Close an iterator with workers (`iterator.close()`) to stop them. Keep
`shuffle_window` at 256 rows or more: grain's index shuffle costs about 7 ms a row on a window of
8 rows and 0.07 ms on 1024.

Evaluation (`make_eval_batches`) packs the eval split in its stored order, once, into a fixed
list of batches; the last one is completed with padding rows (segment id 0) rather than dropped.

This is the one-source pipeline of `config.data.tfds_name`. When `config.data.sources` is set,
both functions hand over to `yocou_jax.data.mixture` (Parquet, JSONL, chat and TFDS sources
mixed by weight, the same packing; eval batches per source).
"""

from collections.abc import Sequence
import dataclasses
import itertools
from typing import Any

from absl import flags
from absl import logging
import grain
import ml_collections
import numpy as np

from yocou_jax.data import corpora
from yocou_jax.data import tokenizers

Batch = dict[str, np.ndarray]
ROW_KEYS = ("tokens", "segment_ids", "positions")
# One reader thread a few documents ahead overlaps I/O; more threads cannot tokenize in parallel
# (the GIL), and grain's default 500-document read-ahead costs seconds at start-up with BPE.
READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=16)


def tokenize_document(tokenizer: tokenizers.Tokenizer, text: str) -> np.ndarray:
  """The token ids of one training document: `[bos] + encode(text) + [eos]`, int32."""
  return np.asarray([tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id], np.int32)


@dataclasses.dataclass(frozen=True)
class _HasText(grain.transforms.Filter):
  text_key: str

  def filter(self, record: dict[str, Any]) -> bool:
    return len(record[self.text_key]) > 0


@dataclasses.dataclass(frozen=True)
class _Tokenize(grain.transforms.Map):
  tokenizer: tokenizers.Tokenizer
  text_key: str

  def map(self, record: dict[str, Any]) -> np.ndarray:
    return tokenize_document(self.tokenizer, corpora.record_text(record, self.text_key))


@dataclasses.dataclass(frozen=True)
class _SplitIntoPieces(grain.experimental.FlatMapTransform):
  seq_len: int

  def flat_map(self, tokens: np.ndarray) -> list[dict[str, np.ndarray]]:
    return [{"tokens": tokens[i:i + self.seq_len]} for i in range(0, len(tokens), self.seq_len)]


def _rename_packed(row: dict[str, np.ndarray]) -> Batch:
  return {"tokens": row["tokens"], "segment_ids": row["tokens_segment_ids"],
          "positions": row["tokens_positions"]}


@dataclasses.dataclass(frozen=True)
class _ProcessRows(grain.transforms.Map):
  start: int
  stop: int

  def map(self, batch: Batch) -> Batch:
    return {key: value[self.start:self.stop] for key, value in batch.items()}


def _source(data_config: ml_collections.ConfigDict, split: str) -> Sequence[Any]:
  source = corpora.get_data_source(data_config.tfds_name, data_config.tfds_data_dir, split,
                                   data_config.text_glob)
  if len(source) and data_config.text_key not in source[0]:
    raise ValueError(f"{_dataset_name(data_config, split)} has no feature "
                     f"text_key={data_config.text_key!r}; its features: {sorted(source[0])}.")
  return source


def _documents(source: Sequence[Any], tokenizer: tokenizers.Tokenizer,
               data_config: ml_collections.ConfigDict, *, shuffle_seed: int | None,
               num_epochs: int | None) -> grain.MapDataset:
  documents = grain.MapDataset.source(source)
  if shuffle_seed is not None:
    documents = documents.shuffle(shuffle_seed)
  documents = documents.repeat(num_epochs)  # Shuffled before repeat: a new order every epoch.
  return documents.filter(_HasText(data_config.text_key)).map(
      _Tokenize(tokenizer, data_config.text_key))


def _packed_rows(documents: grain.MapDataset, data_config: ml_collections.ConfigDict,
                 pad_id: int) -> grain.IterDataset:
  pieces = grain.experimental.FlatMapIterDataset(
      documents.to_iter_dataset(READ_OPTIONS), _SplitIntoPieces(data_config.seq_len))
  rows = grain.experimental.FirstFitPackIterDataset(
      pieces,
      length_struct={"tokens": data_config.seq_len},
      num_packing_bins=data_config.packing_bins,
      padding_struct={"tokens": pad_id},
      shuffle_bins=False,  # The window shuffle below mixes rows across packing groups.
  )
  return rows.map(_rename_packed)


def local_rows(global_batch_size: int, process_index: int, process_count: int) -> _ProcessRows:
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} is not a positive multiple of "
                     f"process_count={process_count}.")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is outside [0, {process_count}).")
  local_batch_size = global_batch_size // process_count
  return _ProcessRows(process_index * local_batch_size, (process_index + 1) * local_batch_size)


def _dataset_name(data_config: ml_collections.ConfigDict, split: str) -> str:
  name = data_config.tfds_name
  if name == "text_files":
    name = f"text_files({data_config.text_glob})"
  return f"{name} split {split!r}"


def _check_one_epoch_fills_a_batch(source: Sequence[Any], documents: grain.MapDataset,
                                   data_config: ml_collections.ConfigDict, pad_id: int,
                                   global_batch_size: int, split: str) -> None:
  """Raises ValueError unless one epoch packs into at least one global batch of rows."""
  if not len(source):
    raise ValueError(f"{_dataset_name(data_config, split)} has no documents.")
  rows = _packed_rows(documents, data_config, pad_id)
  num_rows = sum(1 for _ in itertools.islice(rows, global_batch_size))
  if num_rows < global_batch_size:
    raise ValueError(
        f"{_dataset_name(data_config, split)} packs into only {num_rows} rows of "
        f"seq_len={data_config.seq_len} per epoch ({len(source)} documents), fewer than the "
        f"global batch size {global_batch_size}.")


def ensure_flags_parsed_for_workers() -> None:
  # Grain reads its absl flags when it starts worker processes; outside `absl.app.run` (tests,
  # notebooks) nothing has parsed them, so take their defaults.
  if not flags.FLAGS.is_parsed():
    logging.info("absl flags are not parsed: marking them parsed for grain worker processes.")
    flags.FLAGS.mark_as_parsed()


def make_train_iterator(data_config: ml_collections.ConfigDict,
                        tokenizer: tokenizers.Tokenizer, *, global_batch_size: int, seed: int,
                        process_index: int = 0, process_count: int = 1
                        ) -> grain.DatasetIterator:
  """The endless, exactly resumable iterator of this process's slice of the training batches.

  Args:
    data_config: `config.data`.
    tokenizer: the tokenizer (`tokenizers.load_tokenizer(config.data.tokenizer)`).
    global_batch_size: rows per global batch; a multiple of `process_count`.
    seed: seeds the document order (a new permutation per epoch) and the row shuffle.
    process_index: this process (`jax.process_index()`).
    process_count: the number of processes (`jax.process_count()`).

  Returns:
    A `grain.DatasetIterator` of batches `{tokens, segment_ids, positions}`, each int32
    `[global_batch_size // process_count, seq_len]`.
  """
  if data_config.get("sources"):  # Several sources, mixed by weight.
    from yocou_jax.data import mixture  # pylint: disable=g-import-not-at-top

    return mixture.make_train_iterator(data_config, tokenizer, global_batch_size=global_batch_size,
                                       seed=seed, process_index=process_index,
                                       process_count=process_count)
  process_rows = local_rows(global_batch_size, process_index, process_count)
  split = data_config.train_split
  source = _source(data_config, split)
  document_seed, window_seed = np.random.SeedSequence(seed).generate_state(2).tolist()
  one_epoch = _documents(source, tokenizer, data_config, shuffle_seed=document_seed, num_epochs=1)
  _check_one_epoch_fills_a_batch(source, one_epoch, data_config, tokenizer.pad_id,
                                 global_batch_size, split)
  documents = _documents(source, tokenizer, data_config, shuffle_seed=document_seed,
                         num_epochs=None)
  rows = _packed_rows(documents, data_config, tokenizer.pad_id)
  if data_config.shuffle_window > 1:
    rows = grain.experimental.WindowShuffleIterDataset(
        rows, window_size=data_config.shuffle_window, seed=window_seed)
  batches = rows.batch(global_batch_size, drop_remainder=True).map(process_rows)
  if data_config.num_workers > 0:
    ensure_flags_parsed_for_workers()
    batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_config.num_workers))
  return iter(batches)


def padded_batch(batch: Batch, global_batch_size: int, pad_id: int) -> Batch:
  """Completes a partial last batch with padding rows (segment id 0, which no loss counts)."""
  missing = global_batch_size - len(batch["tokens"])
  if not missing:
    return batch
  fill_values = {"tokens": pad_id, "segment_ids": 0, "positions": 0, "loss_weights": 0}
  return {key: np.concatenate([value, np.full((missing, *value.shape[1:]), fill_values[key],
                                              value.dtype)])
          for key, value in batch.items()}


def make_eval_batches(data_config: ml_collections.ConfigDict, tokenizer: tokenizers.Tokenizer,
                      *, global_batch_size: int, num_batches: int | None, process_index: int = 0,
                      process_count: int = 1) -> list[Batch]:
  """The fixed evaluation batches: the eval split packed in stored order, this process's rows.

  Args:
    data_config: `config.data`.
    tokenizer: the tokenizer.
    global_batch_size: rows per global batch; a multiple of `process_count`.
    num_batches: how many batches to take; None takes the whole split. A split with fewer
      batches gives them all (with a warning).
    process_index: this process.
    process_count: the number of processes.

  Returns:
    A list of batches in the format of `make_train_iterator`, identical on every call.
  """
  if data_config.get("sources"):  # {source name: batches}; see yocou_jax.data.mixture.
    from yocou_jax.data import mixture  # pylint: disable=g-import-not-at-top

    return mixture.make_eval_batches(data_config, tokenizer, global_batch_size=global_batch_size,
                                     num_batches=num_batches, process_index=process_index,
                                     process_count=process_count)
  process_rows = local_rows(global_batch_size, process_index, process_count)
  split = data_config.eval_split
  source = _source(data_config, split)
  documents = _documents(source, tokenizer, data_config, shuffle_seed=None, num_epochs=1)
  global_batches = _packed_rows(documents, data_config, tokenizer.pad_id).batch(global_batch_size)
  batches = [process_rows.map(padded_batch(batch, global_batch_size, tokenizer.pad_id))
             for batch in itertools.islice(global_batches, num_batches)]
  if not batches:
    raise ValueError(f"{_dataset_name(data_config, split)} has no text to evaluate on "
                     f"({len(source)} documents).")
  if num_batches is not None and len(batches) < num_batches:
    logging.warning("%s holds %d eval batches of %d rows, fewer than the %d requested.",
                    _dataset_name(data_config, split), len(batches), global_batch_size,
                    num_batches)
  return batches

