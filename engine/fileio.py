"""Files the engine publishes, and runs that stop cleanly: a reader sees the old output or the whole
new one, never half of one, and an interrupted run leaves nothing behind.

Single files (checkpoints' JSON and `latest`, tokenizers, reward bins, sample-index caches, synthetic
logs, the demo summary, kernel benchmark results) go through :func:`atomic_open`: written under a
temporary name in the same directory, flushed and fsynced, then renamed over the destination. On
any error the temporary file is removed. Whole directories (checkpoints, converted HF directories)
are built under a staging name and put in place by :func:`replace_dir`. Outputs that must appear
together (a preprocessed dataset's files, an indexed dataset's .bin and .idx) rename their own
temporaries in a fixed order instead.

Temporary names carry their owner, ``<name>.<kind>-<pid>-<host>``: a process killed outright
(SIGKILL, power loss) cannot remove its temporaries, so the next run writing the same output removes
those whose process no longer runs on this host (:func:`remove_stale_temporaries`). Published files
get the permissions the umask gives any new file (``0o666 & ~umask``), not a private temporary's 0600.

Tools run their work inside :func:`signals_raise_interrupted`, so that SIGINT and SIGTERM unwind
through the same cleanup as an error, and show progress with :func:`progress_bar`.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import IO, Any, Iterator

TEMPORARY_KINDS = ("tmp", "partial", "old")
_OWNER_RE = re.compile(r"(\d+)-([A-Za-z0-9_-]+)(?:\.|$)")
_HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
PROGRESS_LOG_INTERVAL_S = 30.0  # seconds between progress lines when stderr is a file or a pipe


# --------------------------------------------------------------------------- temporaries and owners


def _host_tag() -> str:
    """This host's name as it appears in temporary names (no dots: they end the owner tag)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:32] or "host"


def owner_tag() -> str:
    """``<pid>-<host>`` of this process, put in temporary names so later runs can tell stale ones."""
    return f"{os.getpid()}-{_host_tag()}"


def temporary_name(name: str, kind: str = "tmp", hidden: bool = False) -> str:
    """``name.<kind>-<pid>-<host>`` (with a leading dot when ``hidden``): a name this process owns."""
    if kind not in TEMPORARY_KINDS:
        raise ValueError(f"temporary kind must be one of {TEMPORARY_KINDS}, not {kind!r}")
    return f"{'.' if hidden else ''}{name}.{kind}-{owner_tag()}"


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (a zombie, dead but not yet reaped, does not)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc: os.kill said it exists
    return state not in (b"Z", b"X")


def _stale_owner(rest: str) -> bool:
    """``rest`` starts with an owner tag of a process of this host that no longer runs."""
    m = _OWNER_RE.match(rest)
    if m is None or m.group(2) != _host_tag():
        return False  # not one of our names, or another host's: it cannot be checked from here
    pid = int(m.group(1))
    return pid != os.getpid() and not process_alive(pid)


def remove_stale_temporaries(path: str | os.PathLike) -> list[str]:
    """Remove what dead processes of this host left while writing ``path``: the files and directories
    beside it named ``[.]<name>.<kind>-<pid>-<host>...``. Returns the removed paths."""
    path = os.fspath(path)
    directory, name = os.path.split(os.path.abspath(path))
    starts = [f"{dot}{name}.{kind}-" for dot in ("", ".") for kind in TEMPORARY_KINDS]
    removed = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return removed
    for entry in entries:
        start = next((s for s in starts if entry.name.startswith(s)), None)
        if start is None or not _stale_owner(entry.name[len(start):]):
            continue
        with contextlib.suppress(FileNotFoundError):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(entry.path)
    return removed


def _create_exclusive(prefix: str) -> tuple[int, str]:
    """Open a new file ``prefix.<random>`` (mode 0o666 & ~umask, as ``open`` would)."""
    while True:
        name = f"{prefix}.{secrets.token_hex(4)}"
        try:
            return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666), name
        except FileExistsError:
            continue


# --------------------------------------------------------------------------- publishing


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """``with atomic_open(path) as f: f.write(...)``: the file appears at ``path`` only on success."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'w' or 'wb', not {mode!r}")
    path = os.fspath(path)
    directory, name = os.path.split(path)
    remove_stale_temporaries(path)
    fd, tmp = _create_exclusive(os.path.join(directory, temporary_name(name, hidden=True)))
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        with signals_deferred():
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
    remove_stale_temporaries(dest)
    if not dest.exists():
        os.replace(src, dest)
        return
    old = dest.with_name(temporary_name(dest.name, "old", hidden=True))
    shutil.rmtree(old, ignore_errors=True)
    with signals_deferred():  # an interrupt between the renames would leave no dest at all
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


def make_parent_dirs(path: str | os.PathLike) -> list[str]:
    """Create the missing directories above ``path``; returns them, deepest first, for
    :func:`remove_empty_dirs` to undo after a failed run."""
    created = []
    parent = os.path.dirname(os.path.abspath(os.fspath(path)))
    while not os.path.isdir(parent):
        created.append(parent)
        parent = os.path.dirname(parent)
    for directory in reversed(created):
        try:
            os.mkdir(directory)
        except FileExistsError:  # another process made it meanwhile, or a file is in the way
            if not os.path.isdir(directory):
                raise
    return created


def remove_empty_dirs(directories: list[str]) -> None:
    """Remove each directory (deepest first) while it is empty; stops at the first that is not."""
    for directory in directories:
        try:
            os.rmdir(directory)
        except OSError:
            return


# --------------------------------------------------------------------------- signals


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived: raised in the main thread so cleanup code unwinds as for an error."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_status(self) -> int:
        """The shell's convention: 128 + the signal number (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + self.signum


class _RaiseOnce:
    """Signal handler: the first signal raises Interrupted, later ones are ignored (cleanup runs)."""

    def __init__(self):
        self.received: int | None = None

    def __call__(self, signum, frame):
        if self.received is None:
            self.received = signum
            raise Interrupted(signum)


@contextlib.contextmanager
def signals_raise_interrupted() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise :class:`Interrupted` in the main thread (once: a
    second signal does not cut the cleanup short). Elsewhere than the main thread it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handler = _RaiseOnce()
    previous = {s: signal.signal(s, handler) for s in _HANDLED_SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, signal.SIG_DFL if h is None else h)  # None: a handler set outside Python


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM for the block (a few renames that must happen together), then act on
    one that arrived as the handler in place before would have. Only the main thread gets signals'
    Python handlers, so elsewhere the block runs as is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    # A handler installed outside Python (getsignal says None) cannot be put back: leave it alone.
    held = [s for s in _HANDLED_SIGNALS if signal.getsignal(s) is not None]
    previous = {s: signal.signal(s, lambda signum, frame: arrived.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if arrived:
            _deliver(arrived[0], previous[arrived[0]])


def _deliver(signum: int, handler: Any) -> None:
    if callable(handler):
        handler(signum, sys._getframe(1))
    elif handler == signal.SIG_DFL:
        os.kill(os.getpid(), signum)  # the default action (terminate), now that the handler is back


# --------------------------------------------------------------------------- progress


class _LineWriter:
    """A stream for tqdm that turns its carriage-return redraws into whole lines (for logs)."""

    def __init__(self, stream: IO):
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")
            self.stream.flush()

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(stream: IO | None = None, **tqdm_kwargs):
    """A tqdm bar on ``stream`` (stderr): redrawn in place on a terminal; elsewhere (CI logs, ``2>
    file``) one line at the start, one every PROGRESS_LOG_INTERVAL_S seconds and one at the end."""
    from tqdm import tqdm

    stream = sys.stderr if stream is None else stream
    if hasattr(stream, "isatty") and stream.isatty():
        return tqdm(file=stream, dynamic_ncols=True, **tqdm_kwargs)
    return tqdm(file=_LineWriter(stream), ncols=100, ascii=True, mininterval=PROGRESS_LOG_INTERVAL_S,
                maxinterval=PROGRESS_LOG_INTERVAL_S, **tqdm_kwargs)
