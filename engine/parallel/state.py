"""Process groups for tensor (TP), data (DP) and pipeline (PP) parallelism.

Ranks are laid out as in Megatron-LM: TP varies fastest, then DP, then PP, so

    global rank = tp_rank + TP * (dp_rank + DP * pp_rank)

and a TP group is TP consecutive ranks, which stay inside one node when TP <= GPUs per node.
:func:`rank_layout` is the pure description of that layout (testable without processes);
:func:`init_parallel` turns it into ``torch.distributed`` groups once per process.
Process groups are the only global state of the engine; they live in the returned
:class:`ParallelState`, which callers pass on explicitly.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from engine.parallel.layout import PipelineLayout


@dataclass(frozen=True)
class RankLayout:
    """Every group of every kind, as lists of global ranks (each list in ascending order).

    ``tp``, ``dp``, ``pp``: the groups of each parallelism. ``model``: the TP x PP ranks that hold
    one full copy of the model (same DP rank), used for global gradient norms and checkpoints.
    ``embedding``: the first and last stage of each pipeline (one rank when PP = 1), which both hold
    the embedding matrix when embeddings are tied and sum its gradients.
    """

    world_size: int
    tp_size: int
    pp_size: int
    dp_size: int
    tp: list[list[int]]
    dp: list[list[int]]
    pp: list[list[int]]
    model: list[list[int]]
    embedding: list[list[int]]

    def coordinates(self, rank: int) -> tuple[int, int, int]:
        """(tp_rank, dp_rank, pp_rank) of a global rank."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside 0..{self.world_size - 1}")
        return rank % self.tp_size, (rank // self.tp_size) % self.dp_size, rank // (self.tp_size * self.dp_size)


def _check_sizes(world_size: int, tp: int, pp: int, dp: int | None) -> int:
    for name, value in (("world size", world_size), ("tensor-parallel size", tp),
                        ("pipeline-parallel size", pp), ("data-parallel size", 1 if dp is None else dp)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if world_size % (tp * pp):
        raise ValueError(f"world size {world_size} is not divisible by tensor-parallel size {tp} "
                         f"x pipeline-parallel size {pp}")
    implied = world_size // (tp * pp)
    if dp is not None and dp != implied:
        raise ValueError(f"world size {world_size} != tensor-parallel {tp} x pipeline-parallel {pp} "
                         f"x data-parallel {dp} (= {tp * pp * dp})")
    return implied


def rank_layout(world_size: int, tp: int, pp: int, dp: int | None = None) -> RankLayout:
    """The groups of a (TP, DP, PP) layout; DP defaults to world_size / (TP * PP)."""
    dp = _check_sizes(world_size, tp, pp, dp)
    # Rank r sits at grid[pp_rank, dp_rank, tp_rank]; a group is a line of this grid along one axis.
    grid = torch.arange(world_size).reshape(pp, dp, tp)

    def lines(t: torch.Tensor) -> list[list[int]]:
        return [row.tolist() for row in t.reshape(-1, t.shape[-1])]

    pipelines = lines(grid.permute(1, 2, 0))
    return RankLayout(
        world_size=world_size, tp_size=tp, pp_size=pp, dp_size=dp,
        tp=lines(grid),
        dp=lines(grid.permute(0, 2, 1)),
        pp=pipelines,
        model=lines(grid.permute(1, 0, 2).reshape(dp, pp * tp)),
        embedding=[sorted({ranks[0], ranks[-1]}) for ranks in pipelines],
    )


def validate_layout(config: Any, tp: int, pp: int = 1, dp: int | None = None,
                    world_size: int | None = None, virtual_stages: int = 1) -> None:
    """Refuse, by name and before any work, a layout the model cannot be split into.

    ``config`` needs ``num_attention_heads``, ``num_key_value_heads`` and ``num_hidden_layers``
    (a :class:`engine.model.config.LlamaConfig`).
    """
    _check_sizes(world_size if world_size is not None else tp * pp * (dp or 1), tp, pp, dp)
    heads = config.num_attention_heads
    kv_heads = config.num_key_value_heads or heads
    if heads % tp:
        raise ValueError(f"tensor-parallel size {tp} does not divide the number of attention heads "
                         f"(num_attention_heads={heads})")
    if kv_heads % tp:
        raise ValueError(f"tensor-parallel size {tp} does not divide the number of key/value heads "
                         f"(num_key_value_heads={kv_heads}); use a TP size dividing it")
    if config.intermediate_size % tp:
        raise ValueError(f"tensor-parallel size {tp} does not divide the MLP width "
                         f"(intermediate_size={config.intermediate_size})")
    PipelineLayout(config.num_hidden_layers, pp, virtual_stages)  # raises, naming what does not divide


@dataclass(frozen=True)
class ParallelState:
    """This process's place in the layout and its process groups.

    A group is None when this process runs alone (no ``torch.distributed``); the collectives treat
    None and one-rank groups as identities, so single-process code paths are the same code.
    """

    layout: RankLayout
    rank: int
    tp_rank: int
    dp_rank: int
    pp_rank: int
    tp_group: Any = field(default=None, repr=False)
    dp_group: Any = field(default=None, repr=False)
    pp_group: Any = field(default=None, repr=False)
    model_group: Any = field(default=None, repr=False)
    embedding_group: Any = field(default=None, repr=False)  # None on middle pipeline stages
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    @property
    def tp_size(self) -> int:
        return self.layout.tp_size

    @property
    def pp_size(self) -> int:
        return self.layout.pp_size

    @property
    def dp_size(self) -> int:
        return self.layout.dp_size

    @property
    def tp_ranks(self) -> list[int]:
        return self.layout.tp[self.rank // self.tp_size]

    @property
    def pp_ranks(self) -> list[int]:
        return next(g for g in self.layout.pp if self.rank in g)

    @property
    def dp_ranks(self) -> list[int]:
        return next(g for g in self.layout.dp if self.rank in g)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def single_process_state() -> ParallelState:
    """The state of a run in one process without ``torch.distributed``: every size is 1."""
    return ParallelState(layout=rank_layout(1, 1, 1), rank=0, tp_rank=0, dp_rank=0, pp_rank=0)


_ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def init_parallel(tp: int = 1, pp: int = 1, dp: int | None = None, backend: str | None = None,
                  timeout_s: float = 600.0) -> ParallelState:
    """Create the TP, DP, PP and model-parallel groups of this process.

    Uses the default process group when one is already initialised (tests, embedding programs),
    otherwise initialises it from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT): NCCL when CUDA is available, gloo otherwise. Without that
    environment and with every size 1, returns :func:`single_process_state`. Every process of
    the job must call this with the same arguments.
    """
    if not dist.is_initialized():
        missing = [v for v in _ENV_VARS if v not in os.environ]
        if missing:
            if tp == pp == 1 and dp in (None, 1):
                return single_process_state()
            raise RuntimeError(f"tensor-parallel {tp} x pipeline-parallel {pp} needs several processes, "
                               f"but the environment lacks {', '.join(missing)}: launch with torchrun")
        world_size, rank = _env_int("WORLD_SIZE"), _env_int("RANK")
        # Check before initialising: a wrong layout must not cost a rendezvous.
        _check_sizes(world_size, tp, pp, dp)
        local_rank = _env_int("LOCAL_RANK")
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
    world_size, rank = dist.get_world_size(), dist.get_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    layout = rank_layout(world_size, tp, pp, dp)
    tp_rank, dp_rank, pp_rank = layout.coordinates(rank)

    def my_group(groups: list[list[int]]):
        # new_group is collective over the whole world: every rank creates every group, same order.
        mine = None
        for ranks in groups:
            group = dist.new_group(ranks)
            if rank in ranks:
                mine = group
        return mine

    tp_group = my_group(layout.tp)
    dp_group = my_group(layout.dp)
    pp_group = my_group(layout.pp)
    model_group = my_group(layout.model)
    embedding_group = my_group(layout.embedding)
    on_cuda = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if on_cuda else torch.device("cpu")
    return ParallelState(layout=layout, rank=rank, tp_rank=tp_rank, dp_rank=dp_rank, pp_rank=pp_rank,
                         tp_group=tp_group, dp_group=dp_group, pp_group=pp_group,
                         model_group=model_group, embedding_group=embedding_group,
                         local_rank=local_rank, device=device)
