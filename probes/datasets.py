"""Typed loaders for the shipped datasets (gzip copies in ``data/``), also reading a path or a Hugging Face id.

See ``data/PROVENANCE.md`` for where each file comes from.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from probes.readers import CorruptFileError

DATA_DIR = Path(__file__).resolve().parents[1] / "data"


@dataclass(frozen=True)
class EntitySpec:
    """How an entity dataset is read: its file, the entity text, the targets and what ranks popularity."""

    file: str
    kind: str  # "space" or "time"
    entity: Callable[[pd.DataFrame], pd.Series]
    targets: Callable[[pd.DataFrame], pd.DataFrame]
    required: tuple[str, ...]
    popularity: str | None


def _year(column: str) -> Callable[[pd.DataFrame], pd.DataFrame]:
    def targets(frame: pd.DataFrame) -> pd.DataFrame:
        return pd.DataFrame({"year": pd.to_numeric(frame[column], errors="coerce")})
    return targets


def _fractional_year(column: str) -> Callable[[pd.DataFrame], pd.DataFrame]:
    def targets(frame: pd.DataFrame) -> pd.DataFrame:
        date = pd.to_datetime(frame[column], errors="coerce")
        return pd.DataFrame({"year": date.dt.year + (date.dt.dayofyear - 1) / 365.25})
    return targets


def _release_year(frame: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({"year": pd.to_numeric(frame["release_date"].astype(str).str[:4], errors="coerce")})


def _lat_lon(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[["latitude", "longitude"]].apply(pd.to_numeric, errors="coerce")


ENTITY_DATASETS: dict[str, EntitySpec] = {
    "world_place": EntitySpec("world_place.csv.gz", "space", lambda f: f["name"], _lat_lon,
                              ("name", "latitude", "longitude"), "page_views"),
    "us_place": EntitySpec("us_place.csv.gz", "space", lambda f: f["name"] + ", " + f["state_id"].astype(str),
                           _lat_lon, ("name", "state_id", "latitude", "longitude"), "population"),
    "nyc_place": EntitySpec("nyc_place.csv.gz", "space", lambda f: f["name"].astype(str).str.title(), _lat_lon,
                            ("name", "latitude", "longitude"), None),
    "art": EntitySpec("art.csv.gz", "time", lambda f: f["title"].astype(str) + " by " + f["creator"].astype(str),
                      _release_year, ("title", "creator", "release_date"), "page_views"),
    "historical_figure": EntitySpec("historical_figures.csv.gz", "time", lambda f: f["name"], _year("death_year"),
                                    ("name", "death_year"), "popularity"),
    "headline": EntitySpec("headlines.csv.gz", "time", lambda f: f["headline"], _fractional_year("date"),
                           ("headline", "date"), None),
}


@dataclass
class EntityData:
    """Entities with numeric targets and a train/test split; ``frame`` keeps every original column."""

    name: str
    kind: str
    frame: pd.DataFrame
    entities: list[str]
    targets: np.ndarray  # [n, n_targets] float64
    target_names: list[str]
    is_test: np.ndarray  # [n] bool

    def __len__(self) -> int:
        return len(self.entities)


def _read_table(source: str | Path, default: Path) -> pd.DataFrame:
    """A DataFrame from the shipped file, a local file (csv/json/jsonl/parquet, optionally .gz) or a HF id."""
    path = Path(source) if source is not None else default
    if path.exists():
        return _read_file(path, "restore the shipped data with `git checkout -- data/`" if source is None else
                          "fix or replace the file")
    if source is None:
        raise FileNotFoundError(f"shipped dataset {path} is missing; restore it with `git checkout -- data/` "
                                "or pass source= a path or Hugging Face dataset id")
    if "/" in str(source) and not str(source).startswith((".", "/")):
        return _read_hub(str(source))
    raise FileNotFoundError(f"no dataset file at {path}")


def _read_file(path: Path, remedy: str) -> pd.DataFrame:
    """A local csv/json/jsonl/parquet file (optionally .gz); a truncated or corrupt one is named with ``remedy``."""
    name = path.name.removesuffix(".gz")
    readers = {".csv": pd.read_csv, ".jsonl": lambda p: pd.read_json(p, lines=True), ".json": pd.read_json,
               ".parquet": pd.read_parquet}
    read = next((r for suffix, r in readers.items() if name.endswith(suffix)), None)
    if read is None:
        raise ValueError(f"cannot read {path}: use a .csv, .json, .jsonl or .parquet file (optionally .gz)")
    try:
        return read(path)
    except (EOFError, OSError, ValueError, zlib.error) as err:  # pandas' parser errors are ValueErrors
        raise CorruptFileError(path, remedy, err) from err


def _read_hub(dataset_id: str, split: str | None = None) -> pd.DataFrame:
    import datasets  # imported here: only users loading from the hub need it

    loaded = datasets.load_dataset(dataset_id, split=split)
    if isinstance(loaded, datasets.DatasetDict):
        loaded = loaded[next(iter(loaded))]
    return loaded.to_pandas()


def _require(frame: pd.DataFrame, columns, what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} lacks column(s) {missing}; it has {list(frame.columns)}")


def load_entities(name: str, n: int | None = None, seed: int = 0, source: str | Path | None = None) -> EntityData:
    """An entity dataset of the space and time probes.

    Rows with no entity text or target are dropped and duplicate entity texts removed. ``n`` keeps the n most
    popular entities (page views, population or popularity; a seeded sample where a dataset has none). The split
    is the file's ``is_test`` column, or a seeded 80/20 split when it has none.
    """
    if name not in ENTITY_DATASETS:
        raise ValueError(f"unknown entity dataset {name!r}; known: {sorted(ENTITY_DATASETS)}")
    if n is not None and n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    spec = ENTITY_DATASETS[name]
    frame = _read_table(source, DATA_DIR / spec.file)
    _require(frame, spec.required, f"dataset {name}")
    frame = frame.assign(_entity=spec.entity(frame))
    targets = spec.targets(frame)
    frame = frame.assign(**{f"_target_{c}": targets[c] for c in targets.columns})
    target_cols = [f"_target_{c}" for c in targets.columns]
    frame = frame.dropna(subset=["_entity", *target_cols])
    frame = frame[frame["_entity"].astype(str).str.strip() != ""].drop_duplicates("_entity")
    if n is not None and n < len(frame):
        if spec.popularity and spec.popularity in frame:
            frame = frame.sort_values(spec.popularity, ascending=False, kind="stable").head(n)
        else:
            frame = frame.sample(n=n, random_state=seed)
    if "is_test" in frame:
        is_test = frame["is_test"].astype(str).str.lower().isin(["true", "1"]).to_numpy()
    else:
        is_test = np.random.default_rng(seed).random(len(frame)) < 0.2
    if "decade" not in frame and spec.kind == "time":
        frame = frame.assign(decade=(frame[target_cols[0]] // 10 * 10).astype(int).astype(str) + "s")
    frame = frame.reset_index(drop=True)
    return EntityData(name=name, kind=spec.kind, frame=frame, entities=frame["_entity"].astype(str).tolist(),
                      targets=np.array(frame[target_cols], dtype=np.float64), target_names=list(targets.columns),
                      is_test=np.array(is_test, dtype=bool))


REFUSAL_KINDS = ("harmful", "harmless")
REFUSAL_SPLITS = ("train", "val", "test")


def load_refusal_instructions(split: str, kind: str, source: str | Path | None = None) -> list[str]:
    """Instructions of Arditi et al.'s splits: ``kind`` harmful or harmless, ``split`` train, val or test."""
    if kind not in REFUSAL_KINDS or split not in REFUSAL_SPLITS:
        raise ValueError(f"kind must be one of {REFUSAL_KINDS} and split one of {REFUSAL_SPLITS}, "
                         f"got kind={kind!r}, split={split!r}")
    frame = _read_table(source, DATA_DIR / "refusal" / f"{kind}_{split}.json.gz")
    _require(frame, ["instruction"], f"refusal split {kind}_{split}")
    return frame["instruction"].astype(str).tolist()


def load_jailbreakbench(source: str | Path | None = None) -> pd.DataFrame:
    """JailbreakBench's 100 harmful behaviours with their category."""
    frame = _read_table(source, DATA_DIR / "refusal" / "jailbreakbench.json.gz")
    _require(frame, ["instruction", "category"], "jailbreakbench")
    return frame


NQSWAP_COLUMNS = ("question", "org_context", "org_answer", "sub_context", "sub_answer")


def load_nqswap(n: int | None = None, seed: int = 0, source: str | Path | None = None) -> pd.DataFrame:
    """NQ-Swap (dev split): questions with the original and the entity-substituted context and answers.

    ``source`` may be the Hugging Face id ``pminervini/NQ-Swap`` (its only split is ``dev``).
    """
    if n is not None and n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    frame = _read_table(source, DATA_DIR / "nqswap.jsonl.gz")
    _require(frame, NQSWAP_COLUMNS, "NQ-Swap")
    frame = frame[list(NQSWAP_COLUMNS)].copy()
    for column in ("org_answer", "sub_answer"):
        frame[column] = frame[column].map(lambda a: [str(x) for x in (json.loads(a) if isinstance(a, str) and
                                                                       a.startswith("[") else list(np.atleast_1d(a)))])
    if n is not None and n < len(frame):
        frame = frame.sample(n=n, random_state=seed)
    return frame.reset_index(drop=True)
