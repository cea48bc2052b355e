"""Streamed safetensors reading and writing, and the JSON form of training states.

Files written here are read back with the safetensors library and files the library wrote are read
here (golden format = the library's); states round-trip through real JSON text and the restored RNG
states must reproduce the same random streams.
"""
import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import safetensors_io as sio


def test_streamed_safetensors_file_is_read_by_the_library_and_reads_library_files(tmp_path):
    tensors = {"b": torch.randn(3, 5).to(torch.bfloat16), "a": torch.arange(7, dtype=torch.int64),
               "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3), "mask": torch.tensor([True, False]),
               "half": torch.randn(4).half()}
    specs = {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    path = tmp_path / "x.safetensors"
    with sio.SafetensorsWriter(path, specs, {"format": "pt"}) as w:
        for k in reversed(list(tensors)):  # any order
            w.write(k, tensors[k])
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert header_len % 8 == 0 and json.loads(raw[8:8 + header_len])["__metadata__"] == {"format": "pt"}
    back = load_file(path)
    assert set(back) == set(tensors) and all(torch.equal(back[k], v) for k, v in tensors.items())

    lib_path = tmp_path / "lib.safetensors"
    save_file(tensors, lib_path)
    infos, _ = sio.read_header(lib_path)
    for k, v in tensors.items():
        got = sio.read_tensor(lib_path, infos[k])
        assert got.dtype == v.dtype and torch.equal(got, v)


def test_read_rows_reads_a_slice_of_dimension_0_of_a_library_file(tmp_path):
    tensors = {"first": torch.randn(3, 2), "m": torch.randn(7, 3, 2).to(torch.bfloat16), "v": torch.arange(9)}
    path = tmp_path / "lib.safetensors"
    save_file(tensors, path)
    infos, _ = sio.read_header(path)
    for name, full in tensors.items():
        for start, stop in ((0, full.shape[0]), (1, 3), (2, 2), (full.shape[0] - 1, full.shape[0])):
            got = sio.read_rows(path, infos[name], start, stop)
            assert got.dtype == full.dtype and torch.equal(got, full[start:stop]), (name, start, stop)
    with pytest.raises(ValueError, match=r"lib.safetensors: rows 5:8 outside a tensor of shape \[7, 3, 2\]"):
        sio.read_rows(path, infos["m"], 5, 8)
    with pytest.raises(ValueError, match=r"rows 2:1 outside"):
        sio.read_rows(path, infos["v"], 2, 1)


def test_writer_fills_a_tensor_by_row_blocks_in_any_order(tmp_path):
    m, v = torch.randn(7, 3).to(torch.bfloat16), torch.arange(5)
    path = tmp_path / "rows.safetensors"
    with sio.SafetensorsWriter(path, {"v": (v.dtype, (5,)), "m": (m.dtype, (7, 3))}) as w:
        w.write_rows("m", 4, m[4:])
        w.write("v", v)
        w.write_rows("m", 0, m[:2])
        w.write_rows("m", 2, m[2:4])
    back = load_file(path)
    assert torch.equal(back["m"], m) and torch.equal(back["v"], v)

    with pytest.raises(ValueError, match=r"rows 1:3 of tensor 'm' written twice"):
        with sio.SafetensorsWriter(path, {"m": (m.dtype, (7, 3))}) as w:
            w.write_rows("m", 0, m[:2])
            w.write_rows("m", 1, m[1:3])
    assert not path.exists()
    with pytest.raises(ValueError, match=r"rows 6:8 of tensor 'm' given as torch.bfloat16\[2, 3\], declared"):
        with sio.SafetensorsWriter(path, {"m": (m.dtype, (7, 3))}) as w:
            w.write_rows("m", 6, m[:2])
    with pytest.raises(ValueError, match=r"given as torch.float32\[2, 3\]"):
        with sio.SafetensorsWriter(path, {"m": (m.dtype, (7, 3))}) as w:
            w.write_rows("m", 0, m[:2].float())
    with pytest.raises(ValueError, match=r"never written: \['m'\]"):
        with sio.SafetensorsWriter(path, {"m": (m.dtype, (7, 3))}) as w:
            w.write_rows("m", 0, m[:6])
    assert not path.exists()


def test_streamed_writer_refuses_bad_tensors_and_removes_incomplete_files(tmp_path):
    path = tmp_path / "x.safetensors"
    specs = {"w": (torch.float32, (2, 2)), "v": (torch.float32, (3,))}
    with pytest.raises(ValueError, match=r"'w' is torch.float32\[2, 3\], declared torch.float32\[2, 2\]"):
        with sio.SafetensorsWriter(path, specs) as w:
            w.write("w", torch.zeros(2, 3))
    assert not path.exists()
    with pytest.raises(ValueError, match="'z' was not declared"):
        with sio.SafetensorsWriter(path, specs) as w:
            w.write("z", torch.zeros(3))
    with pytest.raises(ValueError, match=r"never written: \['v'\]"):
        with sio.SafetensorsWriter(path, specs) as w:
            w.write("w", torch.zeros(2, 2))
    assert not path.exists()


def test_truncated_or_garbage_safetensors_is_refused_by_name(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file({"w": torch.randn(100)}, good)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"cut.safetensors: tensor 'w': offsets"):
        sio.read_header(cut)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"hello world, not a tensor file")
    with pytest.raises(ValueError, match="junk.safetensors: not a safetensors file"):
        sio.read_header(junk)


def test_state_encoding_round_trips_rng_states_and_nested_structures():
    torch.manual_seed(3)
    random.seed(4)
    np.random.seed(5)
    state = {"rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
             "consumed_samples": 1234, "loader": {"epoch": 2, "position": (7, 9)}, "by_id": {0: 1.5, 3: [1, "x"]},
             "__odd": None}
    decoded = sio.decode_state(json.loads(json.dumps(sio.encode_state(state))))
    assert decoded["consumed_samples"] == 1234 and decoded["loader"] == {"epoch": 2, "position": (7, 9)}
    assert decoded["by_id"] == {0: 1.5, 3: [1, "x"]} and decoded["__odd"] is None
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.set_rng_state(decoded["rng"]["torch"])
    random.setstate(decoded["rng"]["python"])
    np.random.set_state(decoded["rng"]["numpy"])
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    assert np.random.rand() == expected[2]


def test_header_problems_name_missing_unexpected_misshaped_and_dtype_changes(tmp_path):
    path = tmp_path / "rank1.safetensors"
    save_file({"a": torch.zeros(2, 3), "b": torch.zeros(4).half(), "extra": torch.zeros(1)}, path)
    first = {"b": sio.TensorInfo(torch.float32, (4,), 0, 16)}  # the same file on TP rank 0
    header, _ = sio.read_header(path)
    problems = sio.header_problems("rank1", header, {"a": (3, 2), "b": (4,), "c": (5,)}, first)
    assert problems == ["rank1: missing tensor(s) ['c']", "rank1: unexpected tensor(s) ['extra']",
                        "rank1: mis-shaped tensor(s) ['a (2, 3) (expected (3, 2))', "
                        "'b is torch.float16 but torch.float32 on TP rank 0']"]
    assert sio.header_problems("rank1", header, {n: i.shape for n, i in header.items()}, {}) == []
