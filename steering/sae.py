"""Sparse autoencoders (SAEs) on the residual stream: train, save, load, evaluate.

Training uses SAELens's own machinery: a ``TrainingSAE`` (``StandardTrainingSAE``: ReLU + L1, or
``TopKTrainingSAE``) stepped by ``SAETrainer`` through its public seams (``step``, ``maybe_reset_sparsity``,
``set_final_sae_metadata``, ``activation_scaler``), fed from an in-memory activation tensor instead of SAELens's
``ActivationsStore`` (which needs a HookedTransformer and a hub dataset). The result is converted to SAELens's
inference class (``StandardSAE`` / ``TopKSAE``), so ``encode`` / ``decode`` and SAELens tooling work as usual.

An SAE acts at its own hook point, ``sae.cfg.metadata.hook_name`` (SAELens's convention, see :func:`sae_hook_name`):
the residual stream entering block L (``blocks.L.hook_resid_pre``, the shipped SAEs) or leaving it
(``blocks.L.hook_resid_post``, e.g. Gemma Scope's ``layer_L`` residual SAEs). Evaluation splices the reconstruction
into ``model.hf_model`` there (:func:`steering.hooks.replace_residual`).
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from sae_lens import SAE, StandardTrainingSAE, StandardTrainingSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.config import LoggingConfig, SAETrainerConfig
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME
from sae_lens.evals import ExplainedVarianceCalculator
from sae_lens.saes.sae import SAEMetadata, TrainingSAE
from sae_lens.training.sae_trainer import SAETrainer
from safetensors import SafetensorError

from probes.cli_args import non_negative_float, positive_float, positive_int
from probes.datasets import DATA_DIR
from probes.files import atomic_folder
from probes.forward import IGNORE, answer_nll, pad_id, pad_token_ids, text_token_ids
from probes.models import ModelHandle
from probes.progress import progress_bar
from probes.settings import Settings, setting
from steering.hooks import replace_residual, residual_point

ARCHITECTURES = ("standard", "topk")
SAE_DIR = DATA_DIR / "sae"  # shipped SAEs: SAE_DIR / <model name> / layer_<L>


# ---------------------------------------------------------------- training

def _check_acts(acts: torch.Tensor, d_in: int | None = None) -> None:
    if not isinstance(acts, torch.Tensor) or acts.dim() != 2:
        raise ValueError(f"activations must be a 2-D tensor [n_tokens, d_in], got "
                         f"{tuple(acts.shape) if isinstance(acts, torch.Tensor) else type(acts).__name__}")
    if acts.shape[0] == 0:
        raise ValueError("the activation tensor is empty")
    if d_in is not None and acts.shape[1] != d_in:
        raise ValueError(f"activations have width {acts.shape[1]}, the SAE expects d_in={d_in}")
    if not torch.isfinite(acts).all():
        raise ValueError("activations contain NaN or infinite values")


def _training_sae(settings: SAESettings, d_in: int, l1_warm_up_steps: int, device: torch.device,
                  metadata: dict) -> TrainingSAE:
    """A fresh SAELens training SAE of the settings' architecture (weights from the current torch RNG)."""
    common = dict(d_in=d_in, d_sae=settings.d_sae, device=str(device), dtype="float32",
                  metadata=SAEMetadata(**metadata))
    if settings.architecture == "standard":
        return StandardTrainingSAE(StandardTrainingSAEConfig(
            l1_coefficient=settings.l1, l1_warm_up_steps=l1_warm_up_steps, **common))
    return TopKTrainingSAE(TopKTrainingSAEConfig(k=settings.k, aux_loss_coefficient=settings.aux, **common))


def _batches(acts: torch.Tensor, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless shuffled full batches of ``acts`` (float32), a new permutation each epoch: SAELens's data provider."""
    n = acts.shape[0]
    usable = n - n % batch_size
    while True:
        order = torch.randperm(n, generator=generator)[:usable].to(acts.device)
        for idx in order.split(batch_size):
            yield acts[idx].float()


def _inference_sae(training: TrainingSAE) -> SAE:
    """SAELens's inference SAE with the trained weights (the same conversion as ``save_inference_model``)."""
    state = {name: tensor.detach().clone() for name, tensor in training.state_dict().items()}
    training.process_state_dict_for_saving_inference(state)
    sae = SAE.from_dict(training.cfg.get_inference_sae_cfg_dict())
    sae.load_state_dict(state)
    return sae.eval()


@dataclass(kw_only=True)
class SAESettings(Settings):
    """How an SAE is trained. The defaults trained the shipped SAEs (``steering.train_saes``), from Python as from
    the command line."""

    d_sae: int = setting(4096, "latents of each SAE", parse=positive_int)
    architecture: str = setting("topk", "standard: ReLU with an L1 penalty on decoder-norm-weighted latents; topk: "
                                        "the k largest latents are kept", choices=ARCHITECTURES)
    k: int = setting(32, "active latents per token (topk)", parse=positive_int)
    l1: float = setting(5.0, "L1 coefficient (standard)", parse=non_negative_float)
    aux: float = setting(1.0, "weight of the AuxK loss that revives dead latents (topk; 0 turns it off)",
                         parse=non_negative_float)
    dead_window: int = setting(200_000, "training tokens without firing after which a latent counts as dead",
                               parse=positive_int)
    epochs: float = setting(5.0, "passes over the training activations", parse=positive_float)
    sae_batch_tokens: int = setting(1024, "tokens per SAE training step", parse=positive_int)
    lr: float = setting(1e-3, "learning rate (Adam)", parse=positive_float)
    l1_warm_up_fraction: float = setting(0.05, "share of the steps over which the L1 penalty warms up (standard)",
                                         parse=non_negative_float)
    lr_decay_fraction: float = setting(0.2, "share of the last steps over which the learning rate decays to 0",
                                       parse=non_negative_float)
    normalize: bool = setting(True, "train on activations scaled to mean norm sqrt(d_in), the scale folded into "
                                    "the weights afterwards (--no-normalize: as read)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if min(self.d_sae, self.sae_batch_tokens, self.epochs, self.lr, self.dead_window) <= 0 \
                or min(self.l1, self.aux, self.l1_warm_up_fraction, self.lr_decay_fraction) < 0:
            raise ValueError(f"d_sae, sae_batch_tokens, epochs, lr and dead_window must be positive, l1, aux and the "
                             f"fractions non-negative, got {self.to_dict()}")
        if self.architecture == "topk" and not 1 <= self.k <= self.d_sae:
            raise ValueError(f"k must be in 1..d_sae={self.d_sae} (topk), got {self.k}")


def train_sae(acts: torch.Tensor, settings: SAESettings | None = None, *, metadata: dict | None = None,
              seed: int = 0, device: str | torch.device | None = None, progress: bool = True) -> SAE:
    """Train an SAE on activations ``[n_tokens, d_in]`` with SAELens's trainer, as ``settings`` say (default:
    :class:`SAESettings`, the shipped SAEs' settings); returns SAELens's inference SAE.

    architecture: ``"standard"`` (ReLU with an L1 penalty of ``l1`` on decoder-norm-weighted latents) or ``"topk"``
    (the ``k`` largest latents are kept; ``l1`` is unused). ``epochs`` passes over the data in shuffled batches of
    ``sae_batch_tokens``; the L1 penalty warms up over the first ``l1_warm_up_fraction`` of the steps and the
    learning rate decays linearly to 0 over the last ``lr_decay_fraction`` (as in Anthropic's April 2024 update).
    With ``normalize``, activations are scaled to mean norm sqrt(d_in) during training (so ``l1`` means the same at
    every layer) and the scale is folded into the weights afterwards.

    Dead latents: SAELens's trainer counts a latent dead once it has not fired for ``dead_window`` training tokens
    (rounded to whole batches); a top-k SAE then trains its dead latents to reconstruct the residual error (the
    AuxK loss of Gao et al., 2024, weighted by ``aux``; 0 turns it off). ``metadata`` (e.g. ``model_name``,
    ``layer`` and ``hook_name``, the hook point ``acts`` were read at, which decides where the SAE is applied) is
    stored in ``sae.cfg.metadata`` together with the training settings.
    """
    _check_acts(acts)
    settings = settings or SAESettings()
    device = torch.device(device) if device is not None else acts.device
    n, d_in = acts.shape
    batch_size = min(settings.sae_batch_tokens, n)
    steps = max(1, round(settings.epochs * n / batch_size))
    dead_window = max(1, -(-settings.dead_window // batch_size))
    record = dict(architecture=settings.architecture, d_sae=settings.d_sae, epochs=settings.epochs,
                  batch_size=batch_size, lr=settings.lr, steps=steps, n_tokens=n, normalize=settings.normalize,
                  seed=seed, dead_window_steps=dead_window,
                  **({"l1_coefficient": settings.l1} if settings.architecture == "standard" else
                     {"k": settings.k, "aux_coefficient": settings.aux}))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        training = _training_sae(settings, d_in, int(settings.l1_warm_up_fraction * steps), device,
                                 {**(metadata or {}), "training": record})
    data = _batches(acts.to(device), batch_size, torch.Generator().manual_seed(seed))
    trainer = SAETrainer(cfg=_trainer_config(steps, batch_size, settings.lr,
                                             int(settings.lr_decay_fraction * steps), dead_window, device),
                         sae=training, data_provider=data)
    if settings.normalize:
        trainer.activation_scaler.scaling_factor = d_in ** 0.5 / acts.float().norm(dim=-1).mean().item()
    for _ in progress_bar(range(steps), desc="train SAE", progress=progress):
        trainer.maybe_reset_sparsity()
        trainer.step(next(data))
        trainer.n_training_steps += 1
    if trainer.activation_scaler.scaling_factor is not None:
        training.fold_activation_norm_scaling_factor(trainer.activation_scaler.scaling_factor)
    trainer.set_final_sae_metadata()
    return _inference_sae(training)


def _trainer_config(steps: int, batch_size: int, lr: float, decay_steps: int, dead_window: int,
                    device: torch.device) -> SAETrainerConfig:
    """SAELens trainer settings: Adam, constant LR with a final linear decay, no wandb, no checkpoints."""
    return SAETrainerConfig(total_training_samples=steps * batch_size, train_batch_size_samples=batch_size, lr=lr,
                            lr_end=lr, lr_decay_steps=decay_steps, device=str(device),
                            dead_feature_window=dead_window, feature_sampling_window=max(dead_window, 2000),
                            logger=LoggingConfig(log_to_wandb=False))


# ---------------------------------------------------------------- files

def float16_copy(sae: SAE) -> SAE:
    """A copy of ``sae`` in float16, as :func:`save_sae` stores it (evaluate ``float16_copy(sae).float()`` to score
    the shipped file rather than the float32 weights training ended with)."""
    return copy.deepcopy(sae).to(dtype=torch.float16)


def save_sae(sae: SAE, path: str | os.PathLike, metadata: dict | None = None, overwrite: bool = False) -> Path:
    """Write ``sae`` with SAELens's ``save_model`` (float16 safetensors + ``cfg.json``) into the folder ``path``.

    ``metadata`` (JSON-serialisable: model name, hook name, layer, eval numbers, ...) is merged into
    ``cfg.metadata``. Written into a temporary folder beside ``path`` and renamed into place, so a failed save
    leaves nothing half-written; with ``overwrite`` an existing folder is replaced only once the new one is complete.
    """
    path = Path(path)
    if path.exists() and not overwrite:  # checked before any work
        raise FileExistsError(f"{path} exists; pass overwrite=True or choose another path")
    try:
        json.dumps(metadata or {}, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"metadata must be JSON-serialisable (no NaN): {e}") from e
    stored = float16_copy(sae).to(device="cpu")
    if not all(torch.isfinite(t).all() for t in stored.state_dict().values()):
        raise ValueError("the SAE weights overflow float16 (or are not finite); they cannot be stored in float16")
    for key, value in (metadata or {}).items():
        stored.cfg.metadata[key] = value
    with atomic_folder(path, overwrite) as tmp:
        stored.save_model(tmp)
    return path


def load_sae(path: str | os.PathLike, device: str | torch.device = "cpu") -> SAE:
    """An SAE saved by :func:`save_sae` (or any SAELens ``save_model`` folder), in float32 on ``device``.

    Raises FileNotFoundError naming the missing file, and ValueError for a file that cannot be read (truncated,
    corrupt) or weights that do not match the config.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no SAE folder at {path}")
    missing = [name for name in (SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME) if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{path} is not a complete SAE folder: missing {', '.join(missing)}")
    try:
        return SAE.load_from_disk(path, device=str(device), dtype="float32").eval()
    except (json.JSONDecodeError, SafetensorError, RuntimeError, KeyError, TypeError) as e:
        raise ValueError(f"cannot read the SAE in {path} (truncated or corrupt file, or weights that do not match "
                         f"{SAE_CFG_FILENAME}?): {e}") from e


def load_pretrained_sae(release: str, sae_id: str, device: str | torch.device = "cpu") -> SAE:
    """A published SAE through SAELens (``SAE.from_pretrained``), e.g. Gemma Scope or Llama Scope.

    ``release`` / ``sae_id`` as listed in SAELens's pretrained directory, e.g. ``("gemma-scope-2b-pt-res-canonical",
    "layer_12/width_16k/canonical")`` or ``("llama_scope_lxr_8x", "l15r_8x")``. Needs the network or a local
    Hugging Face cache; unknown names raise SAELens's ValueError listing the valid ones.
    """
    try:
        return SAE.from_pretrained(release, sae_id, device=str(device)).eval()
    except OSError as e:
        raise OSError(f"cannot download SAE {release!r} / {sae_id!r}: no network access and not in the local "
                      f"Hugging Face cache ({type(e).__name__}). Connect once to cache it, or train one with "
                      f"steering.sae.train_sae.") from e


# ---------------------------------------------------------------- hook point

def _describe(sae: SAE) -> str:
    """A short name for error messages: class, sizes and, where recorded, the model it was trained on."""
    model_name = getattr(sae.cfg.metadata, "model_name", None)
    return (f"the {type(sae).__name__} (d_in={sae.cfg.d_in}, d_sae={sae.cfg.d_sae}"
            + (f", model {model_name}" if model_name else "") + ")")


def sae_hook_name(sae: SAE, model: ModelHandle | None = None) -> str:
    """The hook point the SAE was trained on, ``sae.cfg.metadata.hook_name`` (e.g. ``blocks.12.hook_resid_post``):
    where it encodes and where edits through it land. With ``model``, it is also checked to be a residual-stream
    point the workbench can edit in that model (:func:`steering.hooks.residual_point`)."""
    hook_name = getattr(sae.cfg.metadata, "hook_name", None)
    if not hook_name:
        raise ValueError(f"{_describe(sae)} records no hook point, so where it reads the model is unknown: set "
                         "sae.cfg.metadata.hook_name (e.g. 'blocks.12.hook_resid_pre'), or pass "
                         "metadata={'hook_name': ...} to train_sae")
    if model is not None:
        try:
            residual_point(model, hook_name)
        except ValueError as e:
            raise ValueError(f"{_describe(sae)}: {e}") from e
    return hook_name


# ---------------------------------------------------------------- evaluation

def reconstruct(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """``decode(encode(x))`` in the SAE's dtype and device, returned in ``x``'s dtype and device."""
    return sae.decode(sae.encode(x.to(device=sae.device, dtype=sae.dtype))).to(device=x.device, dtype=x.dtype)


@torch.no_grad()
def evaluate_sae(sae: SAE, acts: torch.Tensor, batch_size: int = 4096) -> dict[str, float]:
    """Reconstruction quality on (held-out) activations ``[n_tokens, d_in]``.

    ``explained_variance`` = 1 - E||x - x_hat||^2 / Var(x) (SAELens's ``ExplainedVarianceCalculator``), ``l0`` =
    mean number of active latents per token, ``mse`` = E||x - x_hat||^2, ``dead_fraction`` = share of latents that
    never fire on these activations.
    """
    _check_acts(acts, sae.cfg.d_in)
    variance = ExplainedVarianceCalculator()
    active = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=sae.device)
    l0_sum = 0.0
    for batch in acts.split(batch_size):
        batch = batch.to(device=sae.device, dtype=torch.float32)
        latents = sae.encode(batch)
        variance.add_batch(sae.decode(latents).float(), batch)
        fired = latents != 0
        l0_sum += fired.sum().item()
        active |= fired.any(0)
    n = acts.shape[0]
    return {"explained_variance": variance.compute(), "l0": l0_sum / n,
            "mse": variance.sum_squared_residual / n, "dead_fraction": 1 - active.float().mean().item(),
            "n_tokens": n}


def _token_ids(model: ModelHandle, prompts: Sequence[str] | Sequence[Sequence[int]]) -> list[list[int]]:
    """Token ids of texts (with the tokenizer's special tokens) or of lists of ids given as they are."""
    if isinstance(prompts, str) or not len(prompts):
        raise ValueError("give a non-empty list of texts or of token-id lists")
    if all(isinstance(p, str) for p in prompts):
        return text_token_ids(model, prompts)
    if all(isinstance(p, (list, tuple, torch.Tensor)) for p in prompts):
        return [[int(t) for t in p] for p in prompts]
    raise ValueError("every prompt must be a string (or every prompt a list of token ids)")


def sae_positions(model: ModelHandle, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Where the SAE acts in right-padded ``input_ids``: real tokens except the first of each sequence and BOS.

    The first token is an attention sink with a residual norm tens of times the others (with or without a BOS
    token); training on it would dominate the normalisation and the explained variance, so SAEs skip it.
    """
    keep = mask.clone()
    keep[:, 0] = False
    bos = model.tokenizer.bos_token_id
    return keep & (input_ids != bos) if bos is not None else keep


def _summed_ce(model: ModelHandle, input_ids: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
    """Summed next-token cross-entropy over real target tokens, and their count."""
    logits = model.hf_model(input_ids=input_ids, attention_mask=mask.long(), use_cache=False).logits
    return answer_nll(logits, input_ids.masked_fill(~mask, IGNORE)).item(), int(mask[:, 1:].sum())


@torch.no_grad()
def reconstruction_ce(model: ModelHandle, sae: SAE, prompts: Sequence[str] | Sequence[Sequence[int]],
                      batch_size: int = 8, max_length: int = 256, progress: bool = True) -> dict[str, float]:
    """Next-token cross-entropy with the residual at the SAE's hook point (:func:`sae_hook_name`) clean,
    SAE-reconstructed, zero-ablated.

    ``prompts``: held-out texts or token-id lists, each cut to ``max_length`` tokens. The reconstruction (resp.
    zeros) replaces the residual at every real token except BOS. ``ce_loss_recovered`` = (CE_zero - CE_sae) /
    (CE_zero - CE_clean): 1 for a perfect reconstruction, 0 for one as bad as zeros.
    """
    if sae.cfg.d_in != model.d_model:
        raise ValueError(f"the SAE has d_in={sae.cfg.d_in}, the model d_model={model.d_model}")
    hook_name = sae_hook_name(sae, model)
    ids = [seq[:max_length] for seq in _token_ids(model, prompts)]
    if any(len(seq) < 2 for seq in ids):
        raise ValueError("every prompt needs at least 2 tokens to score next-token loss")
    totals = {"ce_clean": 0.0, "ce_sae": 0.0, "ce_zero_ablation": 0.0}
    count = 0
    for start in progress_bar(range(0, len(ids), batch_size), desc="reconstruction loss", unit="batch",
                              progress=progress):
        input_ids, mask = pad_token_ids(ids[start:start + batch_size], pad_id(model), "right", model.device)
        mask = mask.bool()
        where = sae_positions(model, input_ids, mask).unsqueeze(-1)
        edits = {"ce_clean": None, "ce_sae": lambda h, where=where: torch.where(where, reconstruct(sae, h), h),
                 "ce_zero_ablation": lambda h, where=where: torch.where(where, torch.zeros_like(h), h)}
        for name, edit in edits.items():
            with replace_residual(model, {hook_name: edit} if edit else {}):
                ce, n = _summed_ce(model, input_ids, mask)
            totals[name] += ce
        count += n
    result = {name: total / count for name, total in totals.items()}
    gap = result["ce_zero_ablation"] - result["ce_clean"]
    if gap <= 0:
        raise ValueError(f"zero-ablating {hook_name} does not raise the loss ({result}): CE recovered is undefined")
    result["ce_loss_recovered"] = (result["ce_zero_ablation"] - result["ce_sae"]) / gap
    return result


def ce_loss_recovered(model: ModelHandle, sae: SAE, prompts: Sequence[str] | Sequence[Sequence[int]],
                      batch_size: int = 8, max_length: int = 256) -> float:
    """Fraction of cross-entropy loss recovered by the SAE at its hook point (see :func:`reconstruction_ce`)."""
    return reconstruction_ce(model, sae, prompts, batch_size, max_length)["ce_loss_recovered"]
