"""Tests of yocou_jax.data.sources: the spec, Parquet/JSONL readers, the block shuffle."""

import gzip
import json
import os

import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from yocou_jax.data import sources


def _texts(prefix: str, count: int) -> list[str]:
  rng = np.random.default_rng(len(prefix) + count)
  return [f"{prefix}{i} " + "é中x"[i % 3] * int(rng.integers(0, 40)) for i in range(count)]


def write_parquet(directory, texts: list[str], *, files: int, row_group_size: int) -> str:
  """`texts` over `files` Parquet files (with an extra column); returns their glob."""
  directory.mkdir(parents=True, exist_ok=True)
  for i, part in enumerate(np.array_split(np.arange(len(texts)), files)):
    table = pa.table({"id": part, "text": [texts[j] for j in part]})
    pq.write_table(table, directory / f"part-{i:02d}.parquet", row_group_size=row_group_size)
  return str(directory / "*.parquet")


def write_jsonl(path, records: list[dict], *, blank_lines: bool = False) -> str:
  lines = []
  for record in records:
    lines.append(json.dumps(record, ensure_ascii=False))
    if blank_lines:
      lines.append("")
  data = ("\n".join(lines)).encode()  # No final newline: the last line still counts.
  path = str(path)
  if path.endswith(".gz"):
    data = gzip.compress(data)
  elif path.endswith(".zst"):
    data = zstandard.ZstdCompressor().compress(data)
  with open(path, "wb") as f:
    f.write(data)
  return path


def test_parquet_documents_read_are_the_documents_written(tmp_path):
  texts = _texts("p", 103)
  source = sources.ParquetSource(write_parquet(tmp_path, texts, files=3, row_group_size=10),
                                 "text", cache_blocks=2)
  assert len(source) == 103
  assert [source[i]["text"] for i in range(len(source))] == texts
  # One block per row group: 35, 34, 34 rows in 10-row groups.
  assert source.block_sizes.tolist() == [10, 10, 10, 5] + [10, 10, 10, 4] * 2
  assert source[57]["text"] == texts[57]  # Random access after the cache moved on.
  with pytest.raises(ValueError, match=r"has no column text_key='content'; its columns: "
                                       r"\['id', 'text'\]"):
    sources.ParquetSource(str(tmp_path / "*.parquet"), "content")


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_jsonl_documents_read_are_the_documents_written(tmp_path, suffix):
  texts = _texts("j", 40)
  write_jsonl(tmp_path / f"a{suffix}", [{"text": t, "n": i} for i, t in enumerate(texts[:25])],
              blank_lines=True)
  write_jsonl(tmp_path / f"b{suffix}", [{"text": t} for t in texts[25:]])
  index_dir = tmp_path / "index"
  source = sources.JsonlSource(str(tmp_path / f"*{suffix}"), "text", str(index_dir),
                               block_bytes=200)
  assert [source[i]["text"] for i in range(len(source))] == texts
  assert source[3]["n"] == 3
  if suffix == ".jsonl":  # Plain files come in blocks of about block_bytes.
    assert len(source.block_sizes) > 2
  else:  # A compressed file is one block.
    assert source.block_sizes.tolist() == [25, 15]
  assert len(os.listdir(index_dir)) == 2  # One cached line index per file...
  cached = sources.JsonlSource(str(tmp_path / f"*{suffix}"), "text", str(index_dir),
                               block_bytes=200)
  assert [cached[i]["text"] for i in range(len(cached))] == texts  # ... which a reopen reuses.


def test_line_index_is_rebuilt_when_the_file_changes(tmp_path):
  path = write_jsonl(tmp_path / "a.jsonl", [{"text": "one"}])
  index_dir = str(tmp_path / "index")
  assert len(sources.JsonlSource(path, "text", index_dir)) == 1
  write_jsonl(tmp_path / "a.jsonl", [{"text": "one"}, {"text": "two, longer"}])
  os.utime(path, ns=(1, 10**18))  # A new modification time, whatever the clock resolution.
  assert [r["text"] for r in sources.JsonlSource(path, "text", index_dir)] == [
      "one", "two, longer"]


def _contiguous_groups(order: np.ndarray, sizes: list[int]) -> list[set[int]]:
  """Cuts an order into contiguous runs that each hold whole blocks; returns their blocks."""
  block_of = np.repeat(np.arange(len(sizes)), sizes)
  groups, position = [], 0
  while position < len(order):
    blocks = {int(block_of[order[position]])}
    while True:
      end = position + sum(sizes[b] for b in blocks)
      seen = {int(b) for b in block_of[order[position:end]]}
      if seen <= blocks:
        break
      blocks |= seen
    assert sorted(order[position:end]) == sorted(np.flatnonzero(np.isin(block_of, list(blocks))))
    groups.append(blocks)
    position = end
  return groups


def test_block_shuffle_is_a_fresh_local_permutation_every_epoch():
  sizes = [7, 3, 10, 1, 9, 5]
  n = sum(sizes)
  index = sources.BlockShuffleIndex(sizes, seed=3, group_blocks=2)
  epochs = [np.array([index[e * n + i] for i in range(n)]) for e in range(3)]
  for order in epochs:
    assert sorted(order) == list(range(n))
    groups = _contiguous_groups(order, sizes)  # Documents of 2 blocks at a time.
    assert max(len(g) for g in groups) <= 2 and len(groups) >= 3
  assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
  again = sources.BlockShuffleIndex(sizes, seed=3, group_blocks=2)
  assert [again[i] for i in range(2 * n, 3 * n)] == epochs[2].tolist()  # Random access.
  starts = np.cumsum([0] + sizes)
  block_orders = [epochs[0][(epochs[0] >= starts[b]) & (epochs[0] < starts[b + 1])]
                  for b in range(len(sizes)) if sizes[b] >= 5]
  in_stored_order = [np.all(np.diff(order) > 0) for order in block_orders]
  assert not any(in_stored_order)  # The documents of a block are shuffled too.


def test_parse_sources_defaults_and_round_trip():
  specs = sources.parse_sources(
      " name=web,kind=parquet,path=gs://b/x/*.parquet,weight=0.7 ; "
      "name=code,kind=jsonl,path=/d/*.jsonl.zst,text_key=content;"
      "name=books,kind=tfds,path=pg19:1.0.0,split=train[:90%]", text_key="body")
  assert specs == [
      sources.SourceSpec("web", "parquet", "gs://b/x/*.parquet", 0.7, "body", None),
      sources.SourceSpec("code", "jsonl", "/d/*.jsonl.zst", 1.0, "content", None),
      sources.SourceSpec("books", "tfds", "pg19:1.0.0", 1.0, "body", "train[:90%]"),
  ]
  assert sources.parse_sources("") == []
  assert (sources.without_weights("name=a,kind=jsonl,path=/x,weight=2")
          == sources.without_weights("name=a,kind=jsonl,path=/x,weight=5")
          != sources.without_weights("name=a,kind=jsonl,path=/y,weight=5"))


@pytest.mark.parametrize("spec, message", [
    ("name=a,kind=csv,path=/x", "kind='csv' of source 'a' is not one of tfds, text_files, "
                                "parquet, jsonl, chat"),
    ("name=a,kind=jsonl", "'name=a,kind=jsonl' has no path"),
    ("name=a,kind=jsonl,path=/x,weight=0", "weight='0' of source 'a' is not a positive number"),
    ("name=a,kind=jsonl,path=/x,weight=abc", "weight='abc' of source 'a' is not a positive"),
    ("name=a,kind=jsonl,path=/x;name=a,kind=parquet,path=/y", "two sources are named 'a'"),
    ("name=a,kind=jsonl,path=/x,split=train", "source 'a' of kind jsonl has no splits"),
    ("name=a,kind=jsonl,path=/x,colour=red", "'colour=red' in .* is not a key=value field"),
    ("name=a,kind=jsonl,path=/x,name=b", "name given twice"),
])
def test_bad_specs_raise_one_line_errors(spec, message):
  with pytest.raises(ValueError, match=f"config.data.sources: .*{message}") as e:
    sources.parse_sources(spec)
  assert "\n" not in str(e.value)


def test_missing_files_and_bad_records_name_the_source(tmp_path):
  data_config = ml_collections.ConfigDict(dict(tfds_data_dir=None, shuffle_blocks=2,
                                               index_dir=None))
  missing = sources.SourceSpec("web", "parquet", str(tmp_path / "none/*.parquet"))
  with pytest.raises(ValueError, match=r"source 'web' \(parquet\): no files match path="):
    sources.open_source(missing, data_config, "train")
  path = write_jsonl(tmp_path / "a.jsonl", [{"content": "x"}])
  source = sources.open_source(sources.SourceSpec("code", "jsonl", path), data_config, "train")
  with pytest.raises(ValueError, match=r"a.jsonl, the line at \(decompressed\) byte 0: no key "
                                       r"text_key='text'; its keys: \['content'\]"):
    source[0]  # pylint: disable=pointless-statement
  with open(path, "a") as f:
    f.write('\n{"text": "fine"}\n{"text": broken\n')
  source = sources.open_source(sources.SourceSpec("code", "jsonl", path),
                               data_config, "train")
  assert source[1]["text"] == "fine"
  with pytest.raises(ValueError, match=r"a.jsonl, the line at \(decompressed\) byte 34: "
                                       r"Expecting value"):
    source[2]  # pylint: disable=pointless-statement
