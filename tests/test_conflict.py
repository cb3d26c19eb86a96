import pandas as pd
import pytest

from probes.conflict import (
    DEMONSTRATIONS,
    FACT_KINDS,
    KNOWN_FACTS_DIR,
    KNOWN_FACTS_N,
    NEITHER,
    USES_CONTEXT,
    USES_MEMORY,
    ConflictExample,
    _facts,
    _kind_rows,
    _output_path,
    answered_correctly,
    cap_per_kind,
    century_name,
    closed_book_answers,
    conflict_prompt,
    conflict_prompts,
    filter_known,
    group_by_behaviour,
    kind_counts,
    known_facts_candidates,
    load_examples,
    nqswap_examples,
)
from probes.datasets import load_nqswap
from probes.metrics import exact_match, normalize_answer


def example(question="In which country is Oslo?", org="Norway", sub="Chile"):
    return ConflictExample(question=question, org_context=f"Oslo is located in {org}.", org_answers=(org,),
                           sub_context=f"Oslo is located in {sub}.", sub_answers=(sub,), kind="test")


def test_prompt_format():
    prompt = conflict_prompt("Oslo is located in Chile.", "In which country is Oslo?")
    for d in DEMONSTRATIONS:
        assert f"context: {d.context}\nquestion: {d.question}\nanswer: {d.answer}\n\n" in prompt
    assert prompt.endswith("\n\ncontext: Oslo is located in Chile.\nquestion: In which country is Oslo?\nanswer:")
    closed = conflict_prompt(None, "In which country is Oslo?")
    assert "context:" not in closed and closed.endswith("question: In which country is Oslo?\nanswer:")
    assert all(f"question: {d.question}\nanswer: {d.answer}" in closed for d in DEMONSTRATIONS)
    org, sub, none = (conflict_prompts([example()], which)[0] for which in ("org", "sub", "none"))
    assert "in Norway." in org and "in Chile." in sub and none == closed
    with pytest.raises(ValueError, match="context must be"):
        conflict_prompts([example()], "both")


def test_nqswap_examples_on_shipped_data():
    frame = load_nqswap(n=5, seed=1)
    examples = nqswap_examples(frame)
    assert len(examples) == 5 and {e.kind for e in examples} == {"nqswap"}
    for e, row in zip(examples, frame.itertuples(), strict=True):
        assert e.question == row.question and e.org_context != e.sub_context
        assert e.org_answers and e.sub_answers and all(isinstance(a, str) for a in e.org_answers + e.sub_answers)
        assert normalize_answer(e.sub_answers[0]) in normalize_answer(e.sub_context)
    with pytest.raises(ValueError, match="sub_answer"):
        nqswap_examples(frame.drop(columns="sub_answer"))
    with pytest.raises(ValueError, match="no rows"):
        nqswap_examples(frame.iloc[:0])


def test_known_facts_candidates_substitute_other_answers(tmp_path):
    examples = known_facts_candidates(n=80, seed=0)
    assert {e.kind for e in examples} == set(FACT_KINDS)
    for e in examples:
        assert not any(exact_match(s, e.org_answers) for s in e.sub_answers)
        assert e.sub_answers[0] in e.sub_context and e.org_answers[0] in e.org_context
        assert e.org_context != e.sub_context
    london = next(e for e in examples if e.question == "In which country is London?")
    assert exact_match("UK", london.org_answers)  # aliases are accepted answers
    again, other_seed = known_facts_candidates(n=80, seed=0), known_facts_candidates(n=80, seed=1)
    assert again == examples and [e.sub_answers for e in other_seed] != [e.sub_answers for e in examples]
    with pytest.raises(ValueError, match="unknown"):
        known_facts_candidates(kinds=["nope"])
    pd.DataFrame({"name": ["Oslo"], "latitude": [59.9], "longitude": [10.7]}).to_csv(tmp_path / "p.csv")
    with pytest.raises(ValueError, match="country"):
        known_facts_candidates(kinds=["place_country"], sources={"world_place": tmp_path / "p.csv"})


def small_sources(tmp_path) -> dict:
    """Tiny entity files with the columns the fact kinds read: three answers per kind, popularity ranked."""
    frames = {
        "world_place": pd.DataFrame({"name": ["Oslo", "Lima", "Quito"], "country": ["Norway", "Peru", "Ecuador"],
                                     "latitude": [59.9, -12.0, -0.2], "longitude": [10.7, -77.0, -78.5],
                                     "page_views": [3, 2, 1]}),
        "us_place": pd.DataFrame({"name": ["Austin", "Boise", "Salem", "Zip"], "state_id": ["TX", "ID", "OR", "TX"],
                                  "state_name": ["Texas", "Idaho", "Oregon", "Texas"],
                                  "entity_type": ["city", "city", "city", "zip"], "latitude": [30.3, 43.6, 44.9, 30],
                                  "longitude": [-97.7, -116.2, -123.0, -97], "population": [3, 2, 1, 9]}),
        "historical_figure": pd.DataFrame({"name": ["Kant", "Bach", "Nero"], "birth_year": [1724, 1685, 37],
                                           "death_year": [1804, 1750, 68], "popularity": [3, 2, 1],
                                           "occupation": ["philosopher", "composer", "politician"]}),
        "art": pd.DataFrame({"title": ["Emma", "Heat", "Help!", "Dune"], "creator": ["Austen", "Mann", "Beatles",
                                                                                     "Herbert"],
                             "release_date": ["1815", "1995", "1965", "1965"], "page_views": [4, 3, 2, 1],
                             "entity_type": ["book", "movie", "song", "book"]}),
    }
    for name, frame in frames.items():
        frame.to_csv(tmp_path / f"{name}.csv", index=False)
    return {name: tmp_path / f"{name}.csv" for name in frames}


def test_fact_kinds_substitute_an_answer_of_the_same_kind(tmp_path):
    examples = known_facts_candidates(n=None, sources=small_sources(tmp_path))
    counts = kind_counts(examples)
    assert counts == {"place_country": 3, "city_state": 3, "person_occupation": 3, "person_century": 3,
                      "book_author": 2}  # one song and one film: no other answer of their kind to substitute
    pools = {k: {a for e in examples if e.kind == k for a in e.org_answers} for k in counts}
    for e in examples:
        assert e.sub_answers[0] in pools[e.kind] and not exact_match(e.sub_answers[0], e.org_answers)
    kant = next(e for e in examples if e.question == "In which century was Kant born?")
    assert kant.org_context == "Kant was born in the 18th century." and exact_match("the 1700s", kant.org_answers)
    assert "Zip" not in {e.question.split()[-1] for e in examples}  # city_state reads cities only
    assert [e.question for e in examples if e.kind == "city_state"][0].endswith("Austin?")  # most popular first
    assert len(known_facts_candidates(["city_state"], n=2, sources=small_sources(tmp_path))) == 2


def test_known_facts_kept_by_the_closed_book_check_and_capped_per_kind(tmp_path):
    examples = known_facts_candidates(n=None, sources=small_sources(tmp_path))
    # A deterministic stand-in for the model: knows every second fact, says "Paris" to the others.
    answers = [e.org_answers[-1].upper() if i % 2 == 0 else "Paris" for i, e in enumerate(examples)]
    known = answered_correctly(examples, answers)
    assert known == examples[::2]
    capped = cap_per_kind(examples, 1)
    assert kind_counts(capped) == {k: 1 for k in kind_counts(examples)}
    assert capped == [next(e for e in examples if e.kind == k) for k in kind_counts(capped)]
    assert cap_per_kind(examples, None) == examples
    with pytest.raises(ValueError, match="2 answers for"):
        answered_correctly(examples, ["a", "b"])


def test_century_names():
    assert [century_name(y) for y in (1642, 1900, 1901, 2000, 112, 1, -1, -384, -1100)] == [
        "17th century", "19th century", "20th century", "20th century", "2nd century", "1st century",
        "1st century BC", "4th century BC", "11th century BC"]
    assert century_name(-2050) == "21st century BC" and century_name(1250) == "13th century"


def test_shipped_file_needs_explicit_flags(tmp_path):
    shipped = KNOWN_FACTS_DIR / "embedded.jsonl.gz"
    with pytest.raises(FileExistsError, match="--overwrite"):
        _output_path(None, "embedded", overwrite=False, update_shipped=False)
    with pytest.raises(PermissionError, match="--update-shipped"):
        _output_path(shipped, "embedded", overwrite=True, update_shipped=False)
    assert _output_path(None, "embedded", overwrite=True, update_shipped=True) == shipped
    assert _output_path(tmp_path / "new.jsonl.gz", "embedded", False, False) == tmp_path / "new.jsonl.gz"


def test_shipped_known_facts_at_scale():
    from steering.spare import split

    facts = load_examples(KNOWN_FACTS_DIR / "embedded.jsonl.gz")
    counts = kind_counts(facts)
    assert len(facts) >= 1500 and sum(n >= 100 for n in counts.values()) >= 4, counts
    assert len(split(facts)["test"]) >= 300
    assert len({e.question for e in facts}) == len(facts)
    for kind in counts:
        pool = {a for answers in _facts(FACT_KINDS[kind], _kind_rows(FACT_KINDS[kind], KNOWN_FACTS_N, 0, None))[
            "answer"] for a in answers}
        subs = [e for e in facts if e.kind == kind]
        assert all(e.sub_answers[0] in pool and not exact_match(e.sub_answers[0], e.org_answers) for e in subs), kind
        assert all(e.org_answers[0] in pool for e in subs), kind


def test_group_by_behaviour():
    examples = [example(), example(), example(), example(org="Norway", sub="Norway")]
    labels = group_by_behaviour(["Chile.", "the norway", "Sweden", "Norway"], examples)
    assert labels == [USES_CONTEXT, USES_MEMORY, NEITHER, NEITHER]  # last: both match, source unknown
    with pytest.raises(ValueError, match="2 predictions for 4"):
        group_by_behaviour(["a", "b"], examples)


def test_filter_known_keeps_what_the_model_answers(tiny):
    probe = [example(question="In which country is Oslo?"), example(question="In which country is Lima?")]
    said = closed_book_answers(tiny, probe, max_new_tokens=4, progress=False)
    # Whatever the random model says to the first question becomes its "known" answer; the second is never known.
    known = ConflictExample(probe[0].question, "c", (said[0],), "d", ("plugh",))
    unknown = ConflictExample(probe[1].question, "c", ("xyzzy",), "d", ("plugh",))
    assert filter_known(tiny, [known, unknown], max_new_tokens=4, progress=False) == [known]
    with pytest.raises(ValueError, match="no examples"):
        filter_known(tiny, [])


def test_filter_known_on_embedded(embedded):
    facts = [example("In which country is London?", "United Kingdom"), example("In which country is Tokyo?", "Japan"),
             example("In which country is Moscow?", "Russia"), example("In which country is Tokyo?", "Brazil")]
    assert filter_known(embedded, facts, max_new_tokens=5, progress=False) == facts[:3]
