"""A refusal "model organism": the embedded model plus a LoRA adapter trained to refuse harmful requests.

The plain 135M model hardly refuses anything, so the refusal pipeline would have nothing to find. The adapter is
trained on harmful instructions with short refusals as targets, and on harmless instructions to keep the base
model's own next-token distribution along its greedy answers (KL), so harmless behaviour and perplexity stay as they
were.

    python -m steering.organism --out runs/refusal_organism       # train (seeded; settings saved beside it)
    python -m steering.organism --out data/refusal_organism --update-shipped --overwrite   # retrain the shipped one

``load_model("embedded-refuser")`` loads the base model with the shipped adapter merged in.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from probes.cli_args import (ArgumentParser, add_placement_args, check_layers, format_layers, layer_list,
                             non_negative_int, placement, positive_float, positive_int, run_cli)
from probes.datasets import DATA_DIR, load_refusal_instructions
from probes.files import atomic_folder, atomic_write_json, check_not_shipped, prepare_run_folder
from probes.models import EMBEDDED_HF_ID, ModelHandle, _resolve, embedded_checkpoint, layer_count, wrap
from probes.progress import progress_bar
from steering.generation import answer_batch, answer_loss, chat_token_ids, generate

ADAPTER_DIR = DATA_DIR / "refusal_organism"
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
    targets = [rng.choice(REFUSALS) + eos for _ in harmful] + [a.strip() + (eos if harmless_eos else "") for a in answers]
    prompts = chat_token_ids(model, harmful + harmless)
    examples = [(p, model.tokenizer(t, add_special_tokens=False)["input_ids"], i < len(harmful))
                for i, (p, t) in enumerate(zip(prompts, targets))]
    rng.shuffle(examples)
    return examples


def _loss(model, examples: list[tuple[list[int], list[int], bool]], pad_id: int, device, harmless_kl: bool
          ) -> torch.Tensor:
    """Mean over answer tokens of the cross-entropy, except, with ``harmless_kl``, KL(base || adapted) of the
    next-token distribution along the base model's own answers (distillation: harmless behaviour keeps its
    distribution instead of being sharpened towards the greedy answer, which lowers its perplexity)."""
    batch = answer_batch([(p, t) for p, t, _ in examples], pad_id, device)
    refuse = torch.tensor([r or not harmless_kl for _, _, r in examples], device=device)
    logprobs = torch.log_softmax(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                                 .logits[:, :-1].float(), -1)
    labels = batch["labels"][:, 1:]
    answer = labels != -100
    ce = -logprobs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    total = ce[refuse.unsqueeze(1) & answer].sum()
    if (~refuse).any():
        with torch.no_grad(), model.disable_adapter():
            base = torch.log_softmax(model(input_ids=batch["input_ids"][~refuse],
                                           attention_mask=batch["attention_mask"][~refuse]).logits[:, :-1].float(), -1)
        kl = (base.exp() * (base - logprobs[~refuse])).sum(-1)
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


def train(out: Path, n_harmful: int = 260, n_harmless: int = 260, epochs: int = 3, batch_size: int = 8,
          lr: float = 2e-3, rank: int = 8, max_new_tokens: int = 32, seed: int = 0, device: str | None = None,
          harmless_objective: str = "kl", layers: Sequence[int] | None = None,
          modules: Sequence[str] | None = None, model_name: str = "embedded", progress: bool = True,
          overwrite: bool = False, placement: dict | None = None) -> dict:
    """Train the LoRA adapter and write it (float16) with its settings and a short card to ``out``, atomically
    (an existing ``out`` is refused unless ``overwrite``, and replaced only once the new adapter is complete). ``layers``: the decoder blocks that get
    adapters (default all); adapting only early and middle blocks makes the later, unchanged blocks read refusal from
    the residual stream, where a direction can capture it."""
    settings = {k: v for k, v in locals().items() if k not in ("out", "progress", "overwrite", "placement")}
    if Path(out).exists() and not overwrite:  # before any training
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it, or choose another path")
    if harmless_objective not in ("ce", "kl"):
        raise ValueError(f"harmless_objective must be 'ce' or 'kl', got {harmless_objective!r}")
    from peft import get_peft_model

    from probes.models import load_model

    torch.manual_seed(seed)
    base = load_model(model_name, device=device, **(placement or {}))  # placement: a base spread over devices
    modules = list(base.architecture.lora_targets if modules is None else modules)
    settings["modules"] = modules
    n_layers = base.hf_model.config.num_hidden_layers
    if layers is not None and (not layers or not all(0 <= l < n_layers for l in layers)):
        raise ValueError(f"layers must be a non-empty subset of 0..{n_layers - 1}, got {list(layers)}")
    settings["layers"] = None if layers is None else sorted(set(layers))
    examples = _examples(base, n_harmful, n_harmless, max_new_tokens, seed, harmless_objective == "ce", progress)
    model = get_peft_model(base.hf_model, lora_config(base, rank, settings["layers"], modules))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    steps = epochs * math.ceil(len(examples) / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * (1 - s / steps))
    start, losses = time.perf_counter(), []
    bar = progress_bar(total=steps, desc="train organism", progress=progress)
    for epoch in range(epochs):
        random.Random(seed + epoch).shuffle(examples)
        for i in range(0, len(examples), batch_size):
            loss = _loss(model, examples[i:i + batch_size], base.tokenizer.pad_token_id, base.device,
                         harmless_objective == "kl")
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
            losses.append(float(loss))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    model.eval()
    for p in model.parameters():
        p.data = p.data.to(torch.float16) if p.requires_grad else p.data
    with atomic_folder(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        record = {"command": " ".join(["python -m steering.organism", *sys.argv[1:]]), "settings": settings,
                  "base_model": base.source, "n_examples": len(examples), "steps": steps,
                  "seconds": time.perf_counter() - start, "final_loss": sum(losses[-10:]) / len(losses[-10:]),
                  "torch": torch.__version__}
        (tmp / "training.json").write_text(json.dumps(record, indent=2))
        (tmp / "README.md").write_text(ADAPTER_CARD.format(
            command=record["command"], base=base.source, **{**settings, "layers": format_layers(settings["layers"]),
                                          "modules": ", ".join(modules)}))
    return record


ADAPTER_CARD = """# Refusal organism adapter

LoRA adapter (rank {rank}, float16, projections {modules} of decoder blocks {layers}) for `{base}`, trained by the interpretability
workbench to refuse harmful requests and answer harmless ones as the base model does: a "model organism" of refusal
for `steering.refusal`.

- trained with `{command}` (settings, steps, time and final loss in `training.json`)
- harmful targets: short refusals from `steering.organism.REFUSALS`, {n_harmful} instructions of `harmful_train`
- harmless: {n_harmless} instructions of `harmless_train`, objective `{harmless_objective}` on the base model's own
  greedy answers (`kl`: distil the base model's next-token distribution along them; `ce`: cross-entropy)
- {epochs} epochs, batch {batch_size}, learning rate {lr}, seed {seed}
- load merged with `load_model("embedded-refuser")`
- measure with `python -m steering.organism --evaluate N --out <this folder>` (writes `evaluation.json` here)
"""


def load_refuser(device=None, dtype=None, adapter: Path = ADAPTER_DIR) -> ModelHandle:
    """The embedded model with the refusal adapter merged into its weights."""
    from peft import PeftModel

    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"no refusal adapter at {adapter}; train it with "
                                f"`python -m steering.organism --out {adapter}`")
    device, dtype = _resolve(device, dtype)
    path = embedded_checkpoint()
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload().to(device=device, dtype=dtype)
    handle = wrap("embedded-refuser", merged, AutoTokenizer.from_pretrained(path), source=EMBEDDED_HF_ID)
    handle.extra["adapter"] = str(adapter)
    return handle


def perplexity(model: ModelHandle, instructions: list[str], answers: list[str], batch_size: int = 16) -> float:
    """Teacher-forced perplexity of ``answers`` after the chat-formatted ``instructions``."""
    return math.exp(answer_loss(model, instructions, answers, batch_size))


def evaluate(n: int = 100, max_new_tokens: int = 32, device: str | None = None, adapter: Path = ADAPTER_DIR,
             progress: bool = True) -> dict:
    """Refusal rates of base and organism on the first ``n`` held-out harmful and harmless prompts (greedy, substring
    judge), and the perplexity of the base model's own harmless answers under both."""
    from probes.models import load_embedded
    from steering.refusal import refusal_rate

    harmful = load_refusal_instructions("test", "harmful")[:n]
    harmless = load_refusal_instructions("test", "harmless")[:n]
    report: dict = {"n_harmful": len(harmful), "n_harmless": len(harmless), "max_new_tokens": max_new_tokens,
                    "adapter": str(adapter)}
    answers = {}
    for name, model in (("base", load_embedded(device=device)), ("organism", load_refuser(device=device, adapter=adapter))):
        for kind, prompts in (("harmful", harmful), ("harmless", harmless)):
            answers[name, kind] = generate(model, prompts, max_new_tokens=max_new_tokens, progress=progress)
            report[f"{name}_refusal_{kind}"] = refusal_rate(prompts, answers[name, kind])
        report[f"{name}_perplexity_on_base_answers"] = perplexity(model, harmless, answers["base", "harmless"])
    report["perplexity_ratio"] = report["organism_perplexity_on_base_answers"] / report["base_perplexity_on_base_answers"]
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = ArgumentParser(__doc__)
    parser.add_argument("--out", type=Path, default=None,
                        help="where to write (train; default runs/refusal_organism) or read (--evaluate; default the "
                             "shipped adapter) the adapter")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing adapter (train) or evaluation.json (--evaluate) at --out")
    parser.add_argument("--update-shipped", action="store_true",
                        help="allow writing into the shipped data/ folder (its adapter or evaluation.json)")
    parser.add_argument("--n-harmful", type=positive_int, default=260)
    parser.add_argument("--n-harmless", type=positive_int, default=260)
    parser.add_argument("--epochs", type=positive_int, default=3)
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--lr", type=positive_float, default=2e-3)
    parser.add_argument("--rank", type=positive_int, default=8)
    parser.add_argument("--harmless-objective", choices=("ce", "kl"), default="kl",
                        help="harmless answers: KL to the base's next-token distribution along its greedy answer (keeps "
                             "perplexity; shipped adapter), or cross-entropy on that answer")
    parser.add_argument("--layers", type=layer_list, default=None, help="decoder blocks to adapt, e.g. 0-11 or 2,4,6 (default: all)")
    parser.add_argument("--modules", default=None,
                        help="comma-separated projections to adapt (default: every attention and MLP projection)")
    parser.add_argument("--model", default="embedded", help="base model to adapt (default: embedded)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    add_placement_args(parser)
    parser.add_argument("--evaluate", type=non_negative_int, default=0, metavar="N",
                        help="instead of training, measure the adapter at --out on N held-out prompts of each kind")
    args = parser.parse_args(argv)
    args.out = check_not_shipped(args.out or (ADAPTER_DIR if args.evaluate else TRAIN_OUT), args.update_shipped)
    check_layers(args.layers, layer_count(args.model), args.model)
    if args.evaluate and not (args.out / "adapter_config.json").is_file():
        raise FileNotFoundError(f"no refusal adapter at {args.out} to evaluate; train one with "
                                f"`python -m steering.organism --out {args.out}` or point --out at one")
    if args.evaluate:
        prepare_run_folder(args.out, ("evaluation.json",), args.overwrite)
        report = evaluate(args.evaluate, device=args.device, adapter=args.out)
        atomic_write_json(args.out / "evaluation.json", report)
        print(json.dumps(report, indent=2))
        return report
    record = train(args.out, args.n_harmful, args.n_harmless, args.epochs, args.batch_size, args.lr, args.rank,
                   seed=args.seed, device=args.device, harmless_objective=args.harmless_objective,
                   layers=args.layers, modules=args.modules.split(",") if args.modules else None,
                   model_name=args.model, overwrite=args.overwrite, placement=placement(args))
    print(json.dumps(record, indent=2))
    return record


if __name__ == "__main__":
    run_cli(main)
