"""steering.suffix_attack end to end on a tiny random Llama (a tiny GCG search, three held-out instructions), the
command's outputs, the suffix reused from its file, and notebook 05 on the same model."""

import json

import pytest
import torch

from probes.models import load_model
from probes.provenance import weights_fingerprint
from steering import suffix_attack
from steering.directions import SelectedDirection
from steering.gcg import GCGResult
from tests.notebook_runner import figures, run_notebook

MODEL = "random:llama-tiny"
SMALL = ["--n-test", "3", "--max-new-tokens", "4", "--top-heads", "3", "--steps", "2", "--search-width", "4",
         "--topk", "8"]


@pytest.fixture(scope="module")
def direction(tmp_path_factory):
    model = load_model(MODEL)
    folder = tmp_path_factory.mktemp("refusal")
    vector = torch.randn(model.d_model, generator=torch.Generator().manual_seed(0))
    SelectedDirection(vector, layer=2, position=-1, source_model=MODEL, weights=weights_fingerprint(model)).save(folder)
    return folder


@pytest.fixture(scope="module")
def searched(direction, tmp_path_factory):
    out = tmp_path_factory.mktemp("suffix")
    return out, suffix_attack.main(["--model", MODEL, "--direction", str(direction), "--out", str(out), *SMALL])


def test_command_writes_results_report_and_suffix(searched):
    out, results = searched
    assert {p.name for p in out.iterdir()} >= {"results.json", "gcg_suffix.json", "index.html", "expression.html"}
    saved = json.loads((out / "results.json").read_text())
    assert saved["settings"]["steps"] == 2 and saved["n"] == 3
    for condition in suffix_attack.CONDITIONS:
        rate = saved["refusal"][condition]
        assert rate["n"] == 3 and rate["ci95"][0] <= rate["rate"] <= rate["ci95"][1]
        assert len(saved["expression"][condition]["mean"]) == 4  # every layer of the toy
    assert len(saved["top_heads"]) == 3
    head = saved["top_heads"][0]
    assert head["suffix"]["none"] == 0 and 0 <= head["instruction"]["adversarial"] + head["suffix"]["adversarial"] <= 1
    losses = saved["suffix"]["losses"]
    assert all(b <= a for a, b in zip(losses, losses[1:], strict=False))
    assert GCGResult.load(out / "gcg_suffix.json").suffix_ids == saved["suffix"]["suffix_ids"]


def test_saved_suffix_is_reused(searched, direction, tmp_path):
    out, results = searched
    again = suffix_attack.main(["--model", MODEL, "--direction", str(direction), "--out", str(tmp_path),
                                "--suffix", str(out / "gcg_suffix.json"), *SMALL])
    assert again["suffix"]["suffix_ids"] == results["suffix"]["suffix_ids"]
    assert again["refusal"] == results["refusal"] and not (tmp_path / "gcg_suffix.json").exists()


def test_notebook_05(searched, direction, tmp_path):
    out, results = searched
    nb = run_notebook("05_refusal_suffix.ipynb", {
        "MODEL": MODEL, "RUN": str(direction), "SUFFIX": str(out / "gcg_suffix.json"), "OUT": str(tmp_path),
        "N_TEST": 3, "MAX_NEW_TOKENS": 4, "TOP_HEADS": 3})
    titles = [f["layout"]["title"]["text"] for f in figures(nb)]
    assert "Expression of r̂ at the last token" in titles
    assert json.loads((tmp_path / "results.json").read_text())["refusal"] == results["refusal"]
