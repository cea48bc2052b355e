"""The README's demo, small.

- The data path end to end: the reward mask lined up on samples, the held-out domain kept out of the
  CT data, the SFT set taken from the target, numbered steps, a tool that refuses bad arguments.
- The whole story at tiny sizes under ``tools/demo.py`` (CT at TP 2 x PP 2 under torchrun with 4
  processes, both SFT arms, both evaluations, the export): every step's output exists and comes from
  the step before it, the table shows both arms with the values of their eval.json, the probabilities
  the exported model gives in ``transformers`` (computed here independently, one teacher-forced
  forward per class) equal the engine's for the printed record, and a printed command reruns by hand.
- A failing step stops the demo with exit status 1 naming the step, its command and its log; an
  interrupt stops a running torchrun and its ranks, which live in sessions of their own.
"""
import json
import os
import re
import runpy
import shlex
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from engine.data.batches import SampleMasks
from engine.data.indexed import IndexedDataset
from engine.data.samples import GPTSampleDataset
from engine.data.tokenizer import Tokenizer
from engine.demo import DATA_STEPS, DEMO_STEPS, DemoConfig, DemoError, describe_sample_start, run_data_demo
from engine.demo_steps import Command, run_commands

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORDS = 120
SEQ = 64
SFT_RECORDS = 60


def tool(name):
    """A tool's functions, loaded from tools/<name>.py as its script would be."""
    return runpy.run_path(os.path.join(ROOT, "tools", name + ".py"), run_name=name)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    lines = []
    cfg = DemoConfig(workdir=str(workdir), records_per_domain=RECORDS, vocab_size=400, workers=2,
                     seq_length=SEQ, micro_batch_size=4, sft_records=SFT_RECORDS, progress=False)
    return workdir, run_data_demo(cfg, log=lines.append), lines


def test_demo_runs_end_to_end(demo):
    workdir, result, _ = demo
    # Three in-domain domains of 120 training and 120 // 8 validation records; shop/purchase is held
    # out (its training records only give its reward bins); SFT reads the target's first 60 records.
    assert result["records"] == {"train": 3 * RECORDS, "valid": 3 * (RECORDS // 8), "sft": SFT_RECORDS,
                                 "sft_valid": RECORDS // 8, "held_out_train": RECORDS}
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


def test_sft_data_is_the_targets_first_records_and_the_held_out_domain_gets_bins(demo):
    workdir, result, _ = demo
    train_lines = (workdir / "logs" / "train" / "ads_ctr.jsonl").read_text().splitlines(keepends=True)
    subset = workdir / "logs" / "sft" / f"ads_ctr_first{SFT_RECORDS}.jsonl"
    assert subset.read_text() == "".join(train_lines[:SFT_RECORDS])
    tok = Tokenizer(str(workdir / "data" / "tokenizer.model"))
    sft = IndexedDataset(str(workdir / "data" / "sft_ads_ctr"))
    assert len(sft) == SFT_RECORDS
    # Record k of the dataset is line k of the log: its state's values appear in its text, in order.
    for k in (0, SFT_RECORDS - 1):
        text = tok.decode(sft[k].tolist())
        state = json.loads(train_lines[k])["state"]
        assert text.startswith("<|domain|>ads/ctr<|state|>" + "; ".join(f"{key}={value}" for key, value in state.items()))
    bins = json.loads((workdir / "data" / "held_out_train.reward_bins.json").read_text())
    assert [(f["domain"], f["field"], f["kind"], f["count"]) for f in bins["fields"]] == \
        [("shop/purchase", "purchase", "binary", RECORDS)]
    # The SFT sequence length fits the longest record of the SFT and validation sets, a multiple of 8.
    longest = max(int(IndexedDataset(str(workdir / "data" / name)).sequence_lengths.max())
                  for name in ("sft_ads_ctr", "sft_valid_ads_ctr"))
    seq = result["sft"]["seq_length"]
    assert seq % 8 == 0 and seq - 8 < longest - 1 <= seq


def test_steps_are_numbered_once_and_the_end_says_where_everything_went(demo):
    workdir, _, lines = demo
    numbered = [line for line in lines if re.match(r"\[\d+/\d+\] ", line)]
    n = len(DATA_STEPS)
    assert [line.split(" ")[0] for line in numbered] == [f"[{k}/{n}]" for k in range(1, n + 1)]
    tail = "\n".join(lines[lines.index("done; where everything went:"):])
    for path in (workdir / "demo_summary.json", workdir / "logs" / "manifest.json",
                 workdir / "data" / "index_cache", workdir / "data" / "sar_train.idx",
                 workdir / "data" / "sft_ads_ctr.idx", workdir / "data" / "held_out_train.reward_bins.json"):
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
    for field, value in (("records_per_domain", 0), ("workers", -1), ("seq_length", 0), ("seed", -2),
                         ("tp", 0), ("ct_iters", 0), ("sft_batch_size", 0), ("bootstrap", 1), ("jobs", 0),
                         ("pp", True)):
        with pytest.raises(DemoError, match=f"{field} must be an integer >= "):
            DemoConfig(workdir=str(tmp_path), **{field: value})
    for field in ("ct_lr", "sft_lr"):
        with pytest.raises(DemoError, match=f"{field} must be a number > 0, got -0.1"):
            DemoConfig(workdir=str(tmp_path), **{field: -0.1})
    with pytest.raises(DemoError, match=r"sft_records \(600\) must not exceed records_per_domain \(500\)"):
        DemoConfig(workdir=str(tmp_path), records_per_domain=500, sft_records=600)
    with pytest.raises(DemoError, match=r"ct_batch_size \(6\) must be a multiple of micro_batch_size \(4\)"):
        DemoConfig(workdir=str(tmp_path), ct_batch_size=6, micro_batch_size=4)
    with pytest.raises(DemoError, match=r"giving at least pp \(4\) microbatches"):
        DemoConfig(workdir=str(tmp_path), ct_batch_size=6, micro_batch_size=2, pp=4)
    with pytest.raises(DemoError, match="target must be a synthetic domain"):
        DemoConfig(workdir=str(tmp_path), target="ads/unknown")
    with pytest.raises(DemoError, match="target shop/purchase is not an in-domain domain"):
        run_data_demo(DemoConfig(workdir=str(tmp_path / "t"), records_per_domain=2, sft_records=2, vocab_size=400,
                                 workers=1, target="shop/purchase", progress=False), log=lambda line: None)
    with pytest.raises(DemoError, match="fewer than one batch of 4 samples of 10001 tokens"):
        run_data_demo(DemoConfig(workdir=str(tmp_path / "w"), records_per_domain=2, sft_records=2, vocab_size=400,
                                 seq_length=10000, micro_batch_size=4, ct_batch_size=8, workers=1, progress=False),
                      log=lambda line: None)


@pytest.mark.parametrize("argv,option", [(["--records", "0"], "--records"), (["--records", "-5"], "--records"),
                                         (["--workers", "0"], "--workers"), (["--seq-length", "x"], "--seq-length"),
                                         (["--seed", "-1"], "--seed"), (["--ct-iters", "0"], "--ct-iters"),
                                         (["--sft-lr", "0"], "--sft-lr"), (["--model", "layers"], "--model"),
                                         (["--tp", "x"], "--tp")])
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
                         "(default: runs/demo)", "(default: 256)", "--ct-iters CT_ITERS CT optimizer steps (default: 1000)",
                         "--tp TP CT tensor-parallel size (default: 2)", "--pp PP CT pipeline-parallel size (default: 2)"],
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


# ------------------------------------------------------------------------------ the whole story
TINY_STORY = ["--records", str(RECORDS), "--sft-records", str(SFT_RECORDS), "--seq-length", str(SEQ),
              "--ct-iters", "3", "--ct-batch", "4", "--sft-iters", "2", "--sft-batch", "4", "--bootstrap", "20",
              "--no-progress"]
STORY_TIMEOUT_S = 420


def run_demo_tool(args, timeout=STORY_TIMEOUT_S):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tools", "demo.py"), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        os.killpg(proc.pid, signal.SIGTERM)  # the demo stops its own steps
        out, err = proc.communicate(timeout=60)
        raise AssertionError(f"demo did not finish in {timeout} s\n{out}\n{err}")
    return proc.returncode, out, err


def transformers_reference(hf_dir, record, encoder):
    """Per reward of ``record``: the class probabilities from one teacher-forced forward per class."""
    import torch
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir).float().eval()
    out = []
    with torch.no_grad():
        for item in encoder.scoring_items(record):
            scores = []
            for candidate in item.candidates:
                ids = torch.tensor([list(item.prefix) + list(candidate)])
                log_probs = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
                start = len(item.prefix) - 1
                scores.append(sum(float(log_probs[start + i, t]) for i, t in enumerate(candidate)))
            out.append(torch.softmax(torch.tensor(scores), 0).numpy())
    return out


@pytest.fixture(scope="module")
def story(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("story") / "demo"
    code, out, err = run_demo_tool(["--workdir", str(workdir), *TINY_STORY])
    assert code == 0, out[-4000:] + err[-4000:]
    return workdir, out, json.loads((workdir / "demo_summary.json").read_text())


@pytest.mark.slow
def test_the_whole_story_runs_and_every_step_leaves_its_output(story):
    workdir, out, summary = story
    numbered = [line.split(" ")[0] for line in out.splitlines() if re.match(r"\[\d+/\d+\] ", line)]
    assert numbered == [f"[{k}/{len(DEMO_STEPS)}]" for k in range(1, len(DEMO_STEPS) + 1)]
    # Every command was printed as it ran and its log kept; the log starts with the command.
    commands = summary["story"]["commands"]
    assert set(commands) == {"base model", "CT", "SFT from CT (LTU)", "SFT only", "evaluate LTU",
                             "evaluate SFT only", "export"}
    for step, command in commands.items():
        assert f"$ {command}" in out, step
        log = open(os.path.join(ROOT, summary["story"]["logs"][step])).read()
        assert log.startswith(f"$ {command}"), step
    assert commands["CT"].startswith("torchrun --standalone --nproc_per_node 4 tools/pretrain.py")
    assert "--parallel.tp 2 --parallel.pp 2" in commands["CT"]
    runs = workdir / "runs"
    for name in ("base", "ct", "sft_ltu", "sft_only"):
        assert (runs / name / "latest").exists(), name
    # CT ran at TP 2 x PP 2 from the base; LTU's SFT started from CT, SFT only from the base.
    ct = json.loads(next((runs / "ct").glob("iter_*/checkpoint.json")).read_text())
    assert (ct["layout"]["tp"], ct["layout"]["pp"]) == (2, 2)
    assert len(list((runs / "ct").glob("iter_0000003/mp_rank_*"))) == 4
    logs = {step: open(os.path.join(ROOT, path)).read() for step, path in summary["story"]["logs"].items()}
    assert f"initialised weights from {runs / 'base'}" in logs["CT"]
    assert f"initialised weights from {runs / 'ct'}" in logs["SFT from CT (LTU)"]
    assert f"initialised weights from {runs / 'base'}" in logs["SFT only"]
    for arm in ("ltu", "sft_only"):
        for name in ("eval.json", "predictions.jsonl", "roc.png", "calibration.png"):
            assert (workdir / "eval" / arm / name).stat().st_size > 0, (arm, name)
        assert str(workdir / "eval" / arm / "roc.png") in out
    assert {p.name for p in (workdir / "hf" / "ltu").iterdir()} >= {"config.json", "model.safetensors",
                                                                   "tokenizer.model"}
    assert re.search(r"^total: \d+\.\d s", out, re.M)
    assert set(summary["story"]["seconds"]) == set(DEMO_STEPS)


@pytest.mark.slow
def test_the_table_shows_both_arms_with_their_evaluations_values(story):
    workdir, out, _ = story
    table = out[out.index("] results: "):out.index("plots:")]
    blocks = re.split(r"\n\s+(?=held-out: )", table)
    assert len(blocks) == 2 and "in-domain: ads/ctr" in blocks[0] and blocks[1].startswith("held-out: shop/purchase")
    for arm, name in (("ltu", "LTU (CT, then SFT)"), ("sft_only", "SFT only")):
        report = json.loads((workdir / "eval" / arm / "eval.json").read_text())
        for block, group in zip(blocks, ("in_domain", "out_of_domain")):
            row = next(line for line in block.splitlines() if line.strip().startswith(name))
            auc = report["groups"][group]["metrics"]["auc"]["value"]
            accuracy = report["groups"][group]["metrics"]["accuracy"]["value"]
            assert f"{auc:.3f}" in row and f"{accuracy:.3f}" in row, (arm, group, row)
    for block in blocks:
        assert "chance (label frequencies)" in block and "Bayes ceiling (true probabilities)" in block


@pytest.mark.slow
def test_transformers_on_the_export_gives_the_engines_probabilities(story):
    from engine.data.reward_bins import RewardBins
    from engine.data.tokenizer import RecordEncoder
    from engine.eval.scoring import read_eval_records

    workdir, out, summary = story
    answer = summary["story"]["transformers"]
    test_file = workdir / "logs" / "test" / "ads_ctr.jsonl"
    assert answer["record"].endswith("logs/test/ads_ctr.jsonl:1")
    line = json.loads(test_file.read_text().splitlines()[0])
    assert answer["state"] == line["state"] and answer["action"] == line["action"]
    assert ", ".join(f"{k}={v}" for k, v in line["state"].items()) in out  # the record is printed
    report = json.loads((workdir / "eval" / "ltu" / "eval.json").read_text())
    bins = RewardBins.merge([RewardBins.load(p) for p in report["reward_bins"]])
    encoder = RecordEncoder(Tokenizer(str(workdir / "hf" / "ltu" / "tokenizer.model")), bins, add_bos=report["add_bos"])
    record = read_eval_records([str(test_file)], max_records=1)[0]
    (reference,) = transformers_reference(str(workdir / "hf" / "ltu"), record, encoder)
    engine = [json.loads(p) for p in (workdir / "eval" / "ltu" / "predictions.jsonl").read_text().splitlines()]
    (first,) = [p for p in engine if p["record"] == 0]
    (printed,) = answer["rewards"]
    np.testing.assert_allclose(first["probs"], reference, atol=1e-4)
    np.testing.assert_allclose(printed["transformers"], reference, atol=1e-6)
    np.testing.assert_allclose(printed["engine"], first["probs"], atol=0)
    assert answer["max_abs_difference"] == pytest.approx(np.abs(np.array(printed["transformers"])
                                                                - np.array(first["probs"])).max(), abs=1e-12)
    assert f"max |transformers - engine| = {answer['max_abs_difference']:.2e}" in out
    for k, p in enumerate(printed["transformers"]):
        assert re.search(rf"click={k} <\|r{k}\|>\s+{p:.6f}", out)


@pytest.mark.slow
def test_a_printed_command_reruns_by_hand(story, tmp_path):
    workdir, _, summary = story
    argv = shlex.split(summary["story"]["commands"]["export"])
    argv[argv.index("--hf-dir") + 1] = str(tmp_path / "again")
    done = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for name in ("model.safetensors", "config.json", "tokenizer.model"):
        assert (tmp_path / "again" / name).read_bytes() == (workdir / "hf" / "ltu" / name).read_bytes()


def test_a_failing_step_stops_the_demo_naming_it_with_exit_1(tmp_path):
    # hidden_size 30 over 4 heads: pretrain.py refuses the base model's config, the first command.
    code, out, err = run_demo_tool(["--workdir", str(tmp_path / "demo"), *TINY_STORY, "--model", "hidden_size=30"],
                                   timeout=180)
    assert code == 1, out + err
    assert err.startswith("demo.py: error: step 'base model' failed (exit status ")
    assert "tools/pretrain.py --model.preset tiny --model.hidden_size 30" in err
    log = str(tmp_path / "demo" / "steps" / "06_base_model.log")
    assert f"last lines of {log}:" in err and "pretrain.py: error" in err
    assert "[6/14] base model" in out and "[7/14]" not in out
    assert not (tmp_path / "demo" / "runs" / "ct").exists()


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_an_interrupt_stops_torchrun_and_its_ranks(tmp_path):
    if not os.path.isdir("/proc"):
        pytest.skip("needs /proc to find the ranks")
    script = tmp_path / "sleeper.py"
    script.write_text("import os, sys, time\n"
                      "open(os.path.join(sys.argv[1], os.environ['RANK'] + '.pid'), 'w').write(f'{os.getpid()} {os.getsid(0)}')\n"
                      "time.sleep(600)\n")
    command = Command("sleepers", ["torchrun", "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path)],
                      str(tmp_path / "steps" / "sleepers.log"), str(tmp_path / "out"), [])
    pid_files = [tmp_path / "0.pid", tmp_path / "1.pid"]
    pids, sessions = [], []

    def interrupt_when_ranks_run():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not all(p.exists() and p.read_text() for p in pid_files):
            time.sleep(0.1)
        for p in pid_files:
            if p.exists() and p.read_text():
                pid, sid = map(int, p.read_text().split())
                pids.append(pid)
                sessions.append(sid)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_when_ranks_run, daemon=True).start()
    began = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_commands([command], log=lambda line: None)
    assert len(pids) == 2, open(command.log).read()
    # Each rank leads a session of its own, out of torchrun's process group: stopped all the same.
    assert sessions == pids
    assert not any(_alive(pid) for pid in pids)
    assert time.monotonic() - began < 120
