import pandas as pd
import pytest

from probes.conflict import (DEMONSTRATIONS, FACT_KINDS, NEITHER, USES_CONTEXT, USES_MEMORY, ConflictExample,
                             closed_book_answers, conflict_prompt, conflict_prompts, exact_match, filter_known,
                             generate_answers, group_by_behaviour, known_facts_candidates, normalize_answer,
                             nqswap_examples)
from probes.datasets import load_nqswap


def example(question="In which country is Oslo?", org="Norway", sub="Chile"):
    return ConflictExample(question=question, org_context=f"Oslo is located in {org}.", org_answers=(org,),
                           sub_context=f"Oslo is located in {sub}.", sub_answers=(sub,), kind="test")


def test_normalisation_and_exact_match():
    assert normalize_answer("  The Beatles! ") == "beatles"
    assert normalize_answer("An apple,  a day") == "apple day"
    assert normalize_answer("U.S.A.") == "usa"
    assert normalize_answer("Theatre of the Absurd") == "theatre of absurd"  # articles only as whole words
    assert normalize_answer("“Señor” – Ñandú") == "señor ñandú"  # Unicode punctuation too
    assert exact_match("the United Kingdom.", ["UK", "United Kingdom"])
    assert exact_match("uk", "UK")
    assert not exact_match("United", "United Kingdom")
    assert not exact_match("", "United Kingdom")
    with pytest.raises(ValueError, match="at least one answer"):
        exact_match("x", [])


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
    for e, row in zip(examples, frame.itertuples()):
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


def test_group_by_behaviour():
    examples = [example(), example(), example(), example(org="Norway", sub="Norway")]
    labels = group_by_behaviour(["Chile.", "the norway", "Sweden", "Norway"], examples)
    assert labels == [USES_CONTEXT, USES_MEMORY, NEITHER, NEITHER]  # last: both match, source unknown
    with pytest.raises(ValueError, match="2 predictions for 4"):
        group_by_behaviour(["a", "b"], examples)


def test_generation_is_batch_independent_and_one_line(tiny):
    prompts = conflict_prompts([example(), example(question="Where is Lima?")], "sub") + ["question: x\nanswer:"]
    batched = generate_answers(tiny, prompts, max_new_tokens=6, batch_size=3, progress=False)
    alone = [generate_answers(tiny, [p], max_new_tokens=6, progress=False)[0] for p in prompts]
    assert batched == alone
    assert all("\n" not in a for a in batched)
    with pytest.raises(ValueError, match="no prompts"):
        generate_answers(tiny, [])


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
