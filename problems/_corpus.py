"""Real text with no download: Python source code of pure-Python standard-library modules.

The corpus is read at run time from the running interpreter's standard library
(``importlib``'s loader ``get_source``, which also works for a zipped stdlib), so
it is available on every Python install but **depends on the Python version**:
metrics are comparable only between runs on the same Python. Training and test
text come from disjoint module lists.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
from torch import Tensor

__all__ = ["TRAIN_MODULES", "TEST_MODULES", "CHARS", "UNKNOWN", "encode", "decode", "load_split"]

TRAIN_MODULES = (
    "argparse", "calendar", "contextlib", "copy", "csv", "dataclasses", "difflib", "enum",
    "fractions", "functools", "heapq", "pprint", "shlex", "statistics", "string",
)
TEST_MODULES = ("textwrap", "bisect", "fnmatch", "glob", "queue")

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


@functools.lru_cache(maxsize=2)
def load_split(split: str) -> Tensor:
    """The ``"train"`` or ``"test"`` text, encoded (modules joined by blank lines)."""
    modules = {"train": TRAIN_MODULES, "test": TEST_MODULES}[split]
    return encode("\n\n".join(module_source(name) for name in modules))
