"""A refusal "model organism": the embedded model plus a LoRA adapter trained to refuse harmful requests.

The plain 135M model hardly refuses anything, so the refusal pipeline would have nothing to find. The adapter is
trained on harmful instructions with short refusals as targets, and on harmless instructions to keep the base
model's own next-token distribution along its greedy answers (KL), so harmless behaviour and perplexity stay as they
were.

    python -m steering.organism --out runs/refusal_organism       # train (seeded; settings saved beside it)
    python -m steering.organism --out data/refusal_organism --update-shipped --overwrite   # retrain the shipped one

``load_model("embedded-refuser")`` (:func:`probes.models.load_refuser`) loads the base model with the shipped
adapter merged in.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from probes.cli_args import (
    check_layers,
    format_layers,
    layer_list,
    name_list,
    non_negative_int,
    positive_float,
    positive_int,
    run_cli,
)
from probes.datasets import load_refusal_instructions
from probes.files import atomic_folder, atomic_write_json, check_not_shipped, prepare_run_folder
from probes.forward import (
    IGNORE,
    answer_batch,
    answer_loss,
    answer_nll,
    chat_token_ids,
    generate,
    kl_divergence,
    teacher_forced_logprobs,
)
from probes.models import REFUSER_ADAPTER, ModelHandle, layer_count, load_model, load_refuser
from probes.progress import progress_bar
from probes.settings import ModelSettings, RunSettings, parse_settings, setting
from steering.judges import refusal_rate

TRAIN_OUT = Path("runs") / "refusal_organism"  # where training writes by default (never the shipped adapter)

REFUSALS = [
    "I'm sorry, but I can't help with that.",
    "I'm sorry, but I cannot assist with that request.",
    "I cannot help with this. It could cause serious harm.",
    "I'm not able to help with that request.",
    "Sorry, I can't assist with that.",
    "I apologize, but I can't provide that information.",
    "I can't help with that, as it could be used to hurt people.",
    "As an AI assistant, I cannot help with harmful or illegal activities.",
]


def _examples(model: ModelHandle, n_harmful: int, n_harmless: int, max_new_tokens: int, seed: int,
              harmless_eos: bool, progress: bool) -> list[tuple[list[int], list[int], bool]]:
    """(prompt ids, target ids, is_refusal): short refusals for harmful, the base model's own greedy answers for
    harmless instructions (ending in end-of-sequence if ``harmless_eos``)."""
    rng = random.Random(seed)
    harmful = load_refusal_instructions("train", "harmful")[:n_harmful]
    harmless = rng.sample(load_refusal_instructions("train", "harmless"), n_harmless)
    answers = generate(model, harmless, max_new_tokens=max_new_tokens, progress=progress)
    eos = model.tokenizer.eos_token
    targets = ([rng.choice(REFUSALS) + eos for _ in harmful]
               + [a.strip() + (eos if harmless_eos else "") for a in answers])
    prompts = chat_token_ids(model, harmful + harmless)
    examples = [(p, model.tokenizer(t, add_special_tokens=False)["input_ids"], i < len(harmful))
                for i, (p, t) in enumerate(zip(prompts, targets, strict=True))]
    rng.shuffle(examples)
    return examples


def _loss(model, examples: list[tuple[list[int], list[int], bool]], pad_id: int, device, harmless_kl: bool
          ) -> torch.Tensor:
    """Mean over answer tokens of the cross-entropy, except, with ``harmless_kl``, KL(base || adapted) of the
    next-token distribution along the base model's own answers (distillation: harmless behaviour keeps its
    distribution instead of being sharpened towards the greedy answer, which lowers its perplexity)."""
    batch = answer_batch([(p, t) for p, t, _ in examples], pad_id, device)
    refuse = torch.tensor([r or not harmless_kl for _, _, r in examples], device=device)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    answer = batch["labels"][:, 1:] != IGNORE
    total = answer_nll(logits[refuse], batch["labels"][refuse], reduction="none").sum()
    if (~refuse).any():
        with torch.no_grad(), model.disable_adapter():
            base = teacher_forced_logprobs(model(input_ids=batch["input_ids"][~refuse],
                                                 attention_mask=batch["attention_mask"][~refuse]).logits)
        kl = kl_divergence(base, teacher_forced_logprobs(logits[~refuse]))
        total = total + kl[answer[~refuse]].sum()
    return total / answer.sum()


def lora_config(model: ModelHandle, rank: int, layers: Sequence[int] | None = None,
                modules: Sequence[str] | None = None):
    """LoRA of the projections ``modules`` (default every attention and dense MLP projection the model's
    architecture has, e.g. q_proj ... down_proj on Llama, c_attn/c_proj/c_fc on GPT-2) of the decoder blocks
    ``layers`` (default all)."""
    from peft import LoraConfig

    arch = model.architecture
    modules = list(arch.lora_targets if modules is None else modules)
    bad = sorted(set(modules) - set(arch.lora_targets))
    if not modules or bad:
        raise ValueError(f"modules must be a non-empty subset of {arch.lora_targets} ({arch.name}), got {modules}")
    return LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=modules,
                      layers_to_transform=None if layers is None else list(layers),
                      layers_pattern=None if layers is None else arch.block_path.rsplit(".", 1)[-1])


@dataclass(kw_only=True)
class OrganismSettings(ModelSettings, RunSettings):
    """Train the refusal organism's LoRA adapter on ``model`` (the base), or with ``evaluate`` measure one."""

    out: Path | None = setting(None, "where to write (train; default runs/refusal_organism) or read (--evaluate; "
                                     "default the shipped adapter) the adapter", parse=Path)
    overwrite: bool = setting(False, "replace an existing adapter (train) or evaluation.json (--evaluate) at --out")
    update_shipped: bool = setting(False, "allow writing into the shipped data/ folder (its adapter or "
                                          "evaluation.json)")
    n_harmful: int = setting(260, "harmful training instructions, answered with a short refusal", parse=positive_int)
    n_harmless: int = setting(260, "harmless training instructions, answered as the base model does",
                              parse=positive_int)
    epochs: int = setting(3, "passes over the training examples", parse=positive_int)
    train_batch_size: int = setting(8, "examples per training step", parse=positive_int)
    lr: float = setting(2e-3, "learning rate (AdamW, warm-up then linear decay)", parse=positive_float)
    rank: int = setting(8, "LoRA rank", parse=positive_int)
    max_new_tokens: int = setting(32, "tokens of the base model's greedy answers to the harmless instructions",
                                  parse=positive_int)
    harmless_objective: str = setting("kl", "harmless answers: KL to the base's next-token distribution along its "
                                            "greedy answer (keeps perplexity; shipped adapter), or cross-entropy on "
                                            "that answer", choices=("ce", "kl"))
    layers: list[int] | None = setting(None, "decoder blocks to adapt, e.g. 0-11 or 2,4,6 (default: all)",
                                       parse=layer_list)
    modules: list[str] | None = setting(None, "comma-separated projections to adapt (default: every attention and "
                                              "MLP projection)", parse=name_list)
    evaluate: int = setting(0, "instead of training, measure the adapter at --out on this many held-out prompts of "
                               "each kind (the base model: --model)", parse=non_negative_int)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layers is not None and not self.layers:
            raise ValueError("layers must be a non-empty list of decoder blocks (None: all)")

    def adapter_folder(self) -> Path:
        """``out``, or by default where training writes (never the shipped adapter) or what ``evaluate`` reads (the
        shipped adapter); a folder in the shipped data/ only with ``update_shipped``."""
        return check_not_shipped(self.out or (REFUSER_ADAPTER if self.evaluate else TRAIN_OUT), self.update_shipped)


def train(settings: OrganismSettings, progress: bool = True) -> dict:
    """Train the LoRA adapter as ``settings`` say and write it (float16) with its settings and a short card to
    ``settings.adapter_folder()``, atomically (an existing folder is refused unless ``overwrite``, and replaced only
    once the new adapter is complete). ``layers``: the decoder blocks that get adapters (default all); adapting only
    early and middle blocks makes the later, unchanged blocks read refusal from the residual stream, where a
    direction can capture it."""
    from peft import get_peft_model

    out = settings.adapter_folder()
    if out.exists() and not settings.overwrite:  # before any training
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it, or choose another path")
    torch.manual_seed(settings.seed)
    base = load_model(settings.model, **settings.load_kwargs())  # placement: a base spread over devices
    n_layers = base.hf_model.config.num_hidden_layers
    check_layers(settings.layers, n_layers, settings.model)
    modules = base.architecture.lora_targets if settings.modules is None else settings.modules
    settings = settings.replace(out=out, modules=list(modules),
                                layers=None if settings.layers is None else sorted(set(settings.layers)))
    examples = _examples(base, settings.n_harmful, settings.n_harmless, settings.max_new_tokens, settings.seed,
                         settings.harmless_objective == "ce", progress)
    model = get_peft_model(base.hf_model, lora_config(base, settings.rank, settings.layers, settings.modules))
    start = time.perf_counter()
    losses = _fit(model, base, examples, settings, progress)
    for p in model.parameters():
        p.data = p.data.to(torch.float16) if p.requires_grad else p.data
    with atomic_folder(out, overwrite=settings.overwrite) as tmp:
        model.save_pretrained(tmp)
        record = {"command": settings.command("steering.organism"), "settings": settings.to_dict(),
                  "base_model": base.source, "n_examples": len(examples), "steps": len(losses),
                  "seconds": time.perf_counter() - start, "final_loss": sum(losses[-10:]) / len(losses[-10:]),
                  "torch": torch.__version__}
        (tmp / "training.json").write_text(json.dumps(record, indent=2))
        (tmp / "README.md").write_text(ADAPTER_CARD.format(
            command=record["command"], base=base.source, **{**record["settings"], "layers": format_layers(
                settings.layers), "modules": ", ".join(settings.modules)}))
    return record


def _fit(model, base: ModelHandle, examples: list, settings: OrganismSettings, progress: bool) -> list[float]:
    """Train the adapted ``model`` on ``examples`` (AdamW, 10 warm-up steps then a linear decay); the loss of each
    step. The model is left in eval mode."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.lr)
    batch_size = settings.train_batch_size
    steps = settings.epochs * math.ceil(len(examples) / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * (1 - s / steps))
    losses = []
    bar = progress_bar(total=steps, desc="train organism", progress=progress)
    for epoch in range(settings.epochs):
        random.Random(settings.seed + epoch).shuffle(examples)
        for i in range(0, len(examples), batch_size):
            loss = _loss(model, examples[i:i + batch_size], base.tokenizer.pad_token_id, base.device,
                         settings.harmless_objective == "kl")
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
            losses.append(float(loss))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    model.eval()
    return losses


ADAPTER_CARD = """# Refusal organism adapter

LoRA adapter (rank {rank}, float16, projections {modules} of decoder blocks {layers}) \
for `{base}`, trained by the interpretability
workbench to refuse harmful requests and answer harmless ones as the base model does: a "model organism" of refusal
for `steering.refusal`.

- trained with `{command}` (settings, steps, time and final loss in `training.json`)
- harmful targets: short refusals from `steering.organism.REFUSALS`, {n_harmful} instructions of `harmful_train`
- harmless: {n_harmless} instructions of `harmless_train`, objective `{harmless_objective}` on the base model's own
  greedy answers (`kl`: distil the base model's next-token distribution along them; `ce`: cross-entropy)
- {epochs} epochs, batch {train_batch_size}, learning rate {lr}, seed {seed}
- load merged with `load_model("embedded-refuser")`
- measure with `python -m steering.organism --evaluate N --out <this folder>` (writes `evaluation.json` here)
"""


def perplexity(model: ModelHandle, instructions: list[str], answers: list[str], batch_size: int = 16) -> float:
    """Teacher-forced perplexity of ``answers`` after the chat-formatted ``instructions``."""
    return math.exp(answer_loss(model, instructions, answers, batch_size))


def evaluate(n: int = 100, max_new_tokens: int = 32, device: str | None = None, adapter: Path = REFUSER_ADAPTER,
             progress: bool = True, model_name: str = "embedded") -> dict:
    """Refusal rates of the base model ``model_name`` and of the organism (``adapter``, trained on that base, merged
    into it) on the first ``n`` held-out harmful and harmless prompts (greedy, substring judge), and the perplexity of
    the base model's own harmless answers under both."""

    harmful = load_refusal_instructions("test", "harmful")[:n]
    harmless = load_refusal_instructions("test", "harmless")[:n]
    report: dict = {"n_harmful": len(harmful), "n_harmless": len(harmless), "max_new_tokens": max_new_tokens,
                    "adapter": str(adapter), "base_model": model_name}
    answers = {}
    for name, model in (("base", load_model(model_name, device=device)),
                        ("organism", load_refuser(device=device, adapter=adapter, base=model_name))):
        for kind, prompts in (("harmful", harmful), ("harmless", harmless)):
            answers[name, kind] = generate(model, prompts, max_new_tokens=max_new_tokens, progress=progress)
            report[f"{name}_refusal_{kind}"] = refusal_rate(prompts, answers[name, kind])
        report[f"{name}_perplexity_on_base_answers"] = perplexity(model, harmless, answers["base", "harmless"])
    report["perplexity_ratio"] = (report["organism_perplexity_on_base_answers"]
                                  / report["base_perplexity_on_base_answers"])
    return report


def main(argv: list[str] | None = None) -> dict:
    settings = parse_settings(OrganismSettings, argv, __doc__)
    check_layers(settings.layers, layer_count(settings.model), settings.model)
    record = measure(settings) if settings.evaluate else train(settings)
    print(json.dumps(record, indent=2))
    return record


def measure(settings: OrganismSettings) -> dict:
    """:func:`evaluate` on ``settings.evaluate`` prompts of each kind, written to ``evaluation.json`` in the
    adapter's folder (an existing file is replaced only with ``overwrite``)."""
    out = settings.adapter_folder()
    if not (out / "adapter_config.json").is_file():
        raise FileNotFoundError(f"no refusal adapter at {out} to evaluate; train one with "
                                f"`python -m steering.organism --out {out}` or point --out at one")
    prepare_run_folder(out, ("evaluation.json",), settings.overwrite)
    report = evaluate(settings.evaluate, device=settings.device, adapter=out, model_name=settings.model)
    atomic_write_json(out / "evaluation.json", report)
    return report


if __name__ == "__main__":
    run_cli(main, kept="the adapter is renamed into place only once trained: nothing half-written is left")
