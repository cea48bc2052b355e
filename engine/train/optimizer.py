"""Mixed-precision AdamW over the flat buffers of :mod:`engine.train.grads`, optionally ZeRO-1.

The optimizer works on fp32 *pieces*: for each parameter, the part of it that this rank owns (all of
it without the distributed optimizer; under ZeRO-1 the intersection with this DP rank's slice of each
bucket, so a parameter may be cut mid-tensor). For each piece it keeps an fp32 master copy of the
weights and the Adam moments; the gradient is the matching fp32 view of the gradient buffer. A step:

    clip (global norm from GradBuffer.grad_norm)  ->  AdamW on the fp32 masters
    ->  masters cast into the parameter buffer    ->  ZeRO: all-gather the updated slices over DP

The update itself is ``torch.optim.AdamW`` (decoupled weight decay; none on norm weights), or NVIDIA
apex's ``FusedAdam`` in AdamW mode on CUDA when apex's compiled modules are present. Optimizer state
is saved and loaded per parameter name as whole local (TP-shard) tensors, so a checkpoint reshards
over DP (and, through the checkpoint module, over TP and PP).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from engine.train.grads import GradBuffer

STATE_KINDS = ("master", "exp_avg", "exp_avg_sq")


def apex_fused_adam_available() -> bool:
    """True when NVIDIA apex is installed with its compiled CUDA extensions (never the PyPI ``apex``)."""
    if not torch.cuda.is_available():
        return False
    if importlib.util.find_spec("amp_C") is None or importlib.util.find_spec("apex") is None:
        return False
    try:
        from apex.optimizers import FusedAdam  # noqa: F401
    except Exception:
        return False
    return True


def no_weight_decay(name: str) -> bool:
    """Norm weights (1-D, replicated) take no weight decay; matrices and embeddings do."""
    return name.endswith("norm.weight")


@dataclass
class AdamWConfig:
    lr: float = 3e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8


class MixedPrecisionAdamW:
    """AdamW on fp32 master pieces of a :class:`GradBuffer`'s owned region."""

    def __init__(self, buffer: GradBuffer, config: AdamWConfig, use_apex: bool | None = None):
        self.buffer, self.config = buffer, config
        self.pieces = buffer.owned_pieces()
        self.master = torch.empty(sum(e - s for _, s, e in self.pieces), dtype=torch.float32,
                                  device=buffer.grads.device)
        self.master_views, decay, no_decay = [], [], []
        offset = 0
        for slot, start, end in self.pieces:
            view = self.master[offset:offset + end - start]
            view.copy_(buffer.params[start:end])
            view.grad = buffer.grads[start:end]
            offset += end - start
            self.master_views.append(view)
            (no_decay if no_weight_decay(slot.name) else decay).append(view)
        groups = [{"params": decay, "weight_decay": config.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        use_apex = apex_fused_adam_available() if use_apex is None else use_apex
        kwargs = dict(lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps)
        if use_apex:
            from apex.optimizers import FusedAdam
            self.inner = FusedAdam(groups, adam_w_mode=True, **kwargs)
        else:
            self.inner = torch.optim.AdamW(groups, **kwargs, foreach=buffer.grads.is_cuda)
        self.implementation = "apex FusedAdam" if use_apex else "torch AdamW"
        self.steps = 0

    # ----------------------------------------------------------------------------------- step
    def step(self, lr: float, clip_grad: float, grad_norm: float) -> None:
        """One update with learning rate ``lr``; gradients are clipped to ``clip_grad`` (0: never)
        given their global norm ``grad_norm`` (finite: the caller skips non-finite steps)."""
        if clip_grad > 0:
            coefficient = clip_grad / (grad_norm + 1e-6)
            if coefficient < 1.0:
                self.buffer.scale_grads(coefficient)
        for group in self.inner.param_groups:
            group["lr"] = lr
        # The master views' .grad point into the gradient buffer; re-attach in case an optimizer
        # implementation replaced them.
        for (_, start, end), view in zip(self.pieces, self.master_views):
            view.grad = self.buffer.grads[start:end]
        self.inner.step()
        self.steps += 1
        self._copy_master_to_params()
        self.buffer.gather_params()

    def _copy_master_to_params(self) -> None:
        for (_, start, end), view in zip(self.pieces, self.master_views):
            self.buffer.params[start:end].copy_(view)

    def reload_master_from_params(self) -> None:
        """After parameters were loaded from elsewhere (a checkpoint's weights): masters follow."""
        for (_, start, end), view in zip(self.pieces, self.master_views):
            view.copy_(self.buffer.params[start:end])

    # ------------------------------------------------------------------------- checkpoint state
    def _flat_state(self, kind: str) -> torch.Tensor:
        """The state ``kind`` as a tensor shaped like the buffers (owned region filled, rest zero)."""
        flat = torch.zeros(self.buffer.numel, dtype=torch.float32, device=self.master.device)
        for (_, start, end), view in zip(self.pieces, self.master_views):
            if kind == "master":
                source = view
            else:
                state = self.inner.state.get(view, {})
                source = state.get(kind)
                if source is None:
                    continue
            flat[start:end].copy_(source)
        return flat

    def state_tensors(self, include_master: bool) -> dict[str, dict[str, torch.Tensor]]:
        """``{param name: {kind: whole local tensor}}`` on every DP rank (collective over DP under
        ZeRO). ``include_master=False`` leaves out masters that equal the fp32 parameters."""
        kinds = [k for k in STATE_KINDS if include_master or k != "master"]
        out: dict[str, dict[str, torch.Tensor]] = {s.name: {} for s in self.buffer.slots}
        for kind in kinds:
            full = self.buffer.gather_owned(self._flat_state(kind))
            for slot in self.buffer.slots:
                out[slot.name][kind] = full[slot.start:slot.end].view_as(slot.param).cpu().clone()
        return out

    def state_meta(self) -> dict:
        return {"steps": self.steps, "implementation": self.implementation,
                "lr": self.config.lr, "weight_decay": self.config.weight_decay,
                "betas": [self.config.beta1, self.config.beta2], "eps": self.config.eps}

    def load_state_tensors(self, tensors: dict[str, dict[str, torch.Tensor]], steps: int) -> None:
        """Set masters and moments from whole local tensors by name (each rank takes its pieces)."""
        missing = [s.name for s in self.buffer.slots if s.name not in tensors]
        if missing:
            raise KeyError(f"optimizer state lacks parameter(s) {missing}")
        for (slot, start, end), view in zip(self.pieces, self.master_views):
            state = tensors[slot.name]
            lo, hi = start - slot.start, end - slot.start

            def piece(kind: str) -> torch.Tensor:
                t = state[kind]
                if tuple(t.shape) != tuple(slot.param.shape):
                    raise ValueError(f"optimizer state {slot.name}/{kind}: shape {tuple(t.shape)}, "
                                     f"the parameter is {tuple(slot.param.shape)}")
                return t.reshape(-1)[lo:hi].to(device=view.device, dtype=torch.float32)

            if "master" in state:
                view.copy_(piece("master"))
            else:
                view.copy_(self.buffer.params[start:end])
            self.inner.state[view] = {
                "step": torch.tensor(float(steps)),
                "exp_avg": piece("exp_avg").clone(),
                "exp_avg_sq": piece("exp_avg_sq").clone(),
            }
        self.steps = steps
        self._copy_master_to_params()
        self.buffer.gather_params()
