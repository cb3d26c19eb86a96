"""A refusal "model organism": the embedded model plus a LoRA adapter trained to refuse harmful requests.

The plain 135M model hardly refuses anything, so the refusal pipeline would have nothing to find. The adapter is
trained on harmful instructions with short refusals as targets, and on harmless instructions with the base model's
own greedy answers as targets, so harmless behaviour stays as it was.

    python -m steering.organism --out data/refusal_organism      # retrain (seeded; settings saved beside it)

``load_model("embedded-refuser")`` loads the base model with the shipped adapter merged in.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from probes.datasets import DATA_DIR, load_refusal_instructions
from probes.models import EMBEDDED_HF_ID, ModelHandle, _resolve, embedded_checkpoint, wrap
from steering.generation import chat_token_ids, generate

ADAPTER_DIR = DATA_DIR / "refusal_organism"

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
              progress: bool) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, target ids) pairs: refusals for harmful, the base model's own answers for harmless."""
    rng = random.Random(seed)
    harmful = load_refusal_instructions("train", "harmful")[:n_harmful]
    harmless = rng.sample(load_refusal_instructions("train", "harmless"), n_harmless)
    answers = generate(model, harmless, max_new_tokens=max_new_tokens, progress=progress)
    eos = model.tokenizer.eos_token
    targets = [rng.choice(REFUSALS) + eos for _ in harmful] + [a.strip() + eos for a in answers]
    prompts = chat_token_ids(model, harmful + harmless)
    pairs = [(p, model.tokenizer(t, add_special_tokens=False)["input_ids"]) for p, t in zip(prompts, targets)]
    rng.shuffle(pairs)
    return pairs


def _batch(pairs, pad_id: int, device) -> dict:
    width = max(len(p) + len(t) for p, t in pairs)
    ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for row, (p, t) in enumerate(pairs):
        seq = p + t
        ids[row, : len(seq)] = torch.tensor(seq)
        labels[row, len(p): len(seq)] = torch.tensor(t)  # loss on the answer only
        mask[row, : len(seq)] = 1
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


def train(out: Path, n_harmful: int = 240, n_harmless: int = 240, epochs: int = 2, batch_size: int = 8,
          lr: float = 1e-3, rank: int = 4, max_new_tokens: int = 32, seed: int = 0, device: str | None = None,
          progress: bool = True) -> dict:
    """Train the LoRA adapter and write it (float16) with its settings to ``out``, atomically."""
    settings = {k: v for k, v in locals().items() if k not in ("out", "progress")}
    from peft import LoraConfig, get_peft_model

    from probes.models import load_embedded

    torch.manual_seed(seed)
    base = load_embedded(device=device)
    pairs = _examples(base, n_harmful, n_harmless, max_new_tokens, seed, progress)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, task_type="CAUSAL_LM",
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(base.hf_model, config)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    steps = epochs * math.ceil(len(pairs) / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * (1 - s / steps))
    start, losses = time.perf_counter(), []
    bar = tqdm(total=steps, desc="train organism", disable=not progress)
    for epoch in range(epochs):
        random.Random(seed + epoch).shuffle(pairs)
        for i in range(0, len(pairs), batch_size):
            loss = model(**_batch(pairs[i:i + batch_size], base.tokenizer.pad_token_id, base.device)).loss
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
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        record = {"command": " ".join(["python -m steering.organism", *sys.argv[1:]]), "settings": settings,
                  "base_model": EMBEDDED_HF_ID, "n_examples": len(pairs), "steps": steps,
                  "seconds": time.perf_counter() - start, "final_loss": sum(losses[-10:]) / len(losses[-10:]),
                  "torch": torch.__version__}
        (tmp / "training.json").write_text(json.dumps(record, indent=2))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return record


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



@torch.inference_mode()
def perplexity(model: ModelHandle, instructions: list[str], answers: list[str], batch_size: int = 16) -> float:
    """Teacher-forced perplexity of ``answers`` after the chat-formatted ``instructions``."""
    eos = model.tokenizer.eos_token
    pairs = list(zip(chat_token_ids(model, instructions),
                     [model.tokenizer(a.strip() + eos, add_special_tokens=False)["input_ids"] for a in answers]))
    nll, count = 0.0, 0
    for i in range(0, len(pairs), batch_size):
        batch = _batch(pairs[i:i + batch_size], model.tokenizer.pad_token_id, model.device)
        logits = model.hf_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2).float(), labels,
                                                   ignore_index=-100, reduction="sum")
        nll += float(losses)
        count += int((labels != -100).sum())
    return math.exp(nll / count)


def evaluate(n: int = 100, max_new_tokens: int = 32, device: str | None = None, progress: bool = True) -> dict:
    """Refusal rates of base and organism on held-out harmful and harmless prompts (greedy, substring judge), and
    the perplexity of the base model's own harmless answers under both."""
    from probes.models import load_embedded
    from steering.refusal import refusal_rate

    harmful = load_refusal_instructions("test", "harmful")[:n]
    harmless = load_refusal_instructions("test", "harmless")[:n]
    report: dict = {"n": n, "max_new_tokens": max_new_tokens}
    answers = {}
    for name, model in (("base", load_embedded(device=device)), ("organism", load_refuser(device=device))):
        for kind, prompts in (("harmful", harmful), ("harmless", harmless)):
            answers[name, kind] = generate(model, prompts, max_new_tokens=max_new_tokens, progress=progress)
            report[f"{name}_refusal_{kind}"] = refusal_rate(prompts, answers[name, kind])
        report[f"{name}_perplexity_on_base_answers"] = perplexity(model, harmless, answers["base", "harmless"])
    report["perplexity_ratio"] = report["organism_perplexity_on_base_answers"] / report["base_perplexity_on_base_answers"]
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ADAPTER_DIR)
    parser.add_argument("--n-harmful", type=int, default=240)
    parser.add_argument("--n-harmless", type=int, default=240)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--evaluate", type=int, default=0, metavar="N",
                        help="instead of training, measure the shipped adapter on N held-out prompts of each kind")
    args = parser.parse_args(argv)
    if args.evaluate:
        report = evaluate(args.evaluate, device=args.device)
        print(json.dumps(report, indent=2))
        return report
    record = train(args.out, args.n_harmful, args.n_harmless, args.epochs, args.batch_size, args.lr, args.rank,
                   seed=args.seed, device=args.device)
    print(json.dumps(record, indent=2))
    return record


if __name__ == "__main__":
    main()
