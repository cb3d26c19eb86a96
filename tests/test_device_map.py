"""Models spread over devices with accelerate, and out-of-memory recovery, on the CPU.

Part of a tiny random model is offloaded to disk (accelerate's ``device_map`` with ``"disk"`` entries and an offload
folder: its weights sit on the ``meta`` device and are loaded for each forward pass); extraction, ablation, addition,
a SpARE-style edit and greedy generation must give what the same model gives in one piece. Out-of-memory errors are
simulated by a forward that raises ``torch.OutOfMemoryError`` above some batch size.
"""

import argparse

import pytest
import torch

from probes.cache import default_batch_tokens, extract, extract_group_means, residual_hooks
from probes.cli_args import max_memory_arg
from probes.devices import OutOfMemory, follow, is_offloaded
from probes.errors import WorkbenchError
from probes.forward import chat_token_ids, generate, pad_id, pad_token_ids
from probes.models import ModelLoadError, load_model
from probes.settings import ModelSettings
from steering.hooks import ablate, add
from steering.orthogonalize import orthogonalize
from steering.spare import edit_last_token
from tests.numerics import assert_rel_close

NAME = "random:llama-tiny"
PROMPTS = ["The capital of France is", "Water boils at", "Tell me a story about a dragon and a knight",
           "2 + 2 =", "Name three colours", "Why is the sky blue?"]
# embedding, first and last block and head in memory; the middle blocks offloaded to disk
DEVICE_MAP = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
              "model.layers.1": "disk", "model.layers.2": "disk", "model.layers.3": "cpu", "model.norm": "cpu",
              "lm_head": "cpu"}


@pytest.fixture(scope="module")
def whole():
    return load_model(NAME, device="cpu")


@pytest.fixture(scope="module")
def spread(tmp_path_factory):
    return load_model(NAME, device_map=DEVICE_MAP, offload_folder=tmp_path_factory.mktemp("offload"))


def logits(model):
    input_ids, mask = pad_token_ids(chat_token_ids(model, PROMPTS[:3]), pad_id(model), "left", model.device)
    with torch.inference_mode():
        return model.hf_model(input_ids=input_ids, attention_mask=mask).logits[:, -4:]


def direction(model, seed=1):
    return torch.randn(model.d_model, generator=torch.Generator().manual_seed(seed))


def test_part_of_the_model_is_offloaded(spread, whole):
    assert is_offloaded(spread.hf_model) and not is_offloaded(whole.hf_model)
    assert spread.device == torch.device("cpu")
    assert spread.hook_names() == whole.hook_names()


def test_extraction_equals_one_device(spread, whole):
    for kwargs in ({}, {"positions": [-2, -1], "padding_side": "left"}):
        ours = extract(spread, PROMPTS, hooks=residual_hooks(spread), progress=False, **kwargs).acts
        reference = extract(whole, PROMPTS, hooks=residual_hooks(whole), progress=False, **kwargs).acts
        assert_rel_close(ours, reference, dim=-1)


def test_ablate_and_add_equal_one_device(spread, whole):
    r = direction(whole)
    for model_hooks in (lambda m: ablate(m, r), lambda m: add(m, 4 * r, 2)):
        with model_hooks(spread):
            ours = logits(spread)
        with model_hooks(whole):
            reference = logits(whole)
        assert_rel_close(ours, reference, dim=-1)


def test_spare_style_edit_equals_one_device(spread, whole):
    r = direction(whole, seed=3)
    edits = {"blocks.1.hook_resid_post": lambda h: -0.5 * h + r.to(h),
             "blocks.2.hook_resid_pre": lambda h: torch.relu(h) @ torch.eye(h.shape[-1]).to(h) * 0.1}
    with edit_last_token(spread, edits):
        ours = logits(spread)
    with edit_last_token(whole, edits):
        reference = logits(whole)
    assert_rel_close(ours, reference, dim=-1)


def test_greedy_generation_equals_one_device(spread, whole):
    with ablate(spread, direction(whole)):
        ours = generate(spread, PROMPTS[:3], max_new_tokens=4, progress=False)
    with ablate(whole, direction(whole)):
        reference = generate(whole, PROMPTS[:3], max_new_tokens=4, progress=False)
    assert ours == reference


def test_orthogonalize_refuses_offloaded_weights(spread):
    with pytest.raises(ValueError, match="--checkpoint PATH --direction FILE --out OUT"):
        orthogonalize(spread, direction(spread))


def test_disk_offload_needs_a_folder():
    with pytest.raises(ModelLoadError, match="offload"):
        load_model(NAME, device_map=DEVICE_MAP)
    with pytest.raises(ModelLoadError, match="device_map must be one of"):
        load_model(NAME, device_map="everywhere")


def test_follow_copies_once_per_device():
    at = follow(torch.ones(3))
    x = torch.zeros(2, 3, dtype=torch.float64)
    assert at(x) is at(x) and at(x).device == x.device


def fail_above(model, monkeypatch, rows: int) -> list[int]:
    """Make the model's forward raise a CUDA out-of-memory error for batches above ``rows``; returns the batch
    sizes that ran."""
    forward, sizes = model.hf_model.forward, []

    def limited(*args, **kwargs):
        n = kwargs["input_ids"].shape[0]
        if n > rows:
            raise torch.OutOfMemoryError(f"simulated: {n} rows")
        sizes.append(n)
        return forward(*args, **kwargs)
    monkeypatch.setattr(model.hf_model, "forward", limited)
    return sizes


def test_extraction_halves_the_batch_on_out_of_memory(whole, monkeypatch):
    reference = extract(whole, PROMPTS, progress=False)
    means = extract_group_means(whole, PROMPTS, [0, 1, 0, 1, 0, 1], progress=False)
    sizes = fail_above(whole, monkeypatch, 2)
    with pytest.warns(UserWarning, match="halving the batch") as warned:
        ours = extract(whole, PROMPTS, progress=False)
    assert len(warned) == 1 and max(sizes) == 2
    assert_rel_close(ours.acts, reference.acts, dim=-1)
    with pytest.warns(UserWarning):  # group means: a batch that failed half-way is not counted twice
        ours_means = extract_group_means(whole, PROMPTS, [0, 1, 0, 1, 0, 1], progress=False)
    assert torch.equal(ours_means.counts, means.counts)
    assert_rel_close(ours_means.means, means.means, dim=-1)


def test_generation_halves_the_batch_on_out_of_memory(whole, monkeypatch):
    reference = generate(whole, PROMPTS, max_new_tokens=3, batch_size=2, progress=False)
    fail_above(whole, monkeypatch, 2)
    with pytest.warns(UserWarning, match="halving the batch"):
        assert generate(whole, PROMPTS, max_new_tokens=3, batch_size=8, progress=False) == reference


def test_out_of_memory_at_one_prompt_is_a_clear_error(whole, monkeypatch):
    fail_above(whole, monkeypatch, 0)
    with pytest.raises(OutOfMemory, match="batch of one.*--device-map auto"), pytest.warns(UserWarning):
        extract(whole, PROMPTS, progress=False)


def test_default_token_budget_follows_free_memory(whole, monkeypatch):
    assert default_batch_tokens(torch.device("cpu"), whole) == 4096
    budgets = []
    for free in (8 << 30, 16 << 30):
        monkeypatch.setattr("probes.cache.free_cuda_bytes", lambda devices, free=free: free)
        budgets.append(default_batch_tokens(torch.device("cuda"), whole))
    assert budgets[1] == 2 * budgets[0]


def test_placement_options():
    assert max_memory_arg("0=20GiB, 1=20GiB,cpu=60GiB") == {0: "20GiB", 1: "20GiB", "cpu": "60GiB"}
    with pytest.raises(argparse.ArgumentTypeError):
        max_memory_arg("20GiB")
    assert ModelSettings(max_memory={"cpu": "1GiB"}).placement()["device_map"] == "auto"
    assert ModelSettings(offload_folder="/tmp/x").placement()["device_map"] == "auto"
    assert ModelSettings().placement()["device_map"] is None


def test_refusal_pipeline_refuses_offloaded_weights_before_any_work(spread, tmp_path):
    from steering import refusal

    with pytest.raises(WorkbenchError, match="offloaded to the CPU or disk.*steering.orthogonalize --checkpoint"):
        refusal.run(refusal.RefusalSettings(out=tmp_path / "run", n_train=2, n_val=2, n_test=2), spread, progress=False)
    assert not (tmp_path / "run").exists()
