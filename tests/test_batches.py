"""CT and SFT samples against plain-Python constructions from the raw records, and the step loader:
DP split invariance, resume, end of data, id validation, and every refused input."""
import json
import random

import numpy as np
import pytest
import torch

from engine.data.batches import (IGNORE_INDEX, BatchLoader, CTSamples, SampleMasks, SFTSamples,
                                 build_dataset, predicted_reward_counts)
from engine.data.indexed import IndexedDataset, IndexedDatasetBuilder
from engine.data.samples import GPTSampleDataset, blended_sample_counts
from test_sample_index import ref_document_order, ref_index

VOCAB = 500


def write_dataset(prefix, documents, masks=None, vocab_size=VOCAB):
    """Tokens (and reward masks) of `documents`, each a list of sequences, as preprocessing writes."""
    with IndexedDatasetBuilder(prefix + ".bin", np.uint16) as builder:
        for doc in documents:
            for seq in doc:
                builder.add_item(np.array(seq, dtype=np.uint16))
            builder.end_document()
    if masks is not None:
        with IndexedDatasetBuilder(prefix + "_reward_mask.bin", np.uint8) as builder:
            for doc in masks:
                for seq in doc:
                    builder.add_item(np.array(seq, dtype=np.uint8))
                builder.end_document()
    if vocab_size is not None:
        with open(prefix + ".meta.json", "w") as f:
            json.dump({"format": "ltu-sar-dataset", "tokenizer": {"vocab_size": vocab_size}}, f)
    return prefix


def random_records(rng, count, max_len, first_id=1):
    """Documents of 1-3 sequences (some empty) with masks: mostly one reward token, some none,
    some only on the first token (nothing to predict)."""
    documents, masks = [], []
    for _ in range(count):
        doc, mask = [], []
        for _ in range(rng.randint(1, 3)):
            n = rng.choice([0, rng.randint(1, max_len // 3)])
            doc.append([rng.randrange(first_id, VOCAB) for _ in range(n)])
            mask.append([0] * n)
        flat = [(s, i) for s in range(len(doc)) for i in range(len(doc[s]))]
        kind = rng.random()
        if flat and kind < 0.15:
            s, i = flat[0]
            mask[s][i] = 1  # reward on the first token only
        elif flat and kind > 0.25:
            for s, i in rng.sample(flat, rng.randint(1, min(3, len(flat)))):
                mask[s][i] = 1
        documents.append(doc)
        masks.append(mask)
    return documents, masks


def ref_sft(documents, masks, seq_length, num_samples, seed, pad_id=0):
    """SFT samples built from the records alone, with the plain-Python document order."""
    records = [[t for seq in doc for t in seq] for doc in documents]
    rewards = [[m for seq in mask for m in seq] for mask in masks]
    usable = [d for d in range(len(records)) if any(rewards[d][1:])]
    epochs = -(-num_samples // len(usable))
    order = ref_document_order(usable, epochs, seed)[:num_samples]
    out = []
    for d in order:
        rec, rew = records[d], rewards[d]
        n = len(rec) - 1
        tokens = rec[:-1] + [pad_id] * (seq_length - n)
        labels = [rec[i + 1] if rew[i + 1] else -100 for i in range(n)] + [-100] * (seq_length - n)
        out.append((tokens, labels, [1.0 if v != -100 else 0.0 for v in labels]))
    return out, len(records) - len(usable)


@pytest.fixture
def sft_data(tmp_path):
    rng = random.Random(3)
    documents, masks = random_records(rng, 40, max_len=18)
    prefix = write_dataset(str(tmp_path / "sft"), documents, masks)
    return prefix, documents, masks


# ---------------------------------------------------------------------------------------------
# Samples
# ---------------------------------------------------------------------------------------------

def test_predicted_reward_counts_equal_plain_python(tmp_path):
    rng = random.Random(11)
    for case in range(6):
        documents, masks = random_records(rng, rng.randint(1, 30), max_len=15)
        prefix = write_dataset(str(tmp_path / f"c{case}"), documents, masks)
        want = [sum(m for seq in mask for m in seq) - ([m for seq in mask for m in seq][:1] or [0])[0]
                for mask in masks]
        got = predicted_reward_counts(IndexedDataset(prefix + "_reward_mask"))
        assert got.tolist() == want, case


@pytest.mark.parametrize("seq_length, num_samples, seed", [(17, 25, 0), (20, 90, 7), (30, 3, 2**63)])
def test_sft_samples_equal_plain_python(sft_data, seq_length, num_samples, seed):
    prefix, documents, masks = sft_data
    ds = build_dataset(prefix, "sft", seq_length, num_samples, seed)
    want, skipped = ref_sft(documents, masks, seq_length, num_samples, seed)
    assert isinstance(ds, SFTSamples) and len(ds) == num_samples and ds.vocab_size == VOCAB
    assert ds.skipped_records == skipped > 0 and ds.num_records == len(documents) - skipped
    for k in range(num_samples):
        got = ds[k]
        assert got["tokens"].dtype == np.int64 and got["labels"].dtype == np.int64
        assert got["loss_mask"].dtype == np.float32
        assert got["tokens"].tolist() == want[k][0], k
        assert got["labels"].tolist() == want[k][1], k
        assert got["loss_mask"].tolist() == want[k][2], k
    # More samples than records: every usable record is served once per epoch.
    first_epoch = [ds.record(k) for k in range(min(num_samples, ds.num_records))]
    assert len(set(first_epoch)) == len(first_epoch)


def test_ct_samples_equal_gpt_packing(tmp_path):
    documents, _ = random_records(random.Random(5), 30, max_len=24)
    prefix = write_dataset(str(tmp_path / "ct"), documents, vocab_size=None)
    ds = build_dataset(prefix, "ct", 16, 37, seed=9, cache_dir=str(tmp_path / "cache"))
    gpt = GPTSampleDataset(IndexedDataset(prefix), 16, 9, num_samples=37)
    assert isinstance(ds, CTSamples) and len(ds) == 37 and ds.vocab_size is None
    for k in range(37):
        got, stream = ds[k], gpt[k]
        assert got["tokens"].tolist() == stream[:-1].tolist()
        assert got["labels"].tolist() == stream[1:].tolist()
        assert got["loss_mask"].dtype == np.float32 and got["loss_mask"].tolist() == [1.0] * 16
    assert build_dataset(prefix, "ct", 16, 37, seed=9, cache_dir=str(tmp_path / "cache")).samples.loaded_from_cache


def test_sample_masks_line_up_with_packed_tokens(sft_data):
    prefix, documents, masks = sft_data
    samples = GPTSampleDataset(IndexedDataset(prefix), 8, seed=1, num_samples=30)
    aligned = SampleMasks(samples, IndexedDataset(prefix + "_reward_mask"))
    counts = [sum(len(seq) for seq in doc) for doc in documents]
    order, _, shuffle, _ = ref_index(counts, list(range(len(documents))), 8, 1, num_samples=30)
    stream_tokens = [t for d in order for seq in documents[d] for t in seq]
    stream_masks = [m for d in order for seq in masks[d] for m in seq]
    for k in range(len(samples)):
        window = slice(shuffle[k] * 8, shuffle[k] * 8 + 9)
        assert samples[k].tolist() == stream_tokens[window]
        assert aligned[k].tolist() == stream_masks[window], k
    bad = IndexedDataset(write_dataset(prefix + "x", [[[1, 2, 3]]], [[[0, 1]]], vocab_size=None)
                         + "_reward_mask")
    with pytest.raises(ValueError, match="sequence lengths"):
        SampleMasks(samples, bad)


def test_blend_draws_each_prefix_by_weight(tmp_path):
    rng = random.Random(8)
    prefixes = []
    for name in ("a", "b"):
        documents, masks = random_records(rng, 25, max_len=15)
        prefixes.append(write_dataset(str(tmp_path / name), documents, masks))
    spec = f"0.75 {prefixes[0]} 0.25 {prefixes[1]}"
    ds = build_dataset(spec, "sft", 16, 40, seed=4, cache_dir=str(tmp_path / "cache"))
    assert len(ds) == 40 and ds.vocab_size == VOCAB and ds.seq_length == 16
    taken = blended_sample_counts([0.75, 0.25], 40)
    assert taken.tolist() == [30, 10]
    alone = [SFTSamples(IndexedDataset(p), IndexedDataset(p + "_reward_mask"), 16, int(n), 4)
             for p, n in zip(prefixes, taken)]
    seen = [0, 0]
    for i in range(40):
        d, j = ds.sample_source(i)
        seen[d] += 1
        for key in ("tokens", "labels", "loss_mask"):
            assert np.array_equal(ds[i][key], alone[d][j][key])
    assert seen == [30, 10]
    ct = build_dataset(f"1 {prefixes[0]} 1 {prefixes[1]}", "ct", 8, 20, seed=4)
    assert len(ct) == 20 and [len(m) for m in ct.datasets] == blended_sample_counts([1, 1], 20).tolist()


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------

class IdSamples:
    """Sample i: tokens all i, labels all i + 1: a batch says exactly which samples it holds."""

    def __init__(self, n, seq_length=3):
        self.n, self.seq_length, self.reads = n, seq_length, 0

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        assert 0 <= i < self.n
        self.reads += 1
        full = np.full(self.seq_length, i, dtype=np.int64)
        return {"tokens": full, "labels": full + 1, "loss_mask": np.ones(self.seq_length, np.float32)}


def sample_ids(microbatch):
    return microbatch["tokens"][:, 0].tolist()


@pytest.mark.parametrize("gbs, mbs, dp", [(8, 1, 1), (8, 2, 2), (8, 1, 4), (12, 2, 3), (12, 3, 2)])
def test_microbatches_follow_the_global_order(gbs, mbs, dp):
    loaders = [BatchLoader(IdSamples(40), gbs, mbs, r, dp, vocab_size=100, consumed_samples=4)
               for r in range(dp)]
    assert loaders[0].num_microbatches == gbs // (mbs * dp)
    for step in range(loaders[0].steps_left()):
        c = 4 + step * gbs
        union = []
        for r, loader in enumerate(loaders):
            micro = loader.next_step()
            assert len(micro) == gbs // (mbs * dp)
            for j, mb in enumerate(micro):
                assert sample_ids(mb) == list(range(c + (j * dp + r) * mbs, c + (j * dp + r + 1) * mbs))
                assert mb["tokens"].dtype == torch.int64 and mb["labels"].dtype == torch.int64
                assert mb["loss_mask"].dtype == torch.float32 and mb["position_ids"].dtype == torch.int64
                assert tuple(mb["tokens"].shape) == (mbs, 3)
                assert torch.equal(mb["position_ids"], torch.arange(3).expand(mbs, 3))
                union += sample_ids(mb)
        assert sorted(union) == list(range(c, c + gbs))  # the same global batch for any DP size
    assert loaders[0].state_dict() == {"consumed_samples": 4 + (36 // gbs) * gbs}


def test_global_batch_is_the_same_set_for_any_dp_size(sft_data):
    prefix = sft_data[0]
    ds = build_dataset(prefix, "sft", 17, 48, seed=1)

    def rows(dp, mbs):
        out = []
        for r in range(dp):
            loader = BatchLoader(ds, 16, mbs, r, dp, VOCAB, consumed_samples=16)
            for mb in loader.next_step():
                out += [tuple(mb["tokens"][i].tolist() + mb["labels"][i].tolist()) for i in range(mbs)]
        return sorted(out)

    want = sorted(tuple(ds[i]["tokens"].tolist() + ds[i]["labels"].tolist()) for i in range(16, 32))
    for dp, mbs in [(1, 16), (1, 4), (2, 2), (4, 4), (8, 1)]:
        assert rows(dp, mbs) == want, (dp, mbs)


def test_resume_gives_exactly_the_next_batches(sft_data):
    ds = build_dataset(sft_data[0], "sft", 17, 60, seed=2)
    full = BatchLoader(ds, 8, 2, 1, 2, VOCAB)
    uninterrupted = list(full)
    assert len(uninterrupted) == 7
    first = BatchLoader(ds, 8, 2, 1, 2, VOCAB)
    for _ in range(3):
        first.next_step()
    state = first.state_dict()
    assert state == {"consumed_samples": 24}
    resumed = BatchLoader(build_dataset(sft_data[0], "sft", 17, 60, seed=2), 8, 2, 1, 2, VOCAB)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == 4
    for got, want in zip(rest, uninterrupted[3:]):
        for g, w in zip(got, want):
            assert all(torch.equal(g[k], w[k]) for k in w)
    direct = BatchLoader(ds, 8, 2, 1, 2, VOCAB, consumed_samples=24)
    assert sample_ids(direct.next_step()[0]) == sample_ids(rest[0][0])


def test_resume_onto_another_dp_size_continues_the_global_order():
    before = [BatchLoader(IdSamples(48), 8, 2, r, 2, 100) for r in range(2)]
    seen = []
    for _ in range(2):
        seen += sorted(i for loader in before for mb in loader.next_step() for i in sample_ids(mb))
    after = [BatchLoader(IdSamples(48), 8, 1, r, 4, 100) for r in range(4)]
    for loader in after:
        loader.load_state_dict(before[0].state_dict())
    while after[0].steps_left():
        seen += sorted(i for loader in after for mb in loader.next_step() for i in sample_ids(mb))
    assert seen == list(range(48))


def test_partial_last_global_batch_is_dropped():
    loader = BatchLoader(IdSamples(10), 4, 2, 0, 1, vocab_size=100)
    assert loader.steps_left() == 2
    loader.next_step()
    loader.next_step()
    assert loader.steps_left() == 0
    with pytest.raises(StopIteration, match="2 samples left"):
        loader.next_step()
    assert loader.state_dict() == {"consumed_samples": 8}
    assert len(list(BatchLoader(IdSamples(10), 4, 2, 0, 1, 100, consumed_samples=3))) == 1


def test_ranks_without_input_read_nothing_but_advance():
    data = IdSamples(24)
    loader = BatchLoader(data, 8, 2, 1, 2, vocab_size=100, reads_data=False)
    assert loader.next_step() == [None, None]
    assert data.reads == 0 and loader.state_dict() == {"consumed_samples": 8}
    reader = BatchLoader(data, 8, 2, 1, 2, vocab_size=100)
    reader.next_step()
    assert data.reads == 4  # only this rank's samples


def test_validation_restarts_from_the_first_sample(sft_data):
    valid = build_dataset(sft_data[0], "sft", 17, 8, seed=5)
    loader = BatchLoader(valid, 4, 2, 0, 1, VOCAB)
    first = [sample_ids(mb) for mb in loader.next_step()] + [sample_ids(mb) for mb in loader.next_step()]
    assert loader.steps_left() == 0
    loader.restart()
    again = [sample_ids(mb) for mb in loader.next_step()] + [sample_ids(mb) for mb in loader.next_step()]
    assert again == first


# ---------------------------------------------------------------------------------------------
# Refused input
# ---------------------------------------------------------------------------------------------

def test_ids_outside_the_vocabulary_are_refused_naming_sample_and_id():
    class Bad(IdSamples):
        def __getitem__(self, i):
            s = super().__getitem__(i)
            if i == 5:
                s["labels"] = np.array([IGNORE_INDEX, 1, 100])
            if i == 6:
                s["tokens"] = np.array([0, -3, 1])
            return s

    loader = BatchLoader(Bad(12), 4, 2, 0, 1, vocab_size=100)
    loader.next_step()  # samples 0..3: ids < 100, labels up to 4 and IGNORE_INDEX are fine
    with pytest.raises(ValueError, match=r"sample 5: label id 100 at position 2 .*\[0, 100\)"):
        loader.next_step()
    small = BatchLoader(Bad(12), 4, 1, 0, 1, vocab_size=5, consumed_samples=4)
    with pytest.raises(ValueError, match="sample 4: label id 5 at position 0"):
        small.next_step()
    with pytest.raises(ValueError, match="sample 6: token id -3 at position 1"):
        BatchLoader(Bad(12), 1, 1, 0, 1, vocab_size=100, consumed_samples=6).next_step()


def test_loader_refuses_bad_layouts_and_states():
    with pytest.raises(ValueError, match="global_batch_size 10 .* micro_batch_size 2 .* size 2"):
        BatchLoader(IdSamples(20), 10, 2, 0, 2, 100)
    with pytest.raises(ValueError, match="dp_rank"):
        BatchLoader(IdSamples(20), 4, 1, 4, 4, 100)
    with pytest.raises(ValueError, match="micro_batch_size"):
        BatchLoader(IdSamples(20), 4, 0, 0, 1, 100)
    with pytest.raises(ValueError, match="vocab_size"):
        BatchLoader(IdSamples(20), 4, 1, 0, 1, 0)
    loader = BatchLoader(IdSamples(20), 4, 1, 0, 1, 100)
    with pytest.raises(ValueError, match="past the end"):
        loader.load_state_dict({"consumed_samples": 21})
    with pytest.raises(ValueError, match="consumed_samples"):
        loader.load_state_dict({"consumed_samples": -1})
    with pytest.raises(KeyError, match="consumed_samples"):
        loader.load_state_dict({})


def test_dataset_errors_name_the_problem(tmp_path, sft_data):
    prefix = sft_data[0]
    with pytest.raises(FileNotFoundError, match=r"nowhere.*not found"):
        build_dataset(str(tmp_path / "nowhere"), "ct", 8, 4, 0)
    with pytest.raises(FileNotFoundError, match=r"nowhere"):
        build_dataset(f"1 {prefix} 1 {tmp_path / 'nowhere'}", "sft", 20, 4, 0)
    no_mask = write_dataset(str(tmp_path / "plain"), [[[1, 2, 3, 4]]] * 5)
    assert len(build_dataset(no_mask, "ct", 4, 2, 0)) == 2
    with pytest.raises(FileNotFoundError, match=r"SFT needs its reward mask.*plain_reward_mask\.bin"):
        build_dataset(no_mask, "sft", 4, 2, 0)
    shifted = write_dataset(str(tmp_path / "shifted"), [[[1, 2, 3]], [[4, 5]]], [[[0, 1]], [[0, 0, 1]]])
    with pytest.raises(ValueError, match=r"shifted_reward_mask.*does not line up.*sequence 0 has 2 mask "
                                         r"values for 3 tokens"):
        build_dataset(shifted, "sft", 4, 2, 0)
    with pytest.raises(ValueError, match=r"plain' holds 20 tokens, fewer than one sample .* = 21"):
        build_dataset(no_mask, "ct", 20, 2, 0)
    long = write_dataset(str(tmp_path / "long"), [[[1, 2]], [[1] * 9, [2] * 4], [[3] * 20]],
                         [[[0, 1]], [[0] * 9, [0, 0, 0, 1]], [[0] * 19 + [1]]])
    with pytest.raises(ValueError, match=r"long: document 1 has 13 tokens, more than data.seq_length \+ 1 = 11"
                                         r".*2 records are too long.*raise data.seq_length to at least 19"):
        build_dataset(long, "sft", 10, 4, 0)
    assert build_dataset(long, "sft", 19, 4, 0).num_records == 3  # 20 tokens = seq_length + 1 fit
    unrewarded = write_dataset(str(tmp_path / "unrewarded"), [[[1, 2]], [[3, 4]]], [[[1, 0]], [[0, 0]]])
    with pytest.raises(ValueError, match="unrewarded: none of its 2 records has a reward token"):
        build_dataset(unrewarded, "sft", 4, 2, 0)
    with pytest.raises(ValueError, match="stage"):
        build_dataset(prefix, "rl", 8, 4, 0)
    with pytest.raises(ValueError, match="num_samples"):
        build_dataset(prefix, "sft", 20, 0, 0)
    other_vocab = write_dataset(str(tmp_path / "other"), [[[1, 2, 3]]] * 10, [[[0, 0, 1]]] * 10,
                                vocab_size=VOCAB + 1)
    with pytest.raises(ValueError, match="different vocabularies"):
        build_dataset(f"1 {prefix} 1 {other_vocab}", "sft", 20, 4, 0)


def test_a_bad_data_spec_is_refused_by_its_name():
    with pytest.raises(ValueError, match="data.valid"):
        build_dataset("0.5 a 0.5", "ct", 8, 4, 0, name="data.valid")
