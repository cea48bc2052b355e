"""Fuzzing the C++ reader with thousands of corrupted .idx/.bin pairs.

Each pair must either raise IndexedDatasetError (naming the file) or open as a dataset whose every
read stays in bounds and equals what the plain-Python spec reader sees; the two must agree on which
files are valid. The loop runs in a subprocess so that a crash fails the test instead of pytest.
"""
import json
import os
import struct
import subprocess
import sys

import numpy as np

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)
ITERATIONS = 10000


def test_corrupted_files_never_crash_and_agree_with_spec(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, TESTS_DIR, env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-X", "faulthandler", os.path.abspath(__file__), str(tmp_path), str(ITERATIONS)],
        capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, (
        f"fuzz worker exited with {proc.returncode} (negative: killed by that signal)\n"
        f"stdout tail: {proc.stdout[-2000:]}\nstderr tail: {proc.stderr[-4000:]}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["disagreements"] == [], summary["disagreements"][:10]
    assert summary["iterations"] == ITERATIONS
    # Both outcomes must be well represented, or the fuzzer is not testing much.
    assert summary["rejected"] > ITERATIONS // 3 and summary["accepted"] > ITERATIONS // 10, summary
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------ the worker (subprocess)

U64_EXTREMES = [0, 1, 2, 2 ** 31, 2 ** 32, 2 ** 62, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1, 2 ** 64 - 2]
ARRAY_EXTREMES = [0, 1, -1, 2, -(2 ** 31), 2 ** 31 - 1, 2 ** 40, -(2 ** 63), 2 ** 63 - 1]


def make_bases(rng, ref):
    """Valid datasets of several dtypes and shapes, as (idx bytes, bin bytes)."""
    bases = []
    for dtype, num_documents in [(np.uint16, 6), (np.int32, 4), (np.uint8, 3), (np.int64, 5),
                                 (np.float32, 3), (np.int16, 8), (np.uint16, 0), (np.float64, 2)]:
        documents = []
        for _ in range(num_documents):
            sequences = [rng.integers(0, 100, size=int(rng.integers(0, 9))) for _ in range(rng.integers(0, 4))]
            documents.append(sequences)
        lengths = [len(s) for d in documents for s in d]
        doc_indices = np.cumsum([0] + [len(d) for d in documents])
        tokens = [np.asarray(s, dtype=dtype) for d in documents for s in d]
        bin_data = b"".join(t.astype(np.dtype(dtype).newbyteorder("<")).tobytes() for t in tokens)
        bases.append((ref.index_bytes(dtype, lengths, doc_indices), bin_data))
    return bases


def mutate(rng, idx: bytes, bin_data: bytes):
    idx, bin_data = bytearray(idx), bytearray(bin_data)
    # Sequence count as far as the bytes can back it, so array edits land inside the file.
    n = struct.unpack_from("<Q", idx, 18)[0] if len(idx) >= 26 else 0
    n = min(n, max(0, (len(idx) - 34) // 12))
    kind = int(rng.integers(0, 11))
    if kind == 0 and idx:  # random byte changes in the index
        for _ in range(rng.integers(1, 6)):
            idx[int(rng.integers(0, len(idx)))] = int(rng.integers(0, 256))
    elif kind == 1 and bin_data:  # token bytes: any content is a valid dataset
        for _ in range(rng.integers(1, 6)):
            bin_data[int(rng.integers(0, len(bin_data)))] = int(rng.integers(0, 256))
    elif kind == 2:
        del idx[int(rng.integers(0, len(idx) + 1)):]
    elif kind == 3:
        del bin_data[int(rng.integers(0, len(bin_data) + 1)):]
    elif kind == 4:
        idx += rng.bytes(int(rng.integers(1, 40)))
    elif kind == 5:
        bin_data += rng.bytes(int(rng.integers(1, 40)))
    elif kind == 6 and len(idx) >= 34:  # header fields: version, dtype, N, D
        field = int(rng.integers(0, 4))
        if field == 1:
            idx[17] = int(rng.integers(0, 256))
        else:
            offset = {0: 9, 2: 18, 3: 26}[field]
            old = struct.unpack_from("<Q", idx, offset)[0]
            choices = U64_EXTREMES + [old + 1, old - 1 if old else 0, old * 2, int(rng.integers(0, 2 ** 63))]
            struct.pack_into("<Q", idx, offset, choices[int(rng.integers(0, len(choices)))] % 2 ** 64)
    elif kind == 7 and n:  # one array element: length, pointer or document index
        region = int(rng.integers(0, 3))
        if region == 0:
            offset, fmt = 34 + 4 * int(rng.integers(0, n)), "<i"
        elif region == 1:
            offset, fmt = 34 + 4 * n + 8 * int(rng.integers(0, n)), "<q"
        else:
            d = (len(idx) - 34 - 12 * n) // 8
            offset, fmt = 34 + 12 * n + 8 * int(rng.integers(0, max(d, 1))), "<q"
        if offset + struct.calcsize(fmt) <= len(idx):
            old = struct.unpack_from(fmt, idx, offset)[0]
            bits = 8 * struct.calcsize(fmt) - 1
            choices = [v for v in ARRAY_EXTREMES + [old + 1, old - 1] if -(2 ** bits) <= v < 2 ** bits]
            struct.pack_into(fmt, idx, offset, choices[int(rng.integers(0, len(choices)))])
    elif kind == 8 and n >= 2:  # swapped array regions: lengths <-> doc indices or pointers reversed
        lengths = idx[34:34 + 4 * n]
        pointers = idx[34 + 4 * n:34 + 12 * n]
        if rng.integers(0, 2):
            swapped = pointers[::-1]
            idx[34 + 4 * n:34 + 12 * n] = swapped
        else:
            tail = idx[34 + 12 * n:]
            k = min(len(lengths), len(tail))
            idx[34:34 + k], idx[34 + 12 * n:34 + 12 * n + k] = tail[:k], lengths[:k]
    elif kind == 9 and n >= 2:  # move one token across a sequence boundary, consistently
        i = int(rng.integers(0, n - 1))
        itemsize = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 4, 8: 2}.get(idx[17], 1)
        a, b = struct.unpack_from("<ii", idx, 34 + 4 * i)
        struct.pack_into("<ii", idx, 34 + 4 * i, a + 1, b - 1)
        p = struct.unpack_from("<q", idx, 34 + 4 * n + 8 * (i + 1))[0]
        struct.pack_into("<q", idx, 34 + 4 * n + 8 * (i + 1), p + itemsize)
    elif kind == 10:  # empty files
        if rng.integers(0, 2):
            idx = bytearray()
        else:
            bin_data = bytearray()
    return bytes(idx), bytes(bin_data)


def check_accepted(ds, expected, rng):
    """Every access of an accepted dataset must match the spec reader and stay in bounds."""
    dtype, lengths, pointers, doc_indices, sequences = expected
    problems = []
    if ds.dtype != dtype or len(ds) != len(lengths):
        return [f"header mismatch: {ds.dtype} {len(ds)} vs {dtype} {len(lengths)}"]
    for name, ours, theirs in [("lengths", ds.sequence_lengths, lengths), ("pointers", ds.sequence_pointers, pointers),
                               ("documents", ds.document_indices, doc_indices)]:
        if not np.array_equal(ours, theirs):
            problems.append(f"{name} differ")
    for i, sequence in enumerate(sequences):
        if ds[i].tobytes() != sequence.tobytes():  # bytes: flipped floats may be NaN
            problems.append(f"sequence {i} differs")
    for _ in range(8):
        i = int(rng.integers(-len(ds) - 2, len(ds) + 2)) if len(ds) else int(rng.integers(-2, 3))
        offset, length = int(rng.integers(-2, 12)), int(rng.integers(-2, 12))
        valid_i = -len(ds) <= i < len(ds)
        full = sequences[i].tobytes() if valid_i else b""
        size = len(sequences[i]) if valid_i else 0
        in_bounds = valid_i and 0 <= offset <= size and 0 <= length <= size - offset
        try:
            part = ds.get(i, offset, length)
            if not in_bounds:
                problems.append(f"get({i}, {offset}, {length}) out of bounds did not raise")
            elif part.tobytes() != full[offset * dtype.itemsize:(offset + length) * dtype.itemsize]:
                problems.append(f"get({i}, {offset}, {length}) differs")
        except IndexError:
            if in_bounds:
                problems.append(f"get({i}, {offset}, {length}) raised in bounds")
    return problems


def run_worker(directory: str, iterations: int) -> dict:
    import indexed_reference as ref
    from engine.data.indexed import IndexedDataset, IndexedDatasetError

    rng = np.random.default_rng(20261124)
    bases = make_bases(rng, ref)
    summary = {"iterations": 0, "rejected": 0, "accepted": 0, "disagreements": []}
    for iteration in range(iterations):
        idx, bin_data = bases[int(rng.integers(0, len(bases)))]
        for _ in range(int(rng.integers(1, 3))):
            idx, bin_data = mutate(rng, idx, bin_data)
        prefix = os.path.join(directory, f"case{iteration}")
        with open(prefix + ".idx", "wb") as f:
            f.write(idx)
        with open(prefix + ".bin", "wb") as f:
            f.write(bin_data)
        try:
            expected = ref.parse(idx, bin_data)
        except ref.InvalidDataset as reason:
            expected, spec_reason = None, str(reason)
        problems = []
        try:
            ds = IndexedDataset(prefix)
        except IndexedDatasetError as error:
            summary["rejected"] += 1
            if expected is not None:
                problems.append(f"rejected a valid file: {error}")
            if prefix not in str(error):
                problems.append(f"error does not name the file: {error}")
        except Exception as error:  # noqa: BLE001 - any other type is a finding
            problems.append(f"unexpected {type(error).__name__}: {error}")
        else:
            summary["accepted"] += 1
            if expected is None:
                problems.append(f"accepted a file the spec rejects ({spec_reason})")
            else:
                problems.extend(check_accepted(ds, expected, rng))
            del ds
        if problems:
            summary["disagreements"].append({"iteration": iteration, "problems": problems[:3],
                                             "idx": idx.hex()[:400], "bin_len": len(bin_data)})
        os.remove(prefix + ".idx")
        os.remove(prefix + ".bin")
        summary["iterations"] += 1
    return summary


if __name__ == "__main__":
    print(json.dumps(run_worker(sys.argv[1], int(sys.argv[2]))))
