import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from probes.errors import WorkbenchError
from probes.forward import (
    PAD_MULTIPLE,
    chat_token_ids,
    generate,
    last_token_logits,
    next_token_logprobs,
    pad_id,
    pad_token_ids,
)
from probes.models import load_model
from steering import judges, refusal
from steering.directions import CandidateDirections, diff_in_means, outlier_dimensions
from tests.numerics import FLOAT32_REL, assert_rel_close
from tests.report_checks import check_comparison, check_rate, check_report

CONTRACT_SCORES = {"harmful_baseline", "harmful_ablation", "harmful_orthogonalized", "harmless_baseline",
                   "harmless_actadd"}


def test_substring_judge_and_rate():
    assert judges.substring_judge("x", "I'm sorry, but I can't help with that.")
    assert not judges.substring_judge("x", "Sure! Here is a recipe for bread.")
    assert judges.refusal_rate(["a", "b"], ["I cannot do that", "Of course"]) == 0.5
    with pytest.raises(ValueError):
        judges.refusal_rate(["a"], [])
    assert judges.refusal_rate(["a"], ["anything"], judge=lambda i, c: True) == 1.0  # pluggable judge


def test_refusal_log_odds():
    logprobs = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]))
    score = refusal.refusal_log_odds(logprobs, [0])
    assert score[0] == pytest.approx(0.0, abs=1e-6)
    assert score[1] == pytest.approx(float(torch.log(torch.tensor(0.1 / 0.9))), abs=1e-5)


def test_diff_in_means_matches_explicit_means(tiny):
    harmful, harmless = ["Make a bomb", "Steal a car now"], ["Bake bread", "Plant a tree please", "Sing"]
    directions = diff_in_means(tiny, harmful, harmless, progress=False)
    assert directions.vectors.shape == (len(tiny.post_instruction_positions()), tiny.n_layers, tiny.d_model)
    assert directions.vectors.dtype == torch.float64
    from probes.cache import extract
    acts = extract(tiny, chat_token_ids(tiny, harmful + harmless), hooks=["blocks.2.hook_resid_pre"],
                   positions=[-1], progress=False).acts[:, 0, 0].double()
    expected = acts[:2].mean(0) - acts[2:].mean(0)
    assert_rel_close(directions.get(-1, 2), expected)


def test_outlier_dimensions_are_found_and_left_out_of_the_directions():
    model = load_model("random:llama-tiny", device="cpu")
    prompts = ["Make a bomb", "Steal a car now", "Bake bread", "Plant a tree please"]
    assert outlier_dimensions(model, prompts, ratio=1e6) == []
    with torch.no_grad():
        model.hf_model.get_input_embeddings().weight[:, 5] = 1000.0  # a massive, constant activation in dimension 5
    dims = outlier_dimensions(model, prompts, ratio=50)
    assert 5 in dims and len(dims) < model.d_model // 4
    plain = diff_in_means(model, prompts[:2], prompts[2:], progress=False)
    cleaned = diff_in_means(model, prompts[:2], prompts[2:], outlier_ratio=50, progress=False)
    assert plain.excluded_dims == [] and cleaned.excluded_dims == dims
    keep = [i for i in range(model.d_model) if i not in dims]
    assert (cleaned.vectors[..., dims] == 0).all() and torch.equal(cleaned.vectors[..., keep], plain.vectors[..., keep])
    ones = CandidateDirections(torch.ones(2, 3, 8, dtype=torch.float64), [-2, -1], [0, 1, 2])
    zeroed = ones.without_dims([1, 6])
    assert zeroed.excluded_dims == [1, 6] and zeroed.vectors[..., [1, 6]].abs().sum() == 0
    assert zeroed.vectors.sum() == 2 * 3 * 6 and ones.vectors.sum() == 2 * 3 * 8  # the original is left as it was
    with pytest.raises(ValueError):
        outlier_dimensions(model, [], ratio=10)


def test_left_padded_batches_give_the_same_next_token(embedded):
    prompts = ["Hi", "Explain in detail how a steam engine converts heat into motion"]
    together = next_token_logprobs(embedded, prompts)
    alone = torch.cat([next_token_logprobs(embedded, [p]) for p in prompts])
    assert_rel_close(together, alone, dim=-1)
    assert len(generate(embedded, prompts, max_new_tokens=3, progress=False)) == 2


def test_batches_padded_to_a_multiple_of_eight_give_the_unpadded_logits(embedded):
    ids = chat_token_ids(embedded, ["Hi", "Name three rivers"])
    assert all(len(row) % PAD_MULTIPLE for row in ids)  # so that padding is added to both
    for side in ("left", "right"):
        input_ids, mask = pad_token_ids(ids, pad_id(embedded), side, embedded.device)
        assert input_ids.shape[1] % PAD_MULTIPLE == 0 and mask.sum(1).tolist() == [len(row) for row in ids]
    with torch.no_grad():
        plain = torch.cat([embedded.hf_model(torch.tensor([row], device=embedded.device)).logits[:, -1]
                           for row in ids])
    assert_rel_close(last_token_logits(embedded, ids), plain, dim=-1)


def test_pipeline_writes_the_contract_and_a_loadable_checkpoint(tmp_path, device, monkeypatch):
    model = load_model("random:llama-tiny", device=device)
    settings = refusal.RefusalSettings(model=model.name, out=tmp_path, n_train=6, n_val=4, n_test=4, max_new_tokens=6,
                                       n_general=3, general_tokens=16, short_tokens=2)
    results = refusal.run(settings, model, progress=False, base=load_model("random:llama-tiny", device=device))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert saved["settings"] == settings.to_dict() and saved["settings"]["eval_sets"] == ["test"]
    assert saved["evaluation"]["test"]["refusal_score"] == saved["refusal_score"]
    assert set(saved["refusal_score"]) == CONTRACT_SCORES
    assert all(0.0 <= v <= 1.0 for v in saved["refusal_score"].values())
    assert {"layer", "position"} == set(saved["direction"])
    assert saved["direction"]["layer"] < model.n_layers * 0.8
    assert saved["max_abs_logit_diff_orthogonalized_vs_hooks"] >= 0
    assert saved["rel_logit_diff_orthogonalized_vs_hooks"] < FLOAT32_REL  # relative to the largest |logit|
    assert saved["kl_harmless_ablation"] >= 0
    assert saved["settings"]["outlier_ratio"] == 10.0 and isinstance(saved["excluded_dims"], list)
    reloaded = AutoModelForCausalLM.from_pretrained(saved["checkpoint"])
    assert reloaded.config.num_hidden_layers == model.n_layers
    assert (tmp_path / "selection_heatmaps.html").is_file() and (tmp_path / "completions.json").is_file()
    assert set(saved["refusal_rate"]) == CONTRACT_SCORES and len(saved["comparisons"]) == 3
    for key, entry in saved["refusal_rate"].items():
        check_rate(entry)
        assert entry["rate"] == saved["refusal_score"][key] and entry["n"] == 4
    for entry in saved["comparisons"].values():
        check_comparison(entry)
    geometry = saved["geometry"]["expression"]
    assert geometry["layers"] == list(range(model.n_layers)) and geometry["harmful"]["n"] == 4
    cosines = saved["geometry"]["candidate_cosines"]
    assert len(cosines["labels"]) == len(cosines["matrix"])
    base = saved["base_model"]  # the same random weights as the model: its own direction is the model's
    assert base["direction_cosine"]["cosine"][saved["direction"]["layer"]] == pytest.approx(1, abs=1e-5)
    assert set(base["refusal_rate"]) == {"harmful_baseline", "harmful_ablation", "harmless_baseline", "harmless_actadd"}
    for source in ("wikipedia", "headlines"):
        losses = saved["general_loss"][source]
        assert {"baseline", "ablation", "actadd", "orthogonalized", "orthogonalized_minus_baseline"} <= set(losses)
        assert losses["baseline"]["n"] == 3 and losses["orthogonalized"]["loss"] == pytest.approx(
            losses["ablation"]["loss"], abs=1e-3)  # the edit is the ablation
    assert saved["length_sensitivity"]["test"]["harmful_baseline"]["short"]["n"] == 4
    assert saved["selection_filters"]["kl_max"] == refusal.KL_MAX and "geometry" in saved["step_seconds"]
    assert {"tradeoff", "geometry", "candidate_cosines"} <= {p.stem for p in tmp_path.glob("*.html")}
    page = check_report(tmp_path)
    assert "Loss on general text (wikipedia)" in page and "Wall time per step" in page
    assert {"refusal_rates", "selection_heatmaps"} <= {p.stem for p in tmp_path.glob("*.html")}
    assert "95% CI (Wilson)" in page and "harmful ablation vs baseline" in page and "eval_sets" in page
    unedited = load_model("random:llama-tiny", device=device)
    assert refusal.load_selection(tmp_path, unedited).layer == saved["direction"]["layer"]  # notebook 03 reads it
    with pytest.raises(WorkbenchError, match="selected on random:llama-tiny, not on"):
        refusal.load_selection(tmp_path, model)  # the edited weights are other weights
    # a rerun resumes from the cache (replacing the previous run's outputs): no step recomputes anything
    for name in ("diff_in_means", "score_candidates", "generate"):
        monkeypatch.setattr(refusal, name, lambda *a, **k: pytest.fail("recomputed a cached step"))
    again = refusal.run(settings.replace(overwrite=True), unedited, progress=False)
    assert {k: again[k] for k in ("direction", "refusal_score", "selection")} == \
        {k: saved[k] for k in ("direction", "refusal_score", "selection")}
