"""The README's demo, small: the data path end to end, with the reward mask lined up on samples, the
held-out domain kept out of the CT data, numbered steps, and a tool that refuses bad arguments."""
import json
import os
import re
import runpy
import subprocess
import sys

import pytest

from engine.data.batches import SampleMasks
from engine.data.indexed import IndexedDataset
from engine.data.samples import GPTSampleDataset
from engine.data.tokenizer import Tokenizer
from engine.demo import DEMO_STEPS, DemoConfig, DemoError, describe_sample_start, run_data_demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORDS = 120
SEQ = 64


def tool(name):
    """A tool's functions, loaded from tools/<name>.py as its script would be."""
    return runpy.run_path(os.path.join(ROOT, "tools", name + ".py"), run_name=name)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    lines = []
    cfg = DemoConfig(workdir=str(workdir), records_per_domain=RECORDS, vocab_size=400, workers=2,
                     seq_length=SEQ, progress=False)
    return workdir, run_data_demo(cfg, log=lines.append), lines


def test_demo_runs_end_to_end(demo):
    workdir, result, _ = demo
    # Three in-domain domains of 120 training and 120 // 8 validation records; shop/purchase is held out.
    assert result["records"] == {"train": 3 * RECORDS, "valid": 3 * (RECORDS // 8)}
    assert result["batch_shape"] == [4, SEQ]
    assert json.loads((workdir / "demo_summary.json").read_text())["samples"] == result["samples"]

    # Every masked token of a sample decodes to a reward label, and each record has exactly one.
    data = workdir / "data"
    tok = Tokenizer(str(data / "tokenizer.model"))
    tokens = IndexedDataset(str(data / "sar_train"))
    samples = GPTSampleDataset(tokens, SEQ, seed=0, num_epochs=1, cache_dir=str(data / "index_cache"))
    assert samples.loaded_from_cache
    masks = SampleMasks(samples, IndexedDataset(str(data / "sar_train_reward_mask")))
    for k in range(len(samples)):
        picked = samples[k][masks[k].astype(bool)]
        assert all(tok.id_to_piece(int(t)).startswith("<|r") for t in picked)
    mask_all = IndexedDataset(str(data / "sar_train_reward_mask"))
    assert all(int(mask_all[i].sum()) == 1 for i in range(len(mask_all)))


def test_ct_data_holds_the_in_domain_records_only(demo):
    workdir, result, _ = demo
    manifest = json.loads((workdir / "logs" / "manifest.json").read_text())
    assert manifest["out_of_domain"] == ["shop/purchase"] == result["held_out_domains"]
    assert result["ct_domains"] == manifest["in_domain"] == ["ads/ctr", "ads/cpc", "ads/impressions"]
    tok = Tokenizer(str(workdir / "data" / "tokenizer.model"))
    for split, count in (("train", RECORDS), ("valid", RECORDS // 8)):
        data = IndexedDataset(str(workdir / "data" / f"sar_{split}"))
        domains = [re.match(r"<\|domain\|>([^<]+)<", tok.decode(data[i].tolist())).group(1)
                   for i in range(len(data))]
        assert sorted(set(domains)) == sorted(manifest["in_domain"])
        assert all(domains.count(d) == count for d in manifest["in_domain"])
    # The held-out domain's logs are still there for evaluation, and the tokenizer read them: the
    # held-out reward field (in no in-domain record) is a piece of its own.
    assert (workdir / "logs" / "valid" / "shop_purchase.jsonl").stat().st_size > 0
    assert "purchase" in [tok.id_to_piece(i) for i in range(tok.vocab_size)]


def test_steps_are_numbered_once_and_the_end_says_where_everything_went(demo):
    workdir, _, lines = demo
    numbered = [line for line in lines if re.match(r"\[\d+/\d+\] ", line)]
    n = len(DEMO_STEPS)
    assert [line.split(" ")[0] for line in numbered] == [f"[{k}/{n}]" for k in range(1, n + 1)]
    tail = "\n".join(lines[lines.index("done; where everything went:"):])
    for path in (workdir / "demo_summary.json", workdir / "logs" / "manifest.json",
                 workdir / "data" / "index_cache", workdir / "data" / "sar_train.idx"):
        assert str(path).removesuffix(".idx") in tail and path.exists()
    assert "Bayes ceilings" in tail and "shop_purchase.jsonl" in tail


def test_sample_start_says_whether_it_begins_inside_a_record(demo):
    workdir, _, lines = demo
    data = workdir / "data"
    tok = Tokenizer(str(data / "tokenizer.model"))
    tokens = IndexedDataset(str(data / "sar_train"))
    samples = GPTSampleDataset(tokens, SEQ, seed=0, num_epochs=1, cache_dir=str(data / "index_cache"))
    # Where each sample starts, from the index rows: (position in the document order, offset), and
    # how many tokens of that record are left (one sequence per record).
    starts = [tuple(int(v) for v in samples.index.boundaries[int(samples.index.shuffle[k])])
              for k in range(len(samples))]
    left = [int(tokens.sequence_lengths[int(samples.index.order[pos])]) - offset for pos, offset in starts]
    offsets = [offset for _, offset in starts]
    inside = next(k for k in range(len(samples)) if offsets[k] > 0 and left[k] <= SEQ)
    described = describe_sample_start(samples, tokens, tok, inside)
    assert described[0].startswith(f"sample {inside} begins in the middle of a record (at its token "
                                   f"{offsets[inside]} of {offsets[inside] + left[inside]}")
    assert described[1].startswith(f"the next record starts at token {left[inside]}: '<|domain|>")
    # The token there is the first of a record: the text from it begins with the domain marker.
    assert tok.decode(samples[inside][left[inside]:].tolist()).startswith("<|domain|>")
    assert not tok.decode(samples[inside].tolist()).startswith("<|domain|>")
    within = [k for k in range(len(samples)) if offsets[k] > 0 and left[k] > SEQ]
    if within:  # a sample inside one record: nothing to show from a record start
        assert describe_sample_start(samples, tokens, tok, within[0])[1].startswith("no record starts in it")

    at_start = offsets.index(0)
    (line,) = describe_sample_start(samples, tokens, tok, at_start)
    assert line.startswith(f"sample {at_start} begins at the start of a record: '<|domain|>")
    assert any(line.strip().startswith("sample 0 begins " + ("in the middle" if offsets[0] else "at the start"))
               for line in lines)


def test_demo_config_and_too_short_data_are_named_errors(tmp_path):
    for field, value in (("records_per_domain", 0), ("workers", -1), ("seq_length", 0), ("seed", -2)):
        with pytest.raises(DemoError, match=f"{field} must be an integer >= "):
            DemoConfig(workdir=str(tmp_path), **{field: value})
    with pytest.raises(DemoError, match="fewer than one batch of 4 samples of 10001 tokens"):
        run_data_demo(DemoConfig(workdir=str(tmp_path / "w"), records_per_domain=2, vocab_size=400,
                                 seq_length=10000, workers=1, progress=False), log=lambda line: None)


@pytest.mark.parametrize("argv,option", [(["--records", "0"], "--records"), (["--records", "-5"], "--records"),
                                         (["--workers", "0"], "--workers"), (["--seq-length", "x"], "--seq-length"),
                                         (["--seed", "-1"], "--seed")])
def test_demo_tool_refuses_bad_arguments_with_usage_error(argv, option, capsys):
    main = tool("demo")["main"]
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"demo.py: error: argument {option}: " in err and "Traceback" not in err


def test_demo_tool_failed_work_is_one_line_and_exit_1(tmp_path, capsys):
    main = tool("demo")["main"]
    assert main(["--workdir", str(tmp_path), "--obd-dir", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert err == f"demo.py: error: Open Bandit Dataset folder not found: {tmp_path / 'missing'}\n"


def test_tool_help_texts_show_defaults(capsys):
    expected = {"demo": ["--records RECORDS  training records per synthetic domain", "(default: 2000)",
                         "(default: runs/demo)", "(default: 256)"],
                "make_synthetic_logs": ["training records per domain (default: 4000)", "(default: 500)",
                                        "--ood-domains", "held out of continued", "(default: ['shop/purchase'])"],
                "train_tokenizer": ["(default: 8000)", "(default: 200000)", "(default: bpe)"]}
    for name, parts in expected.items():
        with pytest.raises(SystemExit) as info:
            tool(name)["main"](["--help"])
        assert info.value.code == 0
        text = " ".join(capsys.readouterr().out.split())  # help wraps lines at the terminal width
        for part in parts:
            assert " ".join(part.split()) in text, (name, part)


def test_kernel_resources_help_shows_sm_default():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "kernel_resources.py"), "--help"],
                         capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    assert "--sm SM target compute capability x 10" in text and "(default: 90)" in text
    assert "(default: bf16)" in text and "(default: [64, 128])" in text


def test_train_tokenizer_tool_errors_are_one_line(demo, tmp_path, capsys):
    workdir, _, _ = demo
    main = tool("train_tokenizer")["main"]
    logs, prefix = str(workdir / "logs" / "train"), str(tmp_path / "tok")
    with pytest.raises(SystemExit) as info:
        main(["--input", logs, "--model-prefix", prefix, "--vocab-size", "0"])
    assert info.value.code == 2
    assert "train_tokenizer.py: error: argument --vocab-size: must be at least 1, got 0" in capsys.readouterr().err
    assert main(["--input", str(tmp_path / "missing"), "--model-prefix", prefix]) == 1
    err = capsys.readouterr().err
    assert err.startswith("train_tokenizer.py: error: ") and str(tmp_path / "missing") in err and err.count("\n") == 1
    # SentencePiece's refusal, without its C++ source location.
    assert main(["--input", logs, "--model-prefix", prefix, "--vocab-size", "10", "--max-records", "50"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("train_tokenizer.py: error: SentencePiece: Vocabulary size is smaller than required")
    assert err.count("\n") == 1 and ".cc(" not in err and not os.path.exists(prefix + ".model")


def test_kernel_resources_bad_shape_is_a_usage_error():
    pytest.importorskip("triton")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "kernel_resources.py"), "--rmsnorm", "8x"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 2 and "shape '8x' is not ROWSxHIDDEN" in out.stderr, out.stderr
