"""Decision evaluation: metrics against scikit-learn and hand computations, reward-class
probabilities against `transformers` on the exported model (single- and multi-token labels), the
same predictions at TP 2, PP 2 and DP 2 as in one process, and tools/evaluate.py's files and errors.
"""
import json
import math
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score, brier_score_loss, log_loss, roc_auc_score

from dist_utils import run_distributed
from run_utils import REPO, make_trainer, run_pretrain, run_trainer, tiny_data, tiny_run_config  # noqa: F401
from engine.convert.sharded import export_hf, import_hf
from engine.data.preprocess import read_records
from engine.data.reward_bins import RewardBins
from engine.data.sar import serialize_text
from engine.data.synthetic import bayes_ceiling
from engine.data.tokenizer import RecordEncoder, Tokenizer, train_tokenizer
from engine.eval import metrics as M
from engine.eval.scoring import (build_plan, load_model_chunks, open_model_source, read_eval_records,
                                 score_records)
from engine.parallel.state import init_parallel, single_process_state

EVALUATE = REPO / "tools" / "evaluate.py"


def _load_tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("evaluate_tool", EVALUATE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def sft(tiny_data, tmp_path_factory):  # noqa: F811
    """A 3-step SFT run on the tiny data, its Hugging Face export and the held-out records."""
    root = tmp_path_factory.mktemp("eval")
    run_trainer(make_trainer(tiny_run_config(tiny_data, root / "sft", stage="sft", train={"iters": 3})))
    hf_dir = export_hf(root / "sft", root / "hf", progress=False)
    valid = str(Path(tiny_data["root"]) / "logs" / "valid")
    bins = RewardBins.load(tiny_data["train"] + ".reward_bins.json")
    return {"root": root, "ckpt": str(root / "sft"), "hf": str(hf_dir), "valid": valid, "bins": bins,
            "tokenizer": tiny_data["tokenizer"], "records": read_eval_records([valid])}


def _engine_predictions(load, records, encoder, batch_size=3):
    source = open_model_source(load)
    chunks = load_model_chunks(source, single_process_state())
    return score_records(records, encoder, chunks, single_process_state(), batch_size=batch_size)


def _transformers_probs(hf_dir, records, encoder):
    """Per reward (in record order): softmax over classes of the summed teacher-forced log-probs."""
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    out = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many tiny forwards: threads only contend on a shared machine
    try:
        _score_with(model, records, encoder, out)
    finally:
        torch.set_num_threads(threads)
    return out


def _score_with(model, records, encoder, out):
    with torch.no_grad():
        for record in records:
            for item in encoder.scoring_items(record):
                scores = []
                for candidate in item.candidates:
                    ids = torch.tensor([list(item.prefix) + list(candidate)])
                    logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
                    start = len(item.prefix) - 1
                    scores.append(sum(float(logp[start + i, t]) for i, t in enumerate(candidate)))
                out.append((item.domain, item.target, torch.softmax(torch.tensor(scores), 0).numpy()))


# -------------------------------------------------------------------------------------- metrics
def _fixed(num_classes, n=240, seed=0):
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(num_classes) * 0.7, n)
    labels = np.array([rng.choice(num_classes, p=p) for p in probs])
    return labels, probs


@pytest.mark.parametrize("num_classes", [2, 4])
def test_metrics_are_scikit_learns_and_the_interval_holds_the_estimate(num_classes):
    labels, probs = _fixed(num_classes)
    got = M.classification_metrics(labels, probs)
    predicted = probs.argmax(axis=1)
    expected_auc = (roc_auc_score(labels, probs[:, 1]) if num_classes == 2 else
                    roc_auc_score(labels, probs, multi_class="ovr", average="macro"))
    onehot = np.eye(num_classes)[labels]
    assert got["auc"] == pytest.approx(expected_auc, abs=1e-12)
    assert got["accuracy"] == pytest.approx(accuracy_score(labels, predicted), abs=1e-12)
    assert got["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, predicted), abs=1e-12)
    assert got["log_loss"] == pytest.approx(log_loss(labels, probs), abs=1e-12)
    assert got["brier"] == pytest.approx(0.5 * ((probs - onehot) ** 2).sum(axis=1).mean(), abs=1e-12)
    if num_classes == 2:  # the usual binary Brier score
        assert got["brier"] == pytest.approx(brier_score_loss(labels, probs[:, 1]), abs=1e-12)
    # The vectorised forms the bootstrap evaluates give the same values on the data itself.
    task = M.TaskData("d/f", "d", "f", labels, probs, None)
    identity = M.resampled_metrics(task, np.arange(len(labels))[None])[:, 0]
    np.testing.assert_allclose(identity, [got[m] for m in M.METRICS], rtol=0, atol=1e-12)
    low, high, undefined = M.bootstrap_intervals([task], resamples=300, seed=1)
    for m, name in enumerate(M.METRICS):
        assert low[m] <= got[name] <= high[m], name
        assert high[m] - low[m] > 0, name
    assert not undefined.any()
    # Seeded: the same seed gives the same interval, another seed another.
    again = M.bootstrap_intervals([task], resamples=300, seed=1)
    np.testing.assert_array_equal(again[0], low)
    assert not np.array_equal(M.bootstrap_intervals([task], resamples=300, seed=2)[0], low)


def test_resampled_metrics_equal_scikit_learn_on_resamples():
    labels, probs = _fixed(3, n=60, seed=4)
    task = M.TaskData("d/f", "d", "f", labels, probs, None)
    index = np.random.default_rng(0).integers(0, 60, size=(5, 60))
    values = M.resampled_metrics(task, index)
    for b in range(5):
        np.testing.assert_allclose(values[:, b], [M.classification_metrics(labels[index[b]], probs[index[b]])[m]
                                                  for m in M.METRICS], atol=1e-12)


def test_ece_against_a_hand_computation():
    probs = np.array([[0.95, 0.05], [0.12, 0.88], [0.35, 0.65], [0.61, 0.39], [0.2, 0.8], [0.5, 0.5]])
    labels = np.array([0, 0, 1, 1, 1, 0])
    # Top-class confidences 0.95, 0.88, 0.65, 0.61, 0.8, 0.5 (ties: class 0); correct 1, 0, 1, 0, 1, 1.
    # Bins (0.4,0.5]: {0.5 ok}; (0.6,0.7]: {0.65 ok, 0.61 wrong}; (0.7,0.8]: {0.8 ok};
    # (0.8,0.9]: {0.88 wrong}; (0.9,1]: {0.95 ok}.
    hand = (1 * abs(1 - 0.5) + 2 * abs(0.5 - 0.63) + 1 * abs(1 - 0.8) + 1 * abs(0 - 0.88)
            + 1 * abs(1 - 0.95)) / 6
    assert M.expected_calibration_error(labels, probs) == pytest.approx(hand, abs=1e-12)
    assert M.expected_calibration_error(labels, probs, bins=1) == pytest.approx(abs(4 / 6 - 4.39 / 6), abs=1e-12)


def test_chance_levels_kl_and_refusals():
    labels = np.array([0, 0, 0, 1, 2, 2])
    chance = M.chance_levels(labels, 3)
    freq = np.array([3, 1, 2]) / 6
    assert chance["prior"]["accuracy"] == pytest.approx(0.5)
    assert chance["prior"]["balanced_accuracy"] == pytest.approx(1 / 3)
    assert chance["prior"]["log_loss"] == pytest.approx(-(freq * np.log(freq)).sum())
    assert chance["prior"]["auc"] == pytest.approx(0.5)
    assert chance["uniform"]["accuracy"] == pytest.approx(1 / 3)
    assert chance["uniform"]["log_loss"] == pytest.approx(math.log(3))
    assert chance["uniform"]["brier"] == pytest.approx((3 - 1) / (2 * 3))
    true, pred = np.array([[0.2, 0.8], [0.5, 0.5]]), np.array([[0.4, 0.6], [0.9, 0.1]])
    hand = np.mean([0.2 * math.log(0.2 / 0.4) + 0.8 * math.log(0.8 / 0.6),
                    0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)])
    assert M.kl_divergence(true, pred) == pytest.approx(hand)
    assert math.isnan(M.auc([1, 1], [[0.2, 0.8], [0.4, 0.6]]))
    with pytest.raises(ValueError, match="sum to 1"):
        M.classification_metrics([0, 1], [[0.5, 0.6], [0.5, 0.5]])
    with pytest.raises(ValueError, match="class indices"):
        M.classification_metrics([0, 2], [[0.5, 0.5], [0.5, 0.5]])


class _P:
    """A prediction as the report reads it."""

    def __init__(self, domain, label, probs, truth=None, field="r"):
        self.domain, self.field, self.label, self.probs, self.true_probs = domain, field, label, probs, truth


def test_report_groups_are_macro_averages_over_in_and_out_of_domain_tasks():
    predictions = []
    for d, seed in (("a", 0), ("b", 1), ("c", 2)):
        labels, probs = _fixed(2, n=50, seed=seed)
        predictions += [_P(d, int(y), p) for y, p in zip(labels, probs)]
    report = M.evaluate_predictions(predictions, in_domain=["a", "b"], resamples=100)
    tasks = report["tasks"]
    assert [tasks[t]["in_domain"] for t in ("a/r", "b/r", "c/r")] == [True, True, False]
    for m in M.METRICS:
        mean = np.mean([tasks[t]["metrics"][m]["value"] for t in ("a/r", "b/r")])
        assert report["groups"]["in_domain"]["metrics"][m]["value"] == pytest.approx(mean)
        assert report["groups"]["out_of_domain"]["metrics"][m]["value"] == tasks["c/r"]["metrics"][m]["value"]
        low, high = report["groups"]["in_domain"]["metrics"][m]["ci"]
        assert low <= mean <= high
    assert report["groups"]["in_domain"]["tasks"] == ["a/r", "b/r"]
    assert M.evaluate_predictions(predictions, None, resamples=10)["groups"]["in_domain"] is None
    assert "in-domain (macro)" in M.format_table(report)


def test_bayes_ceiling_and_kl_from_synthetic_truth(sft):
    records = sft["records"]
    tokenizer = Tokenizer(sft["tokenizer"])
    plan = build_plan(records, RecordEncoder(tokenizer, sft["bins"]))
    predictions = [_P(s.domain, s.label, s.true_probs, s.true_probs, s.field) for s in plan.spans]
    report = M.evaluate_predictions(predictions, None, resamples=20)
    ceilings = bayes_ceiling(records, sft["bins"])
    for (domain, field), c in ceilings.items():
        entry = report["tasks"][f"{domain}/{field}"]
        assert entry["n"] == c.n
        assert entry["bayes"]["accuracy"] == pytest.approx(c.accuracy)
        assert entry["bayes"]["log_loss"] == pytest.approx(c.log_loss)
        if c.auc is not None and not math.isnan(c.auc):
            assert entry["bayes"]["auc"] == pytest.approx(c.auc)
        assert entry["metrics"]["kl"]["value"] == pytest.approx(0.0, abs=1e-12)  # truth against itself


# ------------------------------------------------------------------------ agreement with HF
def test_class_probabilities_equal_transformers_on_the_exported_model(sft):
    encoder = RecordEncoder(Tokenizer(sft["tokenizer"]), sft["bins"])
    records = read_eval_records([sft["valid"]], max_records=20)  # every domain, episodes too
    assert all(len(c) == 1 for c in encoder.label_ids)  # labels are single tokens here
    predictions = _engine_predictions(sft["ckpt"], records, encoder)
    reference = _transformers_probs(sft["hf"], records, encoder)
    assert len(predictions) == len(reference) > len(records)  # episodes have several rewards
    for p, (domain, label, probs) in zip(predictions, reference):
        assert (p.domain, p.label) == (domain, label)
        np.testing.assert_allclose(p.probs, probs, atol=1e-5)
        assert p.probs.sum() == pytest.approx(1.0)
    # The Hugging Face directory itself, and a copy of the checkpoint re-saved at TP 2 x PP 2, give
    # the same predictions on one process.
    resaved = import_hf(sft["hf"], sft["root"] / "tp2pp2", tp=2, pp=2, progress=False)
    for load in (sft["hf"], str(resaved)):
        for p, q in zip(predictions, _engine_predictions(load, records, encoder, batch_size=5)):
            np.testing.assert_allclose(q.probs, p.probs, atol=1e-6)


def test_multi_token_labels_are_scored_teacher_forced_as_transformers_does(sft, tmp_path):
    import transformers

    records = sft["records"]
    texts = [serialize_text(r, sft["bins"].classify) for r in read_records([str(Path(sft["valid"]).parent / "train")])]
    plain = train_tokenizer(texts, str(tmp_path / "plain.model"), vocab_size=400, special_symbols=(),
                            add_dummy_prefix=True)
    encoder = RecordEncoder(plain, sft["bins"])
    assert all(len(ids) > 1 for ids in encoder.label_ids)  # e.g. '<', '|', 'r', '1', '|>'
    config = transformers.LlamaConfig(vocab_size=plain.vocab_size, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "hf", safe_serialization=True)
    subset = read_eval_records([sft["valid"]], max_records=10)
    predictions = _engine_predictions(str(tmp_path / "hf"), subset, encoder)
    reference = _transformers_probs(str(tmp_path / "hf"), subset, encoder)
    assert len(predictions) == len(reference)
    for p, (domain, label, probs) in zip(predictions, reference):
        assert (p.domain, p.label) == (domain, label)
        np.testing.assert_allclose(p.probs, probs, atol=1e-5)
    assert len(records) > len(subset)


# ------------------------------------------------------------------------------- layouts
def _layouts_worker(rank, world_size, load, tokenizer, bins_path, valid, layouts):
    """Every layout in turn on the same two processes: each builds its own groups."""
    encoder = RecordEncoder(Tokenizer(tokenizer), RewardBins.load(bins_path))
    records = read_eval_records([valid])
    out = []
    for tp, pp in layouts:
        state = init_parallel(tp, pp)
        chunks = load_model_chunks(open_model_source(load), state)
        predictions = score_records(records, encoder, chunks, state, batch_size=2)
        out.append(None if predictions is None else [p.probs.tolist() for p in predictions])
    return out


@pytest.mark.distributed
def test_same_predictions_at_tp2_pp2_dp2_as_on_one_process(sft, tiny_data):  # noqa: F811
    encoder = RecordEncoder(Tokenizer(sft["tokenizer"]), sft["bins"])
    single = np.concatenate([p.probs for p in _engine_predictions(sft["ckpt"], sft["records"], encoder)])
    layouts = [(2, 1), (1, 2), (1, 1)]  # TP 2, PP 2, and DP 2: two replicas scoring half the passes each
    results = run_distributed(_layouts_worker, 2, args=(sft["ckpt"], sft["tokenizer"],
                                                        tiny_data["train"] + ".reward_bins.json", sft["valid"],
                                                        layouts), timeout=180)
    for layout, on_rank0, on_rank1 in zip(layouts, *results):
        assert on_rank1 is None, layout  # results are gathered to global rank 0
        np.testing.assert_allclose(np.concatenate(on_rank0), single, atol=1e-6, err_msg=str(layout))


# ---------------------------------------------------------------------------------- the tool
def test_evaluate_writes_its_files_and_the_metrics_of_its_predictions(sft, tiny_data, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "eval"
    tool = _load_tool()
    assert tool.main(["--load", sft["ckpt"], "--data", sft["valid"], "--out", str(out), "--bootstrap", "50",
                      "--in-domain", "ads/ctr", "ads/cpc", "ads/impressions", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "out-of-domain (macro)" in printed and "records/s" in printed
    assert sorted(os.listdir(out)) == ["calibration.png", "eval.json", "predictions.jsonl", "roc.png"]
    for png in ("roc.png", "calibration.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "eval.json").read_text())
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == report["rewards"] and report["records"] == len(sft["records"])
    assert report["tokenizer"] == tiny_data["tokenizer"]  # taken from the run's training data
    assert report["groups"]["out_of_domain"]["tasks"] == ["feed/session/click", "shop/purchase/purchase"]
    ctr = [line for line in lines if line["domain"] == "ads/ctr"]
    probs = np.array([line["probs"] for line in ctr])
    labels = np.array([line["label"] for line in ctr])
    assert report["tasks"]["ads/ctr/click"]["metrics"]["auc"]["value"] == pytest.approx(roc_auc_score(labels, probs[:, 1]))
    assert report["tasks"]["ads/ctr/click"]["metrics"]["log_loss"]["value"] == pytest.approx(log_loss(labels, probs))
    assert report["tasks"]["ads/ctr/click"]["bayes"]["accuracy"] is not None
    assert report["records_per_s"] > 0
    bare = tmp_path / "no_plots"  # the experiment's evaluations: its report draws the plots
    assert tool.main(["--load", sft["ckpt"], "--data", sft["valid"], "--out", str(bare), "--bootstrap", "50",
                      "--in-domain", "ads/ctr", "ads/cpc", "ads/impressions", "--no-plots", "--no-progress"]) == 0
    assert sorted(os.listdir(bare)) == ["eval.json", "predictions.jsonl"]
    assert json.loads((bare / "eval.json").read_text())["tasks"] == report["tasks"]


def test_evaluate_under_torchrun_at_pp2_gives_the_single_process_predictions(sft, tmp_path):
    single, multi = tmp_path / "one", tmp_path / "pp2"
    common = ["--load", sft["ckpt"], "--data", sft["valid"], "--bootstrap", "20", "--no-progress"]
    assert _load_tool().main(common + ["--out", str(single)]) == 0
    proc = run_pretrain(common + ["--out", str(multi), "--pp", "2", "--batch-size", "3"], nproc=2,
                        script=EVALUATE, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    a = [json.loads(x) for x in (single / "predictions.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (multi / "predictions.jsonl").read_text().splitlines()]
    assert [x["label"] for x in a] == [x["label"] for x in b]
    np.testing.assert_allclose(np.concatenate([x["probs"] for x in b]), np.concatenate([x["probs"] for x in a]),
                               atol=1e-6)
    assert json.loads((multi / "eval.json").read_text())["layout"] == {"tp": 1, "pp": 2, "dp": 1}


def _run_tool(args, capsys):
    code = _load_tool().main(args)
    return code, capsys.readouterr().err.strip()


def test_bad_inputs_exit_1_with_one_line_naming_them(sft, tiny_data, tmp_path, capsys):  # noqa: F811
    base = ["--data", sft["valid"], "--no-progress", "--bootstrap", "10"]
    code, err = _run_tool(["--load", str(tmp_path / "nowhere")] + base, capsys)
    assert code == 1 and "nowhere" in err and "no such checkpoint" in err and "\n" not in err

    broken = tmp_path / "broken"
    shutil.copytree(sft["ckpt"], broken)
    weights = next(broken.glob("iter_*/mp_rank_00_000/model.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    code, err = _run_tool(["--load", str(broken)] + base, capsys)
    assert code == 1 and "model.safetensors" in err and "\n" not in err

    other = train_tokenizer(["<|domain|>x<|state|>a=1<|action|>b=2<|reward|>r=<|r0|>"] * 20,
                            str(tmp_path / "other.model"), vocab_size=330)
    code, err = _run_tool(["--load", sft["ckpt"], "--tokenizer", other.model_path] + base, capsys)
    assert code == 1 and "vocabulary" in err and "other.model" in err

    no_reward = tmp_path / "no_reward.jsonl"
    no_reward.write_text('{"domain": "ads/ctr", "state": {"a": 1}, "action": {"b": 2}}\n')
    code, err = _run_tool(["--load", sft["ckpt"], "--data", str(no_reward), "--no-progress"], capsys)
    assert code == 1 and f"{no_reward}:1" in err and "reward" in err

    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text('{"domain": "new/task", "state": {"a": 1}, "action": {"b": 2}, "reward": {"r": 1}}\n')
    code, err = _run_tool(["--load", sft["ckpt"], "--data", str(unknown), "--no-progress"], capsys)
    assert code == 1 and "new/task" in err and "reward bins" in err

    code, err = _run_tool(["--load", sft["ckpt"], "--data", str(tmp_path / "missing.jsonl"), "--no-progress"], capsys)
    assert code == 1 and "missing.jsonl" in err

    code, err = _run_tool(["--load", sft["hf"], "--data", sft["valid"], "--tokenizer", tiny_data["tokenizer"],
                           "--no-progress"], capsys)
    assert code == 1 and "--reward-bins" in err

    with pytest.raises(SystemExit) as exit_info:  # usage errors: argparse's status 2
        _load_tool().main(["--load", sft["ckpt"], "--data", sft["valid"], "--batch-size", "0"])
    assert exit_info.value.code == 2
    assert "positive integer" in capsys.readouterr().err


def test_interrupted_evaluation_exits_143_and_writes_nothing(sft, tmp_path, capsys, monkeypatch):
    from engine.eval import runner
    from engine.fileio import Interrupted

    def interrupted(*args, **kwargs):
        raise Interrupted(signal.SIGTERM)

    monkeypatch.setattr(runner, "score_plan", interrupted)
    code, err = _run_tool(["--load", sft["ckpt"], "--data", sft["valid"], "--out", str(tmp_path / "out"),
                           "--no-progress"], capsys)
    assert code == 143 and "SIGTERM" in err
    assert not (tmp_path / "out").exists()
