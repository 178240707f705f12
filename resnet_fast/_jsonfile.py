"""JSON tables on disk that the library reads and (for caches) writes: the Triton config table
shipped with the package and the per-machine autotuning cache.

Reading never fails a forward: a missing file is an empty table, and an unreadable or corrupt
one (bad JSON, not an object) is an empty table with one :class:`TableWarning` per path and
reason, so the caller falls back to its heuristic. Writing is atomic (a temporary file in the
same directory, then ``os.replace``) and merges under an exclusive lock on a ``.lock`` file
beside the table, so concurrent writers, threads or processes, never lose each other's entries
and a reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
import warnings
from typing import Any, Callable, Iterator

try:
    import fcntl
except ImportError:  # Windows: the in-process lock only
    fcntl = None


class TableWarning(UserWarning):
    """A JSON table could not be read; its entries are ignored."""


_warned: set[tuple[str, str]] = set()
_thread_lock = threading.Lock()


def _warn_once(path: str, what: str, reason: str) -> None:
    if (path, reason) in _warned:
        return
    _warned.add((path, reason))
    warnings.warn(f"ignoring {what} {path}: {reason}", TableWarning, stacklevel=3)


def read(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """The JSON object stored at ``path``; ``{}`` if the file does not exist, or (with one
    warning naming ``what`` and the reason) if it cannot be read or is not a JSON object."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        # RecursionError: valid JSON nested deeper than the parser's recursion limit.
        _warn_once(path, what, f"{type(exc).__name__}: {exc}")
        return {}
    if not isinstance(data, dict):
        _warn_once(path, what, f"expected a JSON object, got {type(data).__name__}")
        return {}
    return data


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    with _thread_lock, open(path + ".lock", "a") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_UN)


def update(path: str | os.PathLike, what: str,
           change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Apply ``change`` to the table at ``path`` (read under the lock, so entries another
    writer stored meanwhile are kept) and store it atomically; returns the stored table.
    A corrupt table is replaced (after its warning)."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with _locked(path):
        table = read(path, what)
        change(table)
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".",
                                   dir=os.path.dirname(path) or ".")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(table, f, indent=1, sort_keys=True)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    return table
