"""Local text corpora as TFDS builders writing ArrayRecord, and `get_data_source` for any corpus.

TensorFlow is not a dependency: TFDS builds and reads these corpora only through the
`array_record` file format and random-access data sources (`tfds.data_source`).

* `python_stdlib` (`PythonStdlib`): every `.py` file of the running interpreter's standard
  library, one document per file. `site-packages` and `__pycache__` are skipped, and so are the
  `test`, `tests` and `idle_test` directories: they are 60% of the bytes, mostly CPython's own
  regression tests, with deliberately malformed files (bad encodings, syntax errors) and large
  generated data. So are the other generated files: `pydoc_data` (the help topics as one string)
  and the 65 charmap codecs of `encodings/` written by `gencodec.py` (256-entry code tables), 16%
  of the rest, which a small model trained on the corpus otherwise learns to recite. What remains
  is about 660 files, 10 MB of library code (Python 3.11). The
  content depends on the interpreter that prepares it; the prepared copy records its Python
  version in `info.metadata` and is reused as is by later runs.
* `text_files` (`TextFiles`): every file under a directory, or matching a glob (recursive `**`
  allowed), one document per file. The builder config is named after a fingerprint of the glob
  and of the matched files' paths, sizes and modification times, so editing the corpus prepares
  a fresh copy instead of silently reusing a stale one.

Both builders apply the same rules, deterministically: empty (whitespace-only) files and binary
files (with a NUL byte) are skipped and counted in the log; identical contents are kept once (the
first path in sorted order); bytes that are not UTF-8 are decoded with U+FFFD replacements and
counted in a warning. A file goes to `validation` when the SHA-256 of its relative POSIX path
falls in the lowest `VALIDATION_FRACTION` of hash values (if that picks no file of a corpus of at
least two files, the file with the lowest hash), so the split never changes when other files are
added or removed. Records are `{"text": Text}`; TFDS data sources return the text as UTF-8 `bytes`.

`get_data_source(name, data_dir, split, text_glob)` prepares a local corpus on first use and
returns a random-access source for any corpus prepared in ArrayRecord format (for example c4 or
lm1b prepared elsewhere with `file_format="array_record"`).
"""

import abc
from collections.abc import Callable, Iterator, Sequence
import dataclasses
import functools
import glob
import hashlib
import os
import pathlib
import platform
import sysconfig
import time
from typing import Any

from absl import logging
from etils import epath
import tensorflow_datasets as tfds

LOCAL_DATASETS = ("python_stdlib", "text_files")
VALIDATION_FRACTION = 0.015
SKIPPED_STDLIB_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests",
                                 "idle_test", "pydoc_data"})
# Written by a generator, not by hand: the charmap codecs of `encodings/` say so in their header.
GENERATED_STDLIB_MARKER = b"gencodec.py"


def default_data_dir() -> str:
  """Where TFDS keeps prepared datasets: `$TFDS_DATA_DIR`, else `~/tensorflow_datasets`."""
  return os.path.expanduser(os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")


def _path_hash_fraction(relative_path: str) -> float:
  """A stable pseudo-random number in [0, 1) derived from a relative path."""
  digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2**64


def split_by_path(relative_paths: Sequence[str]) -> dict[str, list[str]]:
  """Assigns each relative path to "train" or "validation" by the hash rule of this module."""
  validation = [p for p in relative_paths if _path_hash_fraction(p) < VALIDATION_FRACTION]
  if not validation and len(relative_paths) >= 2:
    validation = [min(relative_paths, key=_path_hash_fraction)]
  held_out = set(validation)
  return {"train": [p for p in relative_paths if p not in held_out], "validation": validation}


@dataclasses.dataclass
class _FileCensus:
  """The usable files of a corpus and what was left out, for the preparation log."""

  relative_paths: list[str] = dataclasses.field(default_factory=list)
  empty: int = 0
  binary: int = 0
  duplicates: int = 0

  def summary(self) -> str:
    return (f"{len(self.relative_paths)} files kept, {self.empty} empty, {self.binary} binary "
            f"and {self.duplicates} duplicate files skipped")


def _census(root: str, relative_paths: Sequence[str]) -> _FileCensus:
  """Drops empty, binary and duplicate files (the first path of identical contents stays)."""
  census, seen_hashes = _FileCensus(), set()
  for relative_path in sorted(relative_paths):
    data = pathlib.Path(root, relative_path).read_bytes()
    content_hash = hashlib.sha256(data).digest()
    if not data.strip():
      census.empty += 1
    elif b"\x00" in data:
      census.binary += 1
    elif content_hash in seen_hashes:
      census.duplicates += 1
    else:
      seen_hashes.add(content_hash)
      census.relative_paths.append(relative_path)
  return census


def is_generated(path: str) -> bool:
  """Whether a stdlib file says in its first lines that a generator wrote it (gencodec.py)."""
  with open(path, "rb") as f:
    return GENERATED_STDLIB_MARKER in f.read(1024)


class _FileCorpus(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """One document per text file under a root directory; subclasses list the files."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  # TFDS 4.9.10 derives `code_path` through the `importlib_resources` backport, which it only
  # requires on Python < 3.9; giving the path directly avoids that import.
  code_path = epath.Path(__file__)

  @abc.abstractmethod
  def _root_and_files(self) -> tuple[str, list[str]]:
    """The corpus root and the POSIX paths of its files relative to that root."""

  def _metadata(self) -> dict[str, Any]:
    return {}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
        metadata=tfds.core.MetadataDict(self._metadata()),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Nothing to download.
    root, relative_paths = self._root_and_files()
    census = _census(root, relative_paths)
    logging.info("%s: %d files matched under %s; %s.", self.name, len(relative_paths), root,
                 census.summary())
    if not census.relative_paths:
      raise ValueError(f"{self.name}: no usable text under {root} ({census.summary()}).")
    # TFDS cannot write an empty split: a one-file corpus has no validation split.
    return {split: self._generate_examples(root, paths, split)
            for split, paths in split_by_path(census.relative_paths).items() if paths}

  def _generate_examples(self, root: str, relative_paths: list[str], split: str
                         ) -> Iterator[tuple[str, dict[str, str]]]:
    not_utf8 = 0
    for relative_path in relative_paths:
      data = pathlib.Path(root, relative_path).read_bytes()
      try:
        text = data.decode("utf-8")
      except UnicodeDecodeError:
        not_utf8 += 1
        text = data.decode("utf-8", errors="replace")
      yield relative_path, {"text": text}
    if not_utf8:
      logging.warning("%s/%s: %d of %d files are not valid UTF-8; decoded with U+FFFD "
                      "replacements.", self.name, split, not_utf8, len(relative_paths))


class PythonStdlib(_FileCorpus):
  """The `.py` files of the running interpreter's standard library, without its tests and
  generated tables."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "Initial release.",
                   "1.1.0": "Generated files skipped: pydoc_data, gencodec.py charmap codecs."}

  def _root_and_files(self) -> tuple[str, list[str]]:
    root = sysconfig.get_paths()["stdlib"]
    relative_paths = []
    for directory, subdirectories, filenames in os.walk(root):
      subdirectories[:] = sorted(d for d in subdirectories if d not in SKIPPED_STDLIB_DIRS)
      relative_dir = os.path.relpath(directory, root)
      relative_paths += [os.path.normpath(os.path.join(relative_dir, f)).replace(os.sep, "/")
                         for f in filenames
                         if f.endswith(".py") and not is_generated(os.path.join(directory, f))]
    return root, relative_paths

  def _metadata(self) -> dict[str, Any]:
    return {"python_version": platform.python_version()}


@dataclasses.dataclass(eq=False)
class TextFilesConfig(tfds.core.BuilderConfig):
  """A `TextFiles` corpus: the directory or glob of its files."""

  text_glob: str = ""


def _glob_root(text_glob: str) -> str:
  """The longest leading directory of a glob without wildcards: paths are relative to it."""
  if os.path.isdir(text_glob):
    return text_glob
  parts = text_glob.split(os.sep)
  literal = []
  for part in parts[:-1]:
    if glob.has_magic(part):
      break
    literal.append(part)
  return os.sep.join(literal) or "."


def list_text_files(text_glob: str) -> tuple[str, list[str]]:
  """The root of `text_glob` and the sorted relative POSIX paths of the files it matches."""
  text_glob = os.path.abspath(os.path.expanduser(text_glob))
  root = _glob_root(text_glob)
  pattern = os.path.join(text_glob, "**", "*") if os.path.isdir(text_glob) else text_glob
  paths = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
  return root, sorted(os.path.relpath(p, root).replace(os.sep, "/") for p in paths)


def text_files_config(text_glob: str) -> TextFilesConfig:
  """The config of a `TextFiles` corpus, named after a fingerprint of its files."""
  root, relative_paths = list_text_files(text_glob)
  if not relative_paths:
    raise ValueError(f"text_files: no files match text_glob={text_glob!r}.")
  fingerprint = hashlib.sha256(os.path.abspath(os.path.expanduser(text_glob)).encode())
  for relative_path in relative_paths:
    stat = os.stat(os.path.join(root, relative_path))
    fingerprint.update(f"\0{relative_path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
  return TextFilesConfig(name=f"files-{fingerprint.hexdigest()[:16]}",
                         description=f"Text files matching {text_glob}", text_glob=text_glob)


class TextFiles(_FileCorpus):
  """Text files under a directory or matching a glob; the builder config carries the glob."""

  def _root_and_files(self) -> tuple[str, list[str]]:
    return list_text_files(self.builder_config.text_glob)

  def _metadata(self) -> dict[str, Any]:
    return {"text_glob": self.builder_config.text_glob}


def _local_builder_factory(name: str, data_dir: str,
                           text_glob: str | None) -> Callable[[], _FileCorpus]:
  """Makes fresh builders of a local corpus (the text_files config is computed once)."""
  if name == "python_stdlib":
    return functools.partial(PythonStdlib, data_dir=data_dir, file_format="array_record")
  if not text_glob:
    raise ValueError("tfds_name='text_files' needs text_glob (a directory or a glob of files).")
  return functools.partial(TextFiles, config=text_files_config(text_glob), data_dir=data_dir,
                           file_format="array_record")


def prepare_local_builder(name: str, data_dir: str, text_glob: str | None = None) -> _FileCorpus:
  """Prepares `python_stdlib` or `text_files` in `data_dir` unless it is already there.

  Safe under concurrent processes on a POSIX file system: TFDS writes into a private
  `incomplete.*` directory and renames it into place. When another process wins that rename, ours
  fails and is discarded, and the winner's copy (identical: preparation is deterministic) is used.

  Returns:
    A builder reading the prepared dataset.
  """
  make_builder = _local_builder_factory(name, data_dir, text_glob)
  builder = make_builder()
  if builder.is_prepared():
    return builder
  start = time.perf_counter()
  try:
    builder.download_and_prepare(file_format="array_record")
  except OSError:
    if not make_builder().is_prepared():
      raise
    logging.info("%s was prepared by another process first; using that copy.", name)
  else:
    logging.info("Prepared %s in %s in %.1f s (%s).", builder.info.full_name, data_dir,
                 time.perf_counter() - start, builder.info.dataset_size)
  return make_builder()


def _catalogue_data_source(name: str, data_dir: str, split: str) -> Sequence[Any]:
  how_to_prepare = (
      f"prepare it into {data_dir} with file_format=array_record (for example `tfds build {name} "
      f"--data_dir={data_dir} --file_format=array_record` where TensorFlow is installed), or use "
      f"tfds_name=python_stdlib or tfds_name=text_files with text_glob")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f"Dataset {name!r} is neither prepared in {data_dir} nor known to TFDS: "
                     f"{how_to_prepare}.") from e
  if not builder.is_prepared():
    raise ValueError(f"Dataset {name!r} is not prepared in {data_dir}: {how_to_prepare}.")
  try:
    return builder.as_data_source(split=split)
  except ValueError as e:  # An unknown split: say which dataset.
    raise ValueError(f"{builder.info.full_name} in {data_dir}: {e}") from e
  except NotImplementedError as e:
    raise ValueError(f"Dataset {name!r} in {data_dir} is stored as {builder.info.file_format}, "
                     f"which needs TensorFlow to read: {how_to_prepare}.") from e


def get_data_source(name: str, data_dir: str | None, split: str,
                    text_glob: str | None = None) -> Sequence[Any]:
  """A random-access source of the records of split `split` of dataset `name`.

  Args:
    name: "python_stdlib", "text_files" (with `text_glob`), or any TFDS name (with an optional
      config and version, e.g. "c4/en:3.1.0") prepared in `data_dir` in ArrayRecord format.
    data_dir: the TFDS data directory; None means `default_data_dir()`.
    split: a TFDS split ("train", "validation", "train[:10%]", ...).
    text_glob: for "text_files": a directory or a glob of text files.

  Returns:
    A sequence of records (dicts of features; text features come back as UTF-8 bytes).
  """
  data_dir = os.path.expanduser(data_dir) if data_dir else default_data_dir()
  if name not in LOCAL_DATASETS:
    return _catalogue_data_source(name, data_dir, split)
  builder = prepare_local_builder(name, data_dir, text_glob)
  try:
    return builder.as_data_source(split=split)
  except ValueError as e:  # An unknown split: say which dataset.
    raise ValueError(f"{builder.info.full_name} in {data_dir}: {e}") from e


def record_text(record: dict[str, Any], text_key: str) -> str:
  """The text feature `text_key` of a record, decoded (data sources return UTF-8 bytes)."""
  text = record[text_key]
  return text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text


def iterate_texts(name: str, data_dir: str | None, split: str, text_glob: str | None = None,
                  text_key: str = "text") -> Iterator[str]:
  """The texts of a split of a dataset, in stored order."""
  source = get_data_source(name, data_dir, split, text_glob)
  for index in range(len(source)):
    yield record_text(source[index], text_key)
