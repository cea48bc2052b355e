"""engine.fileio: published files and directories, owner-tagged temporaries and their removal once
their process is gone, signals turned into a clean stop, progress lines for logs."""
import io
import os
import re
import signal
import stat
import subprocess
import sys
import time

import pytest

from engine.fileio import (Interrupted, atomic_open, make_parent_dirs, owner_tag, process_alive, progress_bar,
                           remove_empty_dirs, remove_stale_temporaries, replace_dir, signals_deferred,
                           signals_raise_interrupted, temporary_name, write_json_atomic, write_text_atomic)


def _tree(root):
    return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f)).read()
            for d, _, files in os.walk(root) for f in files}


def _make(path, files):
    path.mkdir()
    for name, text in files.items():
        (path / name).write_text(text)


def test_replace_dir_moves_into_a_missing_destination(tmp_path):
    _make(tmp_path / "staging", {"a.txt": "new"})
    replace_dir(tmp_path / "staging", tmp_path / "dest")
    assert _tree(tmp_path / "dest") == {"a.txt": "new"}
    assert sorted(os.listdir(tmp_path)) == ["dest"]


def test_replace_dir_replaces_an_existing_destination_whole(tmp_path):
    _make(tmp_path / "dest", {"a.txt": "old", "only_old.txt": "old"})
    _make(tmp_path / "staging", {"a.txt": "new"})
    replace_dir(tmp_path / "staging", tmp_path / "dest")
    assert _tree(tmp_path / "dest") == {"a.txt": "new"}  # no file of the old tree survives
    assert sorted(os.listdir(tmp_path)) == ["dest"]  # the old tree moved aside is gone too


# --------------------------------------------------------------------------- permissions


@pytest.fixture(params=[0o022, 0o002], ids=["umask022", "umask002"])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_published_files_get_the_permissions_of_the_umask(tmp_path, umask):
    write_json_atomic(tmp_path / "a.json", {"x": 1})
    write_text_atomic(tmp_path / "latest", "7\n")
    with atomic_open(tmp_path / "b.bin", "wb") as f:
        f.write(b"\x00")
    staging = tmp_path / "staging"
    staging.mkdir()
    write_json_atomic(staging / "meta.json", {})
    replace_dir(staging, tmp_path / "dir")
    with open(tmp_path / "plain.txt", "w") as f:  # what an ordinary new file gets
        f.write("x")
    expected = 0o666 & ~umask
    assert _mode(tmp_path / "plain.txt") == expected
    for name in ("a.json", "latest", "b.bin", "dir/meta.json"):
        assert _mode(tmp_path / name) == expected, name
    assert _mode(tmp_path / "dir") == 0o777 & ~umask


# --------------------------------------------------------------------------- temporaries and owners


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temporary_names_carry_pid_and_host():
    name = temporary_name("data", "partial", hidden=True)
    m = re.fullmatch(r"\.data\.partial-(\d+)-([A-Za-z0-9_-]+)", name)
    assert m and int(m.group(1)) == os.getpid() and m.group(2) == owner_tag().split("-", 1)[1]
    with pytest.raises(ValueError, match="temporary kind must be one of"):
        temporary_name("data", "scratch")


def test_process_alive_sees_running_dead_and_zombie_processes():
    assert process_alive(os.getpid()) and process_alive(os.getppid())
    assert not process_alive(_dead_pid())
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while open(f"/proc/{zombie.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert not process_alive(zombie.pid)  # exited, not yet reaped
    zombie.wait()


def test_stale_temporaries_of_dead_processes_are_removed_and_nothing_else(tmp_path):
    host = owner_tag().split("-", 1)[1]
    dead, live = _dead_pid(), os.getppid()
    stale = [f"data.tmp-{dead}-{host}.bin", f"data.tmp-{dead}-{host}.reward_mask.idx.tmp.{dead}.123",
             f".data.tmp-{dead}-{host}.x1y2", f".data.partial-{dead}-{host}", f".data.old-{dead}-{host}"]
    kept = [f"data.tmp-{live}-{host}.bin",            # its process still runs
            f"data.tmp-{dead}-otherhost.bin",          # another host's process cannot be checked here
            f"data.tmp-{os.getpid()}-{host}.bin",      # this process's own
            f"data_valid.tmp-{dead}-{host}.bin",       # another output's
            f"data.tmp-{dead}.bin", "data.bin", "data.tmp-notapid-x"]
    for name in stale + kept:
        if "partial" in name or "old" in name:
            (tmp_path / name).mkdir()
            (tmp_path / name / "model.safetensors").write_bytes(b"x")
        else:
            (tmp_path / name).write_bytes(b"x")
    removed = remove_stale_temporaries(tmp_path / "data")
    assert sorted(os.path.basename(p) for p in removed) == sorted(stale)
    assert sorted(os.listdir(tmp_path)) == sorted(kept)
    assert remove_stale_temporaries(tmp_path / "missing_dir" / "data") == []


def test_atomic_open_removes_what_a_killed_writer_left_and_its_own_temporary_on_error(tmp_path):
    host = owner_tag().split("-", 1)[1]
    litter = tmp_path / f".a.json.tmp-{_dead_pid()}-{host}.deadbeef"
    litter.write_text("{half")
    with pytest.raises(RuntimeError):
        with atomic_open(tmp_path / "a.json") as f:
            f.write("{")
            names = os.listdir(tmp_path)  # the stale one is gone; this writer's own carries its owner
            assert len(names) == 1 and names[0].startswith(f".a.json.tmp-{owner_tag()}."), names
            raise RuntimeError("stop")
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="mode must be 'w' or 'wb'"):
        with atomic_open(tmp_path / "a.json", "a"):
            pass


def test_parent_dirs_made_for_a_run_are_removed_only_while_empty(tmp_path):
    created = make_parent_dirs(tmp_path / "a" / "b" / "data")
    assert created == [str(tmp_path / "a" / "b"), str(tmp_path / "a")] and (tmp_path / "a" / "b").is_dir()
    assert make_parent_dirs(tmp_path / "a" / "b" / "other") == []
    (tmp_path / "a" / "keep.txt").write_text("x")
    remove_empty_dirs(created)
    assert sorted(os.listdir(tmp_path)) == ["a"] and os.listdir(tmp_path / "a") == ["keep.txt"]
    (tmp_path / "f").write_text("x")
    with pytest.raises(FileExistsError):
        make_parent_dirs(tmp_path / "f" / "data")


# --------------------------------------------------------------------------- signals


@pytest.mark.parametrize("signum,status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signals_raise_interrupted_once_then_let_cleanup_run(signum, status):
    before = signal.getsignal(signum)
    cleaned = []
    with pytest.raises(Interrupted) as info:
        with signals_raise_interrupted():
            try:
                os.kill(os.getpid(), signum)
                time.sleep(5)  # interrupted long before
                pytest.fail("the signal did not interrupt")
            finally:
                os.kill(os.getpid(), signum)  # a second signal does not cut the cleanup short
                time.sleep(0.05)
                cleaned.append(True)
    assert cleaned == [True]
    assert info.value.exit_status == status and info.value.signal_name == signal.Signals(signum).name
    assert isinstance(info.value, KeyboardInterrupt)
    assert signal.getsignal(signum) is before


def test_signals_deferred_hold_the_signal_until_the_block_ends():
    done = []
    with pytest.raises(Interrupted):
        with signals_raise_interrupted():
            with signals_deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
                done.append("first")
                done.append("second")
    assert done == ["first", "second"]
    with pytest.raises(KeyboardInterrupt):  # Python's own SIGINT handler, called afterwards
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            done.append("third")
    assert done[-1] == "third" and signal.getsignal(signal.SIGINT) is signal.default_int_handler


# --------------------------------------------------------------------------- progress


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_prints_lines_in_logs_and_redraws_on_a_terminal():
    log = io.StringIO()
    with progress_bar(stream=log, total=1000, desc="export") as bar:
        for _ in range(1000):
            bar.update(1)
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and log.getvalue().endswith("\n")
    assert len(lines) == 2 and lines[0].startswith("export:   0%") and lines[-1].startswith("export: 100%")
    terminal = _Terminal()
    with progress_bar(stream=terminal, total=3, desc="export", mininterval=0) as bar:
        for _ in range(3):
            bar.update(1)
    assert terminal.getvalue().count("\r") >= 3
