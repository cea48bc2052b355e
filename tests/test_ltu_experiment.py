"""The LTU experiment: its statistics against scipy / scikit-learn on fixed numbers, its data steps
(reward shuffling, general text), its plan (paired arms, equal SFT budgets), and a tiny real run of
tools/ltu_experiment.py whose report, SFT data orders, shuffled logs and commands are checked."""
import json
import math
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.metrics import log_loss, roc_auc_score

from engine.eval.experiment import REPO, ExperimentConfig, ExperimentError, Job, Stage, build_plan, preset
from engine.eval.experiment_runner import Runner, critical_path_order
from engine.eval.experiment_data import (ExperimentDataError, general_text_documents, shuffle_rewards,
                                         write_general_text, write_subset)
from engine.eval.experiment_report import _holds
from engine.eval.experiment_stats import interval_above_zero, mean_interval, paired_bootstrap, paired_difference
from engine.eval.metrics import TaskData

TOOL = os.path.join(REPO, "tools", "ltu_experiment.py")


# ------------------------------------------------------------------------------------- statistics
def test_mean_interval_is_scipys_t_interval():
    values = [0.612, 0.641, 0.587, 0.655, 0.603]
    got = mean_interval(values)
    low, high = stats.t.interval(0.95, df=4, loc=np.mean(values), scale=stats.sem(values))
    assert got["mean"] == pytest.approx(np.mean(values), abs=1e-15)
    assert got["sd"] == pytest.approx(np.std(values, ddof=1))
    assert got["ci"] == pytest.approx([low, high], abs=1e-12)
    assert mean_interval([0.7]) == {"mean": 0.7, "sd": None, "n": 1, "ci": None}
    assert mean_interval([None, float("nan"), 0.5, 0.7])["n"] == 2
    assert mean_interval([])["mean"] is None


def test_paired_difference_is_scipys_paired_t_test_interval():
    ltu = {1: 0.662, 2: 0.640, 3: 0.671, 4: 0.655}
    sft = {1: 0.611, 2: 0.630, 3: 0.622, 4: 0.640, 9: 0.5}  # seed 9 has no partner: left out
    got = paired_difference(ltu, sft)
    seeds = [1, 2, 3, 4]
    reference = stats.ttest_rel([ltu[s] for s in seeds], [sft[s] for s in seeds]).confidence_interval(0.95)
    assert got["per_seed"] == pytest.approx({s: ltu[s] - sft[s] for s in seeds})
    assert got["mean"] == pytest.approx(np.mean([ltu[s] - sft[s] for s in seeds]))
    assert got["ci"] == pytest.approx([reference.low, reference.high], abs=1e-12)
    assert got["n"] == 4


def _task(labels, p1, name="ads/ctr/click"):
    p1 = np.asarray(p1, dtype=np.float64)
    return TaskData(name, name.rsplit("/", 1)[0], "click", np.asarray(labels, dtype=np.int64),
                    np.stack([1 - p1, p1], axis=1), None)


def test_paired_bootstrap_equals_a_plain_loop_over_resamples_with_sklearn():
    rng = np.random.default_rng(7)
    n, resamples = 60, 200
    labels = (rng.random(n) < 0.4).astype(int)
    # Two seeds of two arms on the same records: the first arm's scores follow the labels more.
    first = [[_task(labels, np.clip(0.3 + 0.3 * labels + rng.normal(0, 0.2, n), 0.01, 0.99))] for _ in range(2)]
    second = [[_task(labels, np.clip(0.4 + 0.1 * labels + rng.normal(0, 0.2, n), 0.01, 0.99))] for _ in range(2)]
    got = paired_bootstrap(first, second, "auc", resamples=resamples, seed=3)
    # The reference draws the same record indices (one [resamples, n] draw per task) and computes
    # each resample's AUCs with scikit-learn.
    index = np.random.default_rng(3).integers(0, n, size=(resamples, n))
    differences = []
    for row in index:
        if len(set(labels[row])) < 2:
            continue
        per_seed = [roc_auc_score(labels[row], a[0].probs[row, 1]) - roc_auc_score(labels[row], b[0].probs[row, 1])
                    for a, b in zip(first, second)]
        differences.append(np.mean(per_seed))
    point = np.mean([roc_auc_score(labels, a[0].probs[:, 1]) - roc_auc_score(labels, b[0].probs[:, 1])
                     for a, b in zip(first, second)])
    assert got["mean"] == pytest.approx(point, abs=1e-12)
    assert got["ci"] == pytest.approx(list(np.percentile(differences, [2.5, 97.5])), abs=1e-12)
    assert got["undefined_resamples"] == resamples - len(differences)
    # Log-loss the same way.
    got = paired_bootstrap(first, second, "log_loss", resamples=resamples, seed=3)
    ref = [np.mean([log_loss(labels[row], a[0].probs[row], labels=[0, 1]) - log_loss(labels[row], b[0].probs[row],
                                                                                      labels=[0, 1])
                    for a, b in zip(first, second)]) for row in index]
    assert got["ci"] == pytest.approx(list(np.percentile(ref, [2.5, 97.5])), abs=1e-12)


def test_paired_bootstrap_refuses_runs_of_other_records_and_unknown_metrics():
    a = [[_task([0, 1, 1, 0], [0.2, 0.8, 0.6, 0.3])]]
    b = [[_task([1, 1, 0, 0], [0.2, 0.8, 0.6, 0.3])]]
    with pytest.raises(ValueError, match="scored on other records"):
        paired_bootstrap(a, b)
    with pytest.raises(ValueError, match="unknown metric 'f1'"):
        paired_bootstrap(a, a, "f1")
    with pytest.raises(ValueError, match="need the same number"):
        paired_bootstrap(a, a + a)


def test_holds_needs_every_interval_above_zero():
    above, across = {"mean": 0.02, "ci": [0.005, 0.04]}, {"mean": 0.02, "ci": [-0.01, 0.05]}
    assert interval_above_zero(above) is True and interval_above_zero(across) is False
    assert interval_above_zero({"mean": 0.1, "ci": None}) is None
    assert _holds({"seeds": above, "records": above}, seeds=3) is True
    assert _holds({"seeds": across, "records": above}, seeds=3) is False
    assert _holds({"seeds": {"mean": 0.02, "ci": None}, "records": above}, seeds=1) is True  # one seed: records only
    assert _holds({"seeds": above, "records": across}, seeds=3) is False


# ------------------------------------------------------------------------------------ data steps
def _write_lines(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_shuffle_rewards_permutes_rewards_across_records_and_nothing_else(tmp_path):
    rng = np.random.default_rng(0)
    ctr = [{"domain": "ads/ctr", "state": {"u": f"user{i}"}, "action": {"item": i % 7}, "reward": {"click": i}}
           for i in range(300)]
    cpc = [{"domain": "ads/cpc", "state": {"u": f"user{i}"}, "action": {"bid": 0.5},
            "reward": {"cost": float(i), "clicks": -i}, "meta": {"p": i}} for i in range(100)]
    episodes = [{"domain": "feed", "steps": [{"state": {"t": t}, "action": {"a": int(rng.integers(9))},
                                                "reward": {"click": 1000 * e + t}} for t in range(3)]}
                for e in range(50)]
    _write_lines(tmp_path / "ctr.jsonl", ctr)
    _write_lines(tmp_path / "mixed.jsonl", cpc + episodes)
    out = tmp_path / "out"
    summary = shuffle_rewards([str(tmp_path / "ctr.jsonl"), str(tmp_path / "mixed.jsonl")], str(out), seed=5)
    assert summary["fields"] == {"ads/cpc/clicks": 100, "ads/cpc/cost": 100, "ads/ctr/click": 300, "feed/click": 150}
    shuffled = [json.loads(line) for name in ("ctr.jsonl", "mixed.jsonl")
                for line in (out / name).read_text().splitlines()]
    original = ctr + cpc + episodes
    assert len(shuffled) == len(original)

    def without_rewards(r):
        r = json.loads(json.dumps(r))
        for step in r.get("steps", [r]):
            step.pop("reward")
        return r

    assert [without_rewards(r) for r in shuffled] == [without_rewards(r) for r in original]  # only rewards moved

    def rewards(records, domain, field):
        return [s["reward"][field] for r in records if r["domain"] == domain for s in r.get("steps", [r])]

    for domain, field in (("ads/ctr", "click"), ("ads/cpc", "cost"), ("ads/cpc", "clicks"), ("feed", "click")):
        before, after = rewards(original, domain, field), rewards(shuffled, domain, field)
        assert Counter(before) == Counter(after)  # the same values, the field's distribution unchanged
        moved = np.mean([a != b for a, b in zip(before, after)])  # distinct values: moved = changed
        assert moved > 0.9, (domain, field, moved)
        assert abs(stats.spearmanr(before, after).statistic) < 0.3  # the link to the record is gone
    assert summary["from_other_record"] > 0.95 and summary["changed_value"] > 0.95
    again = tmp_path / "again"
    shuffle_rewards([str(tmp_path / "ctr.jsonl"), str(tmp_path / "mixed.jsonl")], str(again), seed=5)
    assert (again / "ctr.jsonl").read_bytes() == (out / "ctr.jsonl").read_bytes()  # a function of the seed
    other = tmp_path / "other"
    shuffle_rewards([str(tmp_path / "ctr.jsonl")], str(other), seed=6)
    assert (other / "ctr.jsonl").read_bytes() != (out / "ctr.jsonl").read_bytes()


def test_data_steps_refuse_bad_input_by_name(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"domain": "d", "state": {}, "action": {}}\n')
    with pytest.raises(ExperimentDataError, match=r"bad.jsonl: record 1: every decision needs a non-empty 'reward'"):
        shuffle_rewards([str(tmp_path / "bad.jsonl")], str(tmp_path / "o"), 0)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "bad.jsonl").write_text("")
    with pytest.raises(ExperimentDataError, match="share a name"):
        shuffle_rewards([str(tmp_path / "bad.jsonl"), str(tmp_path / "a" / "bad.jsonl")], str(tmp_path / "o"), 0)
    (tmp_path / "notjson.jsonl").write_text("{nope\n")
    with pytest.raises(ExperimentDataError, match=r"notjson.jsonl:1: not JSON"):
        shuffle_rewards([str(tmp_path / "notjson.jsonl")], str(tmp_path / "o"), 0)
    (tmp_path / "three.jsonl").write_text("a\n\nb\nc\n")
    assert write_subset(str(tmp_path / "three.jsonl"), str(tmp_path / "sub" / "two.jsonl"), 2) == 2
    assert (tmp_path / "sub" / "two.jsonl").read_text() == "a\nb\n"
    with pytest.raises(ExperimentDataError, match="holds 3 records, fewer than the 5 asked for"):
        write_subset(str(tmp_path / "three.jsonl"), str(tmp_path / "five.jsonl"), 5)
    assert not (tmp_path / "five.jsonl").exists()


def test_general_text_is_pythons_documentation(tmp_path):
    from pydoc_data.topics import topics

    summary = write_general_text(str(tmp_path / "t" / "text.jsonl"))
    lines = [json.loads(line) for line in (tmp_path / "t" / "text.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [line["text"] for line in lines] == [topics[k] for k in sorted(topics)] == general_text_documents()
    assert summary == {"documents": len(topics), "characters": sum(len(v) for v in topics.values())}


# ------------------------------------------------------------------------------------------ plan
def _config(tmp_path, **changes):
    fields = preset("quick")
    fields.update(changes)
    return ExperimentConfig(out=str(tmp_path / "report"), work=str(tmp_path / "work"), **fields)


def _flags(argv):
    return {argv[i]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("--")}


def test_plan_pairs_the_arms_with_one_sft_budget(tmp_path):
    cfg = _config(tmp_path, text_shares=(0.25, 0.5))
    jobs = build_plan(cfg)
    sft = {(j.info["label"], j.info["seed"], j.info["records"]): _flags(j.argv) for j in jobs.values()
           if j.info.get("stage") == "sft" and j.info["level"] == cfg.shared_structure}
    assert {label for label, _, _ in sft} == {"A", "B", "C", "D", "F25", "F50"}
    # What differs between arms: where a run starts and saves, and (D) its length, which its log
    # and final-validation intervals follow.
    per_run = ("--checkpoint.init", "--checkpoint.save", "--train.iters", "--train.log_interval",
               "--train.eval_interval")
    for (label, seed, records), flags in sft.items():
        reference = sft[("A", seed, records)]
        # Same SFT data, seed (data order), batch, lr schedule, sequence length for every arm.
        assert {k: v for k, v in flags.items() if k not in per_run} == \
            {k: v for k, v in reference.items() if k not in per_run}
        assert flags["--train.seed"] == str(seed)
        expected = cfg.sft.iters + (cfg.ct.iters if label == "D" else 0)
        assert flags["--train.iters"] == str(expected)
        init = flags["--checkpoint.init"]
        assert init.endswith("runs/base") if label in ("A", "D") else init.endswith(f"seed{seed}/ct_{label}")
    ct = [j for j in jobs.values() if j.info.get("stage") == "ct"]
    base = jobs["base"]
    assert _flags(base.argv)["--train.lr"] == "0" and _flags(base.argv)["--train.iters"] == "1"
    for job in ct:
        flags = _flags(job.argv)
        assert flags["--checkpoint.init"] == base.out_dir and flags["--train.iters"] == str(cfg.ct.iters)
    target_train = [a for a in jobs["main/ct_data"].argv if a.endswith(".jsonl")]
    assert target_train and not any("ads_ctr" in a or "shop_purchase" in a for a in target_train)
    with_target = build_plan(_config(tmp_path, ct_includes_target=True))
    assert any("train/ads_ctr.jsonl" in a for a in with_target["main/ct_data"].argv)
    spec = _flags(jobs["main/seed1/ct_F25"].argv)["--data.train"].split()
    assert spec[0] == "0.75" and spec[2] == "0.25" and spec[3].endswith("general_text")
    dose = _flags(jobs["shared0/logs"].argv)
    assert dose["--shared-structure"] == "0" and _flags(jobs["main/logs"].argv)["--shared-structure"] == "1"
    evals = [j for j in jobs.values() if j.info.get("kind") == "eval" and j.info["level"] == 1.0]
    after_sft = {tuple(a for a in j.argv if a.endswith(".jsonl")) for j in evals if j.info["records"] > 0}
    before_sft = {tuple(a for a in j.argv if a.endswith(".jsonl")) for j in evals if j.info["records"] == 0}
    assert len(after_sft) == 1 and len(before_sft) == 1  # every arm scored on the same records
    assert set(next(iter(after_sft))) < set(next(iter(before_sft)))  # CT checkpoints: also the CT domains
    assert {j.info["label"] for j in evals if j.info["records"] == 0} == {"B", "C"}
    assert all(j.deps for j in jobs.values() if j.name != "main/logs" and not j.name.endswith("/logs"))
    order = list(jobs)
    assert all(order.index(d) < order.index(j.name) for j in jobs.values() for d in j.deps)


@pytest.mark.parametrize("changes,message", [
    ({"arms": ("A", "C")}, "arms must include A and B"),
    ({"target": "shop/purchase"}, "must be neither the target nor a CT domain"),
    ({"ct_domains": ("ads/ctr", "ads/cpc")}, "use ct_includes_target"),
    ({"sft_records": 5000}, r"SFT sizes \[5000\] must be between 1 and records_per_domain"),
    ({"dose_levels": (1.5,)}, r"shared_structure must be a number in \[0, 1\]"),
    ({"text_shares": (1.0,)}, "text_shares must lie strictly between 0 and 1"),
    ({"seeds": (1, 1)}, "seeds must be distinct"),
    ({"ct": Stage(10, 8, 3, 128, 1e-3, 0, 0)}, "micro_batch_size must divide"),
    ({"base": "ckpt"}, "needs its tokenizer"),
])
def test_settings_that_cannot_work_are_refused_by_name(tmp_path, changes, message):
    with pytest.raises(ExperimentError, match=message):
        _config(tmp_path, **changes)


def test_tool_usage_errors_exit_2():
    proc = subprocess.run([sys.executable, TOOL, "--quick", "--sft-records", "99999", "--dry-run"],
                          capture_output=True, text=True, timeout=60, cwd=REPO, env=_env())
    assert proc.returncode == 2 and "SFT sizes [99999] must be between" in proc.stderr
    proc = subprocess.run([sys.executable, TOOL, "--quick", "--model", "hidden_size", "--dry-run"],
                          capture_output=True, text=True, timeout=60, cwd=REPO, env=_env())
    assert proc.returncode == 2 and "--model takes KEY=VALUE pairs, got 'hidden_size'" in proc.stderr


def test_model_flag_reaches_every_training_run():
    proc = subprocess.run([sys.executable, TOOL, "--quick", "--model", "preset=tiny", "hidden_size=128", "--dry-run"],
                          capture_output=True, text=True, timeout=60, cwd=REPO, env=_env())
    assert proc.returncode == 0, proc.stderr
    trains = [line for line in proc.stdout.splitlines() if "tools/pretrain.py" in line]
    assert trains and all("--model.preset tiny --model.hidden_size 128 " in line for line in trains)
    # The plan's size, last: every training run counted, and per arm steps and tokens by hand
    # (quick: CT 800 steps of 8 x 128 tokens, SFT 30 steps of 16 x 80; D: 800 + 30 SFT steps).
    runs = [line for line in proc.stdout.splitlines() if line.startswith("# ") and " -> " in line]
    assert f"# {len(runs)} runs: {len(trains) - 1} training " in proc.stdout  # and the base: 1 step at lr 0
    per_arm = dict(line.split(": ") for line in proc.stdout.splitlines() if line.startswith("#   "))
    assert per_arm["#   B"] == per_arm["#   C"] == f"800 30 {800 * 8 * 128 + 30 * 16 * 80:,}"
    assert per_arm["#   A"] == f"0 30 {30 * 16 * 80:,}" and per_arm["#   D"] == f"0 830 {830 * 16 * 80:,}"
    proc = subprocess.run([sys.executable, TOOL, "subset", "--input", "nope.jsonl", "--output", "x", "--records", "2"],
                          capture_output=True, text=True, timeout=60, cwd=REPO, env=_env())
    assert proc.returncode == 1 and proc.stderr.startswith("ltu_experiment.py subset: error: ")


def test_runner_starts_the_costliest_chain_first(tmp_path):
    order = tmp_path / "order.txt"

    def job(name, deps, tokens=None):
        argv = ["python", "-c", f"open({str(order)!r}, 'a').write({name!r} + ' ')"]
        return Job(name, argv, deps, [], str(tmp_path), {} if tokens is None else {"tokens": tokens})

    # Plan order lists the short job first; the data step heads the chain with the training run.
    jobs = {j.name: j for j in (job("short", []), job("data", []), job("train", ["data"], 1000),
                                job("eval", ["train"]))}
    assert critical_path_order(jobs) == ["data", "train", "short", "eval"]
    results = Runner(jobs, str(tmp_path / "work"), parallel=1, log=lambda _: None).run()
    assert order.read_text().split() == ["data", "train", "short", "eval"] and not any(r.reused for r in results.values())


# ---------------------------------------------------------------------------- a tiny real run
SMOKE_ARGS = ["--quick", "--records", "60", "--valid-records", "40", "--test-records", "40", "--seeds", "1",
              "--ct-iters", "2", "--sft-iters", "2", "--sft-records", "30", "--curve-sizes", "--dose-levels",
              "--text-shares", "0.5", "--bootstrap", "50", "--jobs", "2"]


def _env():
    """This checkout first on the path, whichever checkout the environment has installed."""
    path = REPO + os.pathsep + os.environ.get("PYTHONPATH", "")
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": path}


def _run_tool(args, timeout=600):
    proc = subprocess.Popen([sys.executable, TOOL, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=_env())
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the tool stops its running jobs before it exits
        out, _ = proc.communicate(timeout=60)
        raise TimeoutError(out)
    return proc.returncode, out


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("ltu")
    work, out = root / "work", root / "report"
    code, output = _run_tool(SMOKE_ARGS + ["--work", str(work), "--out", str(out)])
    assert code == 0, output
    return {"work": work, "out": out, "output": output, "report": json.loads((out / "report.json").read_text())}


def test_smoke_report_structure(smoke):
    report, out = smoke["report"], smoke["out"]
    assert report["format"] == "ltu-experiment"
    assert list(report["arms"]) == ["A", "B", "C", "D", "F50"]
    for arm in report["arms"].values():
        for group in ("in_domain", "out_of_domain", "multi_step"):
            auc = arm["groups"][group]["auc"]
            assert auc["n"] == 1 and 0 <= auc["mean"] <= 1
    assert set(report["differences"]) == {"B-A", "B-C", "B-D", "B-F50"}
    for diff in report["differences"].values():
        entry = diff["in_domain"]["auc"]
        assert entry["records"]["resamples"] == 50 and len(entry["records"]["ci"]) == 2
        assert entry["seeds"]["mean"] == pytest.approx(entry["records"]["mean"], abs=1e-9)
    assert [(v["comparison"], v["group"]) for v in report["verdicts"]] == \
        [(f"B-{x}", g) for x in ("A", "C", "D") for g in ("in_domain", "out_of_domain")]
    b_minus_a = report["differences"]["B-A"]["in_domain"]["auc"]["seeds"]["mean"]
    assert b_minus_a == pytest.approx(report["arms"]["B"]["groups"]["in_domain"]["auc"]["mean"]
                                      - report["arms"]["A"]["groups"]["in_domain"]["auc"]["mean"])
    assert set(report["before_sft"]) == {"B", "C"}  # CT checkpoints scored as they are
    for entry in report["before_sft"].values():
        assert set(entry["groups"]) == {"in_domain", "out_of_domain", "multi_step", "ct_domains"}
        assert entry["prior_log_loss"]["ct_domains"] > entry["bayes_log_loss"]["ct_domains"] > 0
        assert set(entry["sft_effect"]) == {"in_domain", "out_of_domain", "multi_step"}
    effect = report["before_sft"]["B"]["sft_effect"]["in_domain"]["seeds"]["mean"]
    assert effect == pytest.approx(report["arms"]["B"]["groups"]["in_domain"]["auc"]["mean"]
                                   - report["before_sft"]["B"]["groups"]["in_domain"]["auc"]["mean"])
    assert report["ceilings"]["in_domain"]["tasks"] == ["ads/ctr/click"]
    assert report["ceilings"]["out_of_domain"]["tasks"] == ["shop/purchase/purchase"]
    assert report["costs"]["D"]["sft_steps"] == 4 and report["costs"]["B"]["steps"] == 4
    ct, sft = report["settings"]["ct"], report["settings"]["sft"]
    assert report["costs"]["B"]["tokens"] == 2 * ct["global_batch_size"] * ct["seq_length"] + \
        2 * sft["global_batch_size"] * sft["seq_length"]
    assert report["machine"]["cpu_count"] >= 1 and report["command"].startswith("python tools/ltu_experiment.py")
    md = (out / "report.md").read_text()
    assert "## What CT alone learned" in md and "## What must hold" in md
    for run in report["runs"]:  # every run is listed with its command and output directory
        assert run["command"] in md and run["out_dir"] in md and run["seconds"] is not None
    for plot in ("arms.png", "differences.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _path(path):
    return Path(path) if os.path.isabs(path) else Path(REPO) / path


def test_smoke_base_checkpoint_is_the_seeded_initial_model(smoke):
    # One step at learning rate 0 saves the initialisation untouched: every arm starts from it.
    from safetensors.torch import load_file

    from engine.config import MODEL_PRESETS
    from engine.data.tokenizer import Tokenizer
    from engine.model.config import LlamaConfig
    from engine.model.llama import Llama

    settings = smoke["report"]["settings"]
    vocab = Tokenizer(str(smoke["work"] / "main" / "data" / "tokenizer.model")).vocab_size
    reference = Llama(LlamaConfig(**{**MODEL_PRESETS["tiny"], "vocab_size": vocab}))
    reference.init_weights(settings["base_seed"])
    saved = load_file(str(smoke["work"] / "runs" / "base" / "iter_0000001" / "mp_rank_00_000" / "model.safetensors"))
    expected = dict(reference.named_parameters())
    assert set(saved) == set(expected)
    for name, tensor in saved.items():  # the vocabulary is padded in checkpoints: compare its real rows
        assert torch.equal(tensor[:expected[name].shape[0]], expected[name].detach()), name


def test_smoke_arms_see_the_same_sft_data_in_the_same_order(smoke):
    from engine.data.batches import build_dataset
    from engine.train.checkpoint import open_checkpoint

    runs = {r["name"]: r for r in smoke["report"]["runs"]}
    orders = {}
    for label in ("A", "B", "C", "D", "F50"):
        run = open_checkpoint(_path(runs[f"main/seed1/sft_{label}_n30"]["out_dir"])).extra["run"]
        data, train = run["data"], run["train"]
        ds = build_dataset(data["train"], "sft", data["seq_length"], train["iters"] * train["global_batch_size"],
                           train["seed"])
        orders[label] = [ds.record(k) for k in range(len(ds))]
    assert orders["A"] == orders["B"] == orders["C"] == orders["F50"]
    assert orders["D"][:len(orders["A"])] == orders["A"]  # the longer run starts with the same batches


def test_smoke_control_logs_shuffle_only_the_rewards(smoke):
    logs, shuffled = smoke["work"] / "main" / "logs" / "train", smoke["work"] / "main" / "logs_shuffled" / "seed1"
    assert sorted(os.listdir(shuffled)) == ["ads_cpc.jsonl", "ads_impressions.jsonl", "feed_session.jsonl"]
    for name in os.listdir(shuffled):
        before = [json.loads(line) for line in (logs / name).read_text().splitlines()]
        after = [json.loads(line) for line in (shuffled / name).read_text().splitlines()]
        steps = lambda rs: [s for r in rs for s in r.get("steps", [r])]  # noqa: E731
        assert [(s["state"], s["action"]) for s in steps(before)] == [(s["state"], s["action"]) for s in steps(after)]
        values = lambda rs: [json.dumps(s["reward"]) for s in steps(rs)]  # noqa: E731
        assert Counter(values(before)) == Counter(values(after)) and values(before) != values(after)


def test_smoke_runs_reproduce_by_hand_and_a_rerun_reuses_them(smoke, tmp_path):
    runs = {r["name"]: r for r in smoke["report"]["runs"]}
    command = runs["main/seed1/eval_B_n30"]["command"].split()
    out = command.index("--out") + 1
    original = command[out]
    command[out] = str(tmp_path / "again")
    proc = subprocess.run([sys.executable, *command[1:]], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=_env())
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "again" / "predictions.jsonl").read_text() == (_path(original) / "predictions.jsonl").read_text()
    code, output = _run_tool(SMOKE_ARGS + ["--work", str(smoke["work"]), "--out", str(tmp_path / "report2")])
    assert code == 0, output
    again = json.loads((tmp_path / "report2" / "report.json").read_text())
    assert all(r["reused"] for r in again["runs"])
    assert again["arms"] == smoke["report"]["arms"]
    assert math.isclose(again["costs"]["B"]["ct_s"], smoke["report"]["costs"]["B"]["ct_s"])


# ------------------------------------------------------------------ logs from a folder (--logs)
LOG_DOMAINS = {"shop/a": 40, "shop/b": 48, "shop/c": 40, "shop/d": 40, "shop/e": 40}  # training records


def write_log_folder(root, domains=LOG_DOMAINS, valid=12, test=16):
    """A SAR log folder as make_movielens_logs.py / make_obd_logs.py lay it out, with real-log rewards
    (no true distributions): shop/a-c in domain, shop/d and shop/e out of domain."""
    rng = np.random.default_rng(0)
    files = {}
    for split in ("train", "valid", "test"):
        (root / split).mkdir(parents=True, exist_ok=True)
        for domain, train in domains.items():
            rel = f"{split}/{domain.replace('/', '_')}.jsonl"
            n = {"train": train, "valid": valid, "test": test}[split]
            users, items = rng.integers(0, 4, n), rng.integers(0, 4, n)
            _write_lines(root / rel, [{"domain": domain, "state": {"user": f"u{u}"}, "action": {"item": f"i{i}"},
                                       "reward": {"buy": int((u + i) % 2 == 0)}} for u, i in zip(users, items)])
            files.setdefault(split, {})[domain] = rel
    manifest = {"source": {"name": "hand-written shop logs"}, "in_domain": ["shop/a", "shop/b", "shop/c"],
                "out_of_domain": ["shop/d", "shop/e"], "files": files, "bayes_ceiling": {},
                "split": {"rule": "by hand"}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="module")
def log_folder(tmp_path_factory):
    return write_log_folder(tmp_path_factory.mktemp("shop_logs"))


def _logs_config(tmp_path, folder, **changes):
    fields = dict(preset("quick"), logs=str(folder), target="shop/a", ood="shop/d", ct_domains=("shop/b", "shop/c"),
                  dose_levels=(), curve_sizes=(10, 40), sft_records=30)
    fields.update(changes)
    return ExperimentConfig(out=str(tmp_path / "report"), work=str(tmp_path / "work"), **fields)


def _jsonl_args(job):
    return [a for a in job.argv if a.endswith(".jsonl")]


def test_logs_plan_reads_the_folder_and_runs_every_arm_but_no_dose_response(tmp_path, log_folder):
    jobs = build_plan(_logs_config(tmp_path, log_folder))
    folder = str(log_folder)
    assert not any(j.argv[1] == "tools/make_synthetic_logs.py" for j in jobs.values() if len(j.argv) > 1)
    assert not any(name.startswith("shared") for name in jobs)  # no dose-response worlds
    # The tokenizer trains on the training split of the domains the experiment names, never another's.
    assert _jsonl_args(jobs["main/tokenizer"]) == [f"{folder}/train/shop_{d}.jsonl" for d in "adbc"]
    assert _jsonl_args(jobs["main/ct_data"]) == [f"{folder}/train/shop_{d}.jsonl" for d in "bc"]
    assert _jsonl_args(jobs["main/ct_valid_data"]) == [f"{folder}/valid/shop_{d}.jsonl" for d in "bc"]
    assert _flags(jobs["main/sft_subset_n30"].argv)["--input"] == f"{folder}/train/shop_a.jsonl"
    assert _jsonl_args(jobs["main/shuffle_s1"]) == [f"{folder}/train/shop_{d}.jsonl" for d in "bc"]
    assert jobs["main/tokenizer"].deps == [] and jobs["main/shuffle_s1"].deps == []  # nothing writes the logs
    evals = [j for j in jobs.values() if j.info.get("kind") == "eval"]
    after = {tuple(_jsonl_args(j)) for j in evals if j.info["records"] > 0}
    assert after == {(f"{folder}/test/shop_a.jsonl", f"{folder}/test/shop_d.jsonl")}
    assert {j.info["label"] for j in evals} == {"A", "B", "C", "D", "F50"}  # quick: one text share
    assert {j.info["records"] for j in evals if j.info["label"] == "A"} == {10, 30, 40}
    valid = build_plan(_logs_config(tmp_path, log_folder, eval_split="valid"))
    assert all("/valid/" in f for j in valid.values() if j.info.get("kind") == "eval" for f in _jsonl_args(j))


def test_logs_domains_default_from_the_manifest(log_folder):
    proc = subprocess.run([sys.executable, TOOL, "--quick", "--logs", str(log_folder), "--sft-records", "30",
                           "--dry-run"], capture_output=True, text=True, timeout=60, cwd=REPO, env=_env())
    assert proc.returncode == 0, proc.stderr
    evaluate = next(line for line in proc.stdout.splitlines() if "tools/evaluate.py" in line)
    # Target: the in-domain domain with the most training records; held out: the first out-of-domain
    # one; CT: the other in-domain domains. The curve keeps the setting's sizes up to shop/b's 48.
    assert "--in-domain shop/b " in evaluate and "test/shop_d.jsonl" in evaluate and "shop_e" not in proc.stdout
    ct_data = proc.stdout.split("# main/ct_data ")[1].splitlines()[1]
    assert "train/shop_a.jsonl" in ct_data and "train/shop_c.jsonl" in ct_data and "shop_b" not in ct_data
    subsets = {line.split()[-1] for line in proc.stdout.splitlines() if " subset " in line}
    assert subsets == {"30"}  # the quick curve (50, 500, 4000) is above the 48 records: no curve
    proc = subprocess.run([sys.executable, TOOL, "--quick", "--logs", str(log_folder), "--target", "shop/c", "--ood",
                           "shop/e", "--sft-records", "30", "--dry-run"],
                          capture_output=True, text=True, timeout=60, cwd=REPO, env=_env())
    assert proc.returncode == 0, proc.stderr
    ct_data = proc.stdout.split("# main/ct_data ")[1].splitlines()[1]
    assert [a for a in ct_data.split() if a.endswith(".jsonl")] == \
        [f"{log_folder}/train/shop_{d}.jsonl" for d in "ab"]


def test_logs_settings_that_cannot_work_are_refused_by_name(tmp_path, log_folder):
    with pytest.raises(ExperimentError, match=r"unknown domain 'shop/zz' in .* \(known: shop/a, shop/b, shop/c, "
                                              r"shop/d, shop/e\)"):
        _logs_config(tmp_path, log_folder, ct_domains=("shop/b", "shop/zz"))
    with pytest.raises(ExperimentError, match="the dose-response .* needs the synthetic generator"):
        _logs_config(tmp_path, log_folder, dose_levels=(0.5,))
    with pytest.raises(ExperimentError, match=r"SFT sizes \[100\] must be between 1 and the 40 training records of "
                                              "the target shop/a"):
        _logs_config(tmp_path, log_folder, curve_sizes=(100,))
    with pytest.raises(ExperimentError, match="manifest.json: not found; --logs takes a SAR log folder"):
        _logs_config(tmp_path, tmp_path / "nowhere")
    broken = write_log_folder(tmp_path / "broken")
    os.remove(broken / "test" / "shop_c.jsonl")
    (broken / "valid" / "shop_a.jsonl").write_text("")
    with pytest.raises(ExperimentError) as info:
        _logs_config(tmp_path, broken)
    assert f"missing split file {broken}/test/shop_c.jsonl (the test split of shop/c)" in str(info.value)
    assert f"empty split file {broken}/valid/shop_a.jsonl (the valid split of shop/a)" in str(info.value)
    for flags, message in ((["--dose-levels", "0.5"], "--dose-levels: the dose-response needs the synthetic generator"),
                           (["--records", "20"], "--records shape the synthetic logs; with --logs"),
                           (["--target", "shop/nope"], "unknown domain 'shop/nope'")):
        proc = subprocess.run([sys.executable, TOOL, "--quick", "--logs", str(log_folder), "--sft-records", "30",
                               *flags, "--dry-run"], capture_output=True, text=True, timeout=60, cwd=REPO, env=_env())
        assert proc.returncode == 2 and message in proc.stderr, (flags, proc.stderr)


def test_tiny_run_on_a_log_folder_reports_without_ceiling(log_folder, tmp_path):
    work, out = tmp_path / "work", tmp_path / "report"
    (tmp_path / "notes.md").write_text("The arms are **indistinguishable** here.\n")
    code, output = _run_tool(["--quick", "--logs", str(log_folder), "--target", "shop/a", "--ct-domains", "shop/b",
                              "--seeds", "1", "--ct-iters", "2", "--sft-iters", "2", "--sft-records", "30",
                              "--sft-batch", "4", "--sft-seq-length", "40", "--curve-sizes", "--arms", "A", "B",
                              "--bootstrap", "20", "--jobs", "2", "--notes", str(tmp_path / "notes.md"),
                              "--work", str(work), "--out", str(out)])
    assert code == 0, output
    report = json.loads((out / "report.json").read_text())
    assert list(report["arms"]) == ["A", "B"] and report["dose_response"] == [] and report["truth"] is False
    assert set(report["ceilings"]) == {"in_domain", "out_of_domain"}
    assert report["ceilings"]["in_domain"]["tasks"] == ["shop/a/buy"]
    assert report["ceilings"]["out_of_domain"]["tasks"] == ["shop/d/buy"]
    for group in report["ceilings"].values():
        assert all(v is None for v in group["bayes"].values())
    for arm in report["arms"].values():
        assert 0 <= arm["groups"]["in_domain"]["auc"]["mean"] <= 1 and arm["groups"]["in_domain"]["kl"]["mean"] is None
    assert report["logs"]["records"]["test"] == {"shop/a": 16, "shop/d": 16, "shop/b": 16}
    assert report["logs"]["source"]["name"] == "hand-written shop logs"
    # The chance row is the test labels' frequency, computed here by hand.
    test_lines = (log_folder / "test" / "shop_a.jsonl").read_text().splitlines()
    labels = [json.loads(line)["reward"]["buy"] for line in test_lines]
    assert report["ceilings"]["in_domain"]["prior"]["accuracy"] == pytest.approx(max(np.mean(labels),
                                                                                     1 - np.mean(labels)))
    md = (out / "report.md").read_text()
    assert "# LTU experiment on hand-written shop logs" in md and "Bayes ceiling (true" not in md
    assert "no Bayes ceiling and no KL" in md and "Synthetic logs" not in md and "Dose-response" not in md
    assert "## What the numbers show\n\nThe arms are **indistinguishable** here.\n" in md
    assert report["notes"] == "The arms are **indistinguishable** here."
    sft = next(r for r in report["runs"] if r["name"] == "main/seed1/sft_A_n30")["command"]
    assert "--train.global_batch_size 4 --train.micro_batch_size 4" in sft and "--data.seq_length 40 " in sft
    tokenizer = next(r for r in report["runs"] if r["name"] == "main/tokenizer")
    assert f"{log_folder}/train/shop_b.jsonl" in tokenizer["command"] and "shop_c" not in tokenizer["command"]
    assert (out / "arms.png").read_bytes()[:4] == b"\x89PNG" and not (out / "dose_response.png").exists()
