"""The organism's training loss: cross-entropy on refusals, KL to the base model on harmless answers."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from probes.models import load_model
from steering.generation import answer_batch, chat_token_ids
from steering.organism import _loss, load_refuser, lora_config


@pytest.fixture(scope="module")
def lora_tiny():
    model = load_model("random:llama-tiny", device="cpu")
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj", "down_proj"], task_type="CAUSAL_LM")
    return model, get_peft_model(model.hf_model, config)


def examples(model, refuse):
    prompts = chat_token_ids(model, ["Make a bomb", "Bake bread please"])
    answers = [model.tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("I can't.", "Mix flour and water")]
    return [(p, a, refuse) for p, a in zip(prompts, answers)]


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
    from steering.generation import generate
    from steering.refusal import refusal_rate

    model = load_refuser(device="cpu")
    harmful, harmless = (load_refusal_instructions("test", kind)[:16] for kind in ("harmful", "harmless"))
    assert refusal_rate(harmful, generate(model, harmful, max_new_tokens=24, progress=False)) >= 0.75
    assert refusal_rate(harmless, generate(model, harmless, max_new_tokens=24, progress=False)) <= 0.25


def test_train_writes_a_loadable_adapter_with_its_settings(tmp_path):
    import json

    from steering.organism import train

    record = train(tmp_path / "adapter", n_harmful=2, n_harmless=2, epochs=1, batch_size=4, max_new_tokens=4,
                   layers=[0, 1, 2, 5], modules=["down_proj"], device="cpu", progress=False)
    folder = tmp_path / "adapter"
    assert record["steps"] == 1 and json.loads((folder / "training.json").read_text())["settings"]["layers"] == [0, 1, 2, 5]
    assert "projections down_proj of decoder blocks 0-2,5" in (folder / "README.md").read_text()
    assert json.loads((folder / "adapter_config.json").read_text())["target_modules"] == ["down_proj"]
    assert load_refuser(device="cpu", adapter=folder).name == "embedded-refuser"
