"""Data-parallel, resumable batches of samples.

The dataset order is the global order. One step takes ``micro_batch_size * dp_size`` consecutive
samples; DP rank r gets the r-th contiguous ``micro_batch_size`` of them. Gradient accumulation
simply draws more steps. ``consumed_samples`` counts samples taken by all ranks together, so it is
the same number on every rank, survives a change of DP size, and is what a checkpoint stores: a
run resumed from it sees exactly the samples the uninterrupted run would have seen. A last step
that the dataset cannot fill is dropped.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch


class SampleLoader:
    """Yields LongTensor batches ``[micro_batch_size, sample_length]`` of this DP rank's samples."""

    def __init__(self, dataset, micro_batch_size: int, dp_rank: int, dp_size: int,
                 consumed_samples: int = 0):
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, dp_size), got dp_rank={dp_rank}, dp_size={dp_size}")
        self.dataset = dataset
        self.micro_batch_size = int(micro_batch_size)
        self.dp_rank = int(dp_rank)
        self.dp_size = int(dp_size)
        self.consumed_samples = self._check_consumed(consumed_samples)

    @property
    def samples_per_step(self) -> int:
        return self.micro_batch_size * self.dp_size

    def _check_consumed(self, consumed: Any) -> int:
        if not isinstance(consumed, (int, np.integer)) or consumed < 0:
            raise ValueError(f"consumed_samples must be an integer >= 0, got {consumed!r}")
        if consumed > len(self.dataset):
            raise ValueError(f"consumed_samples = {consumed} is past the end of the dataset "
                             f"({len(self.dataset)} samples)")
        return int(consumed)

    def __len__(self) -> int:
        """Steps left from the current position."""
        return (len(self.dataset) - self.consumed_samples) // self.samples_per_step

    def __iter__(self) -> Iterator[torch.Tensor]:
        while self.consumed_samples + self.samples_per_step <= len(self.dataset):
            first = self.consumed_samples + self.dp_rank * self.micro_batch_size
            batch = np.stack([np.asarray(self.dataset[i], dtype=np.int64)
                              for i in range(first, first + self.micro_batch_size)])
            # Advance before yielding: a state_dict taken while the caller holds this batch
            # resumes after it.
            self.consumed_samples += self.samples_per_step
            yield torch.from_numpy(batch)

    def state_dict(self) -> dict[str, int]:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "consumed_samples" not in state:
            raise KeyError("loader state has no 'consumed_samples'")
        self.consumed_samples = self._check_consumed(state["consumed_samples"])
