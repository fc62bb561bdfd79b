"""Training sources: the `config.data.sources` spec and random-access readers for each kind.

The spec
--------
`config.data.sources` is one string (so that `--config.data.sources=...` works on the command
line): sources separated by `;`, each a `,`-separated list of `key=value` fields::

    name=web,kind=parquet,path=gs://bucket/fineweb/*.parquet,weight=0.7;
    name=code,kind=jsonl,path=/data/code/**/*.jsonl.zst,weight=0.3,text_key=content

Fields: `name` (unique; names the metrics `source_tokens/NAME` and `eval_loss/NAME`), `kind`,
`path`, `weight` (default 1; documents are drawn in proportion to the weights), `text_key`
(default `config.data.text_key`) and `split` (kinds `tfds` and `text_files` only; default
`config.data.train_split`, and `config.data.eval_split` for evaluation). Paths hold no `,` or
`;`. `config.data.eval_sources` has the same form (weights ignored) and names the validation
sets; when it is empty, every `tfds` and `text_files` source is evaluated on its `eval_split`.

Kinds
-----
* `tfds`: `path` is a TFDS name prepared in ArrayRecord format (`corpora.get_data_source`).
* `text_files`: `path` is a directory or glob of text files (one document per file), prepared
  once into ArrayRecord by `corpora.TextFiles` (train/validation split by path hash).
* `parquet`: `path` is a glob of Parquet files (local, or any fsspec URL such as `gs://...`),
  one document per row, text in column `text_key`. Read in place: the footers give every row
  group's length, so document `i` is found by a (file, row group, row) index and one row group
  is read (only the `text_key` column) when one of its rows is first needed.
* `jsonl`: a glob of JSON Lines files, plain, `.gz` or `.zst`, one JSON object per line (blank
  lines skipped). Random access through an index of line offsets built once per file (a NumPy
  scan of the decompressed bytes) and cached in `config.data.index_dir`, keyed by the file's
  path, size and modification time. Random access and not sequential reading, because then the
  position of a source is one integer in grain's iterator state (exact resume, any number of
  workers), exactly as for ArrayRecord. Compressed streams cannot seek, so a compressed file is
  read whole when one of its lines is first needed; plain files are read in blocks of about
  `PLAIN_BLOCK_BYTES`. The price: the first run on a host decompresses every file once to index
  it (about the speed of one decompression pass; later runs load the cached index).
* `chat`: `jsonl` files of SFT conversations: `{"messages": [{"role", "content"}, ...]}` or
  `{"prompt", "response"}` records (rendered by `yocou_jax.data.chat`).

Row groups and compressed files are expensive to read once per document, so file sources are
shuffled by blocks (`block_shuffle_index`): each epoch permutes the blocks (row groups, file
chunks), then permutes the documents within consecutive groups of `config.data.shuffle_blocks`
blocks; readers keep the blocks of the current group decoded. The packed-row window shuffle
then mixes rows across groups.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import gzip
import hashlib
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

KINDS = ("tfds", "text_files", "parquet", "jsonl", "chat")
FIELDS = ("name", "kind", "path", "weight", "text_key", "split")
SPLIT_KINDS = ("tfds", "text_files")  # Kinds with named splits.
PLAIN_BLOCK_BYTES = 64 << 20  # Plain JSONL files are read in blocks of about this many bytes.
_INDEX_CHUNK_BYTES = 16 << 20


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  """One source of `config.data.sources` (see the module docstring)."""

  name: str
  kind: str
  path: str
  weight: float = 1.0
  text_key: str = "text"
  split: str | None = None


def parse_sources(spec: str, *, text_key: str = "text", field: str = "sources"
                  ) -> list[SourceSpec]:
  """Parses a `name=...,kind=...,path=...[,weight=...][,text_key=...][,split=...];...` spec.

  Raises:
    ValueError: one line naming `config.data.<field>`, the bad part and what is allowed.
  """
  where = f"config.data.{field}"
  specs, names = [], set()
  for entry in (e.strip() for e in spec.split(";")):
    if not entry:
      continue
    fields = {}
    for item in entry.split(","):
      key, sep, value = item.partition("=")
      key, value = key.strip(), value.strip()
      if not sep or key not in FIELDS:
        raise ValueError(f"{where}: {item.strip()!r} in {entry!r} is not a key=value field with "
                         f"a key among {', '.join(FIELDS)}.")
      if key in fields:
        raise ValueError(f"{where}: {key} given twice in {entry!r}.")
      fields[key] = value
    missing = [k for k in ("name", "kind", "path") if not fields.get(k)]
    if missing:
      raise ValueError(f"{where}: {entry!r} has no {', '.join(missing)} (needed: name, kind, "
                       f"path).")
    if fields["kind"] not in KINDS:
      raise ValueError(f"{where}: kind={fields['kind']!r} of source {fields['name']!r} is not "
                       f"one of {', '.join(KINDS)}.")
    if fields["name"] in names:
      raise ValueError(f"{where}: two sources are named {fields['name']!r}; names must be "
                       f"unique.")
    if "split" in fields and fields["kind"] not in SPLIT_KINDS:
      raise ValueError(f"{where}: source {fields['name']!r} of kind {fields['kind']} has no "
                       f"splits (split= applies to kinds {', '.join(SPLIT_KINDS)}).")
    try:
      weight = float(fields.get("weight", 1.0))
    except ValueError:
      weight = float("nan")
    if not (np.isfinite(weight) and weight > 0):
      raise ValueError(f"{where}: weight={fields['weight']!r} of source {fields['name']!r} is "
                       f"not a positive number.")
    names.add(fields["name"])
    specs.append(SourceSpec(name=fields["name"], kind=fields["kind"], path=fields["path"],
                            weight=weight, text_key=fields.get("text_key") or text_key,
                            split=fields.get("split")))
  return specs


def without_weights(spec: str) -> str:
  """The spec with its weights removed: what must not change when a run resumes."""
  try:
    sources = parse_sources(spec or "")
  except ValueError:
    return spec
  return ";".join(f"{s.name},{s.kind},{s.path},{s.text_key},{s.split}" for s in sources)


def _filesystem_and_paths(pattern: str) -> tuple[Any, list[str]]:
  """The fsspec file system of a glob (local path or URL) and its sorted matching files."""
  import fsspec  # pylint: disable=g-import-not-at-top

  fs, _, _ = fsspec.core.get_fs_token_paths(os.path.expanduser(pattern))
  local_or_url = os.path.expanduser(pattern)
  if fs.isdir(local_or_url):
    local_or_url = local_or_url.rstrip("/") + "/**"
  paths = sorted(p for p in fs.glob(local_or_url) if fs.isfile(p))
  if not paths:
    raise ValueError(f"no files match path={pattern!r}.")
  return fs, paths


class _BlockCache:
  """The last few decoded blocks of a reader (per process: not pickled to grain workers)."""

  def __init__(self, size: int):
    self._size = size
    self._blocks: collections.OrderedDict[int, list[Any]] = collections.OrderedDict()

  def get(self, block: int, read) -> list[Any]:
    if block in self._blocks:
      self._blocks.move_to_end(block)
      return self._blocks[block]
    values = read(block)
    self._blocks[block] = values
    if len(self._blocks) > self._size:
      self._blocks.popitem(last=False)
    return values


class _BlockSource(Sequence):
  """A random-access source whose documents live in blocks that are read whole."""

  def __init__(self, block_sizes: Sequence[int], cache_blocks: int):
    self.block_sizes = np.asarray(block_sizes, np.int64)
    self._block_starts = np.concatenate([[0], np.cumsum(self.block_sizes)]).tolist()
    self._cache_blocks = cache_blocks
    self._cache = _BlockCache(cache_blocks)

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_cache"] = None
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._cache = _BlockCache(self._cache_blocks)

  def __len__(self) -> int:
    return self._block_starts[-1]

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not 0 <= index < len(self):
      raise IndexError(f"document {index} of {len(self)}")
    block = bisect.bisect_right(self._block_starts, index) - 1
    values = self._cache.get(block, self._read_block)
    row = index - self._block_starts[block]
    try:
      return self._record(values[row])
    except ValueError as e:  # A bad record: say where it is.
      raise ValueError(f"{self._where(block, row)}: {str(e).splitlines()[0]}") from e

  def _read_block(self, block: int) -> list[Any]:
    raise NotImplementedError

  def _record(self, value: Any) -> dict[str, Any]:
    raise NotImplementedError

  def _where(self, block: int, row: int) -> str:
    raise NotImplementedError


class ParquetSource(_BlockSource):
  """The rows of Parquet files, read in place one row group (one column) at a time."""

  def __init__(self, pattern: str, text_key: str, cache_blocks: int = 4):
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

    self._fs, self.paths = _filesystem_and_paths(pattern)
    self.text_key = text_key
    self._row_groups = []  # (file index, row group) of every block.
    sizes = []
    for file_index, path in enumerate(self.paths):
      with self._fs.open(path, "rb") as f:
        parquet_file = pq.ParquetFile(f)
        if text_key not in parquet_file.schema_arrow.names:
          raise ValueError(f"{path} has no column text_key={text_key!r}; its columns: "
                           f"{parquet_file.schema_arrow.names}.")
        for group in range(parquet_file.num_row_groups):
          self._row_groups.append((file_index, group))
          sizes.append(parquet_file.metadata.row_group(group).num_rows)
    super().__init__(sizes, cache_blocks)

  def _read_block(self, block: int) -> list[Any]:
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

    file_index, group = self._row_groups[block]
    with self._fs.open(self.paths[file_index], "rb") as f:
      table = pq.ParquetFile(f).read_row_group(group, columns=[self.text_key])
    return table.column(self.text_key).to_pylist()

  def _record(self, value: Any) -> dict[str, Any]:
    return {self.text_key: "" if value is None else value}

  def _where(self, block: int, row: int) -> str:
    file_index, group = self._row_groups[block]
    return f"{self.paths[file_index]} row group {group} row {row}"


def _open_decompressed(fs, path: str):
  raw = fs.open(path, "rb")
  if path.endswith(".gz"):
    return gzip.GzipFile(fileobj=raw)
  if path.endswith(".zst"):
    import zstandard  # pylint: disable=g-import-not-at-top

    return zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)
  return raw


def _is_compressed(path: str) -> bool:
  return path.endswith((".gz", ".zst"))


def line_index(fs, path: str, index_dir: str | None) -> np.ndarray:
  """[num_lines, 2] int64 (start, end) byte offsets of the non-blank lines of a decompressed file.

  Cached as `.npy` in `index_dir` under a hash of the path, size and modification time.
  """
  info = fs.info(path)
  key = f"{path}\0{info.get('size')}\0{info.get('mtime', info.get('updated', ''))}"
  cache_path = None
  if index_dir:
    name = hashlib.sha256(key.encode()).hexdigest()[:32]
    cache_path = os.path.join(os.path.expanduser(index_dir), f"{name}.npy")
    if os.path.exists(cache_path):
      return np.load(cache_path)
  newlines, offset, last_byte = [], 0, b"\n"
  with _open_decompressed(fs, path) as f:
    while chunk := f.read(_INDEX_CHUNK_BYTES):
      newlines.append(np.flatnonzero(np.frombuffer(chunk, np.uint8) == ord("\n")) + offset)
      offset += len(chunk)
      last_byte = chunk[-1:]
  ends = np.concatenate(newlines + [np.array([offset] if last_byte != b"\n" else [], np.int64)])
  starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
  lines = np.stack([starts, ends.astype(np.int64)], axis=1)
  lines = lines[lines[:, 1] > lines[:, 0]]
  if cache_path:
    from yocou_jax import files  # pylint: disable=g-import-not-at-top

    with files.atomic_write(cache_path, "wb") as f:
      np.save(f, lines)
  return lines


class JsonlSource(_BlockSource):
  """The JSON objects of JSON Lines files (plain, `.gz`, `.zst`), one per non-blank line."""

  def __init__(self, pattern: str, text_key: str | None, index_dir: str | None,
               cache_blocks: int = 4, block_bytes: int = PLAIN_BLOCK_BYTES):
    self._fs, self.paths = _filesystem_and_paths(pattern)
    self.text_key = text_key
    self._blocks = []  # (file index, [lines, 2] offsets) of every block.
    for file_index, path in enumerate(self.paths):
      lines = line_index(self._fs, path, index_dir)
      if _is_compressed(path) or not len(lines):
        self._blocks.append((file_index, lines))
        continue
      block_of_line = (lines[:, 0] // block_bytes)
      cuts = np.flatnonzero(np.diff(block_of_line)) + 1
      self._blocks.extend((file_index, part) for part in np.split(lines, cuts))
    super().__init__([len(lines) for _, lines in self._blocks], cache_blocks)

  def _read_block(self, block: int) -> list[Any]:
    file_index, lines = self._blocks[block]
    path = self.paths[file_index]
    if not len(lines):
      return []
    if _is_compressed(path):
      with _open_decompressed(self._fs, path) as f:
        data, base = f.read(), 0
    else:
      base = int(lines[0, 0])
      with self._fs.open(path, "rb") as f:
        f.seek(base)
        data = f.read(int(lines[-1, 1]) - base)
    return [data[start - base:end - base] for start, end in lines.tolist()]

  def _record(self, value: bytes) -> dict[str, Any]:
    record = json.loads(value)
    if not isinstance(record, dict):
      raise ValueError(f"not a JSON object: {value[:80]!r}")
    if self.text_key is not None and self.text_key not in record:
      raise ValueError(f"no key text_key={self.text_key!r}; its keys: {sorted(record)}.")
    return record

  def _where(self, block: int, row: int) -> str:
    file_index, lines = self._blocks[block]
    return f"{self.paths[file_index]}, the line at (decompressed) byte {int(lines[row, 0])}"


def open_source(source: SourceSpec, data_config: Any, split: str) -> Sequence[Any]:
  """The random-access records of one source (see the module docstring for each kind)."""
  from yocou_jax.data import corpora  # pylint: disable=g-import-not-at-top

  try:
    if source.kind == "tfds":
      return corpora.get_data_source(source.path, data_config.tfds_data_dir, split)
    if source.kind == "text_files":
      return corpora.get_data_source("text_files", data_config.tfds_data_dir, split, source.path)
    cache_blocks = data_config.shuffle_blocks + 1
    if source.kind == "parquet":
      return ParquetSource(source.path, source.text_key, cache_blocks)
    text_key = None if source.kind == "chat" else source.text_key
    return JsonlSource(source.path, text_key, data_config.index_dir, cache_blocks)
  except (ValueError, OSError) as e:
    raise ValueError(f"source {source.name!r} ({source.kind}): "
                     f"{str(e).strip().splitlines()[0]}") from e


def block_sizes(source: Sequence[Any]) -> np.ndarray | None:
  """The documents per block of a block source; None for sources with cheap random access."""
  return getattr(source, "block_sizes", None)


class BlockShuffleIndex(Sequence):
  """Endless epochs of a block-shuffled order of documents `[0, sum(block_sizes))`.

  Epoch `e` permutes the blocks (seeded by `(seed, e)`), cuts the permuted blocks into groups of
  `group_blocks`, and permutes the documents within each group (seeded by `(seed, e, group)`).
  Item `i` is the document at position `i % n` of epoch `i // n`: a pure function of `i`, so a
  grain `MapDataset` over it resumes exactly from its position.
  """

  def __init__(self, block_sizes_: Sequence[int], seed: int, group_blocks: int):
    self._sizes = np.asarray(block_sizes_, np.int64)
    self._starts = np.concatenate([[0], np.cumsum(self._sizes)])
    self._num_documents = int(self._starts[-1])
    self._seed = seed
    self._group_blocks = max(1, group_blocks)
    self._epoch = self._group = None

  def __len__(self) -> int:
    return sys.maxsize

  def _epoch_groups(self, epoch: int) -> None:
    if self._epoch == epoch:
      return
    order = np.random.default_rng([self._seed, epoch]).permutation(len(self._sizes))
    self._groups = [order[i:i + self._group_blocks]
                    for i in range(0, len(order), self._group_blocks)]
    group_sizes = [int(self._sizes[blocks].sum()) for blocks in self._groups]
    self._group_starts = np.concatenate([[0], np.cumsum(group_sizes)]).tolist()
    self._epoch, self._group = epoch, None

  def _group_documents(self, group: int) -> np.ndarray:
    if self._group != group:
      documents = np.concatenate([np.arange(self._starts[b], self._starts[b + 1])
                                  for b in self._groups[group]])
      rng = np.random.default_rng([self._seed, self._epoch, group])
      self._documents, self._group = rng.permutation(documents), group
    return self._documents

  def __getitem__(self, index: int) -> int:
    epoch, position = divmod(int(index), self._num_documents)
    self._epoch_groups(epoch)
    group = bisect.bisect_right(self._group_starts, position) - 1
    return int(self._group_documents(group)[position - self._group_starts[group]])


def block_subset(block_sizes_: np.ndarray, index: int, count: int) -> np.ndarray:
  """The document ids of blocks `index, index + count, ...`: one process's share of a source."""
  starts = np.concatenate([[0], np.cumsum(block_sizes_)])
  return np.concatenate([np.arange(starts[b], starts[b + 1])
                         for b in range(index, len(block_sizes_), count)] or
                        [np.zeros(0, np.int64)])
