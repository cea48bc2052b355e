"""The layout planner: its byte counts against what the engine allocates and keeps, its time model
against published tables and against pipeline theory, its refusals, and the config it writes.

Memory references. Model state: the real GradBuffer and MixedPrecisionAdamW of each rank, built in
gloo processes for TP, PP, DP, ZeRO-1, virtual stages, SP, recomputation, tied embeddings, fp32 and
bf16; their tensors' bytes (flat parameter and gradient buffers, masters, AdamW moments and step
counters after a step) must equal the prediction exactly. Activations: the same ranks run a real
train_step through the engine's schedule while ``saved_tensors_hooks`` record every storage autograd
keeps for backward. A storage counts (once, however many saved tensors view it) from the first save
until the last saved tensor holding it is released; parameters and the rotary caches (which stay
between steps) are left out. Two holdings autograd does not see are tracked as well: activations a
pipeline stage receives (from the post of their receive until PipelineComm.release gives them back)
and the inputs of recomputed layers (kept by the checkpoint with the layer's function until the
layer's backward is done). The peak of that sum
over the step is the measured activation memory; the prediction must be within 10% of it.
"""
import gc
import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed
from run_utils import read_losses, run_pretrain, tiny_data, tiny_run_config  # noqa: F401 (fixture)

from engine.config import ModelConfig, load_yaml_config
from engine.model.config import LlamaConfig
from engine.parallel.p2p import PipelineComm
from engine.plan.devices import A100_BANDWIDTH_EFFICIENCY, A100_MATMUL_EFFICIENCY, GIB, get_device
from engine.plan.memory import Layout, MemoryModel, PipelinePlans, Workload
from engine.plan.published import A100_TABLE, FIT_ROWS, GPT_SEQ, GPT_VOCAB, fit_objective, relative_errors
from engine.plan.search import TIME_TIE, Cluster, search
from engine.plan.timing import ModelShape, TimeModel
from engine.train.grads import bucket_layout, owned_param_pieces
from engine.train.metrics import model_flops_per_token

TOOL = Path(__file__).resolve().parents[1] / "tools" / "plan_layout.py"
VOCAB, SEQ, GLOBAL_BATCH, BUCKET = 300, 16, 8, 500
ACTIVATION_RTOL = 0.10


# ------------------------------------------------------------------------------ bucket layout
def reference_buckets(sizes, dp, bucket_size, tied_index=None):
    """The documented rule in plain Python: walk parameters in reverse, close a bucket when it holds
    bucket_size elements, pad each to a multiple of dp, a tied parameter alone in its bucket."""
    buckets, current, offset, start = [], [], 0, 0
    for index in reversed(range(len(sizes))):
        if index == tied_index and current:
            end = start + -(-(offset - start) // dp) * dp
            buckets.append((start, end, current))
            current, start, offset = [], end, end
        current.append(index)
        offset += sizes[index]
        if index == tied_index or offset - start >= bucket_size:
            end = start + -(-(offset - start) // dp) * dp
            buckets.append((start, end, current))
            current, start, offset = [], end, end
    if current:
        buckets.append((start, start + -(-(offset - start) // dp) * dp, current))
    return buckets


@pytest.mark.parametrize("dp,bucket_size,tied", [(1, 10**9, None), (3, 50, None), (4, 7, 0), (8, 1, 3)])
def test_bucket_layout_follows_the_documented_rule(dp, bucket_size, tied):
    g = torch.Generator().manual_seed(dp * 7 + bucket_size)
    sizes = torch.randint(1, 40, (12,), generator=g).tolist()
    spans = bucket_layout([(f"p{i}", n) for i, n in enumerate(sizes)], dp, bucket_size,
                          None if tied is None else f"p{tied}")
    ref = reference_buckets(sizes, dp, bucket_size, tied)
    assert [(s.start, s.end, [int(n[1:]) for n, _, _ in s.params]) for s in spans] == ref
    assert all(s.tied == (tied is not None and [n for n, _, _ in s.params] == [f"p{tied}"]) for s in spans)
    # Under ZeRO-1 rank r's pieces lie in slice r of each bucket, and the ranks' pieces together
    # cover every parameter element once (padding belongs to no parameter); without it, rank 0 has all.
    covered = []
    for rank in range(dp):
        for name, start, end in owned_param_pieces(spans, dp, rank, True):
            span = next(s for s in spans if s.start <= start < s.end)
            shard = (span.end - span.start) // dp
            assert span.start + rank * shard <= start < end <= span.start + (rank + 1) * shard
            covered += range(start, end)
    params = [i for s in spans for _, start, end in s.params for i in range(start, end)]
    assert sorted(covered) == params
    whole = owned_param_pieces(spans, dp, 0, False)
    assert sum(e - s for _, s, e in whole) == sum(sizes)


def test_bucket_layout_refuses_bad_sizes():
    with pytest.raises(ValueError, match="bucket_size"):
        bucket_layout([("a", 3)], 1, 0)
    with pytest.raises(ValueError, match="data-parallel size"):
        bucket_layout([("a", 3)], 0, 10)


# --------------------------------------------------------------- bytes in gloo processes
class HeldBytes:
    """Bytes of the storages held for backward: reference counts per storage, the peak of the sum."""

    def __init__(self, exclude):
        self.exclude, self.refs, self.live, self.peak = set(exclude), {}, 0, 0

    def add(self, key, nbytes):
        entry = self.refs.get(key)
        if entry is None or entry[0] == 0:
            self.refs[key] = [1, nbytes]
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        else:
            entry[0] += 1

    def remove(self, key):
        entry = self.refs[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]


class Saved:
    """What the pack hook hands autograd: the tensor, and a release of its storage when dropped."""

    def __init__(self, tensor, held, key):
        self.tensor, self.held, self.key = tensor, held, key

    def __del__(self):
        self.held.remove(self.key)


class TrackingComm(PipelineComm):
    """PipelineComm that counts each received activation as held from the post of its receive
    until the buffer is released."""

    def __init__(self, state, held):
        super().__init__(state)
        self.held, self.holding = held, {}

    def post(self, **kwargs):
        transfer = super().post(**kwargs)
        if transfer.from_prev is not None:
            storage = transfer.from_prev.untyped_storage()
            self.holding[id(transfer.from_prev)] = storage.data_ptr()
            self.held.add(storage.data_ptr(), storage.nbytes())
        return transfer

    def release(self, tensor):
        key = self.holding.pop(id(tensor), None)
        if key is not None:
            self.held.remove(key)
        super().release(tensor)


class Recompute:
    """A recomputed layer's function: the checkpoint keeps it, with the layer's input, until the
    layer's backward is done, so its lifetime is how long the input is held."""

    def __init__(self, fn, held, key):
        self.fn, self.held, self.key = fn, held, key

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __del__(self):
        if self.key is not None:
            self.held.remove(self.key)


def _microbatches(mb, dp, dp_rank):
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    out = []
    for j in range(GLOBAL_BATCH // (mb * dp)):
        rows = slice((j * dp + dp_rank) * mb, (j * dp + dp_rank + 1) * mb)
        out.append({"tokens": tokens[rows], "labels": tokens[rows].roll(-1, 1), "loss_mask": torch.ones(mb, SEQ)})
    return out


def _measure(state, layout, dtype, tied):
    from engine.parallel.tensor_parallel import build_model_chunks, pipeline_layout, sequence_parallel_names
    from engine.train.grads import GradBuffer
    from engine.train.optimizer import AdamWConfig, MixedPrecisionAdamW
    from engine.train.step import train_step

    config = _config(tied)
    chunks = build_model_chunks(config, state, layout.virtual_stages, sequence_parallel=layout.sequence_parallel,
                                seed=0, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
    for chunk in chunks:
        chunk.activation_checkpointing = layout.recompute
    grads = GradBuffer(chunks, state, bucket_size=BUCKET, distributed_optimizer=layout.distributed_optimizer,
                       sequence_parallel_names=set().union(*map(sequence_parallel_names, chunks)),
                       pipeline=pipeline_layout(config, state, layout.virtual_stages))
    opt = MixedPrecisionAdamW(grads, AdamWConfig())
    held = HeldBytes({grads.params.untyped_storage().data_ptr()})
    comm = TrackingComm(state, held) if layout.pp > 1 else None
    batches = _microbatches(layout.micro_batch_size, layout.dp, state.dp_rank)
    step = lambda: train_step(chunks, batches, grads, opt, state, lr=1e-3, clip_grad=1.0, comm=comm)
    step()  # fills the rotary caches and the receive-buffer pool; the second step is measured
    for module in (m for chunk in chunks for m in chunk.modules() if hasattr(m, "_cache")):
        held.exclude.update(t.untyped_storage().data_ptr() for pair in module._cache.values() for t in pair)

    def pack(t):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in held.exclude or storage.nbytes() == 0:
            return t
        held.add(key, storage.nbytes())
        return Saved(t, held, key)

    checkpoint = torch.utils.checkpoint.checkpoint

    def checkpoint_holding_input(fn, x, *args, **kwargs):
        storage = x.untyped_storage()
        key = storage.data_ptr()
        if key in held.exclude or key in (comm.holding.values() if comm else ()):
            key = None  # a received activation: counted until it is released
        else:
            held.add(key, storage.nbytes())
        return checkpoint(Recompute(fn, held, key), x, *args, **kwargs)

    torch.utils.checkpoint.checkpoint = checkpoint_holding_input
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda p: p.tensor if isinstance(p, Saved) else p):
            step()
    finally:
        torch.utils.checkpoint.checkpoint = checkpoint
    gc.collect()  # the checkpoint's frames may sit in reference cycles: what is left must be collectable
    moments = sum(t.nbytes for s in opt.inner.state.values() for k, t in s.items() if k != "step")
    counters = sum(t.nbytes for s in opt.inner.state.values() for k, t in s.items() if k == "step")
    return {"params": grads.params.nbytes, "grads": grads.grads.nbytes, "optimizer": opt.master.nbytes + moments,
            "counters": counters, "activations": held.peak, "left": held.live}


def _config(tied):
    return LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
                       tie_word_embeddings=tied)


# (layout, dtype, tied) cases of a 4-process job: every option the planner models.
CASES = [
    (Layout(2, 2, 1, 2, 1, sequence_parallel=True), "fp32", False),
    (Layout(1, 2, 2, 2, 1, distributed_optimizer=True, recompute=True), "bf16", True),
    (Layout(2, 1, 2, 1, 2, sequence_parallel=True, distributed_optimizer=True), "bf16", False),
    (Layout(1, 4, 1, 1, 1), "bf16", False),
    (Layout(1, 1, 4, 1, 2, distributed_optimizer=True), "fp32", False),
]


def _bytes_job(rank, world_size):
    from engine.parallel.state import init_parallel

    torch.manual_seed(0)
    results = []
    for layout, dtype, tied in CASES:
        state = init_parallel(layout.tp, layout.pp)
        got = _measure(state, layout, dtype, tied)
        model = MemoryModel(_config(tied), Workload(SEQ, GLOBAL_BATCH, dtype, "torch", BUCKET))
        want = model.state_bytes(layout, state.pp_rank, state.dp_rank)
        predicted, _ = model.peak_activations(layout, state.pp_rank)
        results.append({"case": (layout.describe(), dtype, tied), "pp_rank": state.pp_rank, "got": got,
                        "want": {"params": want.params, "grads": want.grads, "optimizer": want.optimizer,
                                 "counters": want.host_step_counters, "activations": predicted}})
        dist.barrier()
    return results


@pytest.fixture(scope="module")
def measured():
    torch.set_num_threads(1)
    return run_distributed(_bytes_job, world_size=4, timeout=240)


@pytest.mark.distributed
def test_model_state_bytes_equal_what_the_engine_allocates(measured):
    for rank, results in enumerate(measured):
        for r in results:
            for kind in ("params", "grads", "optimizer", "counters"):
                assert r["got"][kind] == r["want"][kind], f"rank {rank} {r['case']}: {kind} {r['got']} vs {r['want']}"


@pytest.mark.distributed
def test_activation_bytes_within_ten_percent_of_the_measured_peak(measured):
    for rank, results in enumerate(measured):
        for r in results:
            got, want = r["got"]["activations"], r["want"]["activations"]
            assert got > 0 and r["got"]["left"] == 0, f"rank {rank} {r['case']}: nothing measured or released"
            assert abs(want - got) <= ACTIVATION_RTOL * got, \
                f"rank {rank} {r['case']} (pp rank {r['pp_rank']}): predicted {want} bytes, measured {got}"


# ------------------------------------------------------------------------------------ time
def test_flops_split_is_the_engines_count():
    config = ModelConfig(preset="llama3-8b").to_llama_config()
    shape = ModelShape.from_llama(config)
    for seq, recompute in ((4096, False), (8192, True), (1, False)):
        assert math.isclose(shape.model_flops_per_token(seq, recompute), model_flops_per_token(config, seq, recompute),
                            rel_tol=1e-12)


def test_gpt_rows_count_flops_as_megatron_eq3():
    for run in A100_TABLE:
        b, s, l, h, v = run.global_batch, GPT_SEQ, run.layers, run.hidden, GPT_VOCAB
        eq3 = 96 * b * s * l * h * h * (1 + s / (6 * h) + v / (16 * l * h))
        assert math.isclose(run.shape().model_flops_per_token(s, recompute=True) * b * s, eq3, rel_tol=1e-12)


def test_simulated_1f1b_has_the_theoretical_bubble():
    """Equal stages, free exchanges: the engine's 1F1B plan idles (p-1)/(m+p-1) of the step."""
    config = ModelConfig(preset="tiny").to_llama_config()
    model = TimeModel(ModelShape.from_llama(config), get_device("A100-80GB"), 8, 64, 64)
    for pp, m in ((2, 4), (4, 8), (8, 16)):
        durations = tuple((1.0, 2.0) for _ in range(pp))
        finish, _ = model._pipeline(pp, m, 1, durations, 0.0)
        assert math.isclose(1 - 3.0 * m / max(finish), (pp - 1) / (m + pp - 1), rel_tol=1e-12)


def test_a100_constants_are_the_fit_and_predict_the_held_out_rows():
    assert len(FIT_ROWS) * 3 <= len(A100_TABLE)
    plans = PipelinePlans()
    device = get_device("A100-80GB")
    assert (device.matmul_efficiency, device.bandwidth_efficiency) == (A100_MATMUL_EFFICIENCY, A100_BANDWIDTH_EFFICIENCY)
    # The stored constants minimise the fit rows' error among their grid neighbours (the fit's grid).
    stored = fit_objective(device, plans=plans)
    for dm, db in ((0.01, 0), (-0.01, 0), (0, 0.02), (0, -0.02)):
        m, b = A100_MATMUL_EFFICIENCY + dm, A100_BANDWIDTH_EFFICIENCY + db
        if 0 < m <= 1 and 0 < b <= 1:
            assert stored <= fit_objective(get_device("A100-80GB", matmul_efficiency=m, bandwidth_efficiency=b),
                                           plans=plans)
    errors = relative_errors(device, plans=plans)
    held_out = {row: e for row, (_, e) in errors.items() if row not in FIT_ROWS}
    assert len(held_out) == len(A100_TABLE) - len(FIT_ROWS)
    assert all(abs(e) <= 0.15 for e in held_out.values()), held_out


# ------------------------------------------------------------------------------------ search
def _plan_layout_main():
    spec = importlib.util.spec_from_file_location("plan_layout", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_planner_ranks_fitting_layouts_and_says_why_others_fail():
    config = ModelConfig(preset="llama2-7b").to_llama_config()
    plan = search(config, Workload(4096, 64), Cluster(get_device("A100-40GB"), 16, 8), micro_batches=(1,))
    # Fastest first, except that layouts within TIME_TIE of the fastest come first by memory.
    fastest = min(c.time.total for c in plan.ranked)
    tied = [c for c in plan.ranked if c.time.total <= fastest * (1 + TIME_TIE)]
    assert plan.ranked[:len(tied)] == sorted(tied, key=lambda c: c.memory.total)
    rest = [c.time.total for c in plan.ranked[len(tied):]]
    assert rest == sorted(rest) and all(t > fastest * (1 + TIME_TIE) for t in rest)
    usable = plan.cluster.usable_bytes
    assert all(c.memory.total <= usable for c in plan.variants)
    reasons = {(r.tp, r.pp): r.reason for r in plan.rejected}
    assert "out of memory" in reasons[(1, 1)]                      # 7B with Adam on one 40 GB GPU
    assert "does not fit in a server" in reasons[(16, 1)]
    small_batch = search(config, Workload(4096, 8), Cluster(get_device("A100-40GB"), 16, 8), micro_batches=(1, 2))
    reasons = {(r.tp, r.pp): r.reason for r in small_batch.rejected}
    assert "too few microbatches" in reasons[(1, 16)] and "at least 16 microbatches" in reasons[(1, 16)]
    assert "does not split over DP 16" in reasons[(1, 1)]
    assert "does not divide the number of attention heads" in \
        {(r.tp, r.pp): r.reason for r in search(config, Workload(4096, 64), Cluster(get_device("H100"), 24, 8),
                                                 micro_batches=(1,)).rejected}[(3, 1)]


def test_impossible_requests_say_why():
    tiny = ModelConfig(preset="tiny").to_llama_config()
    plan = search(tiny, Workload(64, 2), Cluster(get_device("A100-80GB"), 1024, 8))
    assert not plan.ranked
    assert "at most" in plan.why_none() and "1024" in plan.why_none()
    big = ModelConfig(preset="llama2-13b").to_llama_config()
    plan = search(big, Workload(4096, 8), Cluster(get_device("A100-40GB"), 1, 8))
    assert not plan.ranked
    message = plan.why_none()
    assert "fits no layout" in message and "GiB" in message
    with pytest.raises(ValueError, match="fits no layout"):
        _ = plan.best


def test_cli_refuses_what_cannot_run(capsys):
    main = _plan_layout_main()

    assert main(["--model", "llama2-13b", "--gpus", "1", "--gpu", "A100-40GB", "--seq-length", "4096",
                 "--global-batch-size", "8"]) == 1
    assert "fits no layout" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--model", "tiny", "--gpus", "2", "--gpu", "V100", "--seq-length", "64", "--global-batch-size", "8"])
    assert e.value.code == 2


@pytest.mark.slow
@pytest.mark.distributed
def test_written_config_runs_with_pretrain(tiny_data, tmp_path):  # noqa: F811 (the fixture)
    """The chosen layout for 2 GPUs, written from a base config, trains under torchrun unchanged."""
    import yaml

    main = _plan_layout_main()

    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(tiny_run_config(tiny_data, tmp_path / "run")))
    out = tmp_path / "planned.yaml"
    tokens = 2 * 8 * 64  # two steps of 8 samples of 64 tokens
    assert main(["--model", "tiny", "--gpus", "2", "--gpus-per-node", "2", "--base-config", str(base),
                 "--train-tokens", str(tokens), "--out", str(out)]) == 0
    cfg = load_yaml_config(out)
    assert cfg.train.iters == 2 and cfg.parallel.tp * cfg.parallel.pp <= 2
    proc = run_pretrain(["--config", str(out)], nproc=2, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(read_losses(tmp_path / "run")) == 2


def test_device_overrides_and_unknown_names():
    d = get_device("H100", memory_gib=94, matmul_efficiency=0.6)
    assert d.memory_bytes == 94 * GIB and d.matmul_efficiency == 0.6 and d.peak_tflops == 989.0
    with pytest.raises(ValueError, match="unknown GPU"):
        get_device("V100")
    with pytest.raises(ValueError, match="unknown device field"):
        get_device("H100", clock_ghz=2.0)
    with pytest.raises(ValueError, match="bandwidth_efficiency"):
        get_device("H100", bandwidth_efficiency=1.5)
