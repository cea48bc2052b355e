"""The engine's Llama trains on CUDA with the Triton kernels and follows the PyTorch-ops run, and the
kernels pass the start-up self-check on this GPU.

Same weights, same batch, bf16 parameters: first-step gradients and the loss curve with
Ops("triton") must match the run with Ops("torch") to bf16 tolerance, and the kernels must really
have been called (and never under Ops("torch")).
"""
import importlib

import pytest
import torch
import torch.nn.functional as F

pytestmark = [pytest.mark.gpu, pytest.mark.triton]

VOCAB, SEQ, BATCH, STEPS = 512, 256, 4, 8


def _config():
    from engine.model.config import LlamaConfig

    # head_dim 64 (256 / 4) and GQA 2:1, both within the attention kernel's supported inputs.
    return LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ)


def _count_calls(monkeypatch, module_name, function_name, counter):
    try:
        module = importlib.import_module(module_name)
    except Exception:
        return False
    original = getattr(module, function_name)

    def counted(*args, **kwargs):
        counter[module_name] = counter.get(module_name, 0) + 1
        return original(*args, **kwargs)

    monkeypatch.setattr(module, function_name, counted)
    return True


def _train(mode: str):
    from engine.model.llama import Llama
    from engine.ops import Ops

    model = Llama(_config(), ops=Ops(mode))
    model.init_weights(seed=0)
    model.to(device="cuda", dtype=torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1)).cuda()
    losses, first_grads = [], None
    for step in range(STEPS):
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
        loss.backward()
        if step == 0:
            first_grads = {n: p.grad.float().clone() for n, p in model.named_parameters()}
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    torch.cuda.synchronize()
    return losses, first_grads


def test_llama_trains_with_kernels_like_pytorch_ops(monkeypatch):
    calls: dict[str, int] = {}
    assert _count_calls(monkeypatch, "kernels.rmsnorm", "rms_norm", calls)
    has_attention_kernel = _count_calls(monkeypatch, "kernels.attention", "flash_attention", calls)

    torch_losses, torch_grads = _train("torch")
    assert calls == {}, f"kernels called with Ops('torch'): {calls}"
    kernel_losses, kernel_grads = _train("triton")

    # 2 norms per layer + final norm, per step; attention once per layer per step.
    assert calls.get("kernels.rmsnorm", 0) == STEPS * 5
    if has_attention_kernel:
        assert calls.get("kernels.attention", 0) == STEPS * 2
    assert kernel_losses[-1] < kernel_losses[0] - 0.5, f"did not train: {kernel_losses}"

    for name, g_ref in torch_grads.items():
        g = kernel_grads[name]
        rel = ((g - g_ref).norm() / g_ref.norm().clamp_min(1e-12)).item()
        assert rel < 5e-2, f"first-step gradient of {name}: relative error {rel:.3g}"
    for step, (a, b) in enumerate(zip(kernel_losses, torch_losses)):
        # Same weights at step 0; afterwards bf16 rounding differences compound through the updates.
        tol = 5e-3 if step == 0 else 3e-2
        assert abs(a - b) <= tol * abs(b), f"step {step}: loss {a:.5f} with kernels vs {b:.5f} (PyTorch ops)"


@pytest.mark.parametrize("head_dim", [64, 128])
def test_kernels_pass_the_self_check_on_this_gpu(head_dim):
    """What the training loop runs at start-up under "auto": every kernel passes on this device, in
    bf16, at the default check shapes and at a Llama's own (head_dim 128, GQA 4)."""
    import warnings

    from engine.model.config import LlamaConfig
    from engine.ops import CheckShapes, Ops

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32 * head_dim, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=32, num_key_value_heads=8)
    for shapes in (CheckShapes(), CheckShapes.for_model(config)):
        ops = Ops("auto")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            verdicts = ops.self_check("cuda", shapes=shapes)
        assert [v.passed for v in verdicts.values()] == [True, True], [str(v) for v in verdicts.values()]
        assert ops.verdicts(torch.device("cuda", torch.cuda.current_device())) == verdicts
