"""The reference models of benchmarks/ltu_reference.py on small synthetic logs: transfer from other
domains' logs helps exactly when the domains share their user-item structure."""
import os
import runpy

import pytest

from engine.data.synthetic import SyntheticConfig, write_logs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
reference = runpy.run_path(os.path.join(ROOT, "benchmarks", "ltu_reference.py"), run_name="ltu_reference")

pytest.importorskip("sklearn")


def _logs(tmp_path, shared):
    cfg = SyntheticConfig(seed=3, train_per_domain=1500, valid_per_domain=400, test_per_domain=600,
                          domains=("ads/ctr", "ads/cpc", "ads/impressions"), ood_domains=(),
                          shared_structure=shared)
    write_logs(cfg, str(tmp_path / f"s{shared}"))
    return str(tmp_path / f"s{shared}")


def test_transfer_gains_only_with_shared_structure(tmp_path):
    gains = {}
    for shared in (1.0, 0.0):
        result = reference["run"](_logs(tmp_path, shared), "ads/ctr", ["ads/cpc", "ads/impressions"], [200])
        (row,) = result["rows"]
        assert 0.5 < result["bayes_test_auc"] < 1 and result["test_records"] == 600
        gains[shared] = row["transfer"]["test_auc"] - row["in_domain"]["test_auc"]
    assert gains[1.0] > 0.05          # the other domains' rewards carry the target's affinity
    assert abs(gains[0.0]) < 0.05     # independent affinities: nothing to carry over
    text = reference["markdown"](result, "python benchmarks/ltu_reference.py")
    assert "| 200 |" in text and "Bayes ceiling" in text
