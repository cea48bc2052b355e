import pytest
import torch
import torch.distributed as dist

from dist_utils import run_distributed


def _allreduce_rank(rank, world_size):
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return t.item()


def _fail_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError("boom on rank one")
    return rank


@pytest.mark.distributed
def test_run_distributed_collects_results():
    assert run_distributed(_allreduce_rank, 3) == [3.0, 3.0, 3.0]


@pytest.mark.distributed
def test_run_distributed_reports_rank_errors():
    with pytest.raises(RuntimeError, match="boom on rank one"):
        run_distributed(_fail_on_rank_one, 2, timeout=60)
