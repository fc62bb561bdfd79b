"""Tests of yocou_jax.data.corpora: the python_stdlib and text_files builders, data sources."""

import concurrent.futures
import logging
import os
import sysconfig
import threading

import pytest
import tensorflow_datasets as tfds

from yocou_jax.data import corpora

tfds.disable_progress_bar()


def _texts(source) -> list[bytes]:
  return [source[i]["text"] for i in range(len(source))]


def _write_files(directory, contents: dict[str, bytes]) -> str:
  for relative_path, data in contents.items():
    path = directory / relative_path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
  return str(directory)


@pytest.fixture(scope="module")
def stdlib_data_dir(tmp_path_factory) -> str:
  """python_stdlib prepared once per session (every module asks for the same directory)."""
  data_dir = str(tmp_path_factory.getbasetemp() / "tfds")
  corpora.prepare_local_builder("python_stdlib", data_dir)
  return data_dir


def test_python_stdlib_splits_and_content(stdlib_data_dir):
  train = corpora.get_data_source("python_stdlib", stdlib_data_dir, "train")
  validation = corpora.get_data_source("python_stdlib", stdlib_data_dir, "validation")
  root, relative_paths = corpora.PythonStdlib(data_dir=stdlib_data_dir)._root_and_files()
  assert not any(set(p.split("/")) & corpora.SKIPPED_STDLIB_DIRS for p in relative_paths)
  assert "os.py" in relative_paths and "json/decoder.py" in relative_paths
  # The generated code tables are out (a plain read of each header, not the builder's helper);
  # the hand-written codecs beside them stay.
  encodings = os.path.join(sysconfig.get_paths()["stdlib"], "encodings")
  charmaps = set()
  for f in (f for f in os.listdir(encodings) if f.endswith(".py")):
    with open(os.path.join(encodings, f), "rb") as text:
      if b"gencodec.py" in text.read(1024):
        charmaps.add(f"encodings/{f}")
  assert "encodings/cp1252.py" in charmaps and not charmaps & set(relative_paths)
  assert "encodings/utf_8.py" in relative_paths and "encodings/aliases.py" in relative_paths
  assert not any(p.startswith("pydoc_data/") for p in relative_paths)
  census = corpora._census(root, relative_paths)
  assert len(train) + len(validation) == len(census.relative_paths) > 500
  assert 0.005 < len(validation) / len(census.relative_paths) < 0.03
  train_texts, validation_texts = set(_texts(train)), set(_texts(validation))
  assert len(train_texts) == len(train) and not train_texts & validation_texts  # Deduplicated.
  with open(os.path.join(root, "os.py"), "rb") as f:
    assert f.read() in train_texts | validation_texts
  info = corpora.PythonStdlib(data_dir=stdlib_data_dir).info
  assert info.metadata["python_version"].count(".") == 2


def test_python_stdlib_is_deterministic(stdlib_data_dir, tmp_path):
  rebuilt_dir = str(tmp_path / "again")
  for split in ("train", "validation"):
    first = corpora.get_data_source("python_stdlib", stdlib_data_dir, split)
    second = corpora.get_data_source("python_stdlib", rebuilt_dir, split)
    assert _texts(first) == _texts(second)


def test_split_by_path_is_stable_under_additions():
  paths = [f"pkg/module_{i}.py" for i in range(3000)]
  full = corpora.split_by_path(paths)
  assert 0.01 < len(full["validation"]) / len(paths) < 0.02
  subset = corpora.split_by_path(paths[::3])
  assert set(subset["validation"]) == set(full["validation"]) & set(paths[::3])
  assert corpora.split_by_path(["a.txt", "b.txt"])["validation"]  # Never empty from 2 files.
  assert corpora.split_by_path(["only.txt"]) == {"train": ["only.txt"], "validation": []}


def test_text_files_rules(tmp_path, caplog):
  corpus = _write_files(tmp_path / "corpus", {
      **{f"doc_{i}.txt": f"document {i}\n".encode() for i in range(6)},
      "nested/deeper/notes.md": "ünïcode ✓\n".encode(),
      "nested/copy_of_doc_0.txt": b"document 0\n",  # Duplicate content: kept once.
      "empty.txt": b"",
      "blank.txt": b"  \n\t\n",
      "image.bin": b"\x89PNG\x00\x01",
      "latin1.txt": "café crème\n".encode("latin-1"),
  })
  caplog.set_level(logging.INFO)
  data_dir = str(tmp_path / "tfds")
  texts = []
  for split in ("train", "validation"):
    texts += _texts(corpora.get_data_source("text_files", data_dir, split, corpus))
  assert sorted(texts) == sorted([f"document {i}\n".encode() for i in range(6)] +
                                 ["ünïcode ✓\n".encode(), "caf\ufffd cr\ufffdme\n".encode()])
  assert "8 files kept, 2 empty, 1 binary and 1 duplicate files skipped" in caplog.text
  assert "1 of" in caplog.text and "not valid UTF-8" in caplog.text
  # A glob selects files; paths stay relative to the glob's literal prefix.
  md_only = corpora.get_data_source("text_files", data_dir, "train", f"{corpus}/**/*.md")
  assert _texts(md_only) == ["ünïcode ✓\n".encode()]
  with pytest.raises(ValueError, match=r"text_files/files-\w+/1.0.0 in .*: Unknown split "
                                       r"'validation'. Should be one of \['train'\]"):
    corpora.get_data_source("text_files", data_dir, "validation", f"{corpus}/**/*.md")


def test_text_files_changed_corpus_is_prepared_again(tmp_path):
  corpus = _write_files(tmp_path / "corpus", {"a.txt": b"first version\n", "b.txt": b"other\n"})
  data_dir = str(tmp_path / "tfds")
  before = corpora.text_files_config(corpus).name
  assert set(_texts(corpora.get_data_source("text_files", data_dir, "train", corpus)) +
             _texts(corpora.get_data_source("text_files", data_dir, "validation", corpus))) == {
                 b"first version\n", b"other\n"}
  (tmp_path / "corpus" / "a.txt").write_bytes(b"second, longer version\n")
  assert corpora.text_files_config(corpus).name != before
  texts = (_texts(corpora.get_data_source("text_files", data_dir, "train", corpus)) +
           _texts(corpora.get_data_source("text_files", data_dir, "validation", corpus)))
  assert set(texts) == {b"second, longer version\n", b"other\n"}


def test_text_files_bad_corpora_raise_one_line_errors(tmp_path):
  data_dir = str(tmp_path / "tfds")
  empty_dir = tmp_path / "empty_dir"
  empty_dir.mkdir()
  only_empty = _write_files(tmp_path / "only_empty", {"a.txt": b"", "b.txt": b"\n\n"})
  cases = [
      (str(empty_dir), "no files match text_glob="),
      (str(tmp_path / "missing" / "*.txt"), "no files match text_glob="),
      (only_empty, r"no usable text under .*only_empty \(0 files kept, 2 empty"),
      (None, "needs text_glob"),
  ]
  for text_glob, message in cases:
    with pytest.raises(ValueError, match=message) as e:
      corpora.get_data_source("text_files", data_dir, "train", text_glob)
    assert "\n" not in str(e.value)


def test_concurrent_preparation_gives_one_dataset(tmp_path):
  corpus = _write_files(tmp_path / "corpus", {f"{i}.txt": f"text {i}\n".encode() * 50
                                              for i in range(40)})
  data_dir = str(tmp_path / "tfds")
  start = threading.Barrier(4)

  def prepare_and_read(_):
    start.wait()
    return _texts(corpora.get_data_source("text_files", data_dir, "train", corpus))

  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    results = list(pool.map(prepare_and_read, range(4)))
  assert all(result == results[0] for result in results) and len(results[0]) == 39
  dataset_dirs = os.listdir(os.path.join(data_dir, "text_files"))
  assert len(dataset_dirs) == 1
  assert os.listdir(os.path.join(data_dir, "text_files", dataset_dirs[0])) == ["1.0.0"]


class ToyCatalogue(tfds.core.GeneratorBasedBuilder):
  """Stands for a catalogue dataset (c4, lm1b) prepared elsewhere in ArrayRecord format."""

  VERSION = tfds.core.Version("1.0.0")
  code_path = corpora._FileCorpus.code_path

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict({"content": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i in range(5):
      yield i, {"content": f"record {i}"}


def test_catalogue_datasets_use_tfds_data_source(tmp_path):
  data_dir = str(tmp_path / "tfds")
  with pytest.raises(ValueError, match=r"Dataset 'toy_catalogue' is not prepared in .*tfds: "
                                       "prepare it into .* with file_format=array_record"):
    corpora.get_data_source("toy_catalogue", data_dir, "train")
  ToyCatalogue(data_dir=data_dir, file_format="array_record").download_and_prepare()
  source = corpora.get_data_source("toy_catalogue", data_dir, "train")
  assert sorted(corpora.iterate_texts("toy_catalogue", data_dir, "train", text_key="content")) == [
      f"record {i}" for i in range(5)]
  assert len(source) == 5
  with pytest.raises(ValueError, match="Dataset 'no_such_dataset' is neither prepared in") as e:
    corpora.get_data_source("no_such_dataset", data_dir, "train")
  assert "\n" not in str(e.value)
