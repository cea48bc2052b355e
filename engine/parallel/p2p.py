"""Point-to-point traffic between neighbouring pipeline stages: activations forward, their gradients back.

    comm = PipelineComm(state)                      # once per run: the ring of this rank's pipeline
    transfer = comm.post(send_next=y, recv_prev=(shape, dtype))   # one batched exchange, posted
    transfer.wait_received(); x = transfer.from_prev               # when the input is needed

Every exchange is one ``batch_isend_irecv`` holding all of this rank's sends and receives of one
schedule tick. The schedules plan the ticks so that the two ends of every message post it in the
same tick (see :mod:`engine.train.schedules`), in the same order of ticks on every rank, so posted
batches always find their match, on gloo or NCCL (where unbatched sends and receives between the
same two ranks would serialise on one stream and deadlock). A rank waits for a received tensor only
before the action that reads it, and for a send only before freeing what it sent.

The ranks form a ring (the last stage's next is the first): interleaved schedules send the last
rank's output of chunk c to the first rank's chunk c + 1. Receive buffers come from a pool and go
back to it once their microbatch's backward is done, so steady-state steps allocate none.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from engine.parallel.state import ParallelState


class PipelineComm:
    """This rank's two neighbours in its pipeline group, and the pool of receive buffers."""

    def __init__(self, state: ParallelState):
        ranks = state.pp_ranks
        if len(ranks) < 2:
            raise ValueError("PipelineComm needs a pipeline of at least two stages (parallel.pp >= 2)")
        position = ranks.index(state.rank)
        self.group = state.pp_group
        self.next_rank = ranks[(position + 1) % len(ranks)]
        self.prev_rank = ranks[(position - 1) % len(ranks)]
        self.device = state.device
        self._pool: dict[tuple, list[torch.Tensor]] = {}
        # Under NCCL the first operation on a group must involve all its ranks: one small
        # collective here, so that later exchanges between two ranks only are well defined.
        dist.all_reduce(torch.zeros(1, device=self.device), group=self.group)

    # ------------------------------------------------------------------------------ buffers
    def buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A receive buffer of ``shape`` and ``dtype``: a released one when there is one."""
        free = self._pool.get((tuple(shape), dtype))
        return free.pop() if free else torch.empty(shape, dtype=dtype, device=self.device)

    def release(self, tensor: torch.Tensor) -> None:
        """Give a receive buffer back once nothing reads it any more (its backward is done)."""
        tensor.grad = None
        tensor.requires_grad_(False)
        self._pool.setdefault((tuple(tensor.shape), tensor.dtype), []).append(tensor)

    # ------------------------------------------------------------------------------ traffic
    def post(self, *, send_next: torch.Tensor | None = None, send_prev: torch.Tensor | None = None,
             recv_prev: tuple[tuple[int, ...], torch.dtype] | None = None,
             recv_next: tuple[tuple[int, ...], torch.dtype] | None = None) -> "Transfer":
        """Post one batch of sends to and receives from the neighbours, without waiting for it.

        ``recv_prev`` / ``recv_next``: (shape, dtype) of the tensor expected from that side, or None.
        Received tensors are valid after :meth:`Transfer.wait_received`; sent ones must stay
        untouched until :meth:`Transfer.sent`.
        """
        sends, recvs = [], []
        if send_next is not None:
            sends.append(dist.P2POp(dist.isend, send_next.contiguous(), self.next_rank, self.group))
        if send_prev is not None:
            sends.append(dist.P2POp(dist.isend, send_prev.contiguous(), self.prev_rank, self.group))
        from_prev = self.buffer(*recv_prev) if recv_prev is not None else None
        from_next = self.buffer(*recv_next) if recv_next is not None else None
        if from_prev is not None:
            recvs.append(dist.P2POp(dist.irecv, from_prev, self.prev_rank, self.group))
        if from_next is not None:
            recvs.append(dist.P2POp(dist.irecv, from_next, self.next_rank, self.group))
        works = dist.batch_isend_irecv(sends + recvs) if sends or recvs else []
        if len(works) == len(sends) + len(recvs):  # one request per operation (gloo)
            send_works, recv_works = works[:len(sends)], works[len(sends):]
        else:  # one request for the whole coalesced batch (NCCL)
            send_works = recv_works = works
        return Transfer(from_prev, from_next, [op.tensor for op in sends], send_works, recv_works)

    def exchange(self, **kwargs) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """:meth:`post` and wait for all of it: (tensor from prev, tensor from next)."""
        transfer = self.post(**kwargs)
        transfer.wait_received()
        transfer.wait_sent()
        return transfer.from_prev, transfer.from_next


class Transfer:
    """One posted batch: its received tensors, and the requests to wait for before using them (or
    before reusing what was sent). Waiting only when a tensor is needed keeps the ranks from moving
    in lockstep: a rank runs on while its sends complete and its next inputs arrive."""

    def __init__(self, from_prev, from_next, sent, send_works, recv_works):
        self.from_prev, self.from_next, self.sent_tensors = from_prev, from_next, sent
        self._send_works, self._recv_works = list(send_works), list(recv_works)

    def wait_received(self) -> None:
        for work in self._recv_works:
            work.wait()
        self._recv_works.clear()

    def sent(self) -> bool:
        """True once every send of the batch has completed (its tensors may be freed or reused)."""
        self._send_works = [w for w in self._send_works if not w.is_completed()]
        return not self._send_works

    def wait_sent(self) -> None:
        for work in self._send_works:
            work.wait()
        self._send_works.clear()


def free_storage(output: torch.Tensor) -> None:
    """Drop the storage of a stage's sent output while keeping its autograd node: the next stage
    holds the values now, and the backward needs only the node (the last operation of a stage is
    the residual add, which saves no output). What keeps a stage's activation memory to the
    microbatches the schedule has in flight."""
    if output._base is None:
        output.data = torch.empty((1,), dtype=output.dtype, device=output.device)


def backward_from(output: torch.Tensor, grad: torch.Tensor | None) -> None:
    """``output.backward(grad)`` for an output whose storage :func:`free_storage` dropped (the
    autograd engine's shape check would refuse it); a loss (``grad`` None) backs up from 1."""
    if grad is None:
        output.backward()
        return
    torch.autograd.Variable._execution_engine.run_backward(
        (output,), (grad,), False, False, (), True, True)  # keep_graph, create_graph, inputs,
    # allow_unreachable, accumulate_grad: what Tensor.backward passes, without the shape check.
