"""The input pipeline of `config.data.sources`: several sources mixed by weight, then packed.

Training (`make_train_iterator`), per source (`yocou_jax.data.sources` reads it):

1. An endless shuffled order of its documents, a fresh one every epoch: grain's global
   `MapDataset.shuffle` for ArrayRecord sources (`tfds`, `text_files`), the block shuffle of
   `sources.BlockShuffleIndex` for file sources (`parquet`, `jsonl`, `chat`), whose row groups
   and compressed files are read whole.
2. Tokenize: `[bos] + encode(text) + [eos]` (`pipeline.tokenize_document`), or the rendered
   conversation and its loss weights for `chat` (`yocou_jax.data.chat`); empty documents are
   dropped.

Then `grain.IterDataset.mix` draws documents from the sources in proportion to their weights
(grain's deterministic interleave), and the documents are split, first-fit packed, window
shuffled, batched and sliced per process exactly as in `yocou_jax.data.pipeline`.

Batches hold `tokens`, `segment_ids`, `positions` as in `pipeline`, plus `loss_weights`
(float32 `[B, N]`, 1 on trained tokens, 0 on prompts and padding) when a source is of kind
`chat`, plus `source_tokens/NAME` (int64 scalars: the non-padding tokens of each source in the
global batch) for the metrics. The trainer pops the `source_tokens/` entries before the step.

The iterator state (`get_state`) holds the position of every source by name (the state of its
branch of the mix) and the position of the mix, inside the state of the packing and shuffling
stages: a resumed run continues the same sequence. A resumed run may change the weights (the
trainer logs the change): every source continues from its own position, and the mix draws with
the new weights from then on.

Processes (`config.data.process_sharding`): with `global` (the default), as in `pipeline`, every
process builds the same global batches and keeps its rows: the stream does not depend on the
process count, a checkpoint resumes on any process count, and every process reads and tokenizes
the whole global batch. With `shard`, process `p` of `P` reads only its share of every source
(blocks `p, p + P, ...`: row groups, JSONL file blocks, or documents of ArrayRecord sources), and
packs and batches its own `B / P` rows: reading and tokenizing are split `P` ways, every
document is read once per epoch by one process, and `source_tokens/` counts that process's rows.
The state (`ShardedIterator.get_state`, gathered from all processes at a checkpoint) resumes on
the same process count only.

Evaluation (`make_eval_batches`) packs every validation source (`config.data.eval_sources`, or
the `eval_split` of every `tfds`/`text_files` source) on its own, in stored order, into a dict
`{name: [batches]}`: the trainer reports the loss of each and the token-weighted overall loss.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import itertools
import json
from typing import Any

from absl import logging
import grain
import ml_collections
import numpy as np

from yocou_jax.data import chat
from yocou_jax.data import corpora
from yocou_jax.data import pipeline
from yocou_jax.data import sources as sources_lib
from yocou_jax.data import tokenizers

SOURCE_TOKENS_PREFIX = "source_tokens/"
_NO_SOURCE = -1  # The source id of padding.


def train_sources(data_config: ml_collections.ConfigDict) -> list[sources_lib.SourceSpec]:
  return sources_lib.parse_sources(data_config.sources, text_key=data_config.text_key)


def eval_sources(data_config: ml_collections.ConfigDict) -> list[sources_lib.SourceSpec]:
  """`config.data.eval_sources`, or each `tfds`/`text_files` training source on `eval_split`."""
  if data_config.get("eval_sources"):
    return sources_lib.parse_sources(data_config.eval_sources, text_key=data_config.text_key,
                                     field="eval_sources")
  return [dataclasses.replace(s, split=data_config.eval_split)
          for s in train_sources(data_config) if s.kind in sources_lib.SPLIT_KINDS]


@dataclasses.dataclass(frozen=True)
class _ReadDocument(grain.transforms.Map):
  source: Sequence[Any]

  def map(self, index: int) -> dict[str, Any]:
    return self.source[index]


@dataclasses.dataclass(frozen=True)
class _TokenizeSource(grain.transforms.Map):
  """A record -> `{tokens, source[, loss_weights]}`, or None when it holds no text."""

  tokenizer: tokenizers.Tokenizer
  spec: sources_lib.SourceSpec
  source_id: int
  with_loss_weights: bool
  chat_template: str

  def map(self, record: dict[str, Any]) -> dict[str, np.ndarray] | None:
    if self.spec.kind == "chat":
      tokens, weights = chat.tokenize_chat(self.tokenizer, record, self.chat_template)
    else:
      text = corpora.record_text(record, self.spec.text_key)
      if not text:
        return None
      tokens = pipeline.tokenize_document(self.tokenizer, text)
      weights = np.ones(len(tokens), np.float32)
    document = {"tokens": tokens, "source": np.full(len(tokens), self.source_id, np.int32)}
    if self.with_loss_weights:
      document["loss_weights"] = weights
    return document


@dataclasses.dataclass(frozen=True)
class _SplitFeaturesIntoPieces(grain.experimental.FlatMapTransform):
  seq_len: int

  def flat_map(self, document: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    length = len(document["tokens"])
    return [{key: value[i:i + self.seq_len] for key, value in document.items()}
            for i in range(0, length, self.seq_len)]


@dataclasses.dataclass(frozen=True)
class _RowsOfPacked(grain.transforms.Map):
  with_loss_weights: bool

  def map(self, row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {"tokens": row["tokens"], "segment_ids": row["tokens_segment_ids"],
           "positions": row["tokens_positions"], "source": row["source"]}
    if self.with_loss_weights:
      out["loss_weights"] = row["loss_weights"]
    return out


@dataclasses.dataclass(frozen=True)
class _CountSourceTokens(grain.transforms.Map):
  """Replaces the per-token source ids of a global batch by token counts per source."""

  names: tuple[str, ...]

  def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    source = batch.pop("source")
    counts = np.bincount(source[source != _NO_SOURCE].ravel(), minlength=len(self.names))
    batch.update({f"{SOURCE_TOKENS_PREFIX}{name}": np.int64(count)
                  for name, count in zip(self.names, counts)})
    return batch


@dataclasses.dataclass(frozen=True)
class _ProcessRows(grain.transforms.Map):
  start: int
  stop: int

  def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {key: value[self.start:self.stop] if value.ndim else value
            for key, value in batch.items()}


@dataclasses.dataclass(frozen=True)
class _Lookup(grain.transforms.Map):
  document_ids: np.ndarray

  def map(self, index: int) -> int:
    return int(self.document_ids[index])


def _documents(source: Sequence[Any], seed: int | None, shuffle_blocks: int,
               share: tuple[int, int] = (0, 1)) -> grain.MapDataset:
  """The indices of a source's documents: stored order (seed None) or endless shuffled epochs.

  `share=(index, count)` keeps one process's share: the blocks (or, for ArrayRecord sources, the
  documents) `index, index + count, ...`.
  """
  if seed is None:
    return grain.MapDataset.range(len(source))
  index, count = share
  sizes = sources_lib.block_sizes(source)
  if sizes is None:
    return grain.MapDataset.range(len(source))[index::count].shuffle(seed).repeat()
  if count == 1:
    return grain.MapDataset.source(sources_lib.BlockShuffleIndex(sizes, seed, shuffle_blocks))
  document_ids = sources_lib.block_subset(sizes, index, count)
  order = sources_lib.BlockShuffleIndex(sizes[index::count], seed, shuffle_blocks)
  return grain.MapDataset.source(order).map(_Lookup(document_ids))


def _tokenized(spec: sources_lib.SourceSpec, source: Sequence[Any], source_id: int,
               tokenizer: tokenizers.Tokenizer, data_config: ml_collections.ConfigDict, *,
               seed: int | None, with_loss_weights: bool,
               share: tuple[int, int] = (0, 1)) -> grain.IterDataset:
  tokenize = _TokenizeSource(tokenizer, spec, source_id, with_loss_weights,
                             data_config.chat_template)
  documents = _documents(source, seed, data_config.shuffle_blocks, share)
  return documents.map(_ReadDocument(source)).map(tokenize).to_iter_dataset(pipeline.READ_OPTIONS)


def _packed(documents: grain.IterDataset, data_config: ml_collections.ConfigDict, pad_id: int,
            with_loss_weights: bool) -> grain.IterDataset:
  pieces = grain.experimental.FlatMapIterDataset(
      documents, _SplitFeaturesIntoPieces(data_config.seq_len))
  features = ("tokens", "source") + (("loss_weights",) if with_loss_weights else ())
  padding = {"tokens": pad_id, "source": _NO_SOURCE, "loss_weights": 0.0}
  rows = grain.experimental.FirstFitPackIterDataset(
      pieces,
      length_struct={key: data_config.seq_len for key in features},
      num_packing_bins=data_config.packing_bins,
      padding_struct={key: padding[key] for key in features},
      shuffle_bins=False,
  )
  return rows.map(_RowsOfPacked(with_loss_weights))


def _open(specs: Sequence[sources_lib.SourceSpec], data_config: ml_collections.ConfigDict,
          default_split: str) -> list[Sequence[Any]]:
  opened = []
  for spec in specs:
    source = sources_lib.open_source(spec, data_config, spec.split or default_split)
    if not len(source):
      raise ValueError(f"source {spec.name!r} ({spec.kind} {spec.path}) has no documents.")
    opened.append(source)
  return opened


def make_train_iterator(data_config: ml_collections.ConfigDict,
                        tokenizer: tokenizers.Tokenizer, *, global_batch_size: int, seed: int,
                        process_index: int = 0, process_count: int = 1
                        ) -> grain.DatasetIterator:
  """The endless, exactly resumable iterator of this process's slice of the mixed batches.

  Arguments and the row format are those of `pipeline.make_train_iterator`; the batches also hold
  `loss_weights` (with a `chat` source) and `source_tokens/NAME` (see the module docstring).
  """
  rows_of_process = pipeline.local_rows(global_batch_size, process_index, process_count)
  sharded = data_config.get("process_sharding", "global") == "shard"
  share = (process_index, process_count) if sharded else (0, 1)
  specs = train_sources(data_config)
  opened = _open(specs, data_config, data_config.train_split)
  if sharded:
    _check_shardable(specs, opened, process_count)
  with_loss_weights = any(s.kind == "chat" for s in specs)
  if with_loss_weights:
    chat.check_tokenizer_template(data_config.chat_template, tokenizer)
  seeds = np.random.SeedSequence(seed).generate_state(len(specs) + 1).tolist()
  branches = {spec.name: _tokenized(spec, source, i, tokenizer, data_config, seed=seeds[i],
                                    with_loss_weights=with_loss_weights, share=share)
              for i, (spec, source) in enumerate(zip(specs, opened))}
  mixed = grain.IterDataset.mix(branches, {spec.name: spec.weight for spec in specs})
  rows = _packed(mixed, data_config, tokenizer.pad_id, with_loss_weights)
  if data_config.shuffle_window > 1:
    rows = grain.experimental.WindowShuffleIterDataset(
        rows, window_size=data_config.shuffle_window, seed=seeds[-1])
  batch_size = global_batch_size // process_count if sharded else global_batch_size
  batches = (rows.batch(batch_size, drop_remainder=True)
             .map(_CountSourceTokens(tuple(s.name for s in specs))))
  if not sharded:
    batches = batches.map(_ProcessRows(rows_of_process.start, rows_of_process.stop))
  if data_config.num_workers > 0:
    pipeline.ensure_flags_parsed_for_workers()
    batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_config.num_workers))
  logging.info("training mixture: %s", ", ".join(
      f"{s.name} ({s.kind}, {len(o)} documents, weight {s.weight:g})"
      for s, o in zip(specs, opened)))
  if sharded:
    return ShardedIterator(iter(batches), process_index, process_count)
  return iter(batches)


def _check_shardable(specs, opened, process_count: int) -> None:
  for spec, source in zip(specs, opened):
    sizes = sources_lib.block_sizes(source)
    units, what = (len(source), "documents") if sizes is None else (len(sizes), "blocks")
    if units < process_count:
      raise ValueError(f"source {spec.name!r} has {units} {what} (row groups, file blocks), "
                       f"fewer than the {process_count} processes of "
                       f"process_sharding='shard'; use process_sharding='global'.")


def _allgather_strings(text: str) -> list[str]:
  """`text` of every process, in process order (a collective: every process must call it)."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  if jax.process_count() == 1:
    return [text]
  data = np.frombuffer(text.encode(), np.uint8)
  lengths = np.asarray(multihost_utils.process_allgather(np.array([len(data)], np.int64)))
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:len(data)] = data
  gathered = np.asarray(multihost_utils.process_allgather(padded))
  return [bytes(row[:n]).decode() for row, n in zip(gathered, lengths.ravel())]


class ShardedIterator:
  """The batches of one process of `process_sharding='shard'`, with a state shared by all.

  Every process reads its own share of the sources, so the iterator states differ between
  processes; `get_state` gathers them all (a collective, called by every process at a
  checkpoint) into one state that any process restores its own part from. Resuming needs the
  same number of processes.
  """

  def __init__(self, iterator, process_index: int, process_count: int):
    self._iterator = iterator
    self._process_index, self._process_count = process_index, process_count

  def __iter__(self):
    return self

  def __next__(self):
    return next(self._iterator)

  def get_local_state(self) -> dict[str, Any]:
    return self._iterator.get_state()

  def set_local_state(self, state: dict[str, Any]) -> None:
    self._iterator.set_state(state)

  def get_state(self) -> dict[str, Any]:
    return {"process_count": self._process_count,
            "process_states": _allgather_strings(json.dumps(self.get_local_state()))}

  def set_state(self, state: dict[str, Any]) -> None:
    if state.get("process_count") != self._process_count:
      raise ValueError(f"the data state was saved by {state.get('process_count')} processes "
                       f"with process_sharding='shard'; this run has {self._process_count} "
                       f"(resume on {state.get('process_count')} processes).")
    self.set_local_state(json.loads(state["process_states"][self._process_index]))

  def close(self) -> None:
    if hasattr(self._iterator, "close"):
      self._iterator.close()


def make_eval_batches(data_config: ml_collections.ConfigDict, tokenizer: tokenizers.Tokenizer,
                      *, global_batch_size: int, num_batches: int | None,
                      process_index: int = 0, process_count: int = 1
                      ) -> dict[str, list[pipeline.Batch]]:
  """The fixed validation batches of every validation source: `{name: [batches]}`.

  Each source is packed on its own in stored order (`num_batches` batches at most per source),
  the last batch completed with padding rows; rows as in `make_train_iterator`, without the
  `source_tokens/` counts. A sources config without validation sets gives `{}`.
  """
  rows_of_process = pipeline.local_rows(global_batch_size, process_index, process_count)
  specs = eval_sources(data_config)
  with_loss_weights = any(s.kind == "chat" for s in train_sources(data_config) + specs)
  by_source = {}
  for spec, source in zip(specs, _open(specs, data_config, data_config.eval_split)):
    documents = _tokenized(spec, source, 0, tokenizer, data_config, seed=None,
                           with_loss_weights=with_loss_weights)
    global_batches = _packed(documents, data_config, tokenizer.pad_id,
                             with_loss_weights).batch(global_batch_size)
    batches = []
    for batch in itertools.islice(global_batches, num_batches):
      del batch["source"]
      batches.append(rows_of_process.map(
          pipeline.padded_batch(batch, global_batch_size, tokenizer.pad_id)))
    if not batches:
      raise ValueError(f"validation source {spec.name!r} has no text to evaluate on.")
    by_source[spec.name] = batches
  if not by_source:
    logging.warning("config.data.sources has no validation set: set config.data.eval_sources "
                    "to evaluate.")
  return by_source
