"""Latent dashboards: top contexts, histogram and firing rate against a brute-force pass over the corpus; the cache
hit on a second build and missed for other SAE weights; the held-out default corpus; the SpARE report's links; a
latent index out of range refused in one line."""

import numpy as np
import pytest
import torch

from probes.conflict import nqswap_examples
from probes.datasets import load_nqswap
from probes.errors import WorkbenchError
from probes.report import table_html
from steering import latent_dashboard, sae_corpus, spare_plots
from steering.latent_dashboard import LatentDashboards, default_corpus, write_selected
from steering.sae_corpus import CorpusSettings, corpus_sources, heldout_sources
from tests.helpers import make_sae

TEXTS = ["The cat sat on the mat and looked out of the window at the rain.", "Paris is the capital of France.",
         "In 1969 astronauts walked on the Moon for the first time.", "Rivers flow to the sea.", "A short one",
         "Bananas are yellow when ripe and green before, and sweet."]


@pytest.fixture(scope="module")
def sae(tiny):
    return make_sae(tiny.d_model, d_sae=32)


@pytest.fixture(scope="module")
def dashboards(tiny, sae, tmp_path_factory):
    return LatentDashboards.build(tiny, sae, TEXTS, cache=tmp_path_factory.mktemp("dash"), chunk_tokens=30,
                                  progress=False)


def brute_force(model, sae) -> list[tuple[int, int, torch.Tensor]]:
    """(text, position, latents) at every token but each text's first, one text at a time through the HF model."""
    rows = []
    for k, text in enumerate(TEXTS):
        ids = model.tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad():
            z = sae.encode(model.hf_model(ids, output_hidden_states=True).hidden_states[1][0])
        rows += [(k, pos, z[pos]) for pos in range(1, ids.shape[1])]
    return rows


def test_contexts_histogram_and_firing_rate_equal_a_brute_force_pass(tiny, sae, dashboards):
    rows = brute_force(tiny, sae)
    z = torch.stack([r[2] for r in rows])
    for latent in range(sae.cfg.d_sae):
        s = dashboards.summary(latent, n_contexts=3, window=(2, 1))
        fired = z[:, latent][z[:, latent] != 0]
        assert s.n_tokens == len(rows) and s.n_firing == len(fired)
        assert s.firing_rate == pytest.approx(len(fired) / len(rows))
        if not len(fired):
            assert s.contexts == [] and sum(s.counts) == 0
            continue
        counts, _ = np.histogram(fired.double().numpy(), bins=30, range=(0.0, fired.max().item()))
        assert s.counts == counts.tolist() and s.max_activation == pytest.approx(fired.max().item(), rel=1e-5)
        order = z[:, latent].argsort(descending=True)[:len(s.contexts)].tolist()
        assert [(c.text, c.position) for c in s.contexts] == [rows[j][:2] for j in order]
        for c in s.contexts:
            window = [z[j, latent].item() for j, r in enumerate(rows) if r[0] == c.text and
                      c.position - c.peak <= r[1] < c.position - c.peak + len(c.acts)]
            assert c.acts[-len(window):] == pytest.approx(window, abs=1e-5)
            assert c.acts[:len(c.acts) - len(window)] in ([], [0.0])  # a text's first token is not read


def test_second_build_reads_the_cache_and_other_sae_weights_miss_it(tiny, sae, tmp_path, monkeypatch):
    calls = []
    real = latent_dashboard.extract
    monkeypatch.setattr(latent_dashboard, "extract", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = LatentDashboards.build(tiny, sae, TEXTS, cache=tmp_path, progress=False)
    assert calls and not first.from_cache and len(list(tmp_path.glob("*.safetensors"))) == 1
    n = len(calls)
    again = LatentDashboards.build(tiny, sae, TEXTS, cache=tmp_path, progress=False)
    assert again.from_cache and len(calls) == n
    for name in ("token_ids", "lengths", "counted", "indptr", "tokens", "values"):
        assert torch.equal(getattr(again.acts, name), getattr(first.acts, name))
    other = make_sae(tiny.d_model, d_sae=32)
    with torch.no_grad():
        other.W_enc.mul_(1.01)
    changed = LatentDashboards.build(tiny, other, TEXTS, cache=tmp_path, progress=False)
    assert not changed.from_cache and len(calls) > n and len(list(tmp_path.glob("*.safetensors"))) == 2


def test_panel_figure_and_pages_open_offline(dashboards, tmp_path):
    latent = int(dashboards.acts.indptr.diff().argmax())  # the latent that fires most
    html = str(dashboards.panel(latent))
    assert f"Latent {latent} of 32" in html and "Top contexts" in html and "<script" not in html
    assert dashboards.panel(latent)._repr_html_() == html
    assert len(dashboards.figure(latent).data) == 2
    pages = dashboards.write(tmp_path / "pages", [latent, 0])
    assert set(pages) == {latent, 0} and "<script" not in pages[latent].read_text()


def test_a_latent_out_of_range_is_refused_in_one_line(dashboards, tmp_path):
    for bad in (32, -1, 2.5, True):
        with pytest.raises(WorkbenchError, match=r"out of range: this SAE has 32 latents, 0\.\.31"):
            dashboards.panel(bad)
    with pytest.raises(WorkbenchError, match="latent 40"):
        dashboards.write(tmp_path / "pages", [0, 40])
    assert not (tmp_path / "pages").exists()


def test_default_corpus_is_held_out_from_the_sae_training_recipe(tiny, monkeypatch):
    facts = nqswap_examples(load_nqswap(n=30))  # stands in for the (slower to build) known-fact candidates
    monkeypatch.setattr(sae_corpus, "known_facts_candidates", lambda seed: facts)
    small = CorpusSettings(conflict_facts=3, instructions=5, answered=0, headlines=4, passages=2, continuations=0)
    trained = corpus_sources(tiny, small, seed=2, progress=False)
    held = heldout_sources(tiny, small, seed=2)
    assert {k: len(v) for k, v in held.items()} == {"conflict_prompts": 6, "instructions": 5, "headlines": 4,
                                                    "passages": 2}
    assert all(not set(texts) & set(trained[k]) for k, texts in held.items())
    seeds = []
    monkeypatch.setattr(latent_dashboard, "heldout_sources", lambda model, settings, seed: seeds.append(seed) or held)
    trained_sae = make_sae(tiny.d_model)
    trained_sae.cfg.metadata.training = {"seed": 2}
    texts = default_corpus(tiny, trained_sae, n_tokens=60)
    lengths = [len(tiny.tokenizer(t)["input_ids"]) for t in texts]
    assert seeds == [2] and sum(lengths) >= 60 > sum(lengths[:-1])


def test_spare_report_links_one_dashboard_per_selected_latent(tiny, sae, tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(latent_dashboard, "heldout_sources", lambda model, settings, seed: {"texts": TEXTS})
    entries = write_selected(tiny, {1: sae}, {1: {"context": [0, 2], "memory": [5]}}, tmp_path / "run" / "latents",
                             n_tokens=50, progress=False)
    assert [(e["latent"], e["favours"]) for e in entries["1"]] == [(0, "context"), (2, "context"), (5, "memory")]
    assert list((tmp_path / "cache" / "latent_dashboards").glob("*.safetensors"))
    page = table_html(spare_plots.latent_table({"latent_dashboards": entries, "settings": {"dashboard_tokens": 50}}))
    for e in entries["1"]:
        assert (tmp_path / "run" / e["page"]).is_file() and f'<a href="{e["page"]}">latent {e["latent"]}</a>' in page
    monkeypatch.setattr(latent_dashboard, "heldout_sources", lambda *a: pytest.fail("the corpus was built again"))
    monkeypatch.setattr(latent_dashboard, "extract", lambda *a, **k: pytest.fail("the model was read again"))
    assert write_selected(tiny, {1: sae}, {1: {"context": [0, 2], "memory": [5]}}, tmp_path / "again" / "latents",
                          n_tokens=50, progress=False) == entries
