"""The C++ GPT sample index against a plain-Python implementation of the algorithm in
engine/data/samples.py, GPTSampleDataset against slices of the token stream, and the disk cache."""
import os
import random

import numpy as np
import pytest

from engine import _C
from engine.data import samples
from engine.data.samples import GPTSampleDataset

# ---------------------------------------------------------------------------------------------
# Plain-Python reference (loops and ints only), written from the module docstring.
# ---------------------------------------------------------------------------------------------
MASK = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15


def ref_mix64(z):
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


class RefRng:
    def __init__(self, seed, stream, epoch):
        self.state = ref_mix64((ref_mix64((ref_mix64(seed) + stream) & MASK) + epoch) & MASK)

    def next(self):
        self.state = (self.state + GOLDEN) & MASK
        return ref_mix64(self.state)

    def below(self, n):
        m = self.next() * n
        while (m & MASK) < ((1 << 64) - n) % n:
            m = self.next() * n
        return m >> 64


def ref_shuffle(items, rng):
    a = list(items)
    for i in range(len(a) - 1, 0, -1):
        j = rng.below(i + 1)
        a[i], a[j] = a[j], a[i]
    return a


def ref_document_order(document_ids, num_epochs, seed):
    order = []
    for e in range(num_epochs):
        order += ref_shuffle(document_ids, RefRng(seed, 1, e))
    return order


def ref_stream_positions(order, counts):
    """(position in order, offset) of every token of the stream, one entry per token."""
    stream = []
    for pos, doc in enumerate(order):
        for offset in range(counts[doc]):
            stream.append((pos, offset))
    return stream


def ref_index(counts, document_ids, seq_length, seed, num_epochs=None, num_samples=None):
    """(order, boundaries, shuffle, shown length) as specified."""
    tokens = sum(counts[d] for d in document_ids)
    if num_samples is not None:
        epochs = 1
        while (epochs * tokens - 1) // seq_length < num_samples:
            epochs += 1
    else:
        epochs = num_epochs
    order = ref_document_order(document_ids, epochs, seed)
    stream = ref_stream_positions(order, counts)
    n = (len(stream) - 1) // seq_length
    boundaries = [stream[k * seq_length] for k in range(n + 1)]
    if num_samples is not None:
        head = max(0, ((epochs - 1) * tokens - 1) // seq_length)
    else:
        head = n
    shuffle = (ref_shuffle(range(head), RefRng(seed, 2, 0))
               + ref_shuffle(range(head, n), RefRng(seed, 2, 1)))
    return order, boundaries, shuffle, (n if num_samples is None else num_samples)


class FakeIndexed:
    """Stand-in with the IndexedDataset attributes GPTSampleDataset uses."""

    def __init__(self, documents, prefix="fake"):
        self.documents = documents  # list of documents, each a list of sequences (token lists)
        self.sequences = [seq for doc in documents for seq in doc]
        self.sequence_lengths = np.array([len(s) for s in self.sequences], dtype=np.int32)
        ends = [0]
        for doc in documents:
            ends.append(ends[-1] + len(doc))
        self.document_indices = np.array(ends, dtype=np.int64)
        self.prefix = prefix

    def get(self, i, offset=0, length=None):
        seq = self.sequences[i]
        length = len(seq) - offset if length is None else length
        assert 0 <= offset and offset + length <= len(seq)
        return np.array(seq[offset:offset + length], dtype=np.uint16)


def random_documents(rng, num_docs, max_len=30, max_seqs=3):
    """Documents of 1..max_seqs sequences; 0- and 1-token sequences and documents are common."""
    token = 0
    docs = []
    for _ in range(num_docs):
        doc = []
        for _ in range(rng.randint(1, max_seqs)):
            length = rng.choice([0, 1, rng.randint(0, max_len)])
            doc.append(list(range(token, token + length)))
            token += length
        docs.append(doc)
    return docs


def doc_counts(docs):
    return [sum(len(s) for s in doc) for doc in docs]


# ---------------------------------------------------------------------------------------------
# PRNG and raw arrays
# ---------------------------------------------------------------------------------------------

def test_splitmix64_matches_published_sequence_and_reference():
    # SplitMix64 from state 0 (the stream (0, 0, 0) starts there because mix64(0) == 0).
    got = _C.splitmix64_stream(0, 0, 0, 4).view(np.uint64).tolist()
    assert got == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F, 0xF88BB8A8724C81EC]
    for seed, stream, epoch in [(1, 1, 0), (2**64 - 1, 2, 7), (12345, 1, 3)]:
        rng = RefRng(seed, stream, epoch)
        want = [rng.next() for _ in range(50)]
        assert _C.splitmix64_stream(seed, stream, epoch, 50).view(np.uint64).tolist() == want


def test_index_arrays_equal_plain_python_for_random_inputs():
    rng = random.Random(0)
    for case in range(120):
        docs = random_documents(rng, rng.randint(1, 25))
        counts = doc_counts(docs)
        if sum(counts) == 0:
            continue
        document_ids = list(range(len(docs)))
        if case % 3 == 0:  # a subset in a scrambled order
            document_ids = rng.sample(document_ids, rng.randint(1, len(docs)))
            if sum(counts[d] for d in document_ids) == 0:
                continue
        seq_length = rng.choice([1, 2, 3, 7, 16, 50])
        seed = rng.choice([0, 1, rng.getrandbits(64)])
        tokens = sum(counts[d] for d in document_ids)
        if case % 2:
            kwargs = dict(num_samples=rng.randint(1, 40))
        else:
            epochs = rng.randint(1, 4)
            if epochs * tokens < seq_length + 1:
                continue
            kwargs = dict(num_epochs=epochs)
        ds = GPTSampleDataset(FakeIndexed(docs), seq_length, seed,
                              document_ids=document_ids if case % 3 == 0 else None, **kwargs)
        order, boundaries, shuffle, length = ref_index(counts, document_ids, seq_length, seed, **kwargs)
        assert ds.index.order.tolist() == order, case
        assert [tuple(r) for r in ds.index.boundaries.tolist()] == boundaries, case
        assert ds.index.shuffle.tolist() == shuffle, case
        assert len(ds) == length, case


def test_samples_equal_slices_of_the_token_stream():
    rng = random.Random(1)
    for case in range(40):
        docs = random_documents(rng, rng.randint(1, 20))
        counts = doc_counts(docs)
        if sum(counts) < 2:
            continue
        seq_length = rng.choice([1, 4, 9, 33])
        seed = rng.getrandbits(32)
        num_samples = rng.randint(1, 30)
        ds = GPTSampleDataset(FakeIndexed(docs), seq_length, seed, num_samples=num_samples)
        order, _, shuffle, _ = ref_index(counts, list(range(len(docs))), seq_length, seed,
                                         num_samples=num_samples)
        stream = [tok for d in order for seq in docs[d] for tok in seq]
        for k in range(len(ds)):
            j = shuffle[k]
            want = stream[j * seq_length: j * seq_length + seq_length + 1]
            got = ds[k]
            assert got.dtype == np.int64 and got.tolist() == want, (case, k)
            # The span pieces address the same tokens sequence by sequence.
            flat = [t for s, o, n in ds.sample_span(k).tolist() for t in ds.indexed.sequences[s][o:o + n]]
            assert flat == want
        assert ds[-1].tolist() == ds[len(ds) - 1].tolist()
        with pytest.raises(IndexError):
            ds[len(ds)]


def test_num_samples_uses_fewest_epochs_and_serves_full_epochs_first():
    docs = [[list(range(10 * i, 10 * i + 10))] for i in range(10)]  # 100 tokens per epoch
    ds = GPTSampleDataset(FakeIndexed(docs), 9, seed=3, num_samples=25)
    # 2 epochs give (200-1)//9 = 22 samples, 3 give 33.
    assert ds.plan.num_epochs == 3 and len(ds) == 25 and ds.index.shuffle.size == 33
    head = (200 - 1) // 9
    assert sorted(ds.index.shuffle[:head].tolist()) == list(range(head))


def test_samples_from_a_real_indexed_dataset(tmp_path):
    from engine.data.indexed import IndexedDataset, IndexedDatasetBuilder

    rng = random.Random(5)
    docs = random_documents(rng, 30, max_len=40)
    prefix = str(tmp_path / "data")
    builder = IndexedDatasetBuilder(prefix + ".bin", np.uint16)
    for doc in docs:
        for seq in doc:
            builder.add_item(np.array(seq, dtype=np.uint16))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    real = GPTSampleDataset(IndexedDataset(prefix), 16, seed=9, num_samples=20)
    fake = GPTSampleDataset(FakeIndexed(docs), 16, seed=9, num_samples=20)
    for k in range(20):
        assert real[k].tolist() == fake[k].tolist()


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors():
    docs = [[[1, 2, 3]], [[4, 5]], [[]]]
    fake = FakeIndexed(docs)
    with pytest.raises(ValueError, match="seq_length"):
        GPTSampleDataset(fake, 0, seed=1)
    with pytest.raises(ValueError, match="seed"):
        GPTSampleDataset(fake, 2, seed=-1)
    with pytest.raises(ValueError, match="not both"):
        GPTSampleDataset(fake, 2, seed=1, num_samples=3, num_epochs=2)
    with pytest.raises(ValueError, match="num_epochs"):
        GPTSampleDataset(fake, 2, seed=1, num_epochs=0)
    with pytest.raises(ValueError, match="num_samples"):
        GPTSampleDataset(fake, 2, seed=1, num_samples=0)
    with pytest.raises(ValueError, match="no tokens"):
        GPTSampleDataset(fake, 2, seed=1, document_ids=[2])
    with pytest.raises(ValueError, match="no tokens"):
        GPTSampleDataset(FakeIndexed([[[]], [[]]]), 2, seed=1)
    with pytest.raises(ValueError, match=r"document_ids\[1\] = 3"):
        GPTSampleDataset(fake, 2, seed=1, document_ids=[0, 3])
    with pytest.raises(ValueError, match="duplicates"):
        GPTSampleDataset(fake, 2, seed=1, document_ids=[0, 0])
    with pytest.raises(ValueError, match="fewer than one sample"):
        GPTSampleDataset(fake, 5, seed=1, num_epochs=1)  # 5 tokens < 6
    assert len(GPTSampleDataset(fake, 5, seed=1, num_samples=1)) == 1  # takes 2 epochs instead
    with pytest.raises(ValueError, match="seq_length"):
        _C.sample_boundaries(np.array([0]), np.array([5]), 0)
    with pytest.raises(ValueError, match="negative token count"):
        _C.sample_boundaries(np.array([0]), np.array([-5]), 1)
    with pytest.raises(ValueError, match="empty"):
        _C.document_order(np.array([], dtype=np.int64), 3, 1, 0)
    # seq_length + 1 does not fit int64: still "fewer than one sample", not an empty dataset.
    with pytest.raises(ValueError, match="fewer than one sample"):
        _C.sample_boundaries(np.array([0, 1]), np.array([5, 6]), 2 ** 63 - 1)
    with pytest.raises(ValueError, match="fewer than one sample"):
        GPTSampleDataset(fake, 2 ** 63 - 1, seed=1)


# ---------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------

def _docs_for_cache():
    return random_documents(random.Random(7), 40, max_len=25)


def test_cache_key_changes_with_every_input():
    docs = _docs_for_cache()
    base = dict(seq_length=8, seed=11, num_epochs=2)

    def key(documents=docs, document_ids=None, **over):
        kw = {**base, **over}
        return GPTSampleDataset(FakeIndexed(documents), document_ids=document_ids, **kw).cache_key

    k0 = key()
    assert key() == k0
    changed_doc = [list(map(list, d)) for d in docs]
    target = next(i for i, d in enumerate(changed_doc) if d[0])
    changed_doc[target][0] = changed_doc[target][0][:-1]  # one document one token shorter
    variants = {
        "one document length": key(documents=changed_doc),
        "seed": key(seed=12),
        "seq_length": key(seq_length=9),
        "num_epochs": key(num_epochs=3),
        "num_samples": key(num_epochs=None, num_samples=5),
        "subset": key(document_ids=list(range(39))),
        "subset order": key(document_ids=list(range(39, -1, -1))),
    }
    for name, k in variants.items():
        assert k != k0, name
    assert len(set(variants.values())) == len(variants)
    # The same sequences split into documents differently give different counts, hence keys.
    flat = [[seq] for doc in docs for seq in doc]
    assert key(documents=flat) != k0
    # The version string is part of the key.
    old = samples.ALGORITHM_VERSION
    try:
        samples.ALGORITHM_VERSION = old + "-next"
        assert key() != k0
    finally:
        samples.ALGORITHM_VERSION = old


def test_second_build_loads_from_cache_without_rebuilding(tmp_path, monkeypatch):
    docs = _docs_for_cache()
    first = GPTSampleDataset(FakeIndexed(docs), 8, 11, num_samples=30, cache_dir=str(tmp_path))
    assert not first.loaded_from_cache
    files = sorted(os.listdir(tmp_path))
    assert files == sorted(f"{first.cache_key}{s}" for s in
                           [".json", "-order.npy", "-boundaries.npy", "-shuffle.npy"])

    def no_build(*args, **kwargs):
        raise AssertionError("index rebuilt although it is cached")

    monkeypatch.setattr(samples, "build_gpt_sample_index", no_build)
    second = GPTSampleDataset(FakeIndexed(docs), 8, 11, num_samples=30, cache_dir=str(tmp_path))
    assert second.loaded_from_cache
    for name in ("order", "boundaries", "shuffle"):
        a, b = getattr(first.index, name), getattr(second.index, name)
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert [second[k].tolist() for k in range(30)] == [first[k].tolist() for k in range(30)]


@pytest.mark.parametrize("damage", ["truncate", "extend", "flip", "flip_header", "reshape", "foreign",
                                    "delete", "bad_json"])
def test_damaged_cache_is_detected_and_rebuilt(tmp_path, damage):
    docs = _docs_for_cache()
    fresh = GPTSampleDataset(FakeIndexed(docs), 8, 11, num_epochs=2, cache_dir=str(tmp_path))
    key = fresh.cache_key
    target = tmp_path / f"{key}-boundaries.npy"
    assert target.stat().st_size < samples.FINGERPRINT_SLICE  # the sampled hash covers it whole
    data = bytearray(target.read_bytes())
    if damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "extend":
        target.write_bytes(bytes(data) + b"\0")
    elif damage in ("flip", "flip_header"):
        data[-3 if damage == "flip" else 20] ^= 0x01
        target.write_bytes(bytes(data))
    elif damage == "reshape":  # same bytes, another shape in the header
        np.save(target, np.ascontiguousarray(fresh.index.boundaries).reshape(2, -1))
    elif damage == "foreign":  # another index's array of the same shape and size
        other = GPTSampleDataset(FakeIndexed(docs), 8, 12, num_epochs=2, cache_dir=str(tmp_path / "o"))
        other_file = tmp_path / "o" / f"{other.cache_key}-boundaries.npy"
        assert other_file.stat().st_size == len(data) and other_file.read_bytes() != bytes(data)
        target.write_bytes(other_file.read_bytes())
    elif damage == "delete":
        target.unlink()
    else:
        (tmp_path / f"{key}.json").write_text("{ not json")
    again = GPTSampleDataset(FakeIndexed(docs), 8, 11, num_epochs=2, cache_dir=str(tmp_path))
    assert not again.loaded_from_cache
    assert np.array_equal(again.index.boundaries, fresh.index.boundaries)
    third = GPTSampleDataset(FakeIndexed(docs), 8, 11, num_epochs=2, cache_dir=str(tmp_path))
    assert third.loaded_from_cache  # the rebuild repaired the cache
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temporary file left


def test_file_fingerprint_hashes_first_and_last_slice(tmp_path, monkeypatch):
    import hashlib

    monkeypatch.setattr(samples, "FINGERPRINT_SLICE", 64)
    rng = np.random.default_rng(0)
    for size in [0, 1, 63, 64, 65, 127, 128, 129, 1000]:
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        path = tmp_path / f"f{size}"
        path.write_bytes(data)
        covered = data[:64] + data[max(64, size - 64):]  # each byte at most once
        want = hashlib.sha256(covered).hexdigest()
        assert samples.file_fingerprint(str(path)) == {"file_size": size, "sampled_sha256": want}, size


def test_cache_check_reads_only_the_ends_of_large_files(tmp_path, monkeypatch):
    """The documented trade-off: past 2 slices, a byte in the middle is outside the check."""
    monkeypatch.setattr(samples, "FINGERPRINT_SLICE", 256)
    docs = _docs_for_cache()
    fresh = GPTSampleDataset(FakeIndexed(docs), 2, 11, num_epochs=3, cache_dir=str(tmp_path))
    target = tmp_path / f"{fresh.cache_key}-boundaries.npy"
    original = target.read_bytes()
    assert len(original) > 3 * 256

    def with_flip(position):
        data = bytearray(original)
        data[position] ^= 0x01
        target.write_bytes(bytes(data))
        return GPTSampleDataset(FakeIndexed(docs), 2, 11, num_epochs=3, cache_dir=str(tmp_path))

    assert with_flip(len(original) // 2).loaded_from_cache  # middle: not sampled
    assert not with_flip(len(original) - 200).loaded_from_cache  # last slice: rebuilt
    assert target.read_bytes() == original
    assert not with_flip(100).loaded_from_cache  # first slice: rebuilt
