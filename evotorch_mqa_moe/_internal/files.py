"""Atomic file writes: a file is replaced whole or left as it was, never half written.

Every file the package writes (checkpoints, histories, results, summaries, Optuna
tables) goes through :func:`replacing`: the content goes to a temporary file next
to the target (named with the process id, so concurrent writers do not collide),
which then replaces the target with ``os.replace``. A failed write (a full disk,
...) removes the temporary file, keeps the previous target and raises one
``OSError`` naming the target. A writer killed mid-write (SIGKILL, power loss)
leaves its temporary file behind; :func:`remove_stale_temporaries` removes those of
dead processes when the run starts again.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["replacing", "atomic_write_text", "atomic_save", "atomic_to_csv",
           "remove_stale_temporaries", "pid_alive"]


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # a process we may not signal: leave its files alone
    return True


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete ``folder``'s ``NAME.PID.tmp`` files (see :func:`replacing`) whose process is
    gone; returns the paths removed."""
    removed = []
    for tmp in Path(folder).glob("*.*.tmp"):
        pid = tmp.name[:-len(".tmp")].rsplit(".", 1)[-1]
        # ours too: nothing of this process is being written while a run starts
        if (pid.isdigit() and tmp.is_file()
                and (int(pid) == os.getpid() or not pid_alive(int(pid)))):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


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
        try:
            torch.save(obj, tmp)
        except RuntimeError as exc:  # a full disk: "PytorchStreamWriter failed ... pos"
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise OSError(errno.EIO, f"torch.save failed (disk full?): {first[:120]}") from None


def atomic_to_csv(frame: Any, path: str | Path) -> None:
    """``frame.to_csv(path, index=False)`` (a pandas DataFrame) atomically."""
    with replacing(path) as tmp:
        frame.to_csv(tmp, index=False)
