"""The refusal pipeline's steps one at a time on the tiny model: each returns its data, a cached step reruns without
recomputing (and recomputes when a setting it depends on changes), and directions save and load themselves in one
schema."""

import json
from dataclasses import asdict, replace

import pytest
import torch

from probes.errors import WorkbenchError
from probes.models import load_model
from steering import refusal
from steering.directions import CandidateDirections, SelectedDirection
from steering.orthogonalize import orthogonalize, save_checkpoint


def fail(*args, **kwargs):
    pytest.fail("a cached step recomputed")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Small settings writing into a folder of their own, and their instructions."""
    settings = refusal.RefusalSettings(model="random:llama-tiny", out=tmp_path_factory.mktemp("run"), n_train=4,
                                       n_val=3, n_test=2, max_new_tokens=3, layer_step=2)
    return settings, refusal.instructions(settings)


@pytest.fixture(scope="module")
def steps(tiny, small):
    """Steps 1-3 once (before any edit: the session's tiny model is not changed), with their cache."""
    settings, prompts = small
    cache = refusal.StepCache.of(settings, tiny)
    candidates = refusal.candidate_directions(tiny, settings, prompts, cache, progress=False)
    scores, selected = refusal.selection(tiny, settings, prompts, candidates, cache, progress=False)
    texts = refusal.completions(tiny, settings, prompts, selected, refusal.BEFORE_EDIT, cache, progress=False)
    return cache, candidates, scores, selected, texts


def test_settings_defaults_and_checks():
    settings = refusal.RefusalSettings(out="x")
    assert (settings.n_train, settings.n_val, settings.n_test, settings.max_new_tokens, settings.layer_step,
            settings.batch_size, settings.outlier_ratio, settings.eval_sets) == \
        (128, 32, 64, 128, 1, 64, 10.0, ["test"])
    assert settings.model == "embedded-refuser" and settings.to_dict()["judge"] == "substring_judge"
    with pytest.raises(ValueError, match="above 1"):
        refusal.RefusalSettings(out="x", outlier_ratio=0.5)
    with pytest.raises(ValueError, match=r"unknown or no evaluation sets \['mars'\]"):
        refusal.RefusalSettings(out="x", eval_sets=["test", "mars"])


def test_instructions_by_group_and_evaluation_set():
    settings = refusal.RefusalSettings(out="x", n_train=3, n_val=2, n_test=5, eval_sets=["jailbreakbench", "test"])
    prompts = refusal.instructions(settings)
    assert set(prompts) == {"harmful_train", "harmless_train", "harmful_val", "harmless_val", "jailbreakbench",
                            "harmful_test", "harmless_test"}
    assert [len(prompts[g]) for g in ("harmful_train", "harmful_val", "jailbreakbench")] == [3, 2, 5]
    assert refusal._first_set(settings) == {"harmful": "jailbreakbench", "harmless": "harmless_test"}
    # the harmless test split is shared by both sets: generated once per condition
    assert refusal._jobs(settings, refusal.BEFORE_EDIT) == [
        ("jailbreakbench", "baseline"), ("jailbreakbench", "ablation"), ("harmless_test", "baseline"),
        ("harmless_test", "actadd"), ("harmful_test", "baseline"), ("harmful_test", "ablation")]


def test_each_step_returns_its_data_and_caches_it_in_its_folder(tiny, small, steps):
    settings, prompts = small
    cache, candidates, scores, selected, texts = steps
    root = settings.out / "cache"
    assert (root / "directions" / "candidates.safetensors").is_file() and (root / "selection" / "scores.json").is_file()
    assert sorted(p.stem for p in (root / "completions").glob("*.json")) == sorted(texts)
    assert candidates.layers == [0, 2] and candidates.n_positive == 4
    scored = [(position, layer) for position in candidates.positions for layer in [0, 2]
              if candidates.get(position, layer).norm() > 1e-6]  # the zero ones (template tokens at layer 0) skipped
    assert [(s.position, s.layer) for s in scores] == scored
    best = refusal.select(scores)
    assert (selected.layer, selected.position, selected.selection) == (best.layer, best.position, asdict(best))
    assert torch.equal(selected.vector, candidates.get(best.position, best.layer).float())
    assert set(texts) == {"harmful_test_baseline", "harmful_test_ablation", "harmless_test_baseline",
                          "harmless_test_actadd"} and all(len(t) == 2 for t in texts.values())
    judged = refusal.evaluation(settings, prompts, {**texts, "harmful_test_orthogonalized": ["I cannot."] * 2})
    assert judged["test"]["refusal_score"]["harmful_orthogonalized"] == 1.0
    assert set(judged["test"]["refusal_rate"]) == set(refusal.RATE_KEYS)


def test_a_cached_step_reruns_without_recomputing(tiny, small, steps, monkeypatch):
    settings, prompts = small
    cache, candidates, scores, selected, texts = steps
    for name in ("diff_in_means", "score_candidates", "generate"):
        monkeypatch.setattr(refusal, name, fail)
    again = refusal.candidate_directions(tiny, settings, prompts, cache, progress=False)
    assert torch.equal(again.vectors, candidates.vectors) and again.positions == candidates.positions
    scores_again, selected_again = refusal.selection(tiny, settings, prompts, again, cache, progress=False)
    assert scores_again == scores and selected_again.metadata() == selected.metadata()
    assert torch.equal(selected_again.vector, selected.vector)
    assert refusal.completions(tiny, settings, prompts, selected, refusal.BEFORE_EDIT, cache, progress=False) == texts
    # baseline completions do not depend on the direction; the others do
    other = replace(selected, layer=selected.layer + 1)
    assert refusal.completions(tiny, settings, prompts, other, ("baseline",), cache, progress=False) == {
        k: v for k, v in texts.items() if k.endswith("_baseline")}
    with pytest.raises(pytest.fail.Exception):
        refusal.completions(tiny, settings, prompts, other, ("ablation",), cache, progress=False)
    # a setting the directions depend on, or other weights, recompute
    with pytest.raises(pytest.fail.Exception):
        refusal.candidate_directions(tiny, settings.replace(n_train=5), prompts, cache, progress=False)
    with pytest.raises(pytest.fail.Exception):
        refusal.candidate_directions(tiny, settings, prompts, replace(cache, base={**cache.base, "weights": "x"}),
                                     progress=False)


def test_candidate_directions_save_and_load_themselves(tmp_path):
    candidates = CandidateDirections(torch.randn(2, 3, 8, dtype=torch.float64), [-2, -1], [0, 2, 4], 5, 6, [1, 7])
    candidates.save(tmp_path / "c.safetensors", {"n_train": 5})
    loaded, metadata = CandidateDirections.load(tmp_path / "c.safetensors")
    assert metadata == {"n_train": 5} and torch.equal(loaded.vectors, candidates.vectors)
    assert (loaded.positions, loaded.layers, loaded.n_positive, loaded.n_negative, loaded.excluded_dims) == \
        ([-2, -1], [0, 2, 4], 5, 6, [1, 7])


def test_one_direction_schema_for_a_selection_and_a_checkpoint(tmp_path, small, steps):
    settings, _ = small
    _, _, scores, selected, _ = steps
    folder = refusal.save_selection(tmp_path / "selection", selected, scores)
    loaded = SelectedDirection.load(folder)
    assert replace(loaded, vector=selected.vector) == selected and torch.equal(loaded.vector, selected.vector)
    assert json.loads((folder / "selection.json").read_text())[0].keys() == selected.selection.keys()
    model = load_model("random:llama-tiny", device="cpu")  # a copy to edit: the session's model stays as it is
    orthogonalize(model, selected.vector)
    checkpoint = save_checkpoint(model, tmp_path / "ckpt", selected.vector, selected.layer, selected.position)
    on_disk = json.loads((checkpoint / "direction.json").read_text())
    assert on_disk.keys() == json.loads((folder / "direction.json").read_text()).keys()
    assert on_disk["orthogonalization"]["exact"] and on_disk["layer"] == selected.layer
    assert abs(float(SelectedDirection.load(checkpoint).vector.norm()) - 1) < 1e-6  # unit norm beside a checkpoint


def test_a_saved_selection_is_refused_where_it_does_not_belong(tiny, tmp_path, steps):
    _, _, scores, selected, _ = steps
    with pytest.raises(WorkbenchError, match="run notebooks/02_refusal_direction.ipynb with OUT"):
        refusal.load_selection(tmp_path / "missing", tiny)
    with pytest.raises(FileExistsError):
        refusal.save_selection(refusal.save_selection(tmp_path, selected, scores), selected, scores)
    assert refusal.load_selection(tmp_path, tiny).vector.dtype == torch.float32
    refusal.save_selection(tmp_path, replace(selected, weights="other weights"), scores, overwrite=True)
    with pytest.raises(WorkbenchError, match="rerun notebook 02"):
        refusal.load_selection(tmp_path, tiny)
