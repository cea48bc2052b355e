"""Time and peak memory of Hugging Face <-> engine checkpoint conversion on a ~1B-parameter Llama.

    python benchmarks/bench_convert.py [--workdir /tmp/bench_convert] [--tp 2 --pp 2] [--keep]

Steps, each in its own subprocess so that its peak resident memory (ru_maxrss) is its own:
  1. generate a random bf16 HF directory tensor by tensor (sharded, with an index);
  2. baseline: a process that only imports the converter (interpreter + torch);
  3. import to TP x PP; 4. export back to HF;
  5. reference: iterate the HF tensors with safetensors' safe_open (memory-mapped) for comparison.
Then every exported tensor is compared with the original, bit for bit, and the files are deleted.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHILD_PRELUDE = """
import json, resource, sys, time
sys.path.insert(0, {repo!r})
import torch
torch.set_num_threads(1)
from engine.convert import sharded
from engine.safetensors_io import SafetensorsWriter, read_header, read_tensor
t0 = time.perf_counter()
"""
CHILD_EPILOGUE = """
print(json.dumps({"seconds": time.perf_counter() - t0,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_child(body: str, **fmt) -> dict:
    code = CHILD_PRELUDE.format(repo=str(REPO)) + textwrap.dedent(body).format(**fmt) + CHILD_EPILOGUE
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"child failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


GENERATE = """
from engine.model.config import LlamaConfig
from engine.model.llama import expected_shapes
from engine.fileio import write_json_atomic
from pathlib import Path
out = Path({out!r}); out.mkdir(parents=True)
config = LlamaConfig(**{config!r})
d = config.to_hf_dict(); d["torch_dtype"] = d["dtype"] = "bfloat16"
write_json_atomic(out / "config.json", d)
names = list(expected_shapes(config).items())
shards, size = [[]], 0
for name, shape in names:
    nbytes = 2 * torch.Size(shape).numel()
    if shards[-1] and size + nbytes > {shard_bytes}:
        shards.append([]); size = 0
    shards[-1].append((name, shape)); size += nbytes
weight_map = {{}}
g = torch.Generator().manual_seed(0)
for i, shard in enumerate(shards):
    file = f"model-{{i + 1:05d}}-of-{{len(shards):05d}}.safetensors"
    specs = {{("lm_head.weight" if n == "lm_head.weight" else "model." + n): (torch.bfloat16, s) for n, s in shard}}
    with SafetensorsWriter(out / file, specs, {{"format": "pt"}}) as w:
        for hf_name, (dtype, shape) in specs.items():
            w.write(hf_name, (torch.randn(shape, generator=g) * 0.02).to(dtype))
            weight_map[hf_name] = file
write_json_atomic(out / "model.safetensors.index.json",
                  {{"metadata": {{"total_size": sum(2 * torch.Size(s).numel() for _, s in names)}}, "weight_map": weight_map}})
"""
BASELINE = "pass\n"
IMPORT = "sharded.import_hf({hf!r}, {ckpt!r}, tp={tp}, pp={pp}, progress=False)\n"
EXPORT = "sharded.export_hf({ckpt!r}, {out!r}, max_shard_size='1GB', progress=False)\n"
SAFE_OPEN = """
from engine.model.hf import iter_hf_tensors
for name, t in iter_hf_tensors({hf!r}):
    t.max()  # touch every byte, as a conversion would
    del t
"""
VERIFY = """
from engine.model.hf import hf_weight_files
a, b = hf_weight_files({hf!r}), hf_weight_files({out!r})
assert set(a) == set(b), sorted(set(a) ^ set(b))
for name in a:
    ia, ib = read_header(a[name])[0][name], read_header(b[name])[0][name]
    assert torch.equal(read_tensor(a[name], ia), read_tensor(b[name], ib)), name
print("verified", len(a), "tensors bit for bit")
"""


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/bench_convert")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=16)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--input-shard-size", type=int, default=1_000_000_000, help="bytes per generated HF file")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    args = ap.parse_args()

    work = Path(args.workdir)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    hf, ckpt, out = work / "hf", work / "ckpt", work / "out"
    config = dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                  num_hidden_layers=args.layers, num_attention_heads=args.heads,
                  num_key_value_heads=args.kv_heads, tie_word_embeddings=False)
    try:
        rows = []
        gen = run_child(GENERATE, out=str(hf), config=config, shard_bytes=args.input_shard_size)
        rows.append(("generate random HF dir", gen))
        from engine.model.config import LlamaConfig
        from engine.model.llama import expected_shapes
        shapes = expected_shapes(LlamaConfig(**config))
        params = sum(int(torch_numel(s)) for s in shapes.values())
        largest = max(shapes.items(), key=lambda kv: torch_numel(kv[1]))
        rows.append(("baseline: python + torch + engine imported", run_child(BASELINE)))
        rows.append((f"import HF -> TP={args.tp} x PP={args.pp}", run_child(IMPORT, hf=str(hf), ckpt=str(ckpt),
                                                                           tp=args.tp, pp=args.pp)))
        ckpt_bytes = du(ckpt)
        rows.append(("export -> HF (1 GB files)", run_child(EXPORT, ckpt=str(ckpt), out=str(out))))
        rows.append(("reference: read every HF tensor with safe_open (mmap)", run_child(SAFE_OPEN, hf=str(hf))))
        t0 = time.perf_counter()
        verify = subprocess.run([sys.executable, "-c", CHILD_PRELUDE.format(repo=str(REPO)) +
                                 VERIFY.format(hf=str(hf), out=str(out))], capture_output=True, text=True)
        if verify.returncode:
            raise RuntimeError(verify.stderr)
        print(f"model: {params / 1e9:.3f}B parameters, bf16, {du(hf) / 1e9:.2f} GB on disk "
              f"({len(list(hf.glob('*.safetensors')))} HF files); checkpoint {ckpt_bytes / 1e9:.2f} GB "
              f"in {args.tp * args.pp} rank files")
        from engine.parallel.layout import local_shape
        vocab = LlamaConfig(**config).vocab_size
        shard = max(torch_numel(local_shape(n, s, vocab, args.tp)) for n, s in shapes.items())
        print(f"largest tensor: {largest[0]} {list(largest[1])} = {2 * torch_numel(largest[1]) / 2**20:.0f} MiB; "
              f"largest rank shard: {2 * shard / 2**20:.0f} MiB")
        print(f"{verify.stdout.strip()} ({time.perf_counter() - t0:.1f} s)")
        print("\n| step | wall time (s) | peak RSS (MiB) |\n|---|---|---|")
        for label, r in rows:
            print(f"| {label} | {r['seconds']:.1f} | {r['peak_rss_mib']:.0f} |")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def torch_numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
