"""Synthetic SAR logs with known reward distributions, for tests, the demo and experiments.

A seeded "world" gives every user feature value and every item feature value a latent vector; a
user-item affinity (dot product of the summed vectors, plus a bonus when the user's interest is the
item's category) is shared by every domain. Each domain adds its own terms:

- ``ads/ctr`` (in-domain): click ~ Bernoulli(sigmoid(-1.5 + 1.2 aff + position + device terms))
- ``ads/cpc`` (in-domain): cost ~ LogNormal(mu = -0.5 + 0.4 aff + 0.7 log bid + price-tier term, 0.6)
- ``ads/impressions`` (in-domain): impressions ~ Poisson(exp(0.5 + 0.5 aff + 0.4 log(budget/20) + hour term))
- ``shop/purchase`` (out-of-domain): purchase ~ Bernoulli(sigmoid(-2 + 1.0 aff + 0.04 discount + season x category))
- ``feed/session`` (episodes; opt-in through ``SyntheticConfig.domains``): one user shown 2-5 items
  in turn; at step t, click ~ Bernoulli(sigmoid(-1.0 + 1.0 aff + 0.5 clicks_so_far - 0.3 t)),
  clicks_so_far in the state

``shared_structure`` (s in [0, 1], default 1) sets how much of that affinity the domains share:
below 1, each domain's affinity is ``sqrt(s) * shared + sqrt(1 - s) * own``, where ``own`` is an
affinity of the same form and scale from the domain's own latent vectors (and its own pairing of
interests with categories). Any two domains' affinities then have correlation s: 1, one affinity
for every domain (the default world, record for record); 0, nothing to transfer between domains.

Every record carries its exact reward distribution in ``meta.reward_dist`` (never serialized; for
an episode, a list with one entry per step), so ``bayes_ceiling`` gives the best accuracy / AUC /
log-loss any model can reach on a split once the reward bins are known. Everything is a
deterministic function of the seed.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Iterable, Iterator

import numpy as np

from engine.data.reward_bins import FieldBins, RewardBins
from engine.data.sar import SARRecord, parse_record
from engine.fileio import atomic_open, write_json_atomic

AGES = ("18-24", "25-34", "35-44", "45-54", "55-64", "65+")
REGIONS = ("north", "south", "east", "west", "central", "coast", "mountain", "islands")
DEVICES = ("mobile", "desktop", "tablet")
CATEGORIES = ("shoes", "bags", "shirts", "dresses", "watches", "jackets", "hats", "jeans", "sports", "beauty")
BRANDS = tuple(f"brand{i:02d}" for i in range(20))
PRICE_TIERS = ("low", "mid", "high")
SEASONS = ("winter", "spring", "summer", "autumn")
USER_FEATURES = {"age": AGES, "region": REGIONS, "device": DEVICES, "interest": CATEGORIES}
ITEM_FEATURES = {"category": CATEGORIES, "brand": BRANDS, "price_tier": PRICE_TIERS}

DOMAIN_REWARDS = {"ads/ctr": ("click", "bernoulli"), "ads/cpc": ("cost", "lognormal"),
                  "ads/impressions": ("impressions", "poisson"), "shop/purchase": ("purchase", "bernoulli"),
                  "feed/session": ("click", "bernoulli")}
DEFAULT_DOMAINS = ("ads/ctr", "ads/cpc", "ads/impressions", "shop/purchase")
SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class SyntheticConfig:
    seed: int = 0
    train_per_domain: int = 4000
    valid_per_domain: int = 500
    test_per_domain: int = 500
    domains: tuple[str, ...] = DEFAULT_DOMAINS
    ood_domains: tuple[str, ...] = ("shop/purchase",)
    latent_dim: int = 8
    shared_structure: float = 1.0  # correlation of any two domains' affinities (see the module docstring)

    def __post_init__(self):
        for d in self.domains + self.ood_domains:
            if d not in DOMAIN_REWARDS:
                raise ValueError(f"unknown synthetic domain {d!r} (known: {', '.join(DOMAIN_REWARDS)})")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        for split in SPLITS:
            count = self.count(split)
            if not isinstance(count, int) or count < 0:
                raise ValueError(f"{split}_per_domain must be a non-negative integer, got {count!r}")
        if self.train_per_domain < 1:  # reward bins and Bayes ceilings are fitted on the training split
            raise ValueError(f"train_per_domain must be at least 1, got {self.train_per_domain}")
        if not self.in_domain:
            raise ValueError("no in-domain domain: every domain of "
                             f"{', '.join(self.domains) or '(none)'} is listed as out-of-domain")
        if self.latent_dim < 1:
            raise ValueError(f"latent_dim must be at least 1, got {self.latent_dim}")
        object.__setattr__(self, "shared_structure", check_shared_structure(self.shared_structure))

    @property
    def in_domain(self) -> list[str]:
        return [d for d in self.domains if d not in self.ood_domains]

    def count(self, split: str) -> int:
        return {"train": self.train_per_domain, "valid": self.valid_per_domain, "test": self.test_per_domain}[split]


def check_shared_structure(value) -> float:
    """``value`` as a float in [0, 1], or a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"shared_structure must be a number in [0, 1], got {value!r}")
    return float(value)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


class SyntheticWorld:
    """The seeded latent structure shared by every domain, and the per-domain terms."""

    def __init__(self, seed: int, latent_dim: int = 8, shared_structure: float = 1.0):
        rng = np.random.default_rng([seed, 7919])
        self.latent_dim = latent_dim
        self.shared_structure = check_shared_structure(shared_structure)
        self.embeddings = _draw_embeddings(rng, latent_dim)
        self.interest_match = {c: c for c in CATEGORIES}
        # Each domain's own latent structure, from streams of its own: the shared world above draws
        # exactly what it draws at shared_structure 1.
        self.own = {}
        if self.shared_structure < 1.0:
            for index, domain in enumerate(DOMAIN_REWARDS):
                own_rng = np.random.default_rng([seed, 7919, 1 + index])
                embeddings = _draw_embeddings(own_rng, latent_dim)
                self.own[domain] = (embeddings, dict(zip(CATEGORIES, own_rng.permutation(CATEGORIES).tolist())))
        self.device_ctr = {d: float(rng.normal(0.0, 0.3)) for d in DEVICES}
        self.position_ctr = {1: 0.4, 2: 0.0, 3: -0.4}
        self.price_cpc = {"low": -0.3, "mid": 0.0, "high": 0.4}
        self.hour_phase = float(rng.uniform(0, 2 * math.pi))
        self.season_category = {(s, c): float(rng.normal(0.0, 0.5)) for s in SEASONS for c in CATEGORIES}

    def affinity(self, user: dict, item: dict, domain: str | None = None) -> float:
        """The user-item affinity in ``domain``: the shared one, mixed with the domain's own below
        ``shared_structure`` 1 (``domain`` None: the shared one)."""
        shared = self._affinity(self.embeddings, self.interest_match, user, item)
        if domain is None or self.shared_structure == 1.0:
            return shared
        own = self._affinity(*self.own[domain], user, item)
        return math.sqrt(self.shared_structure) * shared + math.sqrt(1.0 - self.shared_structure) * own

    def _affinity(self, embeddings: dict, interest_match: dict, user: dict, item: dict) -> float:
        u = embeddings["age"][user["age"]] + embeddings["region"][user["region"]] \
            + embeddings["device"][user["device"]] + embeddings["interest"][user["interest"]]
        v = embeddings["category"][item["category"]] + embeddings["brand"][item["brand"]] \
            + embeddings["price_tier"][item["price_tier"]]
        bonus = 1.0 if interest_match[user["interest"]] == item["category"] else 0.0
        return float(u @ v) / math.sqrt(self.latent_dim) + bonus

    def sample(self, domain: str, rng: np.random.Generator) -> dict:
        """One record (JSON-ready dict) of ``domain`` with its true reward distribution in meta."""
        if domain == "feed/session":
            return self._sample_session(rng)
        user = {k: _pick(v, rng) for k, v in USER_FEATURES.items()}
        item = {k: _pick(v, rng) for k, v in ITEM_FEATURES.items()}
        aff = self.affinity(user, item, domain)
        field, kind = DOMAIN_REWARDS[domain]
        state = {f"user_{k}": v for k, v in user.items()}
        action = {f"item_{k}": v for k, v in item.items()}
        if domain == "ads/ctr":
            position = int(rng.integers(1, 4))
            state["position"] = position
            dist = {"kind": kind, "p": _sigmoid(-1.5 + 1.2 * aff + self.position_ctr[position]
                                                + self.device_ctr[user["device"]])}
        elif domain == "ads/cpc":
            bid = round(float(rng.uniform(0.1, 2.0)), 2)
            action["bid"] = bid
            mu = -0.5 + 0.4 * aff + 0.7 * math.log(bid) + self.price_cpc[item["price_tier"]]
            dist = {"kind": kind, "mu": mu, "sigma": 0.6}
        elif domain == "ads/impressions":
            hour = int(rng.integers(0, 24))
            budget = _pick((10, 20, 50, 100), rng)
            state["hour"] = hour
            action["budget"] = budget
            log_lam = (0.5 + 0.5 * aff + 0.4 * math.log(budget / 20)
                       + 0.5 * math.sin(2 * math.pi * hour / 24 + self.hour_phase))
            dist = {"kind": kind, "lam": math.exp(log_lam)}
        else:  # shop/purchase
            season = _pick(SEASONS, rng)
            discount = _pick((0, 10, 20, 30), rng)
            state["season"] = season
            action["discount"] = discount
            dist = {"kind": kind, "p": _sigmoid(-2.0 + 1.0 * aff + 0.04 * discount
                                                + self.season_category[(season, item["category"])])}
        value = draw(dist, rng)
        return {"domain": domain, "state": state, "action": action, "reward": {field: value},
                "meta": {"reward_dist": {field: dist}}}


    def _sample_session(self, rng: np.random.Generator) -> dict:
        user = {k: _pick(v, rng) for k, v in USER_FEATURES.items()}
        steps, dists, clicks = [], [], 0
        for t in range(int(rng.integers(2, 6))):
            item = {k: _pick(v, rng) for k, v in ITEM_FEATURES.items()}
            dist = {"kind": "bernoulli",
                    "p": _sigmoid(-1.0 + 1.0 * self.affinity(user, item, "feed/session") + 0.5 * clicks - 0.3 * t)}
            click = draw(dist, rng)
            steps.append({"state": {**{f"user_{k}": v for k, v in user.items()}, "step": t, "clicks_so_far": clicks},
                          "action": {f"item_{k}": v for k, v in item.items()}, "reward": {"click": click}})
            dists.append({"click": dist})
            clicks += click
        return {"domain": "feed/session", "steps": steps, "meta": {"reward_dist": dists}}


def _draw_embeddings(rng: np.random.Generator, latent_dim: int) -> dict:
    """A latent vector for every user and item feature value (user features scale 0.5, items 0.55)."""
    embeddings = {}
    for name, values in {**USER_FEATURES, **ITEM_FEATURES}.items():
        scale = 0.5 if name in USER_FEATURES else 0.55
        embeddings[name] = {v: rng.normal(0.0, scale, latent_dim) for v in values}
    return embeddings


def _pick(values: tuple, rng: np.random.Generator):
    return values[int(rng.integers(len(values)))]


def draw(dist: dict, rng: np.random.Generator):
    """Sample a reward from its distribution (the one recorded in meta)."""
    kind = dist["kind"]
    if kind == "bernoulli":
        return int(rng.random() < dist["p"])
    if kind == "lognormal":
        return float(math.exp(dist["mu"] + dist["sigma"] * rng.standard_normal()))
    if kind == "poisson":
        return int(rng.poisson(dist["lam"]))
    raise ValueError(f"unknown reward distribution {kind!r}")


def generate(config: SyntheticConfig, domain: str, split: str) -> Iterator[dict]:
    """Records of one (domain, split); each pair has its own random stream, so sizes are independent."""
    world = SyntheticWorld(config.seed, config.latent_dim, config.shared_structure)
    domain_index = list(DOMAIN_REWARDS).index(domain)
    rng = np.random.default_rng([config.seed, domain_index, SPLITS.index(split)])
    for _ in range(config.count(split)):
        yield world.sample(domain, rng)


def domain_slug(domain: str) -> str:
    return domain.replace("/", "_")


def write_logs(config: SyntheticConfig, out_dir: str) -> dict:
    """Write ``<out_dir>/<split>/<domain_slug>.jsonl`` for every domain and split, plus a manifest."""
    files = {}
    all_domains = list(dict.fromkeys(config.domains + config.ood_domains))
    for split in SPLITS:
        os.makedirs(os.path.join(out_dir, split), exist_ok=True)
        for domain in all_domains:
            path = os.path.join(out_dir, split, domain_slug(domain) + ".jsonl")
            with atomic_open(path) as fh:
                for record in generate(config, domain, split):
                    fh.write(json.dumps(record, separators=(",", ":")) + "\n")
            files.setdefault(split, {})[domain] = os.path.relpath(path, out_dir)
    manifest = {"config": asdict(config), "in_domain": config.in_domain,
                "out_of_domain": list(config.ood_domains), "files": files,
                "reward_fields": {d: DOMAIN_REWARDS[d][0] for d in all_domains}}
    # Ceilings with bins fitted per domain on its training split, as preprocessing fits them.
    manifest["bayes_ceiling"] = {}
    for domain in all_domains:
        bins = RewardBins.fit_records(parse_record(r) for r in generate(config, domain, "train"))
        for split in ("valid", "test"):
            try:
                ceilings = bayes_ceiling(generate(config, domain, split), bins)
            except ValueError as exc:  # e.g. counts that were all 0 or 1 in a tiny training split
                raise ValueError(f"{domain}: the reward bins fitted on its {config.train_per_domain} training "
                                 f"records cannot classify its {split} records ({exc}); write more training "
                                 "records per domain") from None
            for (_, name), c in ceilings.items():
                manifest["bayes_ceiling"].setdefault(split, {})[f"{domain}/{name}"] = asdict(c)
    write_json_atomic(os.path.join(out_dir, "manifest.json"), manifest)
    return manifest


def format_logs_summary(manifest: dict, out_dir: str) -> str:
    """A few lines for a person: records per split and domain, which are held out, where the manifest is."""
    config = manifest["config"]
    counts = {split: config[f"{split}_per_domain"] for split in SPLITS}
    domains = list(manifest["reward_fields"])
    width = max(len(d) for d in domains) + len(" (out-of-domain)")
    shared = config.get("shared_structure", 1.0)
    world = f"seed {config['seed']}" + (f", shared structure {shared:g}" if shared != 1.0 else "")
    lines = [f"wrote synthetic SAR logs to {out_dir} ({world}): "
             f"{out_dir}/<split>/<domain>.jsonl",
             f"  {'records':{width}} " + " ".join(f"{split:>7}" for split in SPLITS)]
    for domain in domains:
        name = domain + (" (out-of-domain)" if domain in manifest["out_of_domain"] else "")
        lines.append(f"  {name:{width}} " + " ".join(f"{counts[split]:7d}" for split in SPLITS))
    lines.append(f"manifest (files, reward fields, Bayes ceilings per domain and split): "
                 f"{os.path.join(out_dir, 'manifest.json')}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- exact class probabilities


def _normal_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def _poisson_cdf(n: int, lam: float) -> float:
    if n < 0:
        return 0.0
    term = total = math.exp(-lam)
    for k in range(1, n + 1):
        term *= lam / k
        total += term
    return min(total, 1.0)


def class_probabilities(dist: dict, bins: FieldBins) -> np.ndarray:
    """Exact probability of each reward class under ``dist`` with these bins."""
    kind = dist["kind"]
    if bins.kind == "binary":
        if kind != "bernoulli":
            raise ValueError(f"a {kind} reward cannot be classified by binary bins")
        return np.array([1.0 - dist["p"], dist["p"]])
    if kind == "lognormal":
        cdf = [(_normal_cdf((math.log(e) - dist["mu"]) / dist["sigma"]) if e > 0 else 0.0) for e in bins.edges]
    elif kind == "poisson":
        cdf = [_poisson_cdf(math.floor(e), dist["lam"]) for e in bins.edges]  # class k holds counts <= edge k
    elif kind == "bernoulli":
        cdf = [(0.0 if e < 0 else (1.0 - dist["p"] if e < 1 else 1.0)) for e in bins.edges]
    else:
        raise ValueError(f"unknown reward distribution {kind!r}")
    return np.diff(np.concatenate([[0.0], cdf, [1.0]]))


# --------------------------------------------------------------------------- Bayes ceilings


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with tied scores counted half)."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    # Average rank (1-based) of each distinct score value.
    ends = np.cumsum(counts)
    avg_rank = ends - (counts - 1) / 2.0
    rank_sum = avg_rank[inverse][labels].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def expected_auc(p: np.ndarray) -> float:
    """AUC of the true probabilities in expectation over the labels (ratio of expected pair counts)."""
    p = np.asarray(p, dtype=np.float64)
    values, inverse = np.unique(p, return_inverse=True)
    neg_by_value = np.bincount(inverse, weights=1.0 - p)
    neg_below = np.concatenate([[0.0], np.cumsum(neg_by_value)[:-1]])
    neg_equal_others = neg_by_value[inverse] - (1.0 - p)
    numerator = float(np.sum(p * (neg_below[inverse] + 0.5 * neg_equal_others)))
    denominator = float(p.sum() * (1.0 - p).sum() - np.sum(p * (1.0 - p)))
    return numerator / denominator if denominator > 0 else float("nan")


@dataclass(frozen=True)
class Ceiling:
    n: int
    num_classes: int
    accuracy: float           # argmax of the true class probabilities vs the observed classes
    expected_accuracy: float  # mean of the largest true class probability
    log_loss: float           # mean -log p(observed class) under the true distribution
    auc: float | None         # binary fields: AUC of the true P(class 1) on the observed labels
    expected_auc: float | None


def bayes_ceiling(records: Iterable[dict | SARRecord], bins: RewardBins) -> dict[tuple[str, str], Ceiling]:
    """Best achievable metrics per (domain, reward field) on these records, given the reward bins."""
    probs: dict[tuple[str, str], list[np.ndarray]] = {}
    observed: dict[tuple[str, str], list[int]] = {}
    for record in records:
        if not isinstance(record, SARRecord):
            record = parse_record(record)
        if not isinstance(record.meta, dict) or "reward_dist" not in record.meta:
            raise ValueError(f"{record.where or 'record'}: no meta.reward_dist (not a synthetic record?)")
        dists = record.meta["reward_dist"]
        for i, step in enumerate(record.steps):
            step_dists = dists[i] if isinstance(dists, list) else dists
            for name, value in step.reward.items():
                key = (record.domain, name)
                field_bins = bins.get(*key)
                probs.setdefault(key, []).append(class_probabilities(step_dists[name], field_bins))
                observed.setdefault(key, []).append(field_bins.classify(value))
    out = {}
    for key, plist in probs.items():
        p, y = np.stack(plist), np.asarray(observed[key])
        p_obs = np.clip(p[np.arange(len(y)), y], 1e-300, None)
        binary = p.shape[1] == 2
        out[key] = Ceiling(
            n=len(y), num_classes=p.shape[1], accuracy=float(np.mean(p.argmax(axis=1) == y)),
            expected_accuracy=float(np.mean(p.max(axis=1))), log_loss=float(-np.mean(np.log(p_obs))),
            auc=roc_auc(p[:, 1], y) if binary else None, expected_auc=expected_auc(p[:, 1]) if binary else None)
    return out
