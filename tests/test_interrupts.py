"""Interrupted runs of tools/preprocess_data.py and tools/convert_hf.py, as separate processes.

SIGTERM and SIGINT arrive while the run's temporaries exist (at several delays, in both passes of
preprocessing and while a conversion's staging directory is being filled); the run must end with
128 + the signal number and one line on stderr, leave only what was there before (nothing, or an
earlier complete output), no temporary, no output directory it created, and no process. SIGKILL
leaves litter by nature: the next run of the same output must remove it. Processes are read from
/proc here, independently of engine.fileio.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.data.preprocess import PreprocessConfig, open_preprocessed, preprocess, read_records
from engine.data.reward_bins import RewardBins
from engine.data.synthetic import DOMAIN_REWARDS, SyntheticConfig, write_logs
from engine.data.tokenizer import train_tokenizer
from engine.data.sar import serialize_text

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads processes from /proc")

REPO = Path(__file__).resolve().parents[1]
PREPROCESS_TOOL = REPO / "tools" / "preprocess_data.py"
CONVERT_TOOL = REPO / "tools" / "convert_hf.py"
BIG_RECORDS = 100_000  # several seconds of work at 2 workers: every signal lands mid-run
TEMPORARY_MARKS = (".tmp-", ".tmp.", ".partial-", ".old-", ".saving")


# --------------------------------------------------------------------------- processes and files


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()  # [state, ppid, ...]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def children_of(pid: int) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None and int(fields[1]) == pid and fields[0] not in ("Z", "X"):
                found.add(int(entry))
    return found


def running(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def wait_for(condition, timeout: float, what: str, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the run ended (status {proc.returncode}) before {what}: "
                        f"{Path(proc.stderr_path).read_text()[-2000:]}")
        time.sleep(0.02)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def temporaries(root: Path) -> list[str]:
    return [os.path.join(d, n) for d, dirs, files in os.walk(root) for n in dirs + files
            if any(mark in n for mark in TEMPORARY_MARKS)]


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(root) for f in files}


def start(cmd: list[str], logs: Path) -> subprocess.Popen:
    logs.mkdir(exist_ok=True)
    n = len(list(logs.iterdir())) // 2
    out, err = logs / f"{n}.out", logs / f"{n}.err"
    with open(out, "w") as fo, open(err, "w") as fe:
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe)
    proc.stderr_path = str(err)
    return proc


def interrupt(proc: subprocess.Popen, signum: int) -> tuple[int, list[str]]:
    """Send ``signum`` to the running tool; its exit status and stderr lines."""
    assert proc.poll() is None, "the run finished before the signal: make the input larger"
    os.kill(proc.pid, signum)
    status = proc.wait(timeout=60)
    return status, Path(proc.stderr_path).read_text().splitlines()


def assert_no_process_left(workers: set[int], test_children: set[int]) -> None:
    wait_for(lambda: not any(running(p) for p in workers), 10, f"workers {sorted(workers)} to end")
    assert children_of(os.getpid()) <= test_children


def assert_interrupted(status: int, err: list[str], signum: int, tool: str) -> None:
    assert status == 128 + signum, err
    assert len(err) == 1 and err[0].startswith(tool) and signal.Signals(signum).name in err[0], err
    assert "Traceback" not in "\n".join(err)


# --------------------------------------------------------------------------- preprocessing


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    root = tmp_path_factory.mktemp("interrupts")
    write_logs(SyntheticConfig(seed=3, train_per_domain=60, valid_per_domain=0, test_per_domain=0,
                               domains=tuple(DOMAIN_REWARDS)), str(root / "syn"))
    lines = [line for path in sorted((root / "syn" / "train").iterdir())
             for line in path.read_text().splitlines(keepends=True)]
    with open(root / "big.jsonl", "w") as f:
        for _ in range(BIG_RECORDS // len(lines) + 1):
            f.writelines(lines)
    (root / "small.jsonl").write_text("".join(lines[:50]))
    records = list(read_records([str(root / "syn" / "train")]))
    bins = RewardBins.fit_records(records)
    bins.save(root / "bins.json")
    tok = train_tokenizer([serialize_text(r, bins.classify) for r in records], str(root / "tok.model"),
                          vocab_size=400)
    return {"root": root, "big": str(root / "big.jsonl"), "small": str(root / "small.jsonl"),
            "tok": tok.model_path, "bins": str(root / "bins.json")}


def preprocess_cmd(logs, inputs: str, prefix: Path, *extra: str) -> list[str]:
    return [sys.executable, str(PREPROCESS_TOOL), "--input", inputs, "--output-prefix", str(prefix),
            "--tokenizer-model", logs["tok"], "--workers", "2", "--chunk-size", "64", "--no-progress", *extra]


def previous_output(logs, prefix: Path) -> dict[str, bytes]:
    preprocess(PreprocessConfig(inputs=[logs["small"]], output_prefix=str(prefix), tokenizer_model=logs["tok"],
                                progress=False))
    return tree_bytes(prefix.parent)


@pytest.mark.parametrize("signum,delay,with_previous", [
    (signal.SIGTERM, 0.0, False),
    (signal.SIGTERM, 0.5, True),
    (signal.SIGTERM, 1.5, False),
    (signal.SIGINT, 0.3, True),
], ids=["TERM-at-once", "TERM-over-previous", "TERM-later", "INT-over-previous"])
def test_signal_while_writing_leaves_the_previous_output_only(logs, tmp_path, signum, delay, with_previous):
    test_children = children_of(os.getpid())
    prefix = tmp_path / "out" / "data"
    before = previous_output(logs, prefix) if with_previous else None
    proc = start(preprocess_cmd(logs, logs["big"], prefix, "--reward-bins", logs["bins"]), tmp_path / "logs")
    wait_for(lambda: prefix.parent.is_dir() and temporaries(prefix.parent), 60, "the temporaries", proc)
    workers = wait_for(lambda: len(children_of(proc.pid)) >= 2 and children_of(proc.pid), 60, "2 workers", proc)
    time.sleep(delay)
    status, err = interrupt(proc, signum)
    assert_interrupted(status, err, signum, "preprocess_data")
    if with_previous:
        assert tree_bytes(prefix.parent) == before
    else:
        assert not prefix.parent.exists()  # the directory the run made goes with it
    assert temporaries(tmp_path) == []
    assert_no_process_left(workers, test_children)


def test_signal_while_fitting_reward_bins(logs, tmp_path):
    test_children = children_of(os.getpid())
    prefix = tmp_path / "out" / "data"
    proc = start(preprocess_cmd(logs, logs["big"], prefix), tmp_path / "logs")  # two passes: fit, then encode
    workers = wait_for(lambda: len(children_of(proc.pid)) >= 2 and children_of(proc.pid), 60, "2 workers", proc)
    time.sleep(0.3)
    status, err = interrupt(proc, signal.SIGTERM)
    assert_interrupted(status, err, signal.SIGTERM, "preprocess_data")
    assert not prefix.parent.exists() and temporaries(tmp_path) == []
    assert_no_process_left(workers, test_children)


def test_killed_run_litter_is_removed_by_the_next_run(logs, tmp_path):
    test_children = children_of(os.getpid())
    prefix = tmp_path / "out" / "data"
    proc = start(preprocess_cmd(logs, logs["big"], prefix, "--reward-bins", logs["bins"]), tmp_path / "logs")
    wait_for(lambda: prefix.parent.is_dir() and temporaries(prefix.parent), 60, "the temporaries", proc)
    workers = wait_for(lambda: len(children_of(proc.pid)) >= 2 and children_of(proc.pid), 60, "2 workers", proc)
    time.sleep(0.3)
    status, _ = interrupt(proc, signal.SIGKILL)
    assert status == -signal.SIGKILL
    assert_no_process_left(workers, test_children)  # the workers die with their parent
    litter = temporaries(prefix.parent)
    assert any(f"tmp-{proc.pid}-" in name for name in litter), litter

    done = subprocess.run(preprocess_cmd(logs, logs["small"], prefix), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert temporaries(tmp_path) == []
    assert len(open_preprocessed(str(prefix)).tokens) == 50


# --------------------------------------------------------------------------- conversion


SLOW_WRITES = """\
import runpy, sys, time
from engine import safetensors_io

def slowed(real):
    def write(self, *args, **kwargs):
        time.sleep(0.05)
        return real(self, *args, **kwargs)
    return write

for name in ("write", "write_rows"):
    setattr(safetensors_io.SafetensorsWriter, name, slowed(getattr(safetensors_io.SafetensorsWriter, name)))
sys.argv = [{tool!r}] + sys.argv[1:]
runpy.run_path({tool!r}, run_name="__main__")
"""


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from test_convert_hf import make_hf_dir

    root = tmp_path_factory.mktemp("convert")
    hf_dir = make_hf_dir(root / "hf", "gqa")
    slow_tool = root / "convert_hf_slow_writes.py"
    slow_tool.write_text(SLOW_WRITES.format(tool=str(CONVERT_TOOL)))
    return {"hf": hf_dir, "slow": [sys.executable, str(slow_tool)], "fast": [sys.executable, str(CONVERT_TOOL)]}


def staging_dirs(root: Path) -> list[str]:
    return [p.name for p in root.iterdir() if ".partial-" in p.name]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_signal_during_import_leaves_nothing(model, tmp_path, signum):
    test_children = children_of(os.getpid())
    save = tmp_path / "ckpts" / "ck"
    proc = start(model["slow"] + ["import", "--hf-dir", str(model["hf"]), "--save", str(save), "--tp", "2",
                                  "--no-progress"], tmp_path / "logs")
    wait_for(lambda: save.parent.is_dir() and staging_dirs(save.parent), 120, "the staging directory", proc)
    time.sleep(0.5)
    status, err = interrupt(proc, signum)
    assert_interrupted(status, err, signum, "convert_hf import")
    assert not save.parent.exists()  # neither the checkpoint nor the directory made for it
    assert temporaries(tmp_path) == []
    assert children_of(os.getpid()) <= test_children


def test_signal_during_export_keeps_the_earlier_export(model, tmp_path):
    from engine.convert.sharded import export_hf, import_hf

    ck, out = tmp_path / "ck", tmp_path / "out"
    import_hf(model["hf"], ck, tp=2, pp=2, progress=False)
    export_hf(ck, out, progress=False)
    before = tree_bytes(out)
    proc = start(model["slow"] + ["export", "--load", str(ck), "--hf-dir", str(out), "--force", "--dtype", "bf16",
                                  "--no-progress"], tmp_path / "logs")
    wait_for(lambda: staging_dirs(tmp_path), 120, "the staging directory", proc)
    time.sleep(0.3)
    status, err = interrupt(proc, signal.SIGTERM)
    assert_interrupted(status, err, signal.SIGTERM, "convert_hf export")
    assert tree_bytes(out) == before
    assert temporaries(tmp_path) == []


def test_killed_conversion_staging_is_removed_by_the_next_one(model, tmp_path):
    save = tmp_path / "ck"
    proc = start(model["slow"] + ["import", "--hf-dir", str(model["hf"]), "--save", str(save), "--tp", "2",
                                  "--no-progress"], tmp_path / "logs")
    wait_for(lambda: staging_dirs(tmp_path), 120, "the staging directory", proc)
    time.sleep(0.3)
    status, _ = interrupt(proc, signal.SIGKILL)
    assert status == -signal.SIGKILL
    assert [n for n in staging_dirs(tmp_path) if f".partial-{proc.pid}-" in n]
    done = subprocess.run(model["fast"] + ["import", "--hf-dir", str(model["hf"]), "--save", str(save),
                                           "--tp", "2", "--no-progress"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "TP=2 x PP=1" in done.stdout
    assert temporaries(tmp_path) == []
