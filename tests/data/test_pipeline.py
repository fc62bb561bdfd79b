"""Tests of yocou_jax.data.pipeline: packing, determinism, exact resume, process slices, errors."""

import collections
import itertools
import random

from absl import flags
import grain
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

from yocou_jax.data import corpora
from yocou_jax.data import pipeline
from yocou_jax.data import tokenizers

tfds.disable_progress_bar()
if not flags.FLAGS.is_parsed():
  flags.FLAGS.mark_as_parsed()  # grain worker processes read absl flags.

SEQ_LEN = 32
BATCH = 4
TOKENIZER = tokenizers.ByteTokenizer()


def _data_config(text_glob: str, data_dir: str, **overrides) -> ml_collections.ConfigDict:
  fields = dict(seq_len=SEQ_LEN, tfds_name="text_files", tfds_data_dir=data_dir,
                text_glob=text_glob, text_key="text", train_split="train",
                eval_split="validation", tokenizer="byte", num_workers=0, packing_bins=4,
                shuffle_window=256)  # grain's index_shuffle takes 7 ms a row on a window of 8.
  return ml_collections.ConfigDict({**fields, **overrides})


def _write_corpus(directory, texts: list[str]) -> str:
  directory.mkdir(parents=True, exist_ok=True)
  for i, text in enumerate(texts):
    (directory / f"doc_{i:03d}.txt").write_text(text, encoding="utf-8")
  return str(directory)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> ml_collections.ConfigDict:
  """60 documents of 1 to 120 characters (some multi-byte): about 110 rows of 32 tokens."""
  rng = random.Random(0)
  alphabet = "abcdefghij klmnop\nqrstuvwxyz é中"
  texts = ["".join(rng.choices(alphabet, k=rng.randint(1, 120))) for _ in range(60)]
  root = tmp_path_factory.mktemp("pipeline")
  return _data_config(_write_corpus(root / "corpus", texts), str(root / "tfds"))


def _expected_pieces(data_config, split: str) -> collections.Counter:
  """The seq_len pieces of every tokenized document of a split, as a multiset."""
  source = corpora.get_data_source(data_config.tfds_name, data_config.tfds_data_dir, split,
                                   data_config.text_glob)
  pieces = collections.Counter()
  for index in range(len(source)):
    tokens = pipeline.tokenize_document(TOKENIZER, source[index]["text"].decode())
    pieces.update(tuple(tokens[i:i + data_config.seq_len])
                  for i in range(0, len(tokens), data_config.seq_len))
  return pieces


def _row_pieces(batch) -> list[tuple[int, ...]]:
  """The segments of every row, checking the packing invariants on the way."""
  pieces = []
  for tokens, segment_ids, positions in zip(batch["tokens"], batch["segment_ids"],
                                            batch["positions"]):
    num_segments = segment_ids.max()
    used = segment_ids > 0
    assert used[:used.sum()].all()  # Padding only at the end.
    assert np.all(tokens[~used] == TOKENIZER.pad_id) and np.all(positions[~used] == 0)
    for segment in range(1, num_segments + 1):
      (where,) = np.nonzero(segment_ids == segment)
      assert where.size and np.array_equal(where, np.arange(where[0], where[0] + where.size))
      assert np.array_equal(positions[where], np.arange(where.size))
      pieces.append(tuple(tokens[where].tolist()))
  return pieces


def _assert_batches_equal(first, second):
  assert len(first) == len(second)
  for a, b in zip(first, second):
    assert a.keys() == b.keys() == set(pipeline.ROW_KEYS)
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def _take(iterator, n: int) -> list:
  return list(itertools.islice(iterator, n))


def test_batch_format(corpus):
  batch = next(pipeline.make_train_iterator(corpus, TOKENIZER, global_batch_size=BATCH, seed=0))
  assert set(batch) == set(pipeline.ROW_KEYS)
  for value in batch.values():
    assert value.shape == (BATCH, SEQ_LEN) and value.dtype == np.int32


def test_one_epoch_packs_every_piece_exactly_once(corpus):
  one_epoch = corpus.copy_and_resolve_references()
  one_epoch.eval_split = "train"
  batches = pipeline.make_eval_batches(one_epoch, TOKENIZER, global_batch_size=BATCH,
                                       num_batches=None)
  packed = collections.Counter(p for batch in batches for p in _row_pieces(batch))
  assert packed == _expected_pieces(corpus, "train")
  total_tokens = sum(len(p) * n for p, n in packed.items())
  assert len(batches) * BATCH * SEQ_LEN < 1.5 * total_tokens  # Packing keeps padding low.


def test_training_stream_repeats_the_corpus_pieces(corpus):
  expected = _expected_pieces(corpus, "train")
  one_epoch = corpus.copy_and_resolve_references()
  one_epoch.eval_split = "train"
  rows_per_epoch = sum(len(batch["tokens"]) for batch in pipeline.make_eval_batches(
      one_epoch, TOKENIZER, global_batch_size=1, num_batches=None))
  iterator = pipeline.make_train_iterator(corpus, TOKENIZER, global_batch_size=BATCH, seed=3)
  seen = collections.Counter(p for batch in _take(iterator, 4 * rows_per_epoch // BATCH)
                             for p in _row_pieces(batch))
  assert set(seen) == set(expected)
  # About 4 epochs; the shuffle window (256 rows: over 2 epochs here) blurs their boundaries.
  counts = np.array([seen[p] / expected[p] for p in expected])
  assert 2 <= counts.min() and counts.max() <= 6 and abs(counts.mean() - 4) < 0.2


def test_every_epoch_is_a_fresh_permutation(tmp_path):
  # Documents of exactly seq_len tokens, no row shuffle: each row is one document.
  texts = [f"{i:02d}" + "x" * (SEQ_LEN - 4) for i in range(20)]
  data_config = _data_config(_write_corpus(tmp_path / "corpus", texts), str(tmp_path / "tfds"),
                             shuffle_window=1)
  num_docs = len(corpora.get_data_source("text_files", str(tmp_path / "tfds"), "train",
                                         data_config.text_glob))
  iterator = pipeline.make_train_iterator(data_config, TOKENIZER, global_batch_size=2, seed=0)
  rows = [TOKENIZER.decode(row) for batch in _take(iterator, (3 * num_docs + 1) // 2)
          for row in batch["tokens"]]
  epochs = [rows[i * num_docs:(i + 1) * num_docs] for i in range(3)]
  for epoch in epochs:
    assert sorted(epoch) == sorted(set(rows)) and len(set(epoch)) == num_docs
  assert epochs[0] != epochs[1] != epochs[2]


def test_same_seed_same_batches_other_seed_other_batches(corpus):
  def batches(seed):
    return _take(pipeline.make_train_iterator(corpus, TOKENIZER, global_batch_size=BATCH,
                                              seed=seed), 12)

  _assert_batches_equal(batches(7), batches(7))
  assert not np.array_equal(np.stack([b["tokens"] for b in batches(7)]),
                            np.stack([b["tokens"] for b in batches(8)]))


@pytest.mark.parametrize("consumed", [0, 3, 41])  # 41 batches: past an epoch and many windows.
def test_exact_resume_from_state(corpus, consumed):
  def new_iterator():
    return pipeline.make_train_iterator(corpus, TOKENIZER, global_batch_size=BATCH, seed=1)

  uninterrupted = new_iterator()
  _take(uninterrupted, consumed)
  state = uninterrupted.get_state()
  resumed = new_iterator()
  resumed.set_state(state)
  _assert_batches_equal(_take(resumed, 10), _take(uninterrupted, 10))


def test_exact_resume_through_orbax(corpus, tmp_path):
  def new_iterator():
    return pipeline.make_train_iterator(corpus, TOKENIZER, global_batch_size=BATCH, seed=2)

  iterator = new_iterator()
  _take(iterator, 9)
  with ocp.CheckpointManager(tmp_path / "checkpoints") as manager:
    manager.save(9, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()
  expected = _take(iterator, 5)
  restored = new_iterator()
  with ocp.CheckpointManager(tmp_path / "checkpoints") as manager:
    manager.restore(9, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  _assert_batches_equal(_take(restored, 5), expected)


def test_process_slices_concatenate_to_the_global_batch(corpus):
  global_batches = _take(pipeline.make_train_iterator(corpus, TOKENIZER, global_batch_size=BATCH,
                                                      seed=4), 6)
  slices = [_take(pipeline.make_train_iterator(corpus, TOKENIZER, global_batch_size=BATCH, seed=4,
                                               process_index=p, process_count=2), 6)
            for p in range(2)]
  joined = [{key: np.concatenate([first[key], second[key]]) for key in first}
            for first, second in zip(*slices)]
  _assert_batches_equal(joined, global_batches)
  assert slices[0][0]["tokens"].shape == (BATCH // 2, SEQ_LEN)
  eval_slices = [pipeline.make_eval_batches(corpus, TOKENIZER, global_batch_size=BATCH,
                                            num_batches=3, process_index=p, process_count=2)
                 for p in range(2)]
  eval_joined = [{key: np.concatenate([a[key], b[key]]) for key in a}
                 for a, b in zip(*eval_slices)]
  _assert_batches_equal(eval_joined, pipeline.make_eval_batches(
      corpus, TOKENIZER, global_batch_size=BATCH, num_batches=3))


def test_state_resumes_on_another_process_count(corpus):
  single = pipeline.make_train_iterator(corpus, TOKENIZER, global_batch_size=BATCH, seed=6)
  _take(single, 5)
  state = single.get_state()
  expected = _take(single, 3)
  for process_index in range(2):
    half = pipeline.make_train_iterator(corpus, TOKENIZER, global_batch_size=BATCH, seed=6,
                                        process_index=process_index, process_count=2)
    half.set_state(state)
    rows = slice(process_index * BATCH // 2, (process_index + 1) * BATCH // 2)
    _assert_batches_equal(_take(half, 3), [{key: value[rows] for key, value in batch.items()}
                                           for batch in expected])


def test_bad_batch_sizes_raise(corpus):
  with pytest.raises(ValueError, match="global_batch_size=6 is not a positive multiple of "
                                       "process_count=4"):
    pipeline.make_train_iterator(corpus, TOKENIZER, global_batch_size=6, seed=0, process_count=4)
  with pytest.raises(ValueError, match=r"process_index=2 is outside \[0, 2\)"):
    pipeline.make_eval_batches(corpus, TOKENIZER, global_batch_size=4, num_batches=1,
                               process_index=2, process_count=2)


def test_eval_batches_are_fixed_and_cover_the_split(corpus, caplog):
  batches = pipeline.make_eval_batches(corpus, TOKENIZER, global_batch_size=BATCH,
                                       num_batches=None)
  _assert_batches_equal(batches, pipeline.make_eval_batches(corpus, TOKENIZER,
                                                            global_batch_size=BATCH,
                                                            num_batches=None))
  packed = collections.Counter(p for batch in batches for p in _row_pieces(batch))
  assert packed == _expected_pieces(corpus, "validation")
  more = pipeline.make_eval_batches(corpus, TOKENIZER, global_batch_size=BATCH,
                                    num_batches=len(batches) + 5)
  _assert_batches_equal(more, batches)
  assert f"holds {len(batches)} eval batches of {BATCH} rows, fewer than the" in caplog.text


def test_non_utf8_files_are_read_with_replacements(tmp_path):
  corpus_dir = tmp_path / "corpus"
  corpus_dir.mkdir()
  for i in range(12):
    (corpus_dir / f"{i}.txt").write_bytes(b"caf\xe9 \xff latin-1 bytes " * 3 + bytes([65 + i]))
  data_config = _data_config(str(corpus_dir), str(tmp_path / "tfds"))
  batch = next(pipeline.make_train_iterator(data_config, TOKENIZER, global_batch_size=BATCH,
                                            seed=0))
  assert "caf\ufffd \ufffd latin-1" in TOKENIZER.decode(batch["tokens"][0])


@pytest.mark.parametrize("texts, message", [
    (["short text"] * 1 + ["tiny"], r"text_files\(.*\) split 'train' packs into only 1 rows of "
                                    r"seq_len=32 per epoch \(1 documents\), fewer than the "
                                    r"global batch size 4"),
    ([""] * 3, "no usable text under .* 3 empty"),
])
def test_bad_corpora_raise_one_line_errors(tmp_path, texts, message):
  data_config = _data_config(_write_corpus(tmp_path / "corpus", texts), str(tmp_path / "tfds"))
  with pytest.raises(ValueError, match=message) as e:
    pipeline.make_train_iterator(data_config, TOKENIZER, global_batch_size=BATCH, seed=0)
  assert "\n" not in str(e.value)


def test_missing_text_key_raises(corpus):
  data_config = corpus.copy_and_resolve_references()
  data_config.text_key = "content"
  with pytest.raises(ValueError, match=r"has no feature text_key='content'; its features: "
                                       r"\['text'\]"):
    pipeline.make_train_iterator(data_config, TOKENIZER, global_batch_size=BATCH, seed=0)


def test_python_stdlib_pipeline(tmp_path_factory):
  data_dir = str(tmp_path_factory.getbasetemp() / "tfds")  # Shared with test_corpora.py.
  data_config = _data_config(None, data_dir, tfds_name="python_stdlib", seq_len=256,
                             packing_bins=64, shuffle_window=256)
  batch = next(pipeline.make_train_iterator(data_config, TOKENIZER, global_batch_size=8, seed=0))
  assert batch["tokens"].shape == (8, 256) and (batch["segment_ids"] > 0).mean() > 0.9
  # Every segment is a piece of a training document: its bytes occur in the corpus.
  corpus_bytes = b"\0".join(t.encode() for t in corpora.iterate_texts("python_stdlib", data_dir,
                                                                      "train"))
  for segment in _row_pieces(batch):
    text_ids = [i for i in segment if i not in (TOKENIZER.bos_id, TOKENIZER.eos_id)]
    assert bytes(np.array(text_ids, np.uint8) - 3) in corpus_bytes
  eval_batches = pipeline.make_eval_batches(data_config, TOKENIZER, global_batch_size=8,
                                            num_batches=4)
  assert len(eval_batches) == 4


def test_worker_processes_resume_exactly(corpus):
  data_config = corpus.copy_and_resolve_references()
  data_config.num_workers = 2
  iterator = pipeline.make_train_iterator(data_config, TOKENIZER, global_batch_size=BATCH, seed=5)
  try:
    first = _take(iterator, 4)
    state = iterator.get_state()
    expected = _take(iterator, 4)
    iterator.set_state(state)
    _assert_batches_equal(_take(iterator, 4), expected)
  finally:
    iterator.close()
  expected_pieces = set(_expected_pieces(corpus, "train"))
  assert all(set(_row_pieces(batch)) <= expected_pieces for batch in first + expected)
