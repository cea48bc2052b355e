"""Atomic file writes: a reader sees the old file or the whole new one, never half of one.

Single files the engine publishes (checkpoints' JSON and `latest`, tokenizers, reward bins,
sample-index caches, synthetic logs, the demo summary, kernel benchmark results) go through here:
written under a temporary name in the same directory, flushed and fsynced, then renamed over the
destination. On any error the temporary file is removed. Whole directories (checkpoints, converted
HF directories) are built under a staging name and put in place by :func:`replace_dir`. Outputs that
must appear together (a preprocessed dataset's files, an indexed dataset's .bin and .idx) rename
their own temporaries in a fixed order instead.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """``with atomic_open(path) as f: f.write(...)``: the file appears at ``path`` only on success."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'w' or 'wb', not {mode!r}")
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename in ``directory`` durable (POSIX: the directory entry itself is synced)."""
    try:
        fd = os.open(os.fspath(directory), os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_dir(src: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Rename the finished directory ``src`` to ``dest``. An existing ``dest`` is renamed aside first
    and deleted after, so ``dest`` is never a mix of the old and the new contents."""
    src, dest = Path(src), Path(dest)
    if not dest.exists():
        os.replace(src, dest)
        return
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(dest, old)
    os.replace(src, dest)
    shutil.rmtree(old, ignore_errors=True)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    with atomic_open(path) as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path) as f:
        f.write(text)
