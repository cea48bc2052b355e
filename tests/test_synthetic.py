"""Synthetic logs: deterministic, rewards drawn from the distributions recorded in meta, exact ceilings."""
import hashlib
import json
import math
import os
import random
import runpy

import numpy as np
import pytest

from engine.data.reward_bins import FieldBins, RewardBins, fit_field
from engine.data.sar import parse_json_line, parse_record
from engine.data.synthetic import (CATEGORIES, DOMAIN_REWARDS, ITEM_FEATURES, USER_FEATURES, SyntheticConfig,
                                   SyntheticWorld, bayes_ceiling, class_probabilities, expected_auc, generate, roc_auc,
                                   write_logs)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def per_step(records, field):
    """(true distribution, observed value) of every step of every record (episodes included)."""
    out = []
    for r in records:
        if "steps" in r:
            out += [(d[field], s["reward"][field]) for d, s in zip(r["meta"]["reward_dist"], r["steps"])]
        else:
            out.append((r["meta"]["reward_dist"][field], r["reward"][field]))
    return out


@pytest.fixture(scope="module")
def samples():
    config = SyntheticConfig(seed=11, train_per_domain=6000)
    return {d: list(generate(config, d, "train")) for d in DOMAIN_REWARDS}


def test_deterministic_from_seed_and_valid_records():
    config = SyntheticConfig(seed=5, train_per_domain=50)
    for domain in DOMAIN_REWARDS:
        a, b = list(generate(config, domain, "train")), list(generate(config, domain, "train"))
        assert a == b
        assert a != list(generate(SyntheticConfig(seed=6, train_per_domain=50), domain, "train"))
        assert a != list(generate(SyntheticConfig(seed=5, valid_per_domain=50), domain, "valid"))
        for r in a:
            record = parse_record(r)
            assert record.domain == domain and list(record.steps[0].reward) == [DOMAIN_REWARDS[domain][0]]
            assert record.episode == (domain == "feed/session")
    # A split's size does not change another split's records.
    bigger = SyntheticConfig(seed=5, train_per_domain=50, test_per_domain=999)
    assert list(generate(bigger, "ads/ctr", "train")) == list(generate(config, "ads/ctr", "train"))


def test_default_world_is_unchanged_record_for_record():
    # SHA-256 of the first 40 training records of every domain at seed 0, written before the
    # shared-structure knob existed: the default world (shared_structure 1) must keep them.
    digest = hashlib.sha256()
    for domain in DOMAIN_REWARDS:
        for r in generate(SyntheticConfig(seed=0, train_per_domain=40), domain, "train"):
            digest.update(json.dumps(r, sort_keys=True).encode())
    assert digest.hexdigest() == "c08d55d8bfac6fde7c625a56bf5b0345d981d72b7514591a4acd0bd24d2a0ca6"
    explicit = SyntheticConfig(seed=0, train_per_domain=40, shared_structure=1.0)
    assert list(generate(explicit, "ads/cpc", "train")) == list(generate(SyntheticConfig(seed=0, train_per_domain=40),
                                                                        "ads/cpc", "train"))


def _random_pairs(count, seed):
    rng = random.Random(seed)
    return [({k: rng.choice(v) for k, v in USER_FEATURES.items()}, {k: rng.choice(v) for k, v in ITEM_FEATURES.items()})
            for _ in range(count)]


def _affinity_by_hand(embeddings, match, user, item, latent_dim):
    u = sum(embeddings[k][user[k]] for k in USER_FEATURES)
    v = sum(embeddings[k][item[k]] for k in ITEM_FEATURES)
    return float(np.dot(u, v)) / math.sqrt(latent_dim) + (1.0 if match[user["interest"]] == item["category"] else 0.0)


@pytest.mark.parametrize("shared", [0.0, 0.3, 0.8])
def test_shared_structure_mixes_shared_and_own_affinities(shared):
    world, default = SyntheticWorld(4, 8, shared), SyntheticWorld(4, 8)
    for name in default.embeddings:  # the shared part is the default world's, vector for vector
        for value, vector in default.embeddings[name].items():
            assert np.array_equal(world.embeddings[name][value], vector)
    own_embeddings = {d: world.own[d][0] for d in DOMAIN_REWARDS}
    assert not np.array_equal(own_embeddings["ads/ctr"]["brand"]["brand03"],
                              own_embeddings["ads/cpc"]["brand"]["brand03"])
    for user, item in _random_pairs(20, 1):
        shared_value = _affinity_by_hand(default.embeddings, {c: c for c in CATEGORIES}, user, item, 8)
        assert world.affinity(user, item) == pytest.approx(shared_value, abs=1e-12)
        for domain in ("ads/ctr", "shop/purchase", "feed/session"):
            own = _affinity_by_hand(*world.own[domain], user, item, 8)
            assert world.affinity(user, item, domain) == pytest.approx(
                math.sqrt(shared) * shared_value + math.sqrt(1 - shared) * own, abs=1e-12)


def test_shared_structure_sets_the_correlation_between_domains_and_the_rewards_follow_it():
    pairs = _random_pairs(3000, 2)
    correlations = {}
    for shared in (0.0, 0.5, 1.0):
        world = SyntheticWorld(0, 8, shared)
        ctr = np.array([world.affinity(u, i, "ads/ctr") for u, i in pairs])
        others = [np.array([world.affinity(u, i, d) for u, i in pairs]) for d in ("ads/cpc", "shop/purchase")]
        correlations[shared] = [float(np.corrcoef(ctr, o)[0, 1]) for o in others]
    assert correlations[1.0] == pytest.approx([1.0, 1.0])
    assert all(abs(c) < 0.25 for c in correlations[0.0])
    assert all(0.3 < c < 0.75 for c in correlations[0.5])
    # Records carry the mixed affinity: ads/ctr's recorded p is the domain formula on it.
    config = SyntheticConfig(seed=3, train_per_domain=30, shared_structure=0.4)
    world = SyntheticWorld(3, 8, 0.4)
    for r in generate(config, "ads/ctr", "train"):
        user = {k: r["state"][f"user_{k}"] for k in USER_FEATURES}
        item = {k: r["action"][f"item_{k}"] for k in ITEM_FEATURES}
        logit = (-1.5 + 1.2 * world.affinity(user, item, "ads/ctr") + world.position_ctr[r["state"]["position"]]
                 + world.device_ctr[user["device"]])
        assert r["meta"]["reward_dist"]["click"]["p"] == pytest.approx(1 / (1 + math.exp(-logit)), abs=1e-12)
    assert list(generate(config, "ads/ctr", "train")) != list(generate(SyntheticConfig(seed=3, train_per_domain=30),
                                                                      "ads/ctr", "train"))


def test_bernoulli_rewards_follow_recorded_p_bucket_by_bucket(samples):
    for domain in ("ads/ctr", "shop/purchase", "feed/session"):
        pairs = per_step(samples[domain], DOMAIN_REWARDS[domain][0])
        p = np.array([d["p"] for d, _ in pairs])
        y = np.array([v for _, v in pairs])
        assert p.std() > 0.1  # there is signal to learn
        order = np.argsort(p)
        for bucket in np.array_split(order, 5):
            sd = math.sqrt(np.sum(p[bucket] * (1 - p[bucket]))) / len(bucket)
            assert abs(y[bucket].mean() - p[bucket].mean()) < 4.5 * sd, (domain, y[bucket].mean(), p[bucket].mean())


def _normal_cdf(x):
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def test_lognormal_costs_follow_recorded_parameters(samples):
    # Probability integral transform: F(cost) under the recorded (mu, sigma) must be uniform.
    u = np.array([_normal_cdf((math.log(r["reward"]["cost"]) - r["meta"]["reward_dist"]["cost"]["mu"])
                              / r["meta"]["reward_dist"]["cost"]["sigma"]) for r in samples["ads/cpc"]])
    counts = np.histogram(u, bins=10, range=(0, 1))[0]
    n = len(u)
    assert np.all(np.abs(counts - n / 10) < 4.5 * math.sqrt(n * 0.1 * 0.9)), counts


def test_poisson_counts_follow_recorded_rate(samples):
    lam = np.array([r["meta"]["reward_dist"]["impressions"]["lam"] for r in samples["ads/impressions"]])
    y = np.array([r["reward"]["impressions"] for r in samples["ads/impressions"]])
    for value in range(6):  # P(Y = value) averaged over records, from the pmf written out directly
        pmf = np.exp(-lam) * lam ** value / math.factorial(value)
        sd = math.sqrt(np.sum(pmf * (1 - pmf))) / len(y)
        assert abs(np.mean(y == value) - pmf.mean()) < 4.5 * sd, value


@pytest.mark.parametrize("domain", list(DOMAIN_REWARDS))
def test_class_probabilities_match_empirical_class_frequencies(samples, domain):
    field = DOMAIN_REWARDS[domain][0]
    bins = RewardBins.fit_records(parse_record(r) for r in samples[domain][:3000])
    fb = bins.get(domain, field)
    pairs = per_step(samples[domain][3000:], field)
    probs = np.stack([class_probabilities(d, fb) for d, _ in pairs])
    assert np.all(probs >= -1e-15) and np.allclose(probs.sum(axis=1), 1.0)
    observed = np.array([fb.classify(v) for _, v in pairs])
    n = len(observed)
    for k in range(fb.num_classes):
        sd = math.sqrt(np.sum(probs[:, k] * (1 - probs[:, k]))) / n
        assert abs(np.mean(observed == k) - probs[:, k].mean()) < 4.5 * sd + 1e-12, (domain, k)


def test_class_probabilities_by_hand():
    q = FieldBins("quantile", (0.0, 2.0, 5.0), 10)
    lam = 1.7
    pmf = [math.exp(-lam) * lam ** k / math.factorial(k) for k in range(6)]
    expected = [pmf[0], pmf[1] + pmf[2], pmf[3] + pmf[4] + pmf[5], 1 - sum(pmf)]
    assert np.allclose(class_probabilities({"kind": "poisson", "lam": lam}, q), expected)
    ln = class_probabilities({"kind": "lognormal", "mu": 0.3, "sigma": 0.8}, FieldBins("quantile", (1.0, 3.0), 5))
    a, b = _normal_cdf((0 - 0.3) / 0.8), _normal_cdf((math.log(3) - 0.3) / 0.8)
    assert np.allclose(ln, [a, b - a, 1 - b])
    assert np.allclose(class_probabilities({"kind": "bernoulli", "p": 0.2}, fit_field([0, 1])), [0.8, 0.2])


def direct_auc(scores, labels):
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


def direct_expected_auc(p):
    num = den = 0.0
    for i in range(len(p)):
        for j in range(len(p)):
            if i != j:
                w = p[i] * (1 - p[j])
                den += w
                num += w * (1.0 if p[i] > p[j] else 0.5 if p[i] == p[j] else 0.0)
    return num / den


def test_auc_functions_match_direct_pair_counts():
    rng = random.Random(0)
    for trial in range(20):
        n = rng.randint(2, 60)
        scores = [rng.choice([0.1, 0.2, 0.5, 0.9]) if trial % 2 else rng.random() for _ in range(n)]
        labels = [rng.random() < 0.4 for _ in range(n)]
        if 0 < sum(labels) < n:
            assert roc_auc(np.array(scores), np.array(labels)) == pytest.approx(direct_auc(scores, labels), abs=1e-12)
        assert expected_auc(np.array(scores)) == pytest.approx(direct_expected_auc(scores), abs=1e-12)


def test_bayes_ceiling_matches_direct_computation(samples):
    records = samples["ads/ctr"][:400] + samples["ads/impressions"][:400]
    bins = RewardBins.fit_records(parse_record(r) for r in records)
    ceiling = bayes_ceiling(records, bins)
    ctr = ceiling[("ads/ctr", "click")]
    p = [r["meta"]["reward_dist"]["click"]["p"] for r in samples["ads/ctr"][:400]]
    y = [r["reward"]["click"] for r in samples["ads/ctr"][:400]]
    assert ctr.n == 400 and ctr.num_classes == 2
    assert ctr.auc == pytest.approx(direct_auc(p, y), abs=1e-12)
    assert ctr.expected_auc == pytest.approx(direct_expected_auc(p), abs=1e-12)
    assert ctr.accuracy == pytest.approx(np.mean([(pi > 0.5) == bool(yi) for pi, yi in zip(p, y)]))
    assert ctr.log_loss == pytest.approx(-np.mean([math.log(pi if yi else 1 - pi) for pi, yi in zip(p, y)]))
    imp = ceiling[("ads/impressions", "impressions")]
    assert imp.auc is None and imp.num_classes == bins.num_classes("ads/impressions", "impressions") > 2
    assert 1.0 / imp.num_classes < imp.expected_accuracy < 1.0
    sessions = samples["feed/session"][:100]
    session_bins = RewardBins.fit_records(parse_record(r) for r in sessions)
    session = bayes_ceiling(sessions, session_bins)[("feed/session", "click")]
    pairs = per_step(sessions, "click")
    assert session.n == len(pairs) > len(sessions)
    assert session.auc == pytest.approx(direct_auc([d["p"] for d, _ in pairs], [v for _, v in pairs]), abs=1e-12)
    with pytest.raises(ValueError, match="no meta.reward_dist"):
        bayes_ceiling([{"domain": "ads/ctr", "state": {}, "action": {}, "reward": {"click": 1}}], bins)


def test_write_logs_layout_manifest_and_ood(tmp_path):
    config = SyntheticConfig(seed=2, train_per_domain=30, valid_per_domain=10, test_per_domain=10)
    manifest = write_logs(config, str(tmp_path / "a"))
    write_logs(config, str(tmp_path / "b"))
    assert manifest["out_of_domain"] == ["shop/purchase"]
    assert set(manifest["in_domain"]) == {"ads/ctr", "ads/cpc", "ads/impressions"}  # feed/session is opt-in
    for split, files in manifest["files"].items():
        for domain, rel in files.items():
            a, b = (tmp_path / "a" / rel).read_bytes(), (tmp_path / "b" / rel).read_bytes()
            assert a == b  # byte-identical from the same seed
            lines = a.decode().splitlines()
            assert len(lines) == config.count(split)
            assert all(parse_json_line(line, f"{rel}:{i + 1}").domain == domain for i, line in enumerate(lines))
    assert set(manifest["bayes_ceiling"]["test"]) == {f"{d}/{DOMAIN_REWARDS[d][0]}" for d in config.domains}
    with_sessions = SyntheticConfig(seed=2, train_per_domain=30, valid_per_domain=10, test_per_domain=10,
                                    domains=config.domains + ("feed/session",))
    assert "feed/session" in write_logs(with_sessions, str(tmp_path / "c"))["in_domain"]
    assert not [p for p in os.listdir(tmp_path / "a" / "train") if "tmp" in p]
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["config"]["seed"] == 2


@pytest.mark.parametrize("overrides,message", [
    ({"train_per_domain": 0}, "train_per_domain must be at least 1"),
    ({"valid_per_domain": -1}, "valid_per_domain must be a non-negative integer"),
    ({"test_per_domain": 2.5}, "test_per_domain must be a non-negative integer"),
    ({"seed": -1}, "seed must be a non-negative integer"),
    ({"domains": ("shop/purchase",)}, "no in-domain domain"),
    ({"domains": ("ads/ctr", "nope")}, "unknown synthetic domain 'nope'"),
    ({"shared_structure": 1.5}, r"shared_structure must be a number in \[0, 1\], got 1.5"),
    ({"shared_structure": -0.1}, "shared_structure must be a number in"),
    ({"shared_structure": "0.5"}, "shared_structure must be a number in"),
])
def test_config_refuses_bad_values_by_name(overrides, message):
    with pytest.raises(ValueError, match=message):
        SyntheticConfig(**overrides)


def test_too_small_training_split_is_a_named_error(tmp_path):
    # One training record per domain: its impressions count is 0 or 1, so the bins come out binary
    # and cannot classify larger counts of the other splits.
    with pytest.raises(ValueError, match=r"ads/impressions: the reward bins fitted on its 1 training records "
                                         r"cannot classify its valid records .*write more training records"):
        write_logs(SyntheticConfig(seed=0, train_per_domain=1, valid_per_domain=50, test_per_domain=0),
                   str(tmp_path))


def make_synthetic_logs():
    return runpy.run_path(os.path.join(ROOT, "tools", "make_synthetic_logs.py"), run_name="make_synthetic_logs")


def test_tool_prints_a_short_summary_with_counts_and_the_manifest(tmp_path, capsys):
    out_dir = str(tmp_path / "logs")
    assert make_synthetic_logs()["main"](["--output-dir", out_dir, "--train", "20", "--valid", "3",
                                          "--test", "0", "--seed", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) <= 8
    assert lines[0] == f"wrote synthetic SAR logs to {out_dir} (seed 4): {out_dir}/<split>/<domain>.jsonl"
    assert lines[1].split() == ["records", "train", "valid", "test"]
    manifest = json.loads((tmp_path / "logs" / "manifest.json").read_text())
    rows = {" ".join(line.split()[:-3]): line.split()[-3:] for line in lines[2:-1]}
    assert rows == {"ads/ctr": ["20", "3", "0"], "ads/cpc": ["20", "3", "0"], "ads/impressions": ["20", "3", "0"],
                    "shop/purchase (out-of-domain)": ["20", "3", "0"]}
    for domain, rel in manifest["files"]["valid"].items():  # the counts printed are the lines written
        assert len((tmp_path / "logs" / rel).read_text().splitlines()) == 3
    assert lines[-1].endswith(os.path.join(out_dir, "manifest.json")) and "Bayes ceilings" in lines[-1]
    assert manifest["config"]["shared_structure"] == 1.0


def test_tool_writes_the_shared_structure_it_was_given(tmp_path, capsys):
    out_dir = str(tmp_path / "logs")
    argv = ["--output-dir", out_dir, "--train", "20", "--valid", "0", "--test", "0", "--shared-structure", "0.25"]
    assert make_synthetic_logs()["main"](argv) == 0
    assert "(seed 0, shared structure 0.25)" in capsys.readouterr().out.splitlines()[0]
    manifest = json.loads((tmp_path / "logs" / "manifest.json").read_text())
    assert manifest["config"]["shared_structure"] == 0.25
    ctr = (tmp_path / "logs" / manifest["files"]["train"]["ads/ctr"]).read_text().splitlines()
    config = SyntheticConfig(seed=0, train_per_domain=20, shared_structure=0.25)
    assert [json.loads(line) for line in ctr] == list(generate(config, "ads/ctr", "train"))


@pytest.mark.parametrize("argv,message", [
    (["--train", "0"], "argument --train: must be at least 1, got 0"),
    (["--valid", "-2"], "argument --valid: must be at least 0, got -2"),
    (["--test", "many"], "argument --test: expected an integer, got 'many'"),
    (["--ood-domains", "ads/ctr", "ads/cpc", "ads/impressions", "shop/purchase"], "no in-domain domain"),
    (["--ood-domains", "nope"], "argument --ood-domains: invalid choice: 'nope'"),
    (["--shared-structure", "1.2"], "argument --shared-structure: expected a number in [0, 1], got '1.2'"),
])
def test_tool_bad_arguments_are_usage_errors(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        make_synthetic_logs()["main"](["--output-dir", str(tmp_path)] + argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"make_synthetic_logs.py: error: {message}" in err and "Traceback" not in err


def test_tool_failed_work_is_one_line_and_exit_1(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert make_synthetic_logs()["main"](["--output-dir", str(tmp_path / "file" / "logs"), "--train", "3"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"make_synthetic_logs.py: error: cannot write {tmp_path / 'file' / 'logs'}: ")
    assert err.count("\n") == 1
