"""The documents an evaluation reads: ``code``, ``book`` or a path (file, directory or glob).

* ``code``: the held-out (``eval_split``) documents of a run's training corpus; for the default
  config that is the validation split of the Python standard library's source.
* ``book``: a long prose document present wherever Python is: the Python Language Reference as
  shipped for ``help()`` (``pydoc_data.topics``, about 465K characters), its topics joined in
  sorted order into one document. Point ``PATH`` at a public-domain book for literary prose.
* ``PATH``: every file under a directory, or matching a glob (``**`` allowed), or one file; one
  document per file, empty files skipped.
"""

from __future__ import annotations

import os
from typing import Any

from yocou_jax.data import corpora

NAMED = ("code", "book")


class CorpusError(ValueError):
  """A corpus that cannot be read or holds no text; the message names the flag."""


def book_text() -> str:
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top

  return "\n\n".join(topics.topics[name] for name in sorted(topics.topics))


def load_documents(spec: str, data_config: Any = None, flag: str = "--corpus") -> list[str]:
  """The non-empty texts of ``spec``; ``data_config`` (a run's ``config.data``) for ``code``."""
  if spec == "code":
    if data_config is None:
      raise CorpusError(f"{flag}=code needs a run's data config")
    texts = list(corpora.iterate_texts(data_config.tfds_name, data_config.tfds_data_dir,
                                       data_config.eval_split, data_config.get("text_glob"),
                                       data_config.get("text_key", "text")))
  elif spec == "book":
    texts = [book_text()]
  else:
    root, relative_paths = corpora.list_text_files(spec)
    if not relative_paths:
      raise CorpusError(f"{flag}={spec!r}: no file matches; give code, book, or an existing "
                        "file, directory or glob")
    texts = []
    for relative_path in relative_paths:
      with open(os.path.join(root, relative_path), "rb") as f:
        texts.append(f.read().decode("utf-8", errors="replace"))
  texts = [t for t in texts if t.strip()]
  if not texts:
    raise CorpusError(f"{flag}={spec!r} holds no text (every document is empty)")
  return texts
