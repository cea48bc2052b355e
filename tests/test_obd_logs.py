"""OBD logs as SAR log folders (engine/data/obd_logs.py, tools/make_obd_logs.py): golden records from a
tiny hand-written OBD folder, the time split per log, the manifest's counts and click rates, and bad
input refused by name."""
import json
import os
import subprocess
import sys

import pytest

from engine.data.obd_logs import ObdLogsConfig, ObdLogsError, find_logs, time_cuts, write_logs
from engine.data.sar import RecordError, parse_record, serialize_text

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "make_obd_logs.py")

HASH = {"u0": "a" * 32, "u1": "b1" * 16, "u2": "c2" * 16, "u3": "d3" * 16, "i1": "e4" * 16, "i2": "f5" * 16}
ITEMS = ",item_id,item_feature_0,item_feature_1,item_feature_2,item_feature_3\n" + \
    f"0,0,-0.5,{HASH['i1']},{HASH['i2']},{HASH['i1']}\n1,1,0.25,{HASH['i2']},{HASH['i1']},{HASH['i2']}\n"
HEADER = (",timestamp,item_id,position,click,propensity_score,user_feature_0,user_feature_1,user_feature_2,"
          "user_feature_3,user-item_affinity_0,user-item_affinity_1\n")
# (row, minute, item, position, click, propensity, affinity to item 0, to item 1); rows out of time order,
# minutes 5 and 6 each shared by two rows.
ROWS = [(0, 3, 1, 2, 0, 0.5, 0.0, 2.0), (1, 1, 0, 1, 1, 0.25, 1.0, 3.0), (2, 9, 0, 3, 0, 0.5, 0.0, 0.0),
        (3, 5, 1, 1, 1, 0.125, 0.0, 1.0), (4, 2, 0, 2, 0, 0.5, 0.0, 0.0), (5, 5, 0, 1, 0, 0.5, 0.0, 0.0),
        (6, 7, 1, 3, 0, 0.5, 0.0, 0.0), (7, 0, 0, 1, 0, 0.5, 0.0, 0.0), (8, 6, 1, 2, 1, 0.5, 0.0, 0.0),
        (9, 6, 0, 2, 0, 0.5, 0.0, 0.0)]


def _stamp(minute):
    return f"2019-11-24 00:{minute:02d}:00.000001+00:00"


def write_obd(root, policies=("bts", "random"), rows=ROWS, extra=""):
    for policy in policies:
        folder = root / policy / "all"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "item_context.csv").write_text(ITEMS)
        lines = [f"{r},{_stamp(m)},{item},{pos},{click},{prop},{HASH['u0']},{HASH['u1']},{HASH['u2']},{HASH['u3']},"
                 f"{a0},{a1}\n" for r, m, item, pos, click, prop, a0, a1 in rows]
        (folder / "all.csv").write_text(HEADER + "".join(lines) + extra)
    return root


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_records_are_the_hand_computed_decisions(tmp_path):
    source = write_obd(tmp_path / "obd")
    out = tmp_path / "logs"
    write_logs(str(source), str(out), ObdLogsConfig(valid_fraction=0.0, test_fraction=0.0, ood_domains=("random/all",)))
    records = {r["meta"]["row"]: r for r in _read(out / "train" / "obd_bts_all.jsonl")}
    assert sorted(records) == list(range(10))
    assert records[1] == {
        "domain": "obd/bts/all",
        "state": {"user_feature_0": "aaaaaaaa", "user_feature_1": "b1b1b1b1", "user_feature_2": "c2c2c2c2",
                  "user_feature_3": "d3d3d3d3", "position": 1, "affinity_nonzero": 2, "affinity_top": "1 0"},
        "action": {"item_id": 0, "item_feature_0": -0.5, "item_feature_1": "e4e4e4e4", "item_feature_2": "f5f5f5f5",
                   "item_feature_3": "e4e4e4e4", "affinity": 1.0},
        "reward": {"click": 1},
        "meta": {"propensity_score": 0.25, "timestamp": "2019-11-24 00:01:00.000001+00:00", "row": 1}}
    assert records[3]["state"]["affinity_top"] == "1" and records[3]["action"]["affinity"] == 1.0
    assert records[2]["state"]["affinity_top"] == "none" and records[2]["state"]["affinity_nonzero"] == 0
    # Every line is a valid SAR record; meta is not part of its text.
    text = serialize_text(parse_record(records[1]), lambda domain, name, value: int(value))
    assert "click" in text and "propensity" not in text and "aaaaaaaa" in text


def test_split_is_by_time_within_each_log_and_files_are_shuffled(tmp_path):
    source = write_obd(tmp_path / "obd")
    config = ObdLogsConfig(valid_fraction=0.2, test_fraction=0.3, ood_domains=("obd/random/all",), seed=3)
    manifest = write_logs(str(source), str(tmp_path / "logs"), config)
    # 10 sorted minutes 0 1 2 3 5 5 6 6 7 9: valid_from = t[floor(10 * 0.5)] = t[5] = 5, test_from = t[7] = 6;
    # the two rows of minute 5 and the two of minute 6 each land in one split.
    minutes = {r[0]: r[1] for r in ROWS}
    expected = {"train": {m for m in minutes.values() if m < 5}, "valid": {5}, "test": {6, 7, 9}}
    for split in ("train", "valid", "test"):
        got = [r["meta"]["row"] for r in _read(tmp_path / "logs" / split / "obd_bts_all.jsonl")]
        assert {minutes[row] for row in got} == expected[split]
        assert len(got) == sum(m in expected[split] for m in minutes.values())
    assert manifest["split"]["cuts"]["obd/bts/all"] == {"valid_from": _stamp(5), "test_from": _stamp(6)}
    assert manifest["records"]["train"]["obd/bts/all"] == 4 and manifest["records"]["test"]["obd/random/all"] == 4
    # Clicks: row 1 (minute 1, train), row 3 (minute 5, valid), row 8 (minute 6, test).
    assert manifest["clicks"]["train"]["obd/bts/all"] == 1 and manifest["click_rate"]["train"]["obd/bts/all"] == 0.25
    assert manifest["click_rate"]["valid"]["obd/bts/all"] == 0.5
    assert manifest["click_rate"]["test"]["obd/bts/all"] == 0.25
    assert manifest["in_domain"] == ["obd/bts/all"] and manifest["out_of_domain"] == ["obd/random/all"]
    assert manifest["files"]["test"]["obd/random/all"] == "test/obd_random_all.jsonl"
    assert manifest["reward_fields"] == {"obd/bts/all": "click", "obd/random/all": "click"}
    assert manifest["bayes_ceiling"] == {}
    # File order: a seeded permutation of the time order, the same for the same seed.
    train = [r["meta"]["row"] for r in _read(tmp_path / "logs" / "train" / "obd_bts_all.jsonl")]
    write_logs(str(source), str(tmp_path / "again"), config)
    assert [r["meta"]["row"] for r in _read(tmp_path / "again" / "train" / "obd_bts_all.jsonl")] == train
    orders = set()
    for seed in range(6):
        write_logs(str(source), str(tmp_path / f"s{seed}"), ObdLogsConfig(0.2, 0.3, ("random/all",), seed))
        orders.add(tuple(r["meta"]["row"] for r in _read(tmp_path / f"s{seed}" / "train" / "obd_bts_all.jsonl")))
    assert len(orders) > 1 and all(sorted(o) == sorted(train) for o in orders)


def test_time_cuts_follow_the_quantile_rule():
    times = [4, 1, 3, 2, 0, 9, 8, 7, 6, 5]
    assert time_cuts(times, 0.1, 0.1) == (8, 9)
    assert time_cuts(times, 0.0, 0.2) == (8, 8)  # no valid split
    assert time_cuts(times, 0.3, 0.0) == (7, None)  # no test split


def test_bad_input_is_refused_by_name(tmp_path):
    with pytest.raises(ObdLogsError, match="not a folder"):
        find_logs(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ObdLogsError, match="no OBD log found"):
        find_logs(str(tmp_path / "empty"))
    source = write_obd(tmp_path / "obd")
    with pytest.raises(ObdLogsError, match=r"out-of-domain obd/bts/men is not a log .*obd/bts/all, obd/random/all"):
        write_logs(str(source), str(tmp_path / "o"), ObdLogsConfig(ood_domains=("bts/men",)))
    with pytest.raises(ObdLogsError, match="every domain"):
        write_logs(str(source), str(tmp_path / "o"), ObdLogsConfig(ood_domains=("bts/all", "random/all")))
    with pytest.raises(ObdLogsError, match="valid_fraction \\+ test_fraction must be below 1"):
        ObdLogsConfig(valid_fraction=0.5, test_fraction=0.5)
    bad_click = write_obd(tmp_path / "bad", policies=("bts",),
                          extra=f"10,{_stamp(9)},0,1,2,0.5,a,b,c,d,0.0,0.0\n")
    with pytest.raises(RecordError, match=r"all.csv:12: field 'click': must be 0 or 1, got 2"):
        write_logs(str(bad_click), str(tmp_path / "o"), ObdLogsConfig(ood_domains=()))
    bad_time = write_obd(tmp_path / "badtime", policies=("bts", "random"),
                         extra="10,yesterday,0,1,0,0.5,a,b,c,d,0.0,0.0\n")
    with pytest.raises(ObdLogsError, match=r"all.csv:12: column 'timestamp': not an ISO date"):
        write_logs(str(bad_time), str(tmp_path / "o"), ObdLogsConfig())
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_tool_writes_the_layout_and_exits_by_status(tmp_path):
    source = write_obd(tmp_path / "obd")
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, TOOL, "--source", str(source), "--output-dir", str(tmp_path / "logs"),
                           "--ood-domains", "random/all", "--test-fraction", "0.3"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "obd/random/all (out-of-domain)" in proc.stdout
    manifest = json.loads((tmp_path / "logs" / "manifest.json").read_text())
    assert manifest["config"]["test_fraction"] == 0.3
    for split, files in manifest["files"].items():
        for domain, rel in files.items():
            assert all(r["domain"] == domain for r in _read(tmp_path / "logs" / rel))
    proc = subprocess.run([sys.executable, TOOL, "--source", str(source), "--output-dir", str(tmp_path / "x"),
                           "--valid-fraction", "0.6", "--test-fraction", "0.5"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2 and "valid_fraction + test_fraction must be below 1" in proc.stderr
    proc = subprocess.run([sys.executable, TOOL, "--source", str(tmp_path / "nope"), "--output-dir",
                           str(tmp_path / "x")],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 1 and "nope: not a folder" in proc.stderr
