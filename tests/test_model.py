"""The engine Llama against transformers.LlamaForCausalLM (same random weights, fp32, eval mode)."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

from engine.model.hf import engine_to_hf_name, hf_to_engine_name
from engine.model.config import LlamaConfig
from engine.model.llama import Attention, Llama, MLP, RMSNorm, init_parameter, rope_inv_freq
from engine.ops import TORCH_OPS, Ops, attention_reference, rms_norm_reference
from engine.parallel.state import single_process_state
from engine.parallel.tensor_parallel import RMSNormEnteringTP, build_parallel_llama
from kernel_marks import INTERPRETER_ONLY

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 256}
BASE = dict(vocab_size=250, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
            rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
CONFIGS = {
    "gqa2_llama2": dict(BASE),
    "kv1_mqa": dict(BASE, num_key_value_heads=1, vocab_size=300),
    "mha_tied": dict(BASE, num_key_value_heads=4, tie_word_embeddings=True, vocab_size=256),
    "llama3_rope_scaling": dict(BASE, hidden_size=128, num_attention_heads=8, num_key_value_heads=2,
                                rope_theta=500000.0, rope_scaling=LLAMA3_SCALING, vocab_size=211),
    "explicit_head_dim": dict(BASE, head_dim=32, num_key_value_heads=2, vocab_size=203),
    "linear_rope": dict(BASE, rope_scaling={"rope_type": "linear", "factor": 4.0}),
}


def make_pair(kwargs, seed=0):
    """A transformers model with random weights (norms too) and the engine model holding the same."""
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**copy.deepcopy(kwargs), attn_implementation="eager")).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            # Random norms (around 1) and larger weights than the default init, so every term counts.
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    ours = Llama(LlamaConfig.from_hf_dict(hf.config.to_dict())).eval()
    ours_params = dict(ours.named_parameters())
    with torch.no_grad():
        for hf_name, tensor in hf.state_dict().items():
            name = hf_to_engine_name(hf_name)
            if name == "lm_head.weight" and ours.config.tie_word_embeddings:
                continue
            ours_params[name].copy_(tensor)
    return hf, ours


def assert_close(actual, expected, what):
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_and_gradients_match_transformers(name):
    hf, ours = make_pair(CONFIGS[name])
    vocab = hf.config.vocab_size
    ids = torch.randint(0, vocab, (2, 37), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, vocab, (2, 37), generator=torch.Generator().manual_seed(2))

    hf_logits = hf(ids).logits
    our_logits = ours(ids)
    assert our_logits.shape == (2, 37, vocab)
    assert_close(our_logits, hf_logits, "logits")

    F.cross_entropy(hf_logits.flatten(0, 1), targets.flatten()).backward()
    F.cross_entropy(our_logits.flatten(0, 1), targets.flatten()).backward()
    hf_params = dict(hf.named_parameters())
    assert {engine_to_hf_name(n) for n, _ in ours.named_parameters()} == set(hf_params)
    for n, p in ours.named_parameters():
        ref = hf_params[engine_to_hf_name(n)].grad
        assert ref is not None and ref.abs().max() > 0
        assert_close(p.grad, ref, f"grad of {n}")


@pytest.mark.parametrize("name", ["llama3_rope_scaling", "gqa2_llama2"])
def test_position_ids_and_rope_frequencies_match_transformers(name):
    hf, ours = make_pair(CONFIGS[name])
    # inv_freq bit for bit, including the three Llama-3 regimes (kept, smoothed, divided).
    torch.testing.assert_close(rope_inv_freq(ours.config), hf.model.rotary_emb.inv_freq, rtol=0, atol=0)
    ids = torch.randint(0, hf.config.vocab_size, (2, 19))
    # Far positions, where the scaled low frequencies make a visible difference.
    positions = torch.stack([torch.arange(19) + 1000, torch.arange(19) * 7 + 3])
    with torch.no_grad():
        assert_close(ours(ids, position_ids=positions), hf(ids, position_ids=positions).logits, "logits")
        # 1-D position ids apply to every row.
        assert_close(ours(ids, position_ids=torch.arange(19) + 5),
                     hf(ids, position_ids=(torch.arange(19) + 5)[None].expand(2, -1)).logits, "logits")


def test_llama3_scaling_changes_frequencies():
    plain = LlamaConfig(**{**CONFIGS["llama3_rope_scaling"], "rope_scaling": None})
    scaled = LlamaConfig(**CONFIGS["llama3_rope_scaling"])
    a, b = rope_inv_freq(plain), rope_inv_freq(scaled)
    wavelen = 2 * math.pi / a
    assert torch.equal(a[wavelen < 64], b[wavelen < 64])  # high frequencies kept
    assert torch.allclose(a[wavelen > 256] / 8, b[wavelen > 256])  # low frequencies divided
    medium = (wavelen >= 64) & (wavelen <= 256)
    assert medium.any() and (b[medium] < a[medium]).all() and (b[medium] > a[medium] / 8).all()


def test_rms_norm_matches_transformers_in_bf16():
    """Half-precision order of operations: fp32 statistics, cast back, then multiply."""
    norm = transformers.models.llama.modeling_llama.LlamaRMSNorm(64, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(1 + torch.randn(64))
    norm = norm.to(torch.bfloat16)
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16) * 4
    assert torch.equal(rms_norm_reference(x, norm.weight, 1e-5), norm(x))
    assert torch.equal(Ops("auto").rms_norm(x, norm.weight, 1e-5), norm(x))  # CPU: PyTorch


def _naive_attention(q, k, v, scale):
    groups = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    s = q.shape[1]
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


@pytest.mark.parametrize("kv_heads", [1, 2, 6])
def test_attention_matches_naive_gqa(kv_heads):
    q = torch.randn(2, 9, 6, 16)
    k, v = torch.randn(2, 9, kv_heads, 16), torch.randn(2, 9, kv_heads, 16)
    torch.testing.assert_close(attention_reference(q, k, v), _naive_attention(q, k, v, 0.25),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(Ops("torch").attention(q, k, v, softmax_scale=0.1),
                               _naive_attention(q, k, v, 0.1), rtol=1e-5, atol=1e-5)


def test_attention_rejects_incompatible_shapes():
    for mode in ("torch", "triton"):
        with pytest.raises(ValueError, match="incompatible shapes"):
            Ops(mode).attention(torch.randn(1, 4, 6, 8), torch.randn(1, 4, 4, 8), torch.randn(1, 4, 4, 8))
    with pytest.raises(ValueError, match="incompatible shapes"):
        attention_reference(torch.randn(1, 4, 6, 8), torch.randn(1, 5, 3, 8), torch.randn(1, 5, 3, 8))


class CountingOps(Ops):
    """PyTorch ops that count their calls, to see which object a module really uses."""

    def __init__(self):
        super().__init__("torch")
        self.calls = {"rms_norm": 0, "apply_rotary": 0, "attention": 0}

    def rms_norm(self, *args, **kwargs):
        self.calls["rms_norm"] += 1
        return super().rms_norm(*args, **kwargs)

    def apply_rotary(self, *args, **kwargs):
        self.calls["apply_rotary"] += 1
        return super().apply_rotary(*args, **kwargs)

    def attention(self, *args, **kwargs):
        self.calls["attention"] += 1
        return super().attention(*args, **kwargs)


def _modules_with_ops(model):
    return [m for m in model.modules() if isinstance(m, (RMSNorm, Attention))]


def test_model_holds_the_given_ops_and_defaults_to_pytorch():
    config = LlamaConfig(**BASE)
    plain = Llama(config)
    assert plain.ops is TORCH_OPS and all(m.ops is TORCH_OPS for m in _modules_with_ops(plain))
    counting = CountingOps()
    model = Llama(config, ops=counting)
    assert len(_modules_with_ops(model)) == 2 * 3 + 1  # per layer 2 norms + attention; final norm
    assert model.ops is counting and all(m.ops is counting for m in _modules_with_ops(model))
    model.init_weights(seed=0)
    plain.init_weights(seed=0)
    ids = torch.randint(0, config.vocab_size, (2, 7))
    with torch.no_grad():
        assert torch.equal(model(ids), plain(ids))
    assert counting.calls == {"rms_norm": 5, "apply_rotary": 2, "attention": 2}
    with pytest.raises(TypeError, match="expected an engine.ops.Ops"):
        model.set_ops("auto")


def test_set_ops_reaches_the_norms_tensor_parallelism_put_in():
    """A TP=1 parallel model: its norms are RMSNormEnteringTP (built without RMSNorm.__init__), which
    compute with the class default until set_ops gives every module the model's object."""
    config = LlamaConfig(**BASE)
    model = build_parallel_llama(config, single_process_state(), seed=3)
    entering = [m for m in model.modules() if isinstance(m, RMSNormEnteringTP)]
    assert len(entering) == 2 * config.num_hidden_layers + 1
    ids = torch.randint(0, config.vocab_size, (2, 7))
    with torch.no_grad():
        expected = model(ids)  # the class defaults: PyTorch
    counting = CountingOps()
    model.set_ops(counting)
    assert all(m.ops is counting for m in entering)
    assert all(m.ops is counting for m in _modules_with_ops(model))
    with torch.no_grad():
        assert torch.equal(model(ids), expected)
    assert counting.calls == {"rms_norm": 5, "apply_rotary": 2, "attention": 2}
    model.set_ops(None)
    assert all(m.ops is TORCH_OPS for m in _modules_with_ops(model))


def _slice_linear(linear, dim, index, parts):
    w = linear.weight.chunk(parts, dim=dim)[index]
    out = nn.Linear(w.shape[1], w.shape[0], bias=False)
    out.weight = nn.Parameter(w.clone())
    return out


@pytest.mark.parametrize("tp", [2, 4])
def test_blocks_run_on_tensor_parallel_shards(tp):
    """With column-sliced q/k/v (fewer heads) and row-sliced o_proj, as tensor parallelism builds
    them, each shard derives its heads from the projections and the shards sum to the full output."""
    config = LlamaConfig(**dict(BASE, num_attention_heads=8, num_key_value_heads=4))
    torch.manual_seed(0)
    attn, mlp = Attention(config), MLP(config)
    x = torch.randn(2, 11, config.hidden_size)
    attn_sum, mlp_sum = 0, 0
    for rank in range(tp):
        a = copy.deepcopy(attn)
        for proj in ("q_proj", "k_proj", "v_proj"):
            setattr(a, proj, _slice_linear(getattr(attn, proj), 0, rank, tp))
        a.o_proj = _slice_linear(attn.o_proj, 1, rank, tp)
        attn_sum = attn_sum + a(x)
        m = copy.deepcopy(mlp)
        m.gate_proj, m.up_proj = (_slice_linear(getattr(mlp, p), 0, rank, tp) for p in ("gate_proj", "up_proj"))
        m.down_proj = _slice_linear(mlp.down_proj, 1, rank, tp)
        mlp_sum = mlp_sum + m(x)
    with torch.no_grad():
        torch.testing.assert_close(attn_sum, attn(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mlp_sum, mlp(x), rtol=1e-5, atol=1e-5)


def test_meta_build_and_init_match_init_weights():
    config = LlamaConfig(**CONFIGS["kv1_mqa"])
    eager = Llama(config)
    eager.init_weights(seed=7)
    with torch.device("meta"):
        lazy = Llama(config)
    assert all(p.is_meta for p in lazy.parameters())
    lazy.to_empty(device="cpu")
    lazy.init_weights(seed=7)
    for (n, a), (_, b) in zip(eager.named_parameters(), lazy.named_parameters()):
        assert torch.equal(a, b), n
    ids = torch.randint(0, config.vocab_size, (1, 8))
    with torch.no_grad():
        assert torch.equal(eager(ids), lazy(ids))

    # The values depend on (seed, name) only: a pipeline stage holding layer 1 alone gets the same.
    stage = Llama(config, layer_ids=[1], has_embedding=False, has_head=True)
    stage.init_weights(seed=7)
    full = dict(eager.named_parameters())
    for n, p in stage.named_parameters():
        assert torch.equal(p, full[n]), n
    other = Llama(config)
    other.init_weights(seed=8)
    assert not torch.equal(other.embed_tokens.weight, eager.embed_tokens.weight)


def test_init_parameter_distribution_and_independence():
    config = LlamaConfig(**dict(BASE, initializer_range=0.05))
    w = init_parameter("layers.0.mlp.up_proj.weight", (512, 256), config, seed=3)
    assert w.dtype == torch.float32 and w.shape == (512, 256)
    assert abs(w.mean().item()) < 0.002 and abs(w.std().item() - 0.05) < 0.002
    assert torch.equal(w, init_parameter("layers.0.mlp.up_proj.weight", (512, 256), config, seed=3))
    assert not torch.equal(w, init_parameter("layers.1.mlp.up_proj.weight", (512, 256), config, seed=3))
    assert torch.equal(init_parameter("norm.weight", (64,), config, 3), torch.ones(64))
    assert torch.equal(init_parameter("layers.4.input_layernorm.weight", (64,), config, 3), torch.ones(64))


def test_init_weights_refuses_sharded_shapes():
    config = LlamaConfig(**BASE)
    model = Llama(config)
    model.layers["0"].self_attn.q_proj = nn.Linear(64, 32, bias=False)
    with pytest.raises(ValueError, match="layers.0.self_attn.q_proj.weight"):
        model.init_weights(0)


def test_pipeline_stages_compose_to_the_full_model():
    with pytest.raises(ValueError, match="layer index 2"):
        Llama(LlamaConfig(**BASE), layer_ids=[2])
    for kwargs in (CONFIGS["gqa2_llama2"], CONFIGS["mha_tied"]):
        config = LlamaConfig(**kwargs)
        full = Llama(config)
        full.init_weights(seed=1)
        first = Llama(config, layer_ids=[0], has_embedding=True, has_head=False)
        last = Llama(config, layer_ids=[1], has_embedding=False, has_head=True)
        assert first.norm is None and first.lm_head is None
        assert (last.embed_tokens is not None) == config.tie_word_embeddings
        for stage in (first, last):
            stage.init_weights(seed=1)
        ids = torch.randint(0, config.vocab_size, (2, 6))
        with torch.no_grad():
            assert torch.equal(last(first(ids)), full(ids))


def test_activation_recomputation_gives_identical_loss_and_grads():
    config = LlamaConfig(**CONFIGS["gqa2_llama2"])
    model = Llama(config)
    model.init_weights(seed=2)
    ids = torch.randint(0, config.vocab_size, (2, 16))
    results = []
    for recompute in (False, True):
        model.zero_grad()
        model.activation_checkpointing = recompute
        loss = F.cross_entropy(model(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    for n in grads_a:
        assert torch.equal(grads_a[n], grads_b[n]), n


@pytest.mark.triton
@INTERPRETER_ONLY
def test_triton_mode_reaches_the_kernels(monkeypatch):
    """Ops("triton") with its kernels allowed on CPU tensors (the Triton interpreter) calls the
    kernels with the ops' layout and arguments, and they agree with PyTorch; a model holding it runs
    every norm and attention through them."""
    kernels_attention = pytest.importorskip("kernels.attention")
    kernels_rmsnorm = pytest.importorskip("kernels.rmsnorm")
    calls = []
    for module, fn in ((kernels_attention, "flash_attention"), (kernels_rmsnorm, "rms_norm")):
        original = getattr(module, fn)
        monkeypatch.setattr(module, fn, lambda *a, _o=original, _n=fn, **k: calls.append(_n) or _o(*a, **k))
    ops = Ops("triton", kernel_devices=("cpu",))
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 8, 4, 16, generator=gen).half()
    k, v = torch.randn(2, 1, 8, 2, 16, generator=gen).half().unbind(0)
    out = ops.attention(q, k, v, softmax_scale=0.3)
    ref = attention_reference(q.float(), k.float(), v.float(), softmax_scale=0.3)
    torch.testing.assert_close(out.float(), ref, rtol=2e-3, atol=2e-3)
    x, w = torch.randn(3, 32, generator=gen), torch.randn(32, generator=gen)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-5), rms_norm_reference(x, w, 1e-5))
    assert calls == ["flash_attention", "rms_norm"]

    config = LlamaConfig(**dict(BASE, vocab_size=64))  # head_dim 16
    model = Llama(config)
    model.init_weights(seed=1)
    ids = torch.randint(0, config.vocab_size, (1, 9), generator=gen)
    with torch.no_grad():
        expected = model(ids)
        model.set_ops(ops)
        calls.clear()
        with pytest.warns(RuntimeWarning, match="attention inputs .*torch.float32.* outside"):
            torch.testing.assert_close(model(ids), expected, rtol=1e-4, atol=1e-4)
        # fp32 attention is the exact PyTorch path; the norms take the kernel.
        assert calls == ["rms_norm"] * 5
        model.to(torch.float16)
        calls.clear()
        model(ids)
        assert sorted(set(calls)) == ["flash_attention", "rms_norm"] and len(calls) == 7


def test_training_after_inference_mode_evaluation():
    config = LlamaConfig(**BASE)
    model = Llama(config)
    model.init_weights(seed=0)
    ids = torch.randint(0, config.vocab_size, (1, 12))
    with torch.inference_mode():
        expected = model(ids)
    logits = model(ids)
    logits.sum().backward()
    assert torch.equal(logits.detach(), expected)
    assert model.layers["0"].self_attn.q_proj.weight.grad is not None
