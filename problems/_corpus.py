"""Real text with no download, from the running interpreter's standard library.

Two corpora, both read at run time, so available on every Python install but
**dependent on the Python version** (metrics compare only between runs on the same
Python):

* ``"code"``: Python source code of pure-Python standard-library modules
  (``importlib``'s loader ``get_source``, which also works for a zipped stdlib);
  training and test text come from disjoint module lists.
* ``"prose"``: English prose, the help topics of Python's documentation
  (``pydoc_data.topics``, the text ``help("with")`` prints; about 465k characters
  on Python 3.11). The topics are sorted by name and every tenth one, from the
  fifth, is held out for testing (:data:`PROSE_TEST_EVERY`). Typographic quotes
  and dashes become their ASCII forms.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
from torch import Tensor

__all__ = ["TRAIN_MODULES", "TEST_MODULES", "PROSE_TEST_EVERY", "CORPORA", "CHARS", "UNKNOWN",
           "encode", "decode", "load_split", "prose_topics"]

TRAIN_MODULES = (
    "argparse", "calendar", "contextlib", "copy", "csv", "dataclasses", "difflib", "enum",
    "fractions", "functools", "heapq", "pprint", "shlex", "statistics", "string",
)
TEST_MODULES = ("textwrap", "bisect", "fnmatch", "glob", "queue")
PROSE_TEST_EVERY = (10, 5)
"""Prose test topics: sorted topic names at indices ``5, 15, 25, ...``."""
CORPORA = ("code", "prose")

# Typographic punctuation of the prose -> ASCII, so it is not lost as "unknown".
_ASCII = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"',
                        "\u2013": "-", "\u2014": "--", "\u2026": "...", "\u00a0": " "})

CHARS = "\n" + "".join(chr(c) for c in range(32, 127))
"""The character vocabulary after the unknown id 0: newline and printable ASCII (97 ids)."""
UNKNOWN = 0
"""Id of every character outside :data:`CHARS` (tabs, non-ASCII)."""

_LOOKUP = torch.zeros(128, dtype=torch.long)
_LOOKUP[[ord(c) for c in CHARS]] = torch.arange(1, len(CHARS) + 1)


def encode(text: str) -> Tensor:
    """Text -> (len,) int64 ids in ``[0, 1 + len(CHARS))``; unknown characters -> 0."""
    codes = torch.tensor([min(ord(c), 127) for c in text], dtype=torch.long)
    ids = _LOOKUP[codes]
    return ids


def decode(ids: Tensor) -> str:
    """(len,) ids -> text, with ``"?"`` for the unknown id."""
    return "".join("?" if i == UNKNOWN else CHARS[i - 1] for i in ids.tolist())


def module_source(name: str) -> str:
    """The source text of standard-library module ``name`` (without importing it)."""
    spec = importlib.util.find_spec(name)
    source = None if spec is None or spec.loader is None else spec.loader.get_source(name)
    if source is None:
        raise RuntimeError(f"no source for standard-library module {name!r} in this Python "
                           "install; the text corpus needs the pure-Python stdlib sources")
    return source


def prose_topics(split: str) -> list[str]:
    """The names of the documentation topics in the ``"train"`` or ``"test"`` prose."""
    from pydoc_data.topics import topics  # the standard library's help texts

    every, first = PROSE_TEST_EVERY
    names = sorted(topics)
    held_out = set(names[first::every])
    return [name for name in names if (name in held_out) == (split == "test")]


@functools.lru_cache(maxsize=4)
def load_split(split: str, corpus: str = "code") -> Tensor:
    """The ``"train"`` or ``"test"`` text of ``corpus``, encoded (modules or topics
    joined by blank lines)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if corpus == "prose":
        from pydoc_data.topics import topics

        return encode("\n\n".join(topics[name].strip().translate(_ASCII)
                                   for name in prose_topics(split)))
    if corpus != "code":
        raise ValueError(f"corpus must be one of {CORPORA}, got {corpus!r}")
    modules = {"train": TRAIN_MODULES, "test": TEST_MODULES}[split]
    return encode("\n\n".join(module_source(name) for name in modules))
