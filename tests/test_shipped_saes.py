"""The shipped SAEs of the embedded model: float16 files under the size limit, the quality their training record
claims, and that quality again on text none of them was trained on."""

import json

import pytest
from sae_lens.constants import SAE_WEIGHTS_FILENAME
from safetensors import safe_open

from probes.datasets import load_refusal_instructions
from steering.sae import SAE_DIR, evaluate_sae, load_sae, reconstruction_ce
from steering.sae_corpus import token_activations

FOLDER = SAE_DIR / "embedded"
LAYERS = sorted(int(p.name.split("_")[1]) for p in FOLDER.glob("layer_*"))


def test_shipped_saes_are_float16_and_under_40_mb():
    assert LAYERS, f"no SAEs under {FOLDER}"
    assert sum(p.stat().st_size for p in FOLDER.rglob("*") if p.is_file()) < 40e6
    for layer in LAYERS:
        with safe_open(FOLDER / f"layer_{layer}" / SAE_WEIGHTS_FILENAME, "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}


def test_training_record_meets_the_targets_and_matches_each_sae():
    record = json.loads((FOLDER / "training.json").read_text())
    assert record["command"].startswith("python -m steering.train_saes --model embedded")
    for layer in LAYERS:
        scores = record["layers"][str(layer)]
        assert scores["dead_fraction"] <= 0.2
        assert scores["explained_variance"] >= 0.9 and scores["ce_loss_recovered"] >= 0.95
        sae = load_sae(FOLDER / f"layer_{layer}")
        assert sae.cfg.metadata.eval == scores
        assert sae.cfg.metadata.hook_name == f"blocks.{layer}.hook_resid_pre"
        assert sae.cfg.metadata.training["aux_coefficient"] > 0  # trained with the AuxK loss against dead latents


@pytest.fixture(scope="module")
def unseen(embedded):
    """Chat-formatted validation instructions: the SAE corpus draws its instructions from the training split."""
    return [embedded.format_chat(t) for t in load_refusal_instructions("val", "harmless")[:60]]


def test_shipped_saes_reconstruct_text_they_were_not_trained_on(embedded, unseen):
    acts = token_activations(embedded, unseen, LAYERS, progress=False)
    for layer in LAYERS:
        sae = load_sae(FOLDER / f"layer_{layer}")
        assert evaluate_sae(sae, acts[layer])["explained_variance"] >= 0.9
        assert reconstruction_ce(embedded, sae, unseen[:20], progress=False)["ce_loss_recovered"] >= 0.95
