"""Atomic file writes: a file is replaced whole or left as it was, never half written.

Every file the package writes (checkpoints, histories, results, summaries, Optuna
tables) goes through :func:`replacing`: the content goes to a temporary file next
to the target (named with the process id, so concurrent writers do not collide),
which then replaces the target with ``os.replace``. A failed write (a full disk,
...) removes the temporary file, keeps the previous target and raises one
``OSError`` naming the target.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["replacing", "atomic_write_text", "atomic_save", "atomic_to_csv"]


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path`` atomically.

    Raises:
        OSError: the write or the replace failed; its message names ``path`` and
            says that the previous file, if any, is kept (the temporary file is gone).
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise OSError(exc.errno, f"could not write {path} ({reason}); "
                                 f"the previous file, if any, is kept") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(text: str, path: str | Path) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`replacing`)."""
    with replacing(path) as tmp:
        tmp.write_text(text)


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)`` atomically (see :func:`replacing`)."""
    import torch

    with replacing(path) as tmp:
        torch.save(obj, tmp)


def atomic_to_csv(frame: Any, path: str | Path) -> None:
    """``frame.to_csv(path, index=False)`` (a pandas DataFrame) atomically."""
    with replacing(path) as tmp:
        frame.to_csv(tmp, index=False)
