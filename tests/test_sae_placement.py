"""SAEs act at their own hook point (``cfg.metadata.hook_name``): an SAE on ``blocks.1.hook_resid_post`` reads and
edits the residual stream leaving block 1, in evaluation and in SpARE, on a Llama and a Gemma 2 (post-norm) tiny
model; hook points the workbench cannot place are refused with a clear error."""

import copy
import re

import pytest
import torch
from sae_lens import StandardSAE

from probes.cache import extract
from probes.conflict import USES_CONTEXT, USES_MEMORY, ConflictExample, conflict_prompts
from probes.models import load_model
from steering import spare, spare_protocol
from steering.hooks import replace_residual
from steering.sae import SAESettings, reconstruct, reconstruction_ce, sae_hook_name, save_sae, train_sae
from steering.spare_plots import residual_index
from tests.helpers import greedy_ids, make_sae
from tests.numerics import assert_rel_close, rel_err

PRE, POST = "blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"
WORDS = ["Paris", "river", "seven", "music", "green", "winter", "doctor", "garden"]


def at(sae: StandardSAE, hook_name: str) -> StandardSAE:
    """A copy of ``sae`` recorded at another hook point."""
    moved = copy.deepcopy(sae)
    moved.cfg.metadata.hook_name = hook_name
    return moved


@pytest.fixture(scope="module", params=["random:llama-tiny", "random:gemma2"])
def model(request, device):
    return load_model(request.param, device=device)


def reference(model, ids: list[int]) -> dict[str, torch.Tensor]:
    """The bridge's own (unedited) residual stream at PRE and POST for one prompt: {hook: [seq, d]}."""
    with torch.no_grad():
        _, cache = model.bridge.run_with_cache(torch.tensor([ids], device=model.device),
                                               names_filter=lambda name: name in (PRE, POST))
    return {hook: cache[hook][0].float() for hook in (PRE, POST)}


def captured(model, ids: list[int], positions: list[int]) -> dict[str, torch.Tensor]:
    """The residual stream at PRE and POST as the (possibly edited) plain model computes it: {hook: [n_pos, d]}.
    Left-padded, as in generation: SpARE's edits land on the last column, which right padding fills with pads."""
    acts = extract(model, [ids], hooks=[PRE, POST], positions=positions, padding_side="left",
                   progress=False).acts[0]
    return {PRE: acts[:, 0], POST: acts[:, 1]}


def test_reconstruction_replaces_the_output_of_the_block(model):
    sae = make_sae(model.d_model, POST)
    ids = model.tokenizer("The capital of France is Paris, and the river is")["input_ids"]
    clean = reference(model, ids)
    with replace_residual(model, {sae_hook_name(sae, model): lambda h: reconstruct(sae, h)}):
        edited = captured(model, ids, list(range(-len(ids), 0)))
    assert_rel_close(edited[PRE], clean[PRE], dim=-1)  # the input of block 1 is untouched
    with torch.no_grad():
        assert_rel_close(edited[POST], reconstruct(sae, clean[POST]), dim=-1)  # its output is the reconstruction
    assert rel_err(edited[POST], clean[POST], dim=-1) > 0.1


def test_reconstruction_ce_splices_at_the_sae_hook(model):
    sae, ids = make_sae(model.d_model, POST), greedy_ids(model)
    keys = ("ce_clean", "ce_sae", "ce_zero_ablation")

    def scores(s):
        result = reconstruction_ce(model, s, ids)
        return torch.tensor([result[k] for k in keys])

    post = scores(sae)
    assert_rel_close(post, scores(at(sae, "blocks.2.hook_resid_pre")))  # the same point of the residual stream
    assert rel_err(post, scores(at(sae, PRE))) > 1e-3  # one block earlier is another point


def examples() -> tuple[list[ConflictExample], list[str]]:
    """Conflict examples, alternately labelled as answered from the context and from memory."""
    found = [ConflictExample(f"Where is the {w}?", f"The {w} is in Aland.", ("Aland",), f"The {w} is in Bland.",
                             ("Bland",)) for w in WORDS]
    return found, [USES_CONTEXT, USES_MEMORY] * (len(WORDS) // 2)


def test_spare_reads_and_edits_at_the_sae_hook(model):
    sae = make_sae(model.d_model, POST)
    found, labels = examples()
    hooks = spare.sae_hooks(model, {1: sae})
    context = torch.tensor([label == USES_CONTEXT for label in labels])
    acts = spare.residual_at(model, conflict_prompts(found, "sub"), [POST], progress=False)[:, 0]
    fitted = spare.fit_steering({1: sae}, hooks, {POST: acts}, context, proportion=0.25, mi_share=None)
    assert fitted.hooks == {1: POST}

    prompts = [model.tokenizer(p)["input_ids"] for p in conflict_prompts(found, "sub")]
    last = torch.stack([reference(model, ids)[POST][-1] for ids in prompts])  # [n, d] at the SAE's hook
    assert_rel_close(fitted.directions[1], last[context].mean(0) - last[~context].mean(0))
    with torch.no_grad():
        z = sae.encode(last)
    assert_rel_close(fitted.latents[1].mean_context, z[context].mean(0))
    assert_rel_close(fitted.latents[1].mean_memory, z[~context].mean(0))

    ids, clean = prompts[0], reference(model, prompts[0])
    for method in ("actadd", "spare"):
        edits = fitted.edits(method, "memory", 2.0)
        assert list(edits) == [POST]
        with spare.edit_last_token(model, edits):
            edited = captured(model, ids, [-2, -1])
        with torch.no_grad():
            expected = clean[POST][-1] + edits[POST](clean[POST][-1:])[0]
        assert_rel_close(edited[PRE], clean[PRE][-2:], dim=-1)
        assert_rel_close(edited[POST][0], clean[POST][-2])  # earlier positions untouched
        assert_rel_close(edited[POST][1], expected)
        assert rel_err(edited[POST][1], clean[POST][-1]) > 1e-2


def test_load_saes_places_each_sae_at_its_recorded_hook(tiny, tmp_path):
    trained = train_sae(torch.randn(256, tiny.d_model),
                        SAESettings(architecture="standard", d_sae=16, epochs=1, sae_batch_tokens=64), progress=False,
                        metadata={"hook_name": POST, "layer": 1})
    save_sae(trained, tmp_path / "layer_1")
    save_sae(make_sae(tiny.d_model, "blocks.2.hook_resid_pre"), tmp_path / "layer_2")
    saes = spare.load_saes(tiny, None, tmp_path)
    assert spare.sae_hooks(tiny, saes) == {1: POST, 2: "blocks.2.hook_resid_pre"}
    assert [residual_index(h) for h in (PRE, POST)] == [1, 2]  # on the probe curve, POST is after block 1

    save_sae(make_sae(tiny.d_model, "blocks.1.hook_mlp_out"), tmp_path / "layer_1", overwrite=True)
    with pytest.raises(ValueError, match="SAE for layer 1: .*hook_mlp_out"):
        spare.load_saes(tiny, None, tmp_path)


@pytest.mark.parametrize("hook", ["blocks.1.hook_mlp_out", "blocks.1.attn.hook_z", "blocks.4.hook_resid_post"])
def test_hooks_the_workbench_cannot_place_are_refused(tiny, hook, tmp_path):
    sae = make_sae(tiny.d_model, hook)
    assert sae_hook_name(sae) == hook  # without a model: as recorded
    with pytest.raises(ValueError, match=f"StandardSAE.*{re.escape(hook)}"):
        sae_hook_name(sae, tiny)
    with pytest.raises(ValueError, match=re.escape(hook)):
        reconstruction_ce(tiny, sae, [[1, 2, 3]])
    with pytest.raises(ValueError, match=re.escape(hook)):
        spare_protocol.run(tiny, examples()[0] * 3, {1: sae}, spare.SpareSettings(out=tmp_path), progress=False)


def test_an_sae_without_hook_point_or_two_at_one_point_are_refused(tiny):
    with pytest.raises(ValueError, match="StandardSAE .*records no hook point.*hook_name"):
        sae_hook_name(make_sae(tiny.d_model, None))
    with pytest.raises(ValueError, match="same hook point"):
        spare.sae_hooks(tiny, {1: make_sae(tiny.d_model, POST), 2: make_sae(tiny.d_model, POST, seed=1)})
