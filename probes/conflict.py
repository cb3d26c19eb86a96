"""Knowledge-conflict prompts (Zhao et al. 2024, SpARE): few-shot context + question -> short answer prompts,
NQ-Swap and "known facts" conflict examples, and grouping answers by behaviour (open-domain-QA exact match,
:func:`probes.metrics.exact_match`).

A conflict example pairs a question with two contexts: the original one (states the answer the model is meant to
have memorised) and a substituted one (states a different answer). On the substituted context, answering with its
answer means the model uses the context; answering with the original answer means it uses its memory.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Literal, Mapping, Sequence

import numpy as np
import pandas as pd

from probes.cli_args import choice_list, positive_int
from probes.datasets import ENTITY_DATASETS, NQSWAP_COLUMNS, load_entities
from probes.files import atomic_file, check_not_shipped
from probes.forward import generate
from probes.metrics import exact_match, normalize_answer
from probes.models import ModelHandle
from probes.readers import read_jsonl_gz
from probes.settings import BatchSettings, ModelSettings, RunSettings, parse_settings, setting

USES_CONTEXT, USES_MEMORY, NEITHER = "context", "memory", "neither"


@dataclass(frozen=True)
class Demonstration:
    """One solved few-shot example: the answer is stated by the context."""

    context: str
    question: str
    answer: str


# Written for this workbench. Each context agrees with world knowledge, so the demonstrations show the answer format
# without teaching either behaviour (following the context vs answering from memory).
DEMONSTRATIONS: tuple[Demonstration, ...] = (
    Demonstration("Mount Kilimanjaro, a dormant volcano in Tanzania, is the highest mountain in Africa.",
                  "in which country is mount kilimanjaro", "Tanzania"),
    Demonstration("Pride and Prejudice is a novel by Jane Austen, first published in 1813.",
                  "who wrote pride and prejudice", "Jane Austen"),
    Demonstration("The Eiffel Tower on the Champ de Mars in Paris was completed in 1889 for the World's Fair.",
                  "when was the eiffel tower completed", "1889"),
    Demonstration("The Amazon flows east across South America and empties into the Atlantic Ocean.",
                  "into which ocean does the amazon flow", "Atlantic Ocean"),
)


@dataclass(frozen=True)
class ConflictExample:
    """A question with its original context and answers, and a substituted context stating other answers."""

    question: str
    org_context: str
    org_answers: tuple[str, ...]
    sub_context: str
    sub_answers: tuple[str, ...]
    kind: str = ""  # where it comes from: "nqswap" or a key of FACT_KINDS


def _block(question: str, context: str | None, answer: str | None) -> str:
    lines = ([f"context: {context}"] if context is not None else []) + [f"question: {question}"]
    return "\n".join(lines + ["answer:" if answer is None else f"answer: {answer}"])


def conflict_prompt(context: str | None, question: str,
                    demonstrations: Sequence[Demonstration] = DEMONSTRATIONS) -> str:
    """The few-shot prompt ``context: ... question: ... answer: ...`` (blank line between blocks), ending with
    ``answer:``. With ``context=None`` it is the closed-book prompt: demonstrations and query without contexts."""
    closed = context is None
    shots = [_block(d.question, None if closed else d.context, d.answer) for d in demonstrations]
    return "\n\n".join(shots + [_block(question, context, None)])


def conflict_prompts(examples: Sequence[ConflictExample], context: Literal["sub", "org", "none"] = "sub",
                     demonstrations: Sequence[Demonstration] = DEMONSTRATIONS) -> list[str]:
    """Prompts of ``examples`` with the substituted context, the original one, or none (closed book)."""
    if context not in ("sub", "org", "none"):
        raise ValueError(f"context must be 'sub', 'org' or 'none', got {context!r}")
    pick = {"sub": lambda e: e.sub_context, "org": lambda e: e.org_context, "none": lambda e: None}[context]
    return [conflict_prompt(pick(e), e.question, demonstrations) for e in examples]


def nqswap_examples(frame: pd.DataFrame) -> list[ConflictExample]:
    """Conflict examples from the frame of :func:`probes.datasets.load_nqswap` (answers as lists of strings)."""
    missing = [c for c in NQSWAP_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"NQ-Swap frame lacks column(s) {missing}; it has {list(frame.columns)}")
    if frame.empty:
        raise ValueError("NQ-Swap frame has no rows")
    return [ConflictExample(question=str(r.question), org_context=str(r.org_context),
                            org_answers=tuple(map(str, r.org_answer)), sub_context=str(r.sub_context),
                            sub_answers=tuple(map(str, r.sub_answer)), kind="nqswap")
            for r in frame.itertuples(index=False)]


# ---------------------------------------------------------------------------------------------------------------
# known facts: entity-substitution conflicts built from the shipped entity datasets

# Country names of world_place as written in its (Wikipedia-derived) column -> the name used in prompts.
COUNTRY_NAMES: dict[str, str] = {
    "United States of America": "United States", "People's Republic of China": "China",
    "Republic of Ireland": "Ireland", "Ireland (state)": "Ireland", "England": "United Kingdom",
    "Scotland": "United Kingdom", "Wales": "United Kingdom", "Northern Ireland": "United Kingdom",
    "Republic of China (Taiwan)": "Taiwan", "Myanmar (Burma)": "Myanmar", "Georgia (country)": "Georgia",
}
# Occupations of historical_figure (Pantheon 1.0) -> other words a short answer uses for them.
OCCUPATION_ALIASES: dict[str, tuple[str, ...]] = {
    "politician": ("statesman", "stateswoman"), "military personnel": ("soldier", "military officer", "general"),
    "religious figure": ("religious leader",), "social activist": ("activist",),
    "film director": ("director", "filmmaker", "film maker"), "businessperson": ("businessman", "businesswoman"),
    "soccer player": ("footballer", "football player"), "racecar driver": ("racing driver", "race car driver"),
}


def _ordinal(number: int) -> str:
    suffix = "th" if 10 <= number % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")
    return f"{number}{suffix}"


def century_name(year: int) -> str:
    """The century of a year (BCE years negative, no year 0): 1642 -> "17th century", -384 -> "4th century BC"."""
    if year > 0:
        return f"{_ordinal((year - 1) // 100 + 1)} century"
    return f"{_ordinal((-year - 1) // 100 + 1)} century BC"


def _century_aliases(centuries: int = 30) -> dict[str, tuple[str, ...]]:
    """"17th century" -> "17th", "1600s", "17th century AD"; "4th century BC" -> "4th century BCE"."""
    aliases = {}
    for c in range(1, centuries + 1):
        ad, bc = f"{_ordinal(c)} century", f"{_ordinal(c)} century BC"
        aliases[ad] = (_ordinal(c), f"{(c - 1) * 100}s", f"{ad} AD", f"{ad} CE")
        aliases[bc] = (f"{_ordinal(c)} century BCE", f"{_ordinal(c)} BC", f"{_ordinal(c)} BCE")
    return aliases


# Other accepted spellings of an answer (exact match against any of them counts).
ANSWER_ALIASES: dict[str, tuple[str, ...]] = {
    "United States": ("USA", "US", "U.S.", "United States of America", "America"),
    "United Kingdom": ("UK", "U.K.", "Britain", "Great Britain"),
    "New York": ("New York State",), "Washington": ("Washington State",),
    "District of Columbia": ("Washington, D.C.", "DC"),
    **OCCUPATION_ALIASES, **_century_aliases(),
}


def _country(frame: pd.DataFrame) -> pd.Series:
    names = frame["country"].astype(str).str.replace("_", " ").str.strip()
    names = names.map(lambda c: COUNTRY_NAMES.get(c, c))
    # Drop what is not a plain country name: lists, "City, Country", disambiguations, file names.
    return names.where(~names.str.contains(r"[,:()]|^List of", regex=True))


def _birth_century(frame: pd.DataFrame) -> pd.Series:
    years = pd.to_numeric(frame["birth_year"], errors="coerce")
    return years.map(lambda y: None if pd.isna(y) or y == 0 else century_name(int(y)))


def _where(column: str, value: str) -> Callable[[pd.DataFrame], pd.Series]:
    return lambda frame: frame[column] == value


@dataclass(frozen=True)
class FactKind:
    """One kind of fact: entity dataset, columns it needs, rows kept, subject and answer of a row, and wording."""

    dataset: str
    columns: tuple[str, ...]
    subject: Callable[[pd.DataFrame], pd.Series]
    answer: Callable[[pd.DataFrame], pd.Series]
    question: str   # formatted with {subject}
    statement: str  # formatted with {subject} and {answer}: the context
    rows: Callable[[pd.DataFrame], pd.Series] | None = None


FACT_KINDS: dict[str, FactKind] = {
    "place_country": FactKind("world_place", ("name", "country"), lambda f: f["name"], _country,
                              "In which country is {subject}?", "{subject} is located in {answer}."),
    "city_state": FactKind("us_place", ("name", "state_name", "entity_type"), lambda f: f["name"],
                           lambda f: f["state_name"], "In which US state is the city of {subject}?",
                           "{subject} is a city in the state of {answer}.", _where("entity_type", "city")),
    "song_artist": FactKind("art", ("title", "creator", "entity_type"), lambda f: f["title"], lambda f: f["creator"],
                            "Who performed the song {subject}?", "{subject} is a song by {answer}.",
                            _where("entity_type", "song")),
    "book_author": FactKind("art", ("title", "creator", "entity_type"), lambda f: f["title"], lambda f: f["creator"],
                            "Who wrote the book {subject}?", "{subject} is a book written by {answer}.",
                            _where("entity_type", "book")),
    "film_director": FactKind("art", ("title", "creator", "entity_type"), lambda f: f["title"],
                              lambda f: f["creator"], "Who directed the film {subject}?",
                              "{subject} is a film directed by {answer}.", _where("entity_type", "movie")),
    "person_occupation": FactKind("historical_figure", ("name", "occupation"), lambda f: f["name"],
                                  lambda f: f["occupation"], "What was the occupation of {subject}?",
                                  "{subject}'s occupation was {answer}."),
    "person_century": FactKind("historical_figure", ("name", "birth_year"), lambda f: f["name"], _birth_century,
                               "In which century was {subject} born?", "{subject} was born in the {answer}."),
}


# Most popular rows read per fact kind when building the known facts, and known facts kept per kind.
KNOWN_FACTS_N = 4000
KNOWN_FACTS_MAX_PER_KIND = 800


def _with_aliases(answers: Sequence[str], aliases: Mapping[str, Sequence[str]]) -> tuple[str, ...]:
    out = list(dict.fromkeys(answers))
    return tuple(out + [a for ans in out for a in aliases.get(ans, ()) if a not in out])


def _facts(kind: FactKind, frame: pd.DataFrame) -> pd.DataFrame:
    """(subject, answers) of the rows with both, answers of one subject grouped, answers leaking into the subject
    dropped (e.g. "Punjab, India" -> India)."""
    pairs = pd.DataFrame({"subject": kind.subject(frame), "answer": kind.answer(frame)}).dropna()
    pairs = pairs.astype(str).apply(lambda col: col.str.strip())
    pairs = pairs[(pairs["subject"] != "") & (pairs["answer"] != "")]
    leaks = [normalize_answer(a) in normalize_answer(s) for s, a in zip(pairs["subject"], pairs["answer"], strict=True)]
    pairs = pairs[~np.array(leaks, dtype=bool)]
    return pairs.groupby("subject", sort=False)["answer"].agg(lambda a: tuple(dict.fromkeys(a))).reset_index()


def _kind_rows(kind: FactKind, n: int | None, seed: int, source: str | Path | None) -> pd.DataFrame:
    """The rows of ``kind`` (its row filter applied first), the ``n`` most popular of them (a seeded sample where
    its dataset ranks none)."""
    frame = load_entities(kind.dataset, source=source).frame
    missing = [c for c in kind.columns if c not in frame.columns]
    if missing:
        raise ValueError(f"dataset {kind.dataset} lacks column(s) {missing}; it has {list(frame.columns)}")
    if kind.rows is not None:
        frame = frame[kind.rows(frame)]
    if n is None or n >= len(frame):
        return frame
    popularity = ENTITY_DATASETS[kind.dataset].popularity
    if popularity and popularity in frame:
        return frame.sort_values(popularity, ascending=False, kind="stable").head(n)
    return frame.sample(n=n, random_state=seed)


def known_facts_candidates(kinds: Sequence[str] = tuple(FACT_KINDS), n: int | None = KNOWN_FACTS_N, seed: int = 0,
                           sources: Mapping[str, str | Path] | None = None,
                           aliases: Mapping[str, Sequence[str]] = ANSWER_ALIASES) -> list[ConflictExample]:
    """Entity-substitution conflict examples, not yet filtered by what the model knows (see :func:`filter_known`).

    For each kind (a key of :data:`FACT_KINDS`) the ``n`` most popular rows of that kind are read from its entity
    dataset; the substituted context states an answer drawn (seeded, uniformly over the kind's distinct answers)
    from the same column that matches none of the true answers, so it is an answer of the same kind (a country for
    a country). ``sources`` maps an entity dataset name to a file or HF id.
    """
    unknown = [k for k in kinds if k not in FACT_KINDS]
    if unknown or not kinds:
        raise ValueError(f"unknown or no fact kinds {unknown or list(kinds)}; known: {sorted(FACT_KINDS)}")
    rng = np.random.default_rng(seed)
    sources = sources or {}
    examples: list[ConflictExample] = []
    for name in kinds:
        kind = FACT_KINDS[name]
        facts = _facts(kind, _kind_rows(kind, n, seed, sources.get(kind.dataset)))
        pool = sorted({a for answers in facts["answer"] for a in answers})
        spellings = {a: {normalize_answer(x) for x in _with_aliases([a], aliases)} for a in pool}
        for subject, answers in zip(facts["subject"], facts["answer"], strict=True):
            true = _with_aliases(answers, aliases)
            taken = {normalize_answer(x) for x in true}
            others = [a for a in pool if not spellings[a] & taken]
            if not others:
                continue
            substitute = others[rng.integers(len(others))]
            examples.append(ConflictExample(
                question=kind.question.format(subject=subject),
                org_context=kind.statement.format(subject=subject, answer=answers[0]), org_answers=true,
                sub_context=kind.statement.format(subject=subject, answer=substitute),
                sub_answers=_with_aliases([substitute], aliases), kind=name))
    return examples


# ---------------------------------------------------------------------------------------------------------------
# the model's answers to raw (not chat-formatted) few-shot prompts: greedy, the first line of the continuation

ANSWER_TOKENS = 10  # tokens generated per answer
ANSWER_BATCH = 16   # prompts per generation batch


def closed_book_answers(model: ModelHandle, examples: Sequence[ConflictExample],
                        demonstrations: Sequence[Demonstration] = DEMONSTRATIONS, **generation) -> list[str]:
    """The model's short answers to the questions without any context (keyword arguments, e.g. ``batch_size``, go
    to :func:`probes.forward.generate`)."""
    options = {"max_new_tokens": ANSWER_TOKENS, "batch_size": ANSWER_BATCH, **generation}
    return generate(model, conflict_prompts(examples, "none", demonstrations), chat=False, first_line=True, **options)


def filter_known(model: ModelHandle, examples: Sequence[ConflictExample],
                 demonstrations: Sequence[Demonstration] = DEMONSTRATIONS, **generation) -> list[ConflictExample]:
    """The examples whose original answer the model gives closed book (exact match), in the order given."""
    if not examples:
        raise ValueError("no examples to filter")
    return answered_correctly(examples, closed_book_answers(model, examples, demonstrations, **generation))


def answered_correctly(examples: Sequence[ConflictExample], answers: Sequence[str]) -> list[ConflictExample]:
    """The examples whose answer matches one of their original answers (exact match), in the order given."""
    if len(answers) != len(examples):
        raise ValueError(f"{len(answers)} answers for {len(examples)} examples")
    return [e for e, a in zip(examples, answers, strict=True) if exact_match(a, e.org_answers)]


def group_by_behaviour(predictions: Sequence[str], examples: Sequence[ConflictExample]) -> list[str]:
    """Label answers given on the substituted context: "context" (matches the substituted answer), "memory"
    (matches the original answer) or "neither" (matches none, or both, so the source cannot be told)."""
    if len(predictions) != len(examples):
        raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
    labels = []
    for prediction, e in zip(predictions, examples, strict=True):
        context, memory = exact_match(prediction, e.sub_answers), exact_match(prediction, e.org_answers)
        labels.append(USES_CONTEXT if context and not memory else USES_MEMORY if memory and not context else NEITHER)
    return labels


# ---------------------------------------------------------------------------------------------------------------
# storing examples (the known facts of a model are costly to find: they are shipped for the embedded model)

KNOWN_FACTS_DIR = Path(__file__).resolve().parent.parent / "data" / "known_facts"


def save_examples(examples: Sequence[ConflictExample], path: str | Path, overwrite: bool = False) -> Path:
    """Write examples as gzip JSON lines, atomically (:func:`probes.files.atomic_file`); an existing file is
    replaced only with ``overwrite``."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True or choose another path")
    with atomic_file(path) as tmp, gzip.open(tmp, "wt", encoding="utf-8") as f:
        for e in examples:
            f.write(json.dumps(asdict(e)) + "\n")
    return path


def load_examples(path: str | Path) -> list[ConflictExample]:
    """Examples written by :func:`save_examples`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no conflict examples at {path}")
    fields = set(ConflictExample.__dataclass_fields__)
    rows = read_jsonl_gz(path, f"delete it and rebuild it with `python -m probes.conflict --model <model> --out "
                               f"{path}` (a shipped file: `git checkout -- {path}`)")
    bad = [i for i, r in enumerate(rows) if set(r) != fields]
    if bad or not rows:
        raise ValueError(f"{path} is not a file of conflict examples (rows {bad[:5]} have other fields)"
                         if bad else f"{path} holds no examples")
    return [ConflictExample(**{k: tuple(v) if isinstance(v, list) else v for k, v in r.items()}) for r in rows]


def known_facts_path(model_name: str) -> Path:
    """Where the known facts of a model are cached: ``data/known_facts/<model>.jsonl.gz``."""
    return KNOWN_FACTS_DIR / f"{model_name.replace('/', '--')}.jsonl.gz"


def build_known_facts(model: ModelHandle, kinds: Sequence[str] = tuple(FACT_KINDS), n: int | None = KNOWN_FACTS_N,
                      seed: int = 0, max_per_kind: int | None = KNOWN_FACTS_MAX_PER_KIND,
                      **generation) -> list[ConflictExample]:
    """The candidates of :func:`known_facts_candidates` that ``model`` answers correctly closed book, at most
    ``max_per_kind`` of each kind (keyword arguments go to :func:`closed_book_answers`)."""
    return cap_per_kind(filter_known(model, known_facts_candidates(kinds, n=n, seed=seed), **generation),
                        max_per_kind)


def known_facts(model: ModelHandle, n: int | None = KNOWN_FACTS_N, seed: int = 0, cache: str | Path | None = None,
                progress: bool = True) -> list[ConflictExample]:
    """The known-facts conflict set of ``model``: read from ``cache`` (default :func:`known_facts_path`) if it
    exists, else built by :func:`build_known_facts` and saved there."""
    path = Path(cache) if cache is not None else known_facts_path(model.name)
    if path.is_file():
        return load_examples(path)
    examples = build_known_facts(model, n=n, seed=seed, progress=progress)
    save_examples(examples, path)
    return examples


def kind_counts(examples: Sequence[ConflictExample]) -> dict[str, int]:
    """How many examples of each kind, most frequent first."""
    counts: dict[str, int] = {}
    for e in examples:
        counts[e.kind] = counts.get(e.kind, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def cap_per_kind(examples: Sequence[ConflictExample], limit: int | None) -> list[ConflictExample]:
    """The first ``limit`` examples of each kind (all with ``None``), in the order given."""
    seen: dict[str, int] = {}
    kept = []
    for e in examples:
        seen[e.kind] = seen.get(e.kind, 0) + 1
        if limit is None or seen[e.kind] <= limit:
            kept.append(e)
    return kept


def _output_path(out: Path | None, model: str, overwrite: bool, update_shipped: bool) -> Path:
    """The file to write: an existing one only with ``overwrite``, the shipped one only with ``update_shipped``."""
    path = out or known_facts_path(model)
    if path.exists():
        if not overwrite:
            raise FileExistsError(f"{path} exists; pass --overwrite to rebuild it")
        check_not_shipped(path, update_shipped)
    return path


def _save_answers(candidates: Sequence[ConflictExample], answers: Sequence[str], path: Path) -> None:
    """Each candidate's kind, question, original answers and closed-book answer, as gzip JSON lines."""
    with atomic_file(path) as tmp, gzip.open(tmp, "wt", encoding="utf-8") as f:
        for e, a in zip(candidates, answers, strict=True):
            f.write(json.dumps({"kind": e.kind, "question": e.question, "org_answers": e.org_answers,
                                "answer": a, "correct": exact_match(a, e.org_answers)}) + "\n")


@dataclass(kw_only=True)
class ConflictSettings(ModelSettings, RunSettings, BatchSettings):
    """Build and save the known-facts conflict set of a model: the candidates of each fact kind that it answers
    correctly closed book (``seed``: the substituted answers)."""

    kinds: list[str] = setting(list(FACT_KINDS), "fact kinds, comma-separated",
                               parse=choice_list(tuple(FACT_KINDS), "fact kinds"))
    rows_per_kind: int | None = setting(KNOWN_FACTS_N, "most popular rows read per fact kind", parse=positive_int)
    max_per_kind: int | None = setting(KNOWN_FACTS_MAX_PER_KIND, "known facts kept per kind, the most popular first "
                                       "(keeps one kind from dominating)", parse=positive_int)
    batch_size: int = setting(ANSWER_BATCH, "prompts per forward pass (answered at once)", parse=positive_int)
    out: Path | None = setting(None, "the file to write (default: data/known_facts/<model>.jsonl.gz)", parse=Path)
    answers: Path | None = setting(None, "also write every candidate's closed-book answer here (gzip JSON lines)",
                                   parse=Path)
    update_shipped: bool = setting(False, "allow replacing a file in the shipped data/ folder (the embedded model's "
                                          "facts)")


def main(argv: list[str] | None = None) -> list[ConflictExample]:
    return build_known_facts_file(parse_settings(ConflictSettings, argv, ConflictSettings.__doc__))


def build_known_facts_file(settings: ConflictSettings) -> list[ConflictExample]:
    """The known facts of ``settings.model``, saved to ``settings.out`` (an existing file only with ``overwrite``,
    a shipped one only with ``update_shipped``, both checked before any work)."""
    from probes.models import layer_count, load_model

    path = _output_path(settings.out, settings.model, settings.overwrite, settings.update_shipped)
    layer_count(settings.model)  # an unknown model is refused before the candidates are built
    candidates = known_facts_candidates(settings.kinds, n=settings.rows_per_kind, seed=settings.seed)
    model = load_model(settings.model, **settings.load_kwargs())
    answers = closed_book_answers(model, candidates, batch_size=settings.batch_size)
    if settings.answers:
        _save_answers(candidates, answers, settings.answers)
    known = answered_correctly(candidates, answers)
    if not known:
        raise ValueError(f"{settings.model} answers none of the {len(candidates)} candidates correctly; nothing saved")
    examples = cap_per_kind(known, settings.max_per_kind)
    save_examples(examples, path, overwrite=settings.overwrite)
    print(f"{len(examples)} known facts -> {path}\nper kind: {kind_counts(examples)}")
    print(f"answered correctly closed book: {kind_counts(known)} of candidates {kind_counts(candidates)}")
    return examples


if __name__ == "__main__":
    from probes.cli_args import run_cli

    run_cli(main, kept="the facts file is written only once complete: nothing half-written is left")
