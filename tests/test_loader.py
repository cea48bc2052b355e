"""SampleLoader: DP ranks split every global step exactly, and a resumed loader continues the
uninterrupted run sample for sample."""
import numpy as np
import pytest
import torch

from engine.data.loader import SampleLoader


class IdDataset:
    """Sample i is [i, i+1000, ...]: a batch says exactly which samples it holds."""

    def __init__(self, n, width=5):
        self.n, self.width = n, width
        self.reads = 0

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        self.reads += 1
        return np.arange(self.width, dtype=np.int64) * 1000 + i


def sample_ids(batch):
    return batch[:, 0].tolist()


@pytest.mark.parametrize("mbs, dp", [(1, 1), (2, 1), (1, 3), (3, 2), (2, 4)])
def test_ranks_cover_each_global_step_exactly_once(mbs, dp):
    dataset = IdDataset(50)
    loaders = [SampleLoader(dataset, mbs, r, dp) for r in range(dp)]
    per_rank = [list(loader) for loader in loaders]
    steps = 50 // (mbs * dp)
    assert all(len(batches) == steps for batches in per_rank)
    for step in range(steps):
        got = []
        for r in range(dp):
            batch = per_rank[r][step]
            assert batch.dtype == torch.int64 and tuple(batch.shape) == (mbs, 5)
            assert torch.equal(batch[:, 1] - batch[:, 0], torch.full((mbs,), 1000))
            got += sample_ids(batch)
        # Rank order concatenated is the dataset order of this step.
        assert got == list(range(step * mbs * dp, (step + 1) * mbs * dp))
    assert all(loader.state_dict() == {"consumed_samples": steps * mbs * dp} for loader in loaders)


def _global_stream(loaders, steps):
    out = []
    iters = [iter(loader) for loader in loaders]
    for _ in range(steps):
        for it in iters:
            out += sample_ids(next(it))
    return out


@pytest.mark.parametrize("mbs, dp, stop_after", [(2, 2, 3), (1, 3, 0), (3, 1, 7)])
def test_resume_from_state_dict_continues_the_run(mbs, dp, stop_after):
    dataset = IdDataset(60)
    uninterrupted = [SampleLoader(dataset, mbs, r, dp) for r in range(dp)]
    full = [[sample_ids(b) for b in loader] for loader in uninterrupted]

    first = [SampleLoader(dataset, mbs, r, dp) for r in range(dp)]
    iters = [iter(loader) for loader in first]
    for _ in range(stop_after):
        for it in iters:
            next(it)
    states = [loader.state_dict() for loader in first]
    assert len({s["consumed_samples"] for s in states}) == 1  # the same number on every rank

    resumed = [SampleLoader(IdDataset(60), mbs, r, dp) for r in range(dp)]
    for loader, state in zip(resumed, states):
        loader.load_state_dict(state)
    for r in range(dp):
        assert [sample_ids(b) for b in resumed[r]] == full[r][stop_after:]
    # The constructor argument is the same thing as a loaded state.
    direct = SampleLoader(IdDataset(60), mbs, 0, dp, consumed_samples=states[0]["consumed_samples"])
    assert [sample_ids(b) for b in direct] == full[0][stop_after:]


def test_resume_with_a_different_dp_size_continues_the_global_order():
    dataset = IdDataset(48)
    before = [SampleLoader(dataset, 2, r, 2) for r in range(2)]
    seen = _global_stream(before, 5)
    state = before[0].state_dict()
    after = [SampleLoader(dataset, 1, r, 4) for r in range(4)]
    for loader in after:
        loader.load_state_dict(state)
    seen += _global_stream(after, len(after[0]))
    assert seen == list(range(48))


def test_only_this_ranks_samples_are_read():
    dataset = IdDataset(40)
    list(SampleLoader(dataset, 2, 1, 4))
    assert dataset.reads == 40 // 4


def test_last_partial_step_is_dropped_and_bad_state_refused():
    loader = SampleLoader(IdDataset(10), 3, 0, 2)
    assert len(loader) == 1 and len(list(loader)) == 1 and len(loader) == 0
    with pytest.raises(ValueError, match="past the end"):
        loader.load_state_dict({"consumed_samples": 11})
    with pytest.raises(ValueError, match="consumed_samples"):
        loader.load_state_dict({"consumed_samples": -1})
    with pytest.raises(KeyError, match="consumed_samples"):
        loader.load_state_dict({})
    with pytest.raises(ValueError, match="dp_rank"):
        SampleLoader(IdDataset(10), 1, 2, 2)
    with pytest.raises(ValueError, match="micro_batch_size"):
        SampleLoader(IdDataset(10), 0, 0, 1)


def test_loader_over_gpt_samples(tmp_path):
    from engine.data.samples import GPTSampleDataset
    from test_sample_index import FakeIndexed

    docs = [[list(range(100 * i, 100 * i + 17 + i))] for i in range(12)]
    dataset = GPTSampleDataset(FakeIndexed(docs), 8, seed=4, num_samples=20, cache_dir=str(tmp_path))
    batches = list(SampleLoader(dataset, 2, 1, 2))
    assert len(batches) == 5
    for step, batch in enumerate(batches):
        assert batch.shape == (2, 9)
        for row in range(2):
            assert batch[row].tolist() == dataset[step * 4 + 2 + row].tolist()
