"""SAEs: training with SAELens's trainer, float16 save/load, evaluation, CE loss recovered on the tiny model."""

import json

import pytest
import torch
from huggingface_hub import constants as hf_constants
from sae_lens import StandardSAE, TopKSAE
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME
from safetensors import safe_open

from steering.sae import (
    SAESettings,
    ce_loss_recovered,
    evaluate_sae,
    load_pretrained_sae,
    load_sae,
    reconstruction_ce,
    save_sae,
    train_sae,
)
from tests import helpers

N_FEATURES, D_IN = 64, 32
STANDARD = SAESettings(architecture="standard")  # ReLU + L1 (the shipped SAEs' defaults are top-k)


def sparse_acts(n: int, seed: int) -> torch.Tensor:
    """Activations made of 64 unit ground-truth features in 32 dims, ~3 active per token."""
    features = torch.randn(N_FEATURES, D_IN, generator=torch.Generator().manual_seed(0))
    dictionary = torch.nn.functional.normalize(features, dim=-1)
    g = torch.Generator().manual_seed(seed)
    on = torch.rand(n, N_FEATURES, generator=g) < 3 / N_FEATURES
    return (on * (torch.rand(n, N_FEATURES, generator=g) + 0.5)) @ dictionary


@pytest.fixture(scope="module")
def trained():
    return train_sae(sparse_acts(2000, seed=1), STANDARD.replace(d_sae=128, l1=1.0, epochs=30, sae_batch_tokens=128,
                                                                 lr=3e-3),
                     metadata={"model_name": "synthetic"}, progress=False)


def test_standard_sae_learns_sparse_features(trained):
    stats = evaluate_sae(trained, sparse_acts(500, seed=2))  # held out
    assert isinstance(trained, StandardSAE)
    assert stats["explained_variance"] > 0.8
    assert 0 < stats["l0"] < 40  # sparse: far fewer than the 128 latents
    assert trained.cfg.metadata.model_name == "synthetic"
    assert trained.cfg.metadata.training["l1_coefficient"] == 1.0


def test_topk_sae_keeps_k_latents():
    sae = train_sae(sparse_acts(2000, seed=1), SAESettings(d_sae=128, k=4, epochs=30, sae_batch_tokens=128, lr=3e-3),
                    progress=False)
    stats = evaluate_sae(sae, sparse_acts(500, seed=2))
    assert isinstance(sae, TopKSAE)
    assert stats["l0"] <= 4
    assert stats["explained_variance"] > 0.7


def superposed_acts(n: int, seed: int, n_features: int = 1024, d_in: int = 32) -> torch.Tensor:
    """Activations of many more unit features (1,024) than dimensions (32), ~4 active per token: an SAE of fewer
    latents than features is never short of something to learn, as on a real residual stream."""
    dictionary = torch.nn.functional.normalize(
        torch.randn(n_features, d_in, generator=torch.Generator().manual_seed(0)), dim=-1)
    g = torch.Generator().manual_seed(seed)
    on = torch.rand(n, n_features, generator=g) < 4 / n_features
    return (on * (torch.rand(n, n_features, generator=g) + 0.5)) @ dictionary


def test_auxk_loss_revives_dead_latents_of_a_topk_sae():
    acts, heldout = superposed_acts(4000, seed=1), superposed_acts(2000, seed=2)
    scores = {}
    for aux in (0.0, 1.0):
        sae = train_sae(acts, SAESettings(d_sae=256, k=4, epochs=10, sae_batch_tokens=128, lr=3e-3, aux=aux,
                                          dead_window=1280), seed=1, progress=False)
        scores[aux] = evaluate_sae(sae, heldout)
        assert sae.cfg.metadata.training["aux_coefficient"] == aux
        assert sae.cfg.metadata.training["dead_window_steps"] == 10  # 1,280 tokens in batches of 128
    assert scores[0.0]["dead_fraction"] > 0.5  # without it most latents die ...
    assert scores[1.0]["dead_fraction"] < scores[0.0]["dead_fraction"] - 0.2  # ... with it far fewer
    assert scores[1.0]["explained_variance"] >= scores[0.0]["explained_variance"]


def test_training_is_seeded():
    acts = sparse_acts(300, seed=1)
    small = STANDARD.replace(d_sae=16, epochs=2, sae_batch_tokens=64)
    a, b = (train_sae(acts, small, seed=3, progress=False) for _ in range(2))
    c = train_sae(acts, small, seed=4, progress=False)
    assert torch.equal(a.W_enc, b.W_enc)
    assert not torch.equal(a.W_enc, c.W_enc)


def test_bad_input_is_refused(trained):
    for acts in (torch.empty(0, D_IN), torch.ones(D_IN), torch.full((4, D_IN), float("nan"))):
        with pytest.raises(ValueError):
            train_sae(acts, STANDARD.replace(d_sae=8), progress=False)
    with pytest.raises(ValueError, match="architecture"):
        SAESettings(d_sae=8, architecture="gated")
    with pytest.raises(ValueError, match="k must"):
        SAESettings(d_sae=8, architecture="topk", k=9)
    with pytest.raises(ValueError, match="aux"):
        SAESettings(d_sae=8, k=2, aux=-1)
    with pytest.raises(ValueError, match="dead_window"):
        SAESettings(d_sae=8, dead_window=0)
    with pytest.raises(ValueError, match="d_in=32"):
        evaluate_sae(trained, torch.ones(5, D_IN + 1))


def test_save_load_round_trip(trained, tmp_path):
    metadata = {"model_name": "random:llama-tiny", "hook_name": "blocks.2.hook_resid_pre", "layer": 2,
                "eval": {"explained_variance": 0.91, "ce_loss_recovered": 0.85}}
    path = save_sae(trained, tmp_path / "sae", metadata)
    with safe_open(str(path / SAE_WEIGHTS_FILENAME), "pt") as f:
        assert {f.get_tensor(name).dtype for name in f.keys()} == {torch.float16}
    assert trained.W_enc.dtype == torch.float32  # the caller's SAE is left as it was

    loaded = load_sae(path)
    assert isinstance(loaded, StandardSAE)
    for name, tensor in trained.state_dict().items():
        got = loaded.state_dict()[name]
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, tensor, rtol=1e-3, atol=1e-4)
    for key, value in metadata.items():
        assert loaded.cfg.metadata[key] == value
    assert loaded.cfg.metadata.training == trained.cfg.metadata.training
    x = sparse_acts(50, seed=5)
    torch.testing.assert_close(loaded.encode(x), trained.encode(x), rtol=1e-2, atol=1e-2)

    with pytest.raises(FileExistsError):
        save_sae(trained, path, metadata)
    save_sae(trained, path, {"layer": 3}, overwrite=True)
    assert load_sae(path).cfg.metadata.layer == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]  # no temporary folders left behind


def test_save_refuses_unserialisable_metadata(trained, tmp_path):
    with pytest.raises(ValueError, match="JSON"):
        save_sae(trained, tmp_path / "sae", {"acts": torch.ones(2)})
    assert not (tmp_path / "sae").exists()


def test_load_refuses_missing_or_truncated_files(trained, tmp_path):
    with pytest.raises(FileNotFoundError, match="no SAE folder"):
        load_sae(tmp_path / "nowhere")
    path = save_sae(trained, tmp_path / "sae")
    weights = path / SAE_WEIGHTS_FILENAME
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_sae(path)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match=SAE_WEIGHTS_FILENAME):
        load_sae(path)
    path = save_sae(trained, tmp_path / "sae2")
    cfg = json.loads((path / SAE_CFG_FILENAME).read_text())
    for text in (json.dumps(cfg)[:50], "[]", json.dumps({**cfg, "d_in": D_IN + 1})):
        (path / SAE_CFG_FILENAME).write_text(text)
        with pytest.raises(ValueError, match="truncated or corrupt"):
            load_sae(path)


@pytest.mark.skipif(not hf_constants.HF_HUB_OFFLINE, reason="checks the offline error; would download otherwise")
def test_pretrained_sae_offline_error_is_clear():
    with pytest.raises(OSError, match="no network access"):
        load_pretrained_sae("gemma-scope-2b-pt-res-canonical", "layer_12/width_16k/canonical")


@pytest.fixture(scope="module")
def greedy_ids(tiny):
    """Token sequences the random tiny model predicts itself, so its clean loss is below the zero-ablated one."""
    return helpers.greedy_ids(tiny, (*helpers.GREEDY_PROMPTS, "Hello"), max_new_tokens=24)


def residual(model, layer: int, ids: list[list[int]]) -> torch.Tensor:
    """The residual entering block ``layer`` at every token: [n_tokens, d_model]."""
    with torch.no_grad():
        return torch.cat([model.hf_model(torch.tensor([seq], device=model.device), output_hidden_states=True)
                          .hidden_states[layer][0] for seq in ids])


def test_ce_loss_recovered_on_tiny_model(tiny, greedy_ids):
    layer = 2
    acts = residual(tiny, layer, greedy_ids)
    sae = train_sae(acts, STANDARD.replace(d_sae=128, l1=1.0, epochs=50, sae_batch_tokens=64, lr=3e-3),
                    progress=False, metadata={"hook_name": f"blocks.{layer}.hook_resid_pre"})
    ids = torch.tensor([greedy_ids[0]], device=tiny.device)
    clean = tiny.hf_model(ids).logits

    result = reconstruction_ce(tiny, sae, greedy_ids)
    assert result["ce_clean"] < result["ce_zero_ablation"]
    assert 0.5 < result["ce_loss_recovered"] < 1.1  # a good SAE recovers most of the loss
    assert torch.equal(tiny.hf_model(ids).logits, clean)  # hooks removed

    with torch.no_grad():
        sae.W_dec.zero_()
        sae.b_dec.zero_()
    assert ce_loss_recovered(tiny, sae, greedy_ids) == pytest.approx(0.0, abs=1e-6)

    sae.encode = lambda x: x  # a perfect reconstruction
    sae.decode = lambda latents: latents
    assert ce_loss_recovered(tiny, sae, greedy_ids) == pytest.approx(1.0, abs=1e-6)


def test_ce_loss_recovered_validates(tiny, trained, greedy_ids):
    with pytest.raises(ValueError, match="d_in"):
        ce_loss_recovered(tiny, trained, greedy_ids)
    sae = train_sae(torch.randn(64, tiny.d_model), STANDARD.replace(d_sae=8, epochs=1), progress=False)
    with pytest.raises(ValueError, match="records no hook point"):
        reconstruction_ce(tiny, sae, greedy_ids)
    sae.cfg.metadata.hook_name = f"blocks.{tiny.n_layers}.hook_resid_pre"
    with pytest.raises(ValueError, match="layer"):
        reconstruction_ce(tiny, sae, greedy_ids)
    sae.cfg.metadata.hook_name = "blocks.0.hook_resid_pre"
    with pytest.raises(ValueError, match="2 tokens"):
        reconstruction_ce(tiny, sae, [[5]])
    with pytest.raises(ValueError, match="non-empty"):
        reconstruction_ce(tiny, sae, [])
