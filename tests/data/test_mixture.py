"""Tests of yocou_jax.data.mixture: sources mixed by weight, resume, process slices, SFT masks."""

import collections
import itertools
import json
import os
import subprocess
import sys

import grain
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import portpicker
import pytest

from experiments.configs import default
from yocou_jax import validation
from yocou_jax.data import chat
from yocou_jax.data import pipeline
from yocou_jax.data import tokenizers
from tests import cpu_env
from tests.data.test_sources import write_jsonl, write_parquet

SEQ_LEN = 32
BATCH = 4
DOC_CHARS = SEQ_LEN - 2  # With bos and eos, one document fills one row exactly.
TOKENIZER = tokenizers.ByteTokenizer()
SFT_SAMPLE = os.path.join(os.path.dirname(__file__), "testdata", "sft_sample.jsonl")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _fixed_length_texts(prefix: str, count: int, chars: int = DOC_CHARS) -> list[str]:
  return [f"{prefix}{i:04d}".ljust(chars, "abcdefgh"[i % 8]) for i in range(count)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """Parquet "P" documents (5 files, row groups of 8), .zst JSONL "J" documents, the SFT sample."""
  root = tmp_path_factory.mktemp("mixture")
  parquet = write_parquet(root / "web", _fixed_length_texts("P", 120), files=5, row_group_size=8)
  (root / "code").mkdir()
  for i in range(3):
    write_jsonl(root / "code" / f"{i}.jsonl.zst",
                [{"content": t} for t in _fixed_length_texts("J", 90)[i * 30:(i + 1) * 30]])
  return {"parquet": parquet, "jsonl": str(root / "code" / "*.jsonl.zst"),
          "index_dir": str(root / "index"), "root": root}


def _data_config(files, sources: str, **overrides) -> ml_collections.ConfigDict:
  fields = dict(seq_len=SEQ_LEN, tfds_name="unused", tfds_data_dir=str(files["root"] / "tfds"),
                text_glob=None, text_key="text", train_split="train", eval_split="validation",
                tokenizer="byte", num_workers=0, packing_bins=4, shuffle_window=64,
                sources=sources, eval_sources="", chat_template=chat.DEFAULT_TEMPLATE,
                shuffle_blocks=2, index_dir=files["index_dir"])
  return ml_collections.ConfigDict({**fields, **overrides})


def _web_and_code(files, web_weight=3, code_weight=1) -> str:
  return (f"name=web,kind=parquet,path={files['parquet']},weight={web_weight};"
          f"name=code,kind=jsonl,path={files['jsonl']},weight={code_weight},text_key=content")


def _take(iterator, n: int) -> list:
  return list(itertools.islice(iterator, n))


def _segments(batch) -> list[str]:
  """The decoded text of every segment of every row."""
  texts = []
  for tokens, segment_ids in zip(batch["tokens"], batch["segment_ids"]):
    texts += [TOKENIZER.decode(tokens[segment_ids == s]) for s in range(1, segment_ids.max() + 1)]
  return texts


def _assert_batches_equal(first, second):
  assert len(first) == len(second)
  for a, b in zip(first, second):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_mixture_follows_the_weights_and_counts_tokens_per_source(files):
  data_config = _data_config(files, _web_and_code(files))
  batches = _take(pipeline.make_train_iterator(data_config, TOKENIZER, global_batch_size=BATCH,
                                               seed=0), 60)
  assert set(batches[0]) == {"tokens", "segment_ids", "positions", "source_tokens/web",
                             "source_tokens/code"}
  counted = {name: sum(int(b[f"source_tokens/{name}"]) for b in batches)
             for name in ("web", "code")}
  # Every document is one full row: the counts are the rows whose text starts with P or J.
  rows = collections.Counter(text[0] for b in batches for text in _segments(b))
  assert counted == {"web": rows["P"] * SEQ_LEN, "code": rows["J"] * SEQ_LEN}
  assert sum(counted.values()) == 60 * BATCH * SEQ_LEN
  assert abs(counted["web"] / sum(counted.values()) - 0.75) < 0.03


def test_each_source_epoch_reads_every_document_once(files):
  data_config = _data_config(files, _web_and_code(files, 4, 3), shuffle_window=1)
  batches = _take(pipeline.make_train_iterator(data_config, TOKENIZER, global_batch_size=BATCH,
                                               seed=1), 70)  # 280 rows: 160 web, 120 code.
  texts = [text for b in batches for text in _segments(b)]
  web = [t for t in texts if t[0] == "P"]
  code = [t for t in texts if t[0] == "J"]
  assert sorted(web[:120]) == sorted(_fixed_length_texts("P", 120))  # An epoch of each source,
  assert sorted(code[:90]) == sorted(_fixed_length_texts("J", 90))
  assert web[:120] != sorted(web[:120]) and web[120:] != web[:len(web) - 120]  # shuffled anew.


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_slices_cover_every_document_once_per_epoch(files, process_count):
  data_config = _data_config(files, f"name=web,kind=parquet,path={files['parquet']}",
                             shuffle_window=1)
  batch = 8
  slices = [_take(pipeline.make_train_iterator(data_config, TOKENIZER, global_batch_size=batch,
                                               seed=2, process_index=p,
                                               process_count=process_count), 120 // batch)
            for p in range(process_count)]
  per_process = [[t for b in process_batches for t in _segments(b)] for process_batches in slices]
  assert all(len(texts) == 120 // process_count for texts in per_process)
  assert sorted(itertools.chain(*per_process)) == sorted(_fixed_length_texts("P", 120))
  assert slices[0][0]["tokens"].shape == (batch // process_count, SEQ_LEN)
  # The token counts are those of the global batch, the same on every process.
  assert {int(s[0]["source_tokens/web"]) for s in slices} == {batch * SEQ_LEN}


def test_kill_and_resume_mid_parquet_mixture(files, tmp_path):
  data_config = _data_config(files, _web_and_code(files))

  def new_iterator():
    return pipeline.make_train_iterator(data_config, TOKENIZER, global_batch_size=BATCH, seed=3)

  uninterrupted = new_iterator()
  _take(uninterrupted, 11)  # Past the first row groups of several Parquet files.
  with ocp.CheckpointManager(tmp_path / "checkpoints") as manager:
    manager.save(11, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(uninterrupted)))
    manager.wait_until_finished()
  expected = _take(uninterrupted, 6)
  resumed = new_iterator()  # As a new process would after a kill.
  with ocp.CheckpointManager(tmp_path / "checkpoints") as manager:
    manager.restore(11, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
  _assert_batches_equal(_take(resumed, 6), expected)


def test_mixture_resumes_exactly_with_worker_processes(files):
  data_config = _data_config(files, _web_and_code(files), num_workers=2)
  iterator = pipeline.make_train_iterator(data_config, TOKENIZER, global_batch_size=BATCH, seed=3)
  try:
    _take(iterator, 5)
    state = iterator.get_state()
    expected = _take(iterator, 4)
    iterator.set_state(state)
    _assert_batches_equal(_take(iterator, 4), expected)
  finally:
    iterator.close()
  assert {t[0] for b in expected for t in _segments(b)} == {"P", "J"}


def test_weight_change_on_resume_continues_every_source(files):
  before = _data_config(files, _web_and_code(files, 1, 1), shuffle_window=1)
  iterator = pipeline.make_train_iterator(before, TOKENIZER, global_batch_size=BATCH, seed=4)
  seen = [t for b in _take(iterator, 10) for t in _segments(b)]
  after = _data_config(files, _web_and_code(files, 7, 1), shuffle_window=1)
  resumed = pipeline.make_train_iterator(after, TOKENIZER, global_batch_size=BATCH, seed=4)
  resumed.set_state(iterator.get_state())
  later = [t for b in _take(resumed, 10) for t in _segments(b)]
  assert not set(seen) & set(later)  # Both sources go on from their positions, no repeats,
  assert sum(t[0] == "P" for t in later) >= 30  # at the new weights (7:1 of 40 rows).


def test_chat_rows_train_on_responses_only(files):
  data_config = _data_config(files, f"name=sft,kind=chat,path={SFT_SAMPLE}", seq_len=256,
                             eval_sources=f"name=sft,kind=chat,path={SFT_SAMPLE}")
  batches = pipeline.make_eval_batches(data_config, TOKENIZER, global_batch_size=BATCH,
                                       num_batches=None)["sft"]
  with open(SFT_SAMPLE) as f:
    records = [json.loads(line) for line in f]
  trained, prompts = [], []
  for batch in batches:
    assert batch["loss_weights"].dtype == np.float32
    for tokens, segment_ids, weights in zip(batch["tokens"], batch["segment_ids"],
                                            batch["loss_weights"]):
      assert np.all(weights[segment_ids == 0] == 0)
      for s in range(1, segment_ids.max() + 1):
        segment, segment_weights = tokens[segment_ids == s], weights[segment_ids == s]
        assert set(np.unique(segment_weights)) <= {0.0, 1.0}
        assert segment[-1] == TOKENIZER.eos_id and segment_weights[-1] == 1
        trained.append(TOKENIZER.decode(segment[segment_weights == 1]))
        prompts.append(TOKENIZER.decode(segment[segment_weights == 0]))
  expected = []  # (trained text, prompt text) of every conversation; packing reorders them.
  for record in records:
    messages = chat.messages_of(record)
    expected.append((
        "".join(f"{m['content']}<|end|>\n" for m in messages if m["role"] == "assistant"),
        "".join(f"<|{m['role']}|>\n" + ("" if m["role"] == "assistant" else
                                        f"{m['content']}<|end|>\n") for m in messages)))
  assert sorted(zip(trained, prompts)) == sorted(expected) and len(expected) == 36


def test_mixed_text_and_chat_rows_weigh_text_fully(files):
  data_config = _data_config(files, f"name=web,kind=parquet,path={files['parquet']};"
                                    f"name=sft,kind=chat,path={SFT_SAMPLE}")
  batch = next(pipeline.make_train_iterator(data_config, TOKENIZER, global_batch_size=8, seed=5))
  is_text = np.isin(batch["tokens"], [ord("P") + 3]) & (batch["positions"] == 1)
  for row, segment_ids, weights in zip(is_text, batch["segment_ids"], batch["loss_weights"]):
    for segment in np.unique(segment_ids[row]):
      assert np.all(weights[segment_ids == segment] == 1)  # Text documents: every token.
  assert (batch["loss_weights"] == 0).any()


def test_eval_batches_per_source_are_fixed(files):
  data_config = _data_config(
      files, _web_and_code(files),
      eval_sources=f"name=web,kind=parquet,path={files['parquet']};"
                   f"name=code,kind=jsonl,path={files['jsonl']},text_key=content")
  first = pipeline.make_eval_batches(data_config, TOKENIZER, global_batch_size=BATCH,
                                     num_batches=None)
  assert list(first) == ["web", "code"] and len(first["web"]) == 30 and len(first["code"]) == 23
  assert [t for b in first["code"] for t in _segments(b)] == _fixed_length_texts("J", 90)
  assert np.all(first["code"][-1]["segment_ids"][2:] == 0)  # Padding rows complete the last.
  again = pipeline.make_eval_batches(data_config, TOKENIZER, global_batch_size=BATCH,
                                     num_batches=2)
  for name in first:
    _assert_batches_equal(again[name], first[name][:2])


def test_bad_sources_config_fails_validation_with_one_line_each():
  config = default.get_config()
  config.data.sources = "name=web,kind=parquet,path=/x,weight=-1"
  config.data.eval_sources = "name=a,kind=jsonl"
  config.data.chat_template = "{content} only"
  _, errors = validation.config_errors(config, check_data=True)
  assert "config.data.sources: weight='-1' of source 'web' is not a positive number." in errors
  assert ("config.data.eval_sources: 'name=a,kind=jsonl' has no path (needed: name, kind, path)."
          in errors)
  assert any("config.data.chat_template='{content} only' must hold {role}" in e for e in errors)


def test_text_files_source_mixes_and_evaluates_on_its_validation_split(files):
  corpus = files["root"] / "texts"
  corpus.mkdir()
  texts = _fixed_length_texts("T", 40)
  for i, text in enumerate(texts):
    (corpus / f"{i:03d}.txt").write_text(text)
  data_config = _data_config(files, f"name=web,kind=parquet,path={files['parquet']};"
                                    f"name=books,kind=text_files,path={corpus}")
  batches = _take(pipeline.make_train_iterator(data_config, TOKENIZER, global_batch_size=BATCH,
                                               seed=6), 10)
  drawn = {t for b in batches for t in _segments(b)}
  assert {t[0] for t in drawn} == {"P", "T"} and drawn <= set(texts) | set(
      _fixed_length_texts("P", 120))
  evaluated = pipeline.make_eval_batches(data_config, TOKENIZER, global_batch_size=BATCH,
                                         num_batches=None)
  assert list(evaluated) == ["books"]  # Parquet has no split; text_files holds out by path hash.
  held_out = {t for b in evaluated["books"] for t in _segments(b)}
  assert held_out and held_out <= set(texts) and not held_out & drawn


@pytest.mark.parametrize("process_count", [2, 4])
def test_shard_mode_reads_every_document_once_per_epoch_across_processes(files, process_count):
  data_config = _data_config(files, f"name=web,kind=parquet,path={files['parquet']}",
                             shuffle_window=1, process_sharding="shard")
  local_batch = 8 // process_count
  epochs = []  # The documents of each process until its first repeat: its first epoch.
  for p in range(process_count):
    iterator = pipeline.make_train_iterator(data_config, TOKENIZER, global_batch_size=8, seed=7,
                                            process_index=p, process_count=process_count)
    batches = _take(iterator, 80 // local_batch)  # 80 rows: more than any process's share.
    assert batches[0]["tokens"].shape == (local_batch, SEQ_LEN)
    texts = [t for b in batches for t in _segments(b)]
    first_repeat = next(i for i, t in enumerate(texts) if t in texts[:i])
    epochs.append(texts[:first_repeat])
    assert set(texts[first_repeat:]) <= set(epochs[-1])  # Then the same share, reshuffled.
  # The shares (blocks p, p + P, ... of 15 row groups) are disjoint and cover the corpus.
  assert sorted(itertools.chain(*epochs)) == sorted(_fixed_length_texts("P", 120))
  assert max(map(len, epochs)) - min(map(len, epochs)) <= 8  # One row group at most.


def test_shard_mode_resumes_each_process_and_checks_the_process_count(files):
  data_config = _data_config(files, _web_and_code(files), process_sharding="shard")

  def new_iterator(process_index, process_count=2):
    return pipeline.make_train_iterator(data_config, TOKENIZER, global_batch_size=BATCH, seed=8,
                                        process_index=process_index, process_count=process_count)

  for p in range(2):
    uninterrupted = new_iterator(p)
    _take(uninterrupted, 9)
    state = uninterrupted.get_local_state()
    resumed = new_iterator(p)
    resumed.set_local_state(state)
    _assert_batches_equal(_take(resumed, 5), _take(uninterrupted, 5))
  single = new_iterator(0, 1)
  saved = single.get_state()  # One process: the gather is its own state.
  assert saved["process_count"] == 1 and len(saved["process_states"]) == 1
  with pytest.raises(ValueError, match="the data state was saved by 1 processes with "
                                       "process_sharding='shard'; this run has 2"):
    new_iterator(0).set_state(saved)
  with pytest.raises(ValueError, match=r"source 'web' has 15 blocks .* fewer than the 16 "
                                       r"processes"):
    pipeline.make_train_iterator(data_config, TOKENIZER, global_batch_size=16, seed=8,
                                 process_index=0, process_count=16)


def test_shard_mode_state_is_gathered_from_two_real_processes(files, tmp_path):
  port = portpicker.pick_unused_port()
  sources = _web_and_code(files)
  procs = [subprocess.Popen([sys.executable, "-m", "tests.data.sharded_worker", str(port), str(i),
                             sources, str(tmp_path / f"out{i}.json")],
                            cwd=REPO, env=cpu_env.subprocess_env(1), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
           for i in range(2)]
  for proc in procs:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out.decode()[-3000:]
  results = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2)]
  assert results[0]["state"] == results[1]["state"]  # One state, holding both processes' parts,
  assert results[0]["state"]["process_count"] == 2
  assert len(results[0]["state"]["process_states"]) == 2
  for result in results:  # from which each process resumes its own stream exactly.
    assert result["resumed"] == result["expected"]
  assert results[0]["expected"] != results[1]["expected"]
