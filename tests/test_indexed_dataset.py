"""The C++ MMIDIDX dataset: golden bytes, round trips, spec reader/writer agreement, validation,
builder durability and the Python face's contract."""
import gc
import os
import pickle
import struct

import numpy as np
import pytest
import torch

import indexed_reference as ref
from engine.data.indexed import (DTYPE_CODES, IndexedDataset, IndexedDatasetBuilder, IndexedDatasetError,
                                 best_dtype)

# The golden example of docs/design.md: documents [5, 6, 7] and [8, 9] as uint16.
GOLDEN_IDX = bytes.fromhex(
    "4d4d49444944580000" "0100000000000000" "08" "0200000000000000" "0300000000000000"
    "03000000" "02000000" "0000000000000000" "0600000000000000"
    "0000000000000000" "0100000000000000" "0200000000000000")
GOLDEN_BIN = bytes.fromhex("0500" "0600" "0700" "0800" "0900")

ALL_DTYPES = [np.uint8, np.int8, np.int16, np.int32, np.int64, np.float64, np.float32, np.uint16]


def random_documents(rng, dtype, num_documents=12, max_sequences=4, max_length=40):
    """Documents of sequences spanning the dtype's whole range (including empty ones)."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        lo, hi = -(2 ** 20), 2 ** 20
    else:
        info = np.iinfo(dtype)
        lo, hi = int(info.min), int(info.max)
    documents = []
    for _ in range(num_documents):
        document = []
        for _ in range(rng.integers(0, max_sequences + 1)):
            length = int(rng.integers(0, max_length))
            values = rng.integers(lo, hi, size=length, endpoint=True, dtype=np.int64)
            if length >= 2:
                values[0], values[-1] = lo, hi  # the extremes must survive
            document.append(values.astype(dtype))
        documents.append(document)
    return documents


def build_with_add_item(prefix, documents, dtype):
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype)
    for document in documents:
        for sequence in document:
            builder.add_item(sequence)
        builder.end_document()
    builder.finalize(prefix + ".idx")


def file_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def assert_dataset_equals(ds, documents):
    sequences = [s for d in documents for s in d]
    assert len(ds) == len(sequences)
    for i, expected in enumerate(sequences):
        np.testing.assert_array_equal(ds[i], expected)
        assert ds[i].dtype == ds.dtype
    expected_doc = np.cumsum([0] + [len(d) for d in documents])
    np.testing.assert_array_equal(ds.document_indices, expected_doc)
    np.testing.assert_array_equal(ds.sequence_lengths, [len(s) for s in sequences])
    assert ds.num_tokens == sum(len(s) for s in sequences)


# ------------------------------------------------------------------ golden bytes

def test_builder_writes_design_golden_bytes(tmp_path):
    prefix = str(tmp_path / "golden")
    builder = IndexedDatasetBuilder(prefix + ".bin", np.uint16)
    builder.add_item([5, 6, 7])
    builder.end_document()
    builder.add_item(np.array([8, 9], dtype=np.int64))
    builder.end_document()
    builder.finalize(prefix + ".idx")
    assert len(GOLDEN_IDX) == 82
    assert file_bytes(prefix + ".idx") == GOLDEN_IDX
    assert file_bytes(prefix + ".bin") == GOLDEN_BIN


def test_reader_reads_design_golden_bytes(tmp_path):
    prefix = str(tmp_path / "golden")
    (tmp_path / "golden.idx").write_bytes(GOLDEN_IDX)
    (tmp_path / "golden.bin").write_bytes(GOLDEN_BIN)
    ds = IndexedDataset(prefix)
    assert len(ds) == 2 and ds.dtype == np.uint16 and ds.num_tokens == 5
    assert ds[0].tolist() == [5, 6, 7] and ds[1].tolist() == [8, 9] and ds[-1].tolist() == [8, 9]
    assert ds.get(0, 1).tolist() == [6, 7] and ds.get(0, 1, 1).tolist() == [6]
    assert ds.sequence_lengths.dtype == np.int32 and ds.sequence_lengths.tolist() == [3, 2]
    assert ds.sequence_pointers.dtype == np.int64 and ds.sequence_pointers.tolist() == [0, 6]
    assert ds.document_indices.dtype == np.int64 and ds.document_indices.tolist() == [0, 1, 2]
    assert [a.tolist() for a in ds[0:2]] == [[5, 6, 7], [8, 9]]
    assert ds.prefix == prefix and IndexedDataset.exists(prefix)
    assert not IndexedDataset.exists(str(tmp_path / "other"))


# ------------------------------------------------------------------ round trips and the spec

@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda t: np.dtype(t).name)
def test_round_trip_every_dtype_matches_spec_writer_bytes(tmp_path, dtype):
    rng = np.random.default_rng(DTYPE_CODES[dtype])
    documents = random_documents(rng, dtype)
    ours, theirs = str(tmp_path / "ours"), str(tmp_path / "theirs")
    build_with_add_item(ours, documents, dtype)
    ref.write_dataset(theirs, documents, dtype)
    # Same bytes as the spec writer, so any MMIDIDX tool reads ours and we read theirs.
    assert file_bytes(ours + ".idx") == file_bytes(theirs + ".idx")
    assert file_bytes(ours + ".bin") == file_bytes(theirs + ".bin")
    for prefix in (ours, theirs):
        ds = IndexedDataset(prefix)
        assert ds.dtype == np.dtype(dtype)
        assert_dataset_equals(ds, documents)


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.float32], ids=lambda t: np.dtype(t).name)
def test_spec_reader_agrees_with_ours_on_add_document_files(tmp_path, dtype):
    rng = np.random.default_rng(7)
    documents = random_documents(rng, dtype, num_documents=30)
    prefix = str(tmp_path / "docs")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype)
    for document in documents:
        flat = np.concatenate(document) if document else np.zeros(0, dtype)
        builder.add_document(flat, [len(s) for s in document])
    builder.finalize(prefix + ".idx")
    spec_dtype, lengths, pointers, doc_indices, sequences = ref.read_dataset(prefix)
    ds = IndexedDataset(prefix)
    assert spec_dtype == ds.dtype
    np.testing.assert_array_equal(ds.sequence_lengths, lengths)
    np.testing.assert_array_equal(ds.sequence_pointers, pointers)
    np.testing.assert_array_equal(ds.document_indices, doc_indices)
    for i, sequence in enumerate(sequences):
        np.testing.assert_array_equal(ds[i], sequence)
    assert_dataset_equals(ds, documents)


def test_reads_large_random_spec_written_dataset(tmp_path):
    rng = np.random.default_rng(3)
    documents = random_documents(rng, np.int32, num_documents=400, max_sequences=3, max_length=300)
    prefix = str(tmp_path / "big")
    ref.write_dataset(prefix, documents, np.int32)
    ds = IndexedDataset(prefix)
    assert_dataset_equals(ds, documents)
    lengths = ds.sequence_lengths
    for _ in range(200):  # random partial reads against the spec reader's arrays
        i = int(rng.integers(0, len(ds)))
        offset = int(rng.integers(0, lengths[i] + 1))
        length = int(rng.integers(0, lengths[i] - offset + 1))
        full = [s for d in documents for s in d][i]
        np.testing.assert_array_equal(ds.get(i, offset, length), full[offset:offset + length])


def test_add_index_merges_documents(tmp_path):
    rng = np.random.default_rng(11)
    parts = [random_documents(rng, np.uint16, num_documents=n) for n in (5, 0, 9)]
    for k, documents in enumerate(parts):
        build_with_add_item(str(tmp_path / f"part{k}"), documents, np.uint16)
    own = random_documents(rng, np.uint16, num_documents=3)
    merged = str(tmp_path / "merged")
    builder = IndexedDatasetBuilder(merged + ".bin", np.uint16)
    for sequence in own[0]:
        builder.add_item(sequence)
    builder.end_document()
    for k in range(3):
        builder.add_index(str(tmp_path / f"part{k}"))
    for document in own[1:]:
        builder.add_document(np.concatenate(document) if document else [], [len(s) for s in document])
    builder.finalize(merged + ".idx")
    expected = [own[0]] + parts[0] + parts[1] + parts[2] + own[1:]
    assert_dataset_equals(IndexedDataset(merged), expected)
    ref_merged = str(tmp_path / "ref")
    ref.write_dataset(ref_merged, expected, np.uint16)
    assert file_bytes(merged + ".idx") == file_bytes(ref_merged + ".idx")


def test_add_index_refuses_other_dtype_and_open_document(tmp_path):
    build_with_add_item(str(tmp_path / "a"), [[[1, 2]]], np.int32)
    builder = IndexedDatasetBuilder(str(tmp_path / "b.bin"), np.uint16)
    with pytest.raises(ValueError, match="int32.*uint16"):
        builder.add_index(str(tmp_path / "a"))
    builder.add_item([1])
    with pytest.raises(RuntimeError, match="end_document"):
        builder.add_index(str(tmp_path / "a"))


def test_empty_dataset_round_trip(tmp_path):
    prefix = str(tmp_path / "empty")
    IndexedDatasetBuilder(prefix + ".bin", np.uint16).finalize(prefix + ".idx")
    ds = IndexedDataset(prefix)
    assert len(ds) == 0 and ds.num_tokens == 0 and ds.document_indices.tolist() == [0]
    assert ds[0:5] == []
    with pytest.raises(IndexError):
        ds[0]


# ------------------------------------------------------------------ the Python face

def test_views_are_zero_copy_read_only_and_outlive_the_dataset(tmp_path):
    prefix = str(tmp_path / "v")
    build_with_add_item(prefix, [[np.arange(1000, dtype=np.int64)], [[7, 8]]], np.int32)
    ds = IndexedDataset(prefix)
    view = ds.get(0, 10, 5)
    assert not view.flags.writeable and not view.flags.owndata
    with pytest.raises(ValueError):
        view[0] = 1
    assert ds.get(0, 10, 5).__array_interface__["data"][0] == view.__array_interface__["data"][0]
    tail = ds[1]
    del ds
    gc.collect()
    # The map must still be alive: the views hold it, not the dataset object.
    assert view.tolist() == [10, 11, 12, 13, 14] and tail.tolist() == [7, 8]


def test_index_errors(tmp_path):
    prefix = str(tmp_path / "e")
    build_with_add_item(prefix, [[[1, 2, 3]], [[4]]], np.uint16)
    ds = IndexedDataset(prefix)
    assert ds[np.int64(-2)].tolist() == [1, 2, 3]
    for bad in (2, -3, 10 ** 12, 2 ** 70, -(2 ** 70)):
        with pytest.raises(IndexError, match="out of range"):
            ds[bad]
    for args in ((2 ** 64,), (0, 2 ** 63), (0, 0, 2 ** 63), (0, 0, -(2 ** 64))):
        with pytest.raises(IndexError):
            ds.get(*args)
    with pytest.raises(IndexError):
        ds.get(0, 4)
    with pytest.raises(IndexError):
        ds.get(0, -1)
    with pytest.raises(IndexError):
        ds.get(0, 1, 3)
    with pytest.raises(IndexError):
        ds.get(0, 0, -1)
    assert ds.get(0, 3).tolist() == []
    with pytest.raises(ValueError, match="step 1"):
        ds[0:2:2]
    with pytest.raises(TypeError):
        ds["0"]


def test_pickle_round_trip_reopens(tmp_path):
    prefix = str(tmp_path / "p")
    documents = random_documents(np.random.default_rng(5), np.uint16)
    build_with_add_item(prefix, documents, np.uint16)
    ds = IndexedDataset(prefix)
    payload = pickle.dumps(ds)
    assert len(payload) < 500  # only the prefix travels, not the tokens
    clone = pickle.loads(payload)
    assert clone.prefix == prefix and clone._reader is not ds._reader
    assert_dataset_equals(clone, documents)


def test_megatron_call_signatures(tmp_path):
    """Calls as Megatron-LM's tools write them work unchanged; multimodal ones are refused by name."""
    prefix = str(tmp_path / "m")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16, multimodal=False)
    builder.add_item(torch.IntTensor([1, 2]), 0)
    builder.add_item(torch.IntTensor([3]), mode=0)
    builder.end_document()
    builder.add_document(torch.IntTensor([4, 5, 6]), [1, 2], modes=None)
    with pytest.raises(NotImplementedError, match="mode 1"):
        builder.add_item([7], mode=1)
    builder.finalize(prefix + ".idx")
    ds = IndexedDataset(prefix)
    assert ds.get_document_indices().tolist() == ds.document_indices.tolist() == [0, 2, 4]
    assert [s.tolist() for s in ds[:]] == [[1, 2], [3], [4], [5, 6]]
    with pytest.raises(NotImplementedError, match="multimodal"):
        IndexedDatasetBuilder(str(tmp_path / "mm.bin"), np.uint16, multimodal=True)
    assert sorted(os.listdir(tmp_path)) == ["m.bin", "m.idx"]  # the refused builder left nothing


def test_dtype_helpers():
    assert best_dtype(32000) is np.uint16 and best_dtype(65499) is np.uint16
    assert best_dtype(65500) is np.int32 and best_dtype(128256) is np.int32 and best_dtype(None) is np.int32
    assert DTYPE_CODES[np.uint16] == 8 and DTYPE_CODES["float32"] == 7 and DTYPE_CODES[np.dtype("int8")] == 2
    assert sorted(DTYPE_CODES.values()) == list(range(1, 9))
    assert np.bool_ not in DTYPE_CODES


# ------------------------------------------------------------------ builder input and durability

@pytest.mark.parametrize("dtype,bad", [
    (np.uint16, 65536), (np.uint16, -1), (np.uint8, 256), (np.int8, -129), (np.int16, 32768),
    (np.int32, 2 ** 31), (np.int64, 2 ** 63), (np.float32, 2 ** 24 + 1), (np.int32, 1.5),
    (np.float64, 2 ** 64 + 1), (np.float32, 2 ** 70 + 1), (np.float64, 10 ** 400),
], ids=str)
def test_out_of_range_tokens_are_refused_before_writing(tmp_path, dtype, bad):
    prefix = str(tmp_path / "r")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype)
    builder.add_item([1, 2])
    with pytest.raises(ValueError, match=rf"token id {bad}\b.*{np.dtype(dtype).name}"):
        builder.add_item([3, bad])
    with pytest.raises(ValueError, match=np.dtype(dtype).name):
        builder.add_document([4, bad], [2])
    builder.add_item([5])
    builder.finalize(prefix + ".idx")
    ds = IndexedDataset(prefix)
    assert [s.tolist() for s in ds[:]] == [[1, 2], [5]]  # nothing of the refused items was written


def test_builder_inputs(tmp_path):
    prefix = str(tmp_path / "in")
    builder = IndexedDatasetBuilder(prefix + ".bin", np.int32)
    builder.add_item(torch.tensor([1, 2, 3]))
    builder.add_item(np.array([[4, 5], [6, 7]], dtype=">i8"))  # flattened, byte-swapped source
    builder.add_item(np.arange(10, dtype=np.int16)[::3])  # non-contiguous
    builder.add_item([])
    builder.end_document()
    with pytest.raises(ValueError, match="lengths sum to 3 but 2 tokens"):
        builder.add_document([1, 2], [1, 2])
    with pytest.raises(ValueError, match="length -1"):
        builder.add_document([1, 2], [3, -1])
    with pytest.raises(TypeError):
        builder.add_item(["a", "b"])
    with pytest.raises(ValueError, match="unsupported token dtype"):
        IndexedDatasetBuilder(str(tmp_path / "x.bin"), np.uint32)
    builder.add_item([8])  # no end_document: finalize closes the last document
    builder.finalize(prefix + ".idx")
    with pytest.raises(RuntimeError, match="finalized"):
        builder.add_item([1])
    ds = IndexedDataset(prefix)
    assert [s.tolist() for s in ds[:]] == [[1, 2, 3], [4, 5, 6, 7], [0, 3, 6, 9], [], [8]]
    assert ds.document_indices.tolist() == [0, 4, 5]


def test_failed_or_abandoned_builder_leaves_no_index(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with IndexedDatasetBuilder(str(tmp_path / "a.bin"), np.uint16) as builder:
            builder.add_item([1, 2])
            raise RuntimeError("boom")
    builder = IndexedDatasetBuilder(str(tmp_path / "b.bin"), np.uint16)
    builder.add_item([1, 2])
    del builder
    gc.collect()
    assert os.listdir(tmp_path) == []  # no .idx, no temporary .bin, no side files
    with IndexedDatasetBuilder(str(tmp_path / "c.bin"), np.uint16) as builder:
        builder.add_item([3])
    assert sorted(os.listdir(tmp_path)) == ["c.bin", "c.idx"]
    assert IndexedDataset(str(tmp_path / "c"))[0].tolist() == [3]


def test_rebuilding_replaces_both_files_only_at_finalize(tmp_path):
    prefix = str(tmp_path / "d")
    build_with_add_item(prefix, [[[1, 2, 3]]], np.uint16)
    builder = IndexedDatasetBuilder(prefix + ".bin", np.uint16)
    builder.add_item([9] * 50)
    # Until finalize the old pair is untouched and still valid.
    assert IndexedDataset(prefix)[0].tolist() == [1, 2, 3]
    builder.finalize(prefix + ".idx")
    assert IndexedDataset(prefix)[0].tolist() == [9] * 50
    assert sorted(os.listdir(tmp_path)) == ["d.bin", "d.idx"]


# ------------------------------------------------------------------ validation

def golden_with(tmp_path, idx=GOLDEN_IDX, bin_data=GOLDEN_BIN):
    (tmp_path / "g.idx").write_bytes(idx)
    (tmp_path / "g.bin").write_bytes(bin_data)
    return str(tmp_path / "g")


def patched(offset, fmt, value, data=GOLDEN_IDX):
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


# Each case breaks the golden files one way; the message must name the problem.
VALIDATION_CASES = {
    "magic": (patched(0, "<9s", b"MMIDIDY\0\0"), GOLDEN_BIN, "wrong magic"),
    "version": (patched(9, "<Q", 2), GOLDEN_BIN, "unsupported version 2"),
    "dtype": (patched(17, "<B", 9), GOLDEN_BIN, "unknown token dtype code 9"),
    "dtype_zero": (patched(17, "<B", 0), GOLDEN_BIN, "unknown token dtype code 0"),
    "huge_n": (patched(18, "<Q", 2 ** 64 - 1), GOLDEN_BIN, "sequences, more than a file"),
    "huge_d": (patched(26, "<Q", 2 ** 61), GOLDEN_BIN, "document indices, more than a file"),
    "zero_d": (patched(26, "<Q", 0), GOLDEN_BIN, "0 document indices"),
    "size": (GOLDEN_IDX + b"\0", GOLDEN_BIN, "header implies"),
    "short": (GOLDEN_IDX[:20], GOLDEN_BIN, "shorter than the 34-byte"),
    "truncated": (GOLDEN_IDX[:-8], GOLDEN_BIN, "more than a file of 74 bytes"),
    "first_pointer": (patched(42, "<q", 2), GOLDEN_BIN, "first sequence pointer is 2"),
    "gap": (patched(50, "<q", 8), GOLDEN_BIN, "not contiguous"),
    "negative_length": (patched(34, "<i", -3), GOLDEN_BIN, "negative length -3"),
    "past_end": (patched(38, "<i", 3), GOLDEN_BIN, "past the end"),
    "bin_size": (GOLDEN_IDX, GOLDEN_BIN + b"\0\0", "describes 10 bytes"),
    "bin_odd": (GOLDEN_IDX, GOLDEN_BIN[:-1], "past the end"),
    "doc_start": (patched(58, "<q", 1), GOLDEN_BIN, "start at 1"),
    "doc_decrease": (patched(66, "<q", 3), GOLDEN_BIN, "decrease"),
    "doc_end": (patched(74, "<q", 1), GOLDEN_BIN, "last document index is 1"),
}


@pytest.mark.parametrize("case", sorted(VALIDATION_CASES))
def test_corrupt_files_raise_named_errors(tmp_path, case):
    idx, bin_data, message = VALIDATION_CASES[case]
    prefix = golden_with(tmp_path, idx, bin_data)
    with pytest.raises(IndexedDatasetError, match=message) as excinfo:
        IndexedDataset(prefix)
    assert isinstance(excinfo.value, ValueError)
    assert prefix in str(excinfo.value)  # names the file
    with pytest.raises(ref.InvalidDataset):  # the spec agrees the file is broken
        ref.parse(idx, bin_data)


def test_missing_files(tmp_path):
    prefix = golden_with(tmp_path)
    os.remove(prefix + ".bin")
    with pytest.raises(FileNotFoundError, match="g.bin"):
        IndexedDataset(prefix)
    with pytest.raises(FileNotFoundError, match="nothing.idx"):
        IndexedDataset(str(tmp_path / "nothing"))
    (tmp_path / "dir.idx").mkdir()
    (tmp_path / "dir.bin").write_bytes(b"")
    with pytest.raises(IndexedDatasetError, match="not a regular file"):
        IndexedDataset(str(tmp_path / "dir"))


def test_design_document_shows_the_golden_bytes():
    """docs/design.md's byte-layout example is the file the builder writes (the document cannot drift)."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "design.md").read_text()
    block = text[text.index("4d4d49444944580000"):]
    block = block[:block.index("```")]
    hex_digits = "".join(re.findall(r"^([0-9a-f ]+?)\s{2,}\S", block, flags=re.M)).replace(" ", "")
    assert bytes.fromhex(hex_digits) == GOLDEN_IDX
