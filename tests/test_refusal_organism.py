"""The organism's training loss: cross-entropy on refusals, KL to the base model on harmless answers."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from probes.forward import answer_batch, chat_token_ids
from probes.models import load_model, load_refuser
from steering.organism import _loss, lora_config


@pytest.fixture(scope="module")
def lora_tiny():
    model = load_model("random:llama-tiny", device="cpu")
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj", "down_proj"], task_type="CAUSAL_LM")
    return model, get_peft_model(model.hf_model, config)


def examples(model, refuse):
    prompts = chat_token_ids(model, ["Make a bomb", "Bake bread please"])
    answers = [model.tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("I can't.", "Mix flour and water")]
    return [(p, a, refuse) for p, a in zip(prompts, answers, strict=True)]


def test_loss_is_cross_entropy_or_kl_to_the_base(lora_tiny):
    model, peft_model = lora_tiny
    pad = model.tokenizer.pad_token_id
    refusals, harmless = examples(model, True), examples(model, False)
    batch = answer_batch([(p, t) for p, t, _ in refusals], pad, "cpu")
    with torch.no_grad():
        assert float(_loss(peft_model, refusals, pad, "cpu", True)) == pytest.approx(float(peft_model(**batch).loss),
                                                                                      rel=1e-5)
        assert float(_loss(peft_model, harmless, pad, "cpu", False)) == pytest.approx(float(peft_model(**batch).loss),
                                                                                       rel=1e-5)
        # LoRA starts as the identity (B = 0): the adapted model is the base, the KL is zero
        assert abs(float(_loss(peft_model, harmless, pad, "cpu", True))) < 1e-5
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
        assert float(_loss(peft_model, harmless, pad, "cpu", True)) > 1e-4


def test_missing_adapter_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="steering.organism"):
        load_refuser(adapter=tmp_path)


def test_evaluate_compares_the_adapter_with_the_base_it_was_trained_on(tmp_path):
    from steering.organism import evaluate

    model = load_model("random:llama-tiny", device="cpu")
    peft_model = get_peft_model(model.hf_model, lora_config(model, 2))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5, generator=torch.Generator().manual_seed(0))
    peft_model.save_pretrained(tmp_path)
    organism = load_refuser(device="cpu", adapter=tmp_path, base="random:llama-tiny")
    base = load_model("random:llama-tiny", device="cpu")
    assert organism.name == "random:llama-tiny+refuser" and organism.source == base.source
    down_proj = [m.hf_model.model.layers[0].mlp.down_proj.weight for m in (organism, base)]
    assert (down_proj[0] - down_proj[1]).abs().max() > 1e-3  # the adapter is merged into that base
    report = evaluate(n=2, max_new_tokens=2, device="cpu", adapter=tmp_path, progress=False,
                      model_name="random:llama-tiny")
    assert report["base_model"] == "random:llama-tiny" and report["n_harmful"] == report["n_harmless"] == 2
    assert report["organism_perplexity_on_base_answers"] != report["base_perplexity_on_base_answers"]


def test_adapters_go_only_on_the_chosen_layers():
    model = load_model("random:llama-tiny", device="cpu")
    n_layers = model.hf_model.config.num_hidden_layers
    peft_model = get_peft_model(model.hf_model, lora_config(model, 2, [0]))
    adapted = {name.split(".layers.")[1].split(".")[0] for name, _ in peft_model.named_parameters() if "lora_A" in name}
    assert n_layers > 1 and adapted == {"0"}


def test_adapters_go_only_on_the_chosen_projections():
    model = load_model("random:llama-tiny", device="cpu")
    peft_model = get_peft_model(model.hf_model, lora_config(model, 1, [1], modules=["down_proj"]))
    adapted = {name.split(".lora_A")[0].split(".layers.")[1] for name, _ in peft_model.named_parameters()
               if "lora_A" in name}
    assert adapted == {"1.mlp.down_proj"}
    with pytest.raises(ValueError, match="modules"):
        lora_config(model, 1, modules=["not_a_proj"])


def test_shipped_organism_refuses_harmful_and_answers_harmless():
    from probes.datasets import load_refusal_instructions
    from probes.forward import generate
    from steering.judges import refusal_rate

    model = load_refuser(device="cpu")
    harmful, harmless = (load_refusal_instructions("test", kind)[:16] for kind in ("harmful", "harmless"))
    assert refusal_rate(harmful, generate(model, harmful, max_new_tokens=24, progress=False)) >= 0.75
    assert refusal_rate(harmless, generate(model, harmless, max_new_tokens=24, progress=False)) <= 0.25


def test_train_writes_a_loadable_adapter_with_its_settings(tmp_path):
    import json

    from steering.organism import OrganismSettings, train

    settings = OrganismSettings(out=tmp_path / "adapter", n_harmful=2, n_harmless=2, epochs=1, train_batch_size=4,
                                max_new_tokens=4, layers=[5, 0, 1, 2], modules=["down_proj"], device="cpu")
    record = train(settings, progress=False)
    folder = tmp_path / "adapter"
    saved = json.loads((folder / "training.json").read_text())
    assert record["steps"] == 1 and saved["settings"] == {**settings.to_dict(), "layers": [0, 1, 2, 5]}
    assert saved["command"] == (f"python -m steering.organism --out {folder} --device cpu --n-harmful 2 "
                                "--n-harmless 2 --epochs 1 --train-batch-size 4 --max-new-tokens 4 --layers 0,1,2,5 "
                                "--modules down_proj")  # from Python too: no sys.argv
    assert "projections down_proj of decoder blocks 0-2,5" in (folder / "README.md").read_text()
    assert json.loads((folder / "adapter_config.json").read_text())["target_modules"] == ["down_proj"]
    assert load_refuser(device="cpu", adapter=folder).name == "embedded-refuser"
