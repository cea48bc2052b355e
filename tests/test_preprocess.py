"""Preprocessing end to end: synthetic logs and the real OBD sample, 1 vs 2 workers, bad lines, failed runs."""
import json
import os
import shutil
import stat
import subprocess
import sys

import numpy as np
import pytest

from engine.data.indexed import IndexedDataset
from engine.data.obd import iter_obd_rows
from engine.data.preprocess import PreprocessConfig, PreprocessError, open_preprocessed, preprocess, read_records
from engine.data.reward_bins import RewardBins
from engine.data.sar import RecordError, parse_json_line, parse_record, serialize_text
from engine.data.synthetic import DOMAIN_REWARDS, SyntheticConfig, write_logs
from engine.data.tokenizer import RecordEncoder, Tokenizer, train_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The OBD sample lives in shared/ beside the checkout (as README's ../shared/data/obd), wherever
# the checkout is (CI clones elsewhere); /work/shared is the development machines' copy.
OBD = next((p for p in (os.path.join(os.path.dirname(REPO), "shared", "data", "obd"), "/work/shared/data/obd")
            if os.path.isdir(p)), "/work/shared/data/obd")
OUTPUTS = (".bin", ".idx", "_reward_mask.bin", "_reward_mask.idx", ".reward_bins.json", ".meta.json")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("pre")
    write_logs(SyntheticConfig(seed=4, train_per_domain=150, valid_per_domain=40, test_per_domain=0,
                               domains=tuple(DOMAIN_REWARDS)), str(root / "syn"))  # feed/session: episodes
    episodes = root / "episodes.jsonl"
    episodes.write_text("\n".join(json.dumps(r) for r in [
        {"domain": "game", "steps": [{"state": {"hp": i}, "action": {"move": "left"}, "reward": {"score": i * 1.5}}
                                     for i in range(1 + k % 3)]} for k in range(12)]) + "\n\n")
    records = [parse_json_line(line, "x")
               for path in sorted((root / "syn" / "train").iterdir()) for line in path.read_text().splitlines()]
    bins = RewardBins.fit_records(records)
    tok = train_tokenizer([serialize_text(r, bins.classify) for r in records], str(root / "tok.model"), vocab_size=400)
    return {"root": root, "tok": tok, "train": str(root / "syn" / "train"), "episodes": str(episodes)}


def run(env, inputs, out, **kw):
    config = PreprocessConfig(inputs=inputs, output_prefix=str(out), tokenizer_model=env["tok"].model_path,
                              progress=False, chunk_size=kw.pop("chunk_size", 17), **kw)
    return preprocess(config)


def read_bytes(prefix):
    return {suffix: open(f"{prefix}{suffix}", "rb").read() for suffix in OUTPUTS}


def check_dataset(prefix, expected_records, encoder, append_eod):
    """Every stored record equals the record encoded on its own (with EOD when asked)."""
    ds, mask = IndexedDataset(prefix), IndexedDataset(prefix + "_reward_mask")
    assert len(ds) == len(mask) == len(expected_records)
    assert mask.dtype == np.uint8 and ds.dtype == np.uint16
    assert np.array_equal(ds.sequence_lengths, mask.sequence_lengths)
    assert np.array_equal(ds.document_indices, np.arange(len(ds) + 1))  # one document per record
    for i, record in enumerate(expected_records):
        encoded = encoder.encode(record)
        tokens, m = encoded.tokens.tolist(), encoded.reward_mask().tolist()
        if append_eod:
            tokens, m = tokens + [encoder.tokenizer.eos_id], m + [0]
        assert ds[i].tolist() == tokens and mask[i].tolist() == m
        assert encoder.tokenizer.decode(ds[i][np.asarray(mask[i], dtype=bool)]) == "".join(
            f"<|r{s.label_class}|>" for s in encoded.spans)


def test_synthetic_end_to_end_identical_for_1_and_2_workers(env, tmp_path):
    s1 = run(env, [env["train"], env["episodes"]], tmp_path / "w1" / "data", workers=1, append_eod=True)
    s2 = run(env, [env["train"], env["episodes"]], tmp_path / "w2" / "data", workers=2, append_eod=True)
    assert read_bytes(tmp_path / "w1" / "data") == read_bytes(tmp_path / "w2" / "data")
    # Independent expectation: every input line parsed and encoded on its own, in input order.
    files = sorted(os.path.join(env["train"], f) for f in os.listdir(env["train"])) + [env["episodes"]]
    records = [parse_json_line(line, f"{p}:{i}") for p in files
               for i, line in enumerate(open(p).read().splitlines(), 1) if line.strip()]
    assert len(files) == 6 and (s1.records, s1.blank_lines) == (5 * 150 + 12, 1)
    assert (s1.episodes, s1.steps) == (150 + 12, sum(len(r.steps) for r in records))
    assert s1.tokens == s2.tokens and s1.reward_tokens == s1.steps  # one reward field per step, one token each
    bins = RewardBins.load(str(tmp_path / "w1" / "data.reward_bins.json"))
    assert bins == RewardBins.fit_records(records)
    check_dataset(str(tmp_path / "w1" / "data"), records, RecordEncoder(env["tok"], bins), append_eod=True)
    meta = json.loads((tmp_path / "w1" / "data.meta.json").read_text())
    assert meta["counts"]["records"] == s1.records and meta["counts"]["bad_lines"] == 0
    assert meta["tokenizer"]["vocab_size"] == env["tok"].vocab_size and meta["append_eod"] is True
    assert meta["reward_label_ids"]["<|r1|>"] == env["tok"].encode("<|r1|>")
    assert meta["domains"]["game"] == 12
    opened = open_preprocessed(str(tmp_path / "w1" / "data"))
    assert opened.meta == meta and opened.bins == bins and len(opened.reward_mask) == s1.records
    run(env, [env["episodes"], env["train"]], tmp_path / "w3" / "data")  # same records, another order
    for suffix in ("_reward_mask.bin", "_reward_mask.idx"):  # tokens of one run next to the mask of another
        shutil.copy(tmp_path / "w3" / f"data{suffix}", tmp_path / "w1" / f"data{suffix}")
    with pytest.raises(ValueError, match="disagree"):
        open_preprocessed(str(tmp_path / "w1" / "data"))
    assert not [f for f in os.listdir(tmp_path / "w1") if "tmp" in f]


def test_add_bos(env, tmp_path):
    run(env, [env["episodes"]], tmp_path / "plain")
    run(env, [env["episodes"]], tmp_path / "bos", add_bos=True, append_eod=True, workers=2)
    plain, bos = IndexedDataset(str(tmp_path / "plain")), IndexedDataset(str(tmp_path / "bos"))
    masks = IndexedDataset(str(tmp_path / "plain_reward_mask")), IndexedDataset(str(tmp_path / "bos_reward_mask"))
    tok = env["tok"]
    for i in range(len(plain)):
        assert bos[i].tolist() == [tok.bos_id] + plain[i].tolist() + [tok.eos_id]
        assert masks[1][i].tolist() == [0] + masks[0][i].tolist() + [0]
    assert json.loads((tmp_path / "bos.meta.json").read_text())["add_bos"] is True


def test_validation_split_uses_training_bins(env, tmp_path):
    run(env, [env["train"]], tmp_path / "train")
    bins_path = str(tmp_path / "train.reward_bins.json")
    valid = os.path.join(os.path.dirname(env["train"]), "valid")
    run(env, [valid], tmp_path / "valid", reward_bins=bins_path)
    assert RewardBins.load(str(tmp_path / "valid.reward_bins.json")) == RewardBins.load(bins_path)
    assert json.loads((tmp_path / "valid.meta.json").read_text())["reward_bins_source"] == [os.path.abspath(bins_path)]
    # A field the training bins do not know is a bad line naming file:line and the field.
    with pytest.raises(PreprocessError, match=r"episodes.jsonl:1: field 'steps\[0\].reward.score': no reward bins"):
        run(env, [env["episodes"]], tmp_path / "ep", reward_bins=bins_path)
    assert not os.path.exists(tmp_path / "ep.idx")
    # The task's own bins merged with the training bins (as for an out-of-domain evaluation).
    run(env, [env["episodes"]], tmp_path / "ep_own")
    own = str(tmp_path / "ep_own.reward_bins.json")
    run(env, [env["episodes"], valid], tmp_path / "ep", reward_bins=[bins_path, own])
    merged = RewardBins.load(str(tmp_path / "ep.reward_bins.json"))
    assert merged.fields == {**RewardBins.load(bins_path).fields, **RewardBins.load(own).fields}


@pytest.fixture(scope="module")
def obd_subset(tmp_path_factory):
    """First 120 rows of each of the six OBD logs, with their item_context.csv."""
    root = tmp_path_factory.mktemp("obd")
    for policy in ("random", "bts"):
        for campaign in ("all", "men", "women"):
            src, dst = os.path.join(OBD, policy, campaign), root / policy / campaign
            dst.mkdir(parents=True)
            with open(os.path.join(src, f"{campaign}.csv")) as fh:
                (dst / f"{campaign}.csv").write_text("".join(next(fh) for _ in range(121)))
            shutil.copy(os.path.join(src, "item_context.csv"), dst / "item_context.csv")
    return root


@pytest.mark.skipif(not os.path.isdir(OBD), reason="OBD sample not present")
def test_obd_sample_end_to_end(env, obd_subset, tmp_path):
    s1 = run(env, [str(obd_subset)], tmp_path / "a" / "obd", workers=1)
    s2 = run(env, [str(obd_subset)], tmp_path / "b" / "obd", workers=2)
    assert read_bytes(tmp_path / "a" / "obd") == read_bytes(tmp_path / "b" / "obd")
    assert s1.records == s2.records == 720 and s1.num_bad_lines == 0
    # item_context.csv files are read beside their logs, not as inputs: listed as not read, not hidden.
    assert [os.path.basename(p) for p in s1.ignored_files] == ["item_context.csv"] * 6
    meta = json.loads((tmp_path / "a" / "obd.meta.json").read_text())
    assert [os.path.basename(p) for p in meta["ignored_files"]] == ["item_context.csv"] * 6
    assert "not logs (not read): " in s1.format()
    assert sorted(s1.domains) == [f"obd/{p}/{c}" for p in ("bts", "random") for c in ("all", "men", "women")]
    bins = RewardBins.load(str(tmp_path / "a" / "obd.reward_bins.json"))
    assert all(fb.kind == "binary" for fb in bins.fields.values())
    rows = [(where, r) for policy in ("bts", "random") for c in ("all", "men", "women")
            for where, r in iter_obd_rows(str(obd_subset / policy / c / f"{c}.csv"))]
    assert [w for w, _ in rows][:2] == [f"{obd_subset}/bts/all/all.csv:2", f"{obd_subset}/bts/all/all.csv:3"]
    records = [parse_record(r, w) for w, r in rows]
    check_dataset(str(tmp_path / "a" / "obd"), records, RecordEncoder(env["tok"], bins), append_eod=False)
    first = records[0]
    assert 0 < first.meta["propensity_score"] <= 1
    text = serialize_text(first, bins.classify)
    assert "propensity" not in text and repr(first.meta["propensity_score"])[:8] not in text
    assert first.steps[0].reward == {"click": float(open(obd_subset / "bts/all/all.csv").readlines()[1].split(",")[4])}


def test_obd_malformed_row_names_file_line_and_column(obd_subset, tmp_path):
    src = obd_subset / "random" / "men"
    dst = tmp_path / "random" / "men"
    dst.mkdir(parents=True)
    shutil.copy(src / "item_context.csv", dst / "item_context.csv")
    lines = (src / "men.csv").read_text().splitlines(keepends=True)[:10]
    cells = lines[4].split(",")
    cells[4] = "2"  # click
    lines[4] = ",".join(cells)
    cells = lines[6].split(",")
    cells[2] = "999"  # item_id
    lines[6] = ",".join(cells)
    lines[8] = lines[8].rsplit(",", 1)[0] + "\n"  # a column short
    (dst / "men.csv").write_text("".join(lines))
    errors = [(w, str(e)) for w, e in iter_obd_rows(str(dst / "men.csv")) if isinstance(e, Exception)]
    path = str(dst / "men.csv")
    assert [w for w, _ in errors] == [f"{path}:5", f"{path}:7", f"{path}:9"]
    assert "field 'click': must be 0 or 1" in errors[0][1]
    assert "field 'item_id': item 999 is not in item_context.csv" in errors[1][1]
    assert "columns, header has" in errors[2][1]


def write_with_bad_line(env, tmp_path):
    src = os.path.join(env["train"], "ads_ctr.jsonl")
    lines = open(src).read().splitlines(keepends=True)
    lines[4] = lines[4].replace('"click":', '"click":"yes","x":')  # line 5
    lines.insert(9, "{not json\n")                                 # line 10
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(lines))
    return str(path), len(lines)


@pytest.mark.parametrize("workers", [1, 2])
def test_bad_line_fails_with_file_line_and_leaves_nothing(env, tmp_path, workers):
    path, _ = write_with_bad_line(env, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(PreprocessError, match=r"bad.jsonl:5: field 'reward.click': .*--skip-bad-lines"):
        run(env, [path], out / "data", workers=workers)
    assert os.listdir(out) == []
    # Bins given: the error surfaces in the encoding pass, after some records were written.
    bins = str(tmp_path / "bins.json")
    RewardBins.fit({("ads/ctr", "click"): [0, 1]}).save(bins)
    with pytest.raises(PreprocessError, match=r"bad.jsonl:5"):
        run(env, [path], out / "data", workers=workers, reward_bins=bins, chunk_size=2)
    assert os.listdir(out) == []


def test_skip_bad_lines_counts_and_lists_them(env, tmp_path):
    path, total = write_with_bad_line(env, tmp_path)
    s = run(env, [path], tmp_path / "data", workers=2, skip_bad_lines=True)
    assert s.records == total - 2 and s.num_bad_lines == 2
    meta = json.loads((tmp_path / "data.meta.json").read_text())
    assert [b["where"] for b in meta["bad_lines"]] == [f"{path}:5", f"{path}:10"]
    assert "invalid JSON" in meta["bad_lines"][1]["error"] and meta["counts"]["bad_lines"] == 2
    assert len(IndexedDataset(str(tmp_path / "data"))) == total - 2
    assert f"{path}:5" in s.format()


def test_failed_run_keeps_previous_output_and_leaves_no_temporaries(env, tmp_path):
    run(env, [env["episodes"]], tmp_path / "data")
    before = read_bytes(tmp_path / "data")
    path, _ = write_with_bad_line(env, tmp_path)
    with pytest.raises(PreprocessError):
        run(env, [path], tmp_path / "data")
    assert read_bytes(tmp_path / "data") == before
    assert sorted(os.listdir(tmp_path)) == sorted(["bad.jsonl"] + [f"data{s}" for s in OUTPUTS])


def test_input_errors(env, tmp_path):
    with pytest.raises(PreprocessError, match="input not found"):
        run(env, [str(tmp_path / "nope.jsonl")], tmp_path / "x")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(PreprocessError, match="unsupported input"):
        run(env, [str(tmp_path / "notes.txt")], tmp_path / "x")
    (tmp_path / "blank.jsonl").write_text("\n \n")
    with pytest.raises(PreprocessError, match=r"no valid records in \S*blank.jsonl: no record lines, only 2 blank "
                                              r"lines; nothing to fit reward bins on$"):
        run(env, [str(tmp_path / "blank.jsonl")], tmp_path / "x")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "empty2.jsonl").write_text("")
    with pytest.raises(PreprocessError, match=r"in \S*empty.jsonl, \S*empty2.jsonl: the files are empty;"):
        run(env, [str(tmp_path / "empty.jsonl"), str(tmp_path / "empty2.jsonl")], tmp_path / "x", workers=2)
    (tmp_path / "bad.jsonl").write_text("{nope\n[]\n")
    with pytest.raises(PreprocessError, match=r"bad.jsonl: every record line is malformed \(2 skipped by "
                                              r"--skip-bad-lines\); nothing to fit reward bins on$"):
        run(env, [str(tmp_path / "bad.jsonl")], tmp_path / "x", skip_bad_lines=True)
    bins = str(tmp_path / "bins.json")  # bins given: the encoding pass finds nothing to write
    RewardBins.fit({("ads/ctr", "click"): [0, 1]}).save(bins)
    with pytest.raises(PreprocessError, match=r"in \S*empty.jsonl: the file is empty; nothing to write$"):
        run(env, [str(tmp_path / "empty.jsonl")], tmp_path / "new" / "x", reward_bins=bins)
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "bins.json", "blank.jsonl", "empty.jsonl", "empty2.jsonl",
                                            "notes.txt"]
    with pytest.raises(PreprocessError, match="names a directory"):
        run(env, [env["episodes"]], str(tmp_path) + os.sep)


def test_failed_run_removes_the_directories_it_made(env, tmp_path):
    path, _ = write_with_bad_line(env, tmp_path)
    (tmp_path / "kept").mkdir()
    with pytest.raises(PreprocessError, match="bad.jsonl:5"):
        run(env, [path], tmp_path / "kept" / "new" / "deeper" / "data", workers=2)
    assert os.listdir(tmp_path / "kept") == []  # the existing directory stays, the new ones go


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_outputs_get_the_permissions_of_the_umask(env, tmp_path, umask):
    previous = os.umask(umask)
    try:
        run(env, [env["episodes"]], tmp_path / "out" / "data", workers=2)
    finally:
        os.umask(previous)
    modes = {p: stat.S_IMODE(os.stat(tmp_path / "out" / f"data{p}").st_mode) for p in OUTPUTS}
    assert modes == {p: 0o666 & ~umask for p in OUTPUTS}
    assert stat.S_IMODE(os.stat(tmp_path / "out").st_mode) == 0o777 & ~umask


def test_command_line_tools(env, tmp_path):
    model_prefix = tmp_path / "cli_tok"
    subprocess.run([sys.executable, os.path.join(REPO, "tools", "train_tokenizer.py"), "--input", env["train"],
                    "--model-prefix", str(model_prefix), "--vocab-size", "350", "--threads", "1"],
                   check=True, capture_output=True, text=True)
    assert Tokenizer(f"{model_prefix}.model").is_single_token("<|reward|>")
    cmd = [sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), "--input", env["episodes"],
           "--output-prefix", str(tmp_path / "cli"), "--tokenizer-model", f"{model_prefix}.model",
           "--workers", "2", "--append-eod"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "records 12 (episodes 12" in done.stdout and "tokens/s" in done.stdout
    # stderr is a pipe: the progress bar prints whole lines (a first and a last here), no redraws
    assert "\r" not in done.stderr and done.stderr.splitlines()[-1].startswith("12 records [")
    path, _ = write_with_bad_line(env, tmp_path)
    done = subprocess.run(cmd[:3] + [path] + cmd[4:], capture_output=True, text=True)
    assert done.returncode == 1 and "bad.jsonl:5" in done.stderr and "Traceback" not in done.stderr
    done = subprocess.run(cmd[:3] + [str(tmp_path / "nothing.jsonl")] + cmd[4:], capture_output=True, text=True)
    assert done.returncode == 1 and "error: input not found:" in done.stderr
    done = subprocess.run(cmd + ["--workers", "0"], capture_output=True, text=True)  # usage: argparse's status
    assert done.returncode == 2 and "--workers: expected a positive integer, got 0" in done.stderr
    done = subprocess.run(cmd[:2] + ["--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--output-prefix data/sar_train \\\n        --tokenizer-model" in done.stdout


def test_unknown_tokens_are_counted_not_hidden(env, tmp_path):
    texts = [serialize_text(parse_json_line(line, "x"), lambda d, f, v: int(v))
             for line in open(os.path.join(env["train"], "ads_ctr.jsonl")).read().splitlines()]
    no_bytes = train_tokenizer(texts, str(tmp_path / "nb.model"), vocab_size=300, byte_fallback=False)
    path = tmp_path / "snow.jsonl"
    path.write_text(json.dumps({"domain": "d", "state": {"w": "☃☃"}, "action": {}, "reward": {"click": 1}}) + "\n")
    config = PreprocessConfig(inputs=[str(path)], output_prefix=str(tmp_path / "d"),
                              tokenizer_model=no_bytes.model_path, progress=False)
    summary = preprocess(config)
    assert summary.unknown_tokens >= 1 and "UNKNOWN TOKENS" in summary.format()
    assert json.loads((tmp_path / "d.meta.json").read_text())["counts"]["unknown_tokens"] == summary.unknown_tokens


def test_obd_log_without_item_context_is_refused(obd_subset, env, tmp_path):
    (tmp_path / "p" / "c").mkdir(parents=True)
    shutil.copy(obd_subset / "bts" / "men" / "men.csv", tmp_path / "p" / "c" / "c.csv")
    with pytest.raises(FileNotFoundError, match="item_context.csv"):
        run(env, [str(tmp_path / "p" / "c" / "c.csv")], tmp_path / "out")
    assert not os.path.exists(tmp_path / "out.idx")


def test_failure_after_the_indexes_are_written_publishes_nothing(env, tmp_path, monkeypatch):
    import engine.data.preprocess as pre

    def broken_meta(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pre, "_write_meta", broken_meta)
    with pytest.raises(OSError, match="disk full"):
        run(env, [env["episodes"]], tmp_path / "data", workers=2)
    assert os.listdir(tmp_path) == []


@pytest.mark.timeout(120)
def test_a_dying_worker_fails_the_run_instead_of_hanging(env, tmp_path, monkeypatch):
    from concurrent.futures.process import BrokenProcessPool

    import engine.data.preprocess as pre

    def die(self, chunk):
        os._exit(3)  # what a segfault in a worker looks like to the pool

    monkeypatch.setattr(pre.ChunkEncoder, "__call__", die)  # forked workers inherit the patch
    with pytest.raises(BrokenProcessPool):
        run(env, [env["episodes"]], tmp_path / "data", workers=2)
    assert os.listdir(tmp_path) == []


def test_append_eod_needs_an_eos_token(env, tmp_path):
    texts = [line for line in open(env["episodes"]).read().splitlines() if line]
    no_eos = train_tokenizer(texts, str(tmp_path / "noeos.model"), vocab_size=400, eos_id=-1)
    assert no_eos.eos_id is None and no_eos.bos_id == 1
    config = PreprocessConfig(inputs=[env["episodes"]], output_prefix=str(tmp_path / "d"),
                              tokenizer_model=no_eos.model_path, append_eod=True, progress=False)
    with pytest.raises(PreprocessError, match="no EOS token"):
        preprocess(config)
    assert not os.path.exists(tmp_path / "d.idx")


def test_read_records_in_order_with_file_line(env, tmp_path, obd_subset):
    path, total = write_with_bad_line(env, tmp_path)
    with pytest.raises(RecordError, match=r"bad.jsonl:5: field 'reward.click'"):
        list(read_records([path]))
    kept = list(read_records([path, str(obd_subset / "bts" / "men")], skip_bad_lines=True))
    assert len(kept) == total - 2 + 120
    assert [r.where for r in kept[:5]] == [f"{path}:{i}" for i in (1, 2, 3, 4, 6)]
    assert kept[-1].where == f"{obd_subset}/bts/men/men.csv:121" and kept[-1].domain == "obd/bts/men"


def test_tokenizer_record_cap_samples_every_input_file(env, tmp_path):
    from engine.data.preprocess import train_tokenizer_on_logs

    first = os.path.join(env["train"], sorted(os.listdir(env["train"]))[0])  # 150 records
    greek = tmp_path / "greek.jsonl"
    greek.write_text("".join(json.dumps({"domain": "gr", "state": {"w": "ζωή ψυχή"}, "action": {},
                                         "reward": {"click": k % 2}}) + "\n" for k in range(30)))
    tok, used = train_tokenizer_on_logs([first, str(greek)], str(tmp_path / "t.model"), vocab_size=400,
                                        max_records=40)
    assert used == 40
    # Half of the capped records came from the second file, so its characters are pieces of their own
    # (taking the first 40 records of the first file would have left them to byte fallback).
    assert all(tok.piece_to_id(ch) is not None for ch in "ζωήψυχ")


@pytest.mark.parametrize("workers,given_bins", [(1, False), (2, True)])
def test_batched_encoding_writes_the_bytes_of_records_encoded_one_by_one(env, tmp_path, workers, given_bins):
    """A few thousand records of every domain (episodes, numeric rewards): the files equal those a
    builder writes from each record encoded on its own, segment by segment."""
    logs = tmp_path / "logs"
    write_logs(SyntheticConfig(seed=9, train_per_domain=600, valid_per_domain=0, test_per_domain=0,
                               domains=tuple(DOMAIN_REWARDS)), str(logs))
    records = list(read_records([str(logs / "train")]))
    bins = RewardBins.fit_records(records)
    bins.save(str(tmp_path / "bins.json"))
    encoder = RecordEncoder(env["tok"], bins)
    from engine.data.indexed import IndexedDatasetBuilder
    with IndexedDatasetBuilder(str(tmp_path / "ref.bin"), np.uint16) as tokens, \
            IndexedDatasetBuilder(str(tmp_path / "ref_reward_mask.bin"), np.uint8) as masks:
        for record in records:
            encoded = encoder.encode(record)
            tokens.add_item(np.append(encoded.tokens, env["tok"].eos_id).astype(np.uint16))
            tokens.end_document()
            masks.add_item(np.append(encoded.reward_mask(), 0).astype(np.uint8))
            masks.end_document()
    summary = run(env, [str(logs / "train")], tmp_path / "out" / "data", workers=workers, append_eod=True,
                  chunk_size=256, reward_bins=str(tmp_path / "bins.json") if given_bins else None)
    assert summary.records == len(records) == 3000 and summary.episodes == 600
    for suffix in (".bin", ".idx", "_reward_mask.bin", "_reward_mask.idx"):
        assert (tmp_path / "out" / f"data{suffix}").read_bytes() == (tmp_path / f"ref{suffix}").read_bytes(), suffix


@pytest.mark.parametrize("workers", [1, 2])
def test_tricky_and_malformed_lines_read_as_the_python_path_reads_them(env, tmp_path, workers):
    """Lines the C++ reader takes (escapes, unicode, any key order, meta) and lines it leaves to the
    Python path (repeated keys, NaN, huge numbers, escaped keys, lone surrogates, broken JSON)
    mixed in one file: the records and the bad lines listed are those of parse_json_line."""
    lines = []
    for k in range(60):
        state = {"q": ["red shoes", "a;b=c\\d", "<|r1|> <|state|>", "é 中 🙂\u2581", "line\nbreak"][k % 5],
                 "n": [0, -7, 2.5, 1e-7, 10 ** 20][k % 5]}
        record = {"meta": {"p": k / 7, "list": [{"k": None}]}, "reward": {"click": k % 2, "cost": k * 0.37},
                  "action": {"bid": k / 3, "on": k % 3 == 0}, "state": state, "domain": "ads/ctr"}
        lines.append(json.dumps(record, ensure_ascii=k % 2 == 0))
    unusual = [lines[0].replace('"q"', '"q": 1, "q"'), lines[1].replace("0.37", "NaN"),
               lines[2].replace('"n"', '"\\u006e"'), lines[3][:-1], lines[4].replace('"bid": ', '"bid": 1' + "0" * 80),
               lines[5].replace('"red shoes"', '"\\ud800"'), lines[6].replace('"click": 0', '"click": "0"')]
    for k, broken in enumerate(unusual):
        lines.insert(5 + 7 * k, broken)
    path = tmp_path / "tricky.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    s = run(env, [str(path)], tmp_path / "out" / "data", workers=workers, skip_bad_lines=True, chunk_size=16)
    records, errors = [], []
    for i, line in enumerate(lines, 1):
        try:
            records.append(parse_json_line(line, f"{path}:{i}"))
        except RecordError as exc:
            errors.append({"where": f"{path}:{i}", "error": str(exc)})
    assert s.records == len(records) == 62 and s.bad_lines == errors and len(errors) == 5
    bins = RewardBins.load(str(tmp_path / "out" / "data.reward_bins.json"))
    assert bins == RewardBins.fit_records(records)
    check_dataset(str(tmp_path / "out" / "data"), records, RecordEncoder(env["tok"], bins), append_eod=False)
