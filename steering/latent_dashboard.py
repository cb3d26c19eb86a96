"""Latent dashboards: what an SAE latent fires on, read from text the SAE was not trained on.

One pass over a corpus serves every latent of an SAE: each token is read at the SAE's hook point
(:func:`probes.cache.extract`, positions="all", texts of like length together, with a progress bar), encoded, and
every non-zero activation kept, grouped by latent (so the storage grows with the SAE's L0, not its width). That is
cached under the workbench cache (``probes.models.cache_dir()/latent_dashboards``) in safetensors, keyed by the
SAE's weights, the corpus (its tokens; for the default corpus, its recipe and the shipped data files) and the
model's weights fingerprint, so building the same dashboards again reads neither model nor corpus. A latent's
summary then takes milliseconds: its top-activating contexts, the histogram of its activations, its firing rate, and
the logit lens of its decoder row (:mod:`probes.direction_lens`). Drawing is in :mod:`steering.dashboard_plots`.
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import plotly.graph_objects as go
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from probes.cache import extract
from probes.datasets import DATA_DIR
from probes.direction_lens import LogitLens, direction_logits, lens_of_logits, token_strings
from probes.errors import WorkbenchError, as_list
from probes.files import atomic_file
from probes.forward import pad_id, pad_token_ids, text_token_ids
from probes.models import ModelHandle, cache_dir
from probes.progress import progress_bar
from probes.provenance import weights_fingerprint
from steering import dashboard_plots
from steering.sae import sae_hook_name, sae_positions
from steering.sae_corpus import CorpusSettings, heldout_sources, mix

FORMAT = 1
DEFAULT_TOKENS = 20_000  # tokens of the default corpus
ENCODE_TOKENS = 2048  # tokens encoded at a time: [2048, d_sae] floats at most in memory
_ARRAYS = ("token_ids", "lengths", "counted", "indptr", "tokens", "values")


def training_seed(sae) -> int:
    """The seed the SAE's training corpus was drawn with (``steering.train_saes`` records it), else 0."""
    training = getattr(sae.cfg.metadata, "training", None) or {}
    return int(training.get("seed", 0)) if isinstance(training, dict) else 0


def default_corpus(model: ModelHandle, sae=None, n_tokens: int = DEFAULT_TOKENS, settings: CorpusSettings | None = None,
                   seed: int | None = None, max_length: int = 256) -> list[str]:
    """Texts the SAE was not trained on, by the SAE corpus recipe: the held-out twin of its data sources
    (:func:`steering.sae_corpus.heldout_sources` with the recipe's ``settings`` and the SAE's training ``seed``:
    conflict prompts, chat instructions, headlines and passages it never read), mixed, as many as reach
    ``n_tokens`` tokens (each text cut to ``max_length``)."""
    if n_tokens < 1:
        raise WorkbenchError(f"n_tokens must be at least 1, got {n_tokens}")
    if seed is None:
        seed = training_seed(sae) if sae is not None else 0
    texts, total = mix(heldout_sources(model, settings, seed), seed), 0
    for start in range(0, len(texts), 256):
        for j, ids in enumerate(text_token_ids(model, texts[start:start + 256], max_length)):
            total += len(ids)
            if total >= n_tokens:
                return texts[:start + j + 1]
    return texts


def default_corpus_key(model: ModelHandle, sae, n_tokens: int, max_length: int) -> dict:
    """What :func:`default_corpus` is made of, known before building it (so a cached build needs no corpus): the
    recipe's settings and seed, the budget, the chat template, and the shipped data files (name, size, mtime)."""
    files = sorted((p.relative_to(DATA_DIR).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
                   for p in DATA_DIR.rglob("*") if p.is_file())
    return {"recipe": "heldout_sources", "settings": CorpusSettings().to_dict(), "seed": training_seed(sae),
            "n_tokens": n_tokens, "max_length": max_length, "chat_template": model.chat_template,
            "data": hashlib.sha256(json.dumps(files).encode()).hexdigest()}


def _corpus_ids(model: ModelHandle, corpus: Sequence[str], max_length: int) -> list[list[int]]:
    texts = as_list(corpus, "corpus")
    if not texts:
        raise WorkbenchError("the corpus is empty: give at least one text")
    return text_token_ids(model, texts, max_length)


def _cache_path(cache: bool | str | os.PathLike, key: dict) -> Path | None:
    """Where the build of ``key`` is cached: the workbench cache (``cache=True``), a folder, or nowhere (False)."""
    if cache is False:
        return None
    folder = cache_dir() / "latent_dashboards" if cache is True else Path(cache)
    return folder / f"{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]}.safetensors"


@dataclass
class LatentActivations:
    """Every non-zero activation of every latent over a corpus, grouped by latent: latent ``i``'s are
    ``values[indptr[i]:indptr[i + 1]]`` at tokens ``tokens[...]`` (indices into ``token_ids``, increasing).
    ``token_ids``: the corpus, text after text (``lengths`` tokens each); ``counted``: where the SAE acts
    (:func:`steering.sae.sae_positions`: not a text's first token nor BOS), the tokens the firing rate counts."""

    token_ids: torch.Tensor
    lengths: torch.Tensor
    counted: torch.Tensor
    indptr: torch.Tensor
    tokens: torch.Tensor
    values: torch.Tensor

    @property
    def d_sae(self) -> int:
        return len(self.indptr) - 1

    def of(self, latent: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token indices and activations of one latent where it is non-zero."""
        start, end = int(self.indptr[latent]), int(self.indptr[latent + 1])
        return self.tokens[start:end], self.values[start:end]

    def save(self, path: Path, key: dict) -> None:
        """safetensors with ``key`` in its header, written atomically."""
        small = {"token_ids": torch.int32, "tokens": torch.int32}
        arrays = {name: getattr(self, name).to(small.get(name, getattr(self, name).dtype)).contiguous()
                  for name in _ARRAYS}
        with atomic_file(path) as tmp:
            save_file(arrays, str(tmp), metadata={"workbench": json.dumps(key, sort_keys=True)})

    @classmethod
    def load(cls, path: Path, key: dict) -> LatentActivations | None:
        """The cached activations made with ``key``, or None (no file, another key, or unreadable: then a warning)."""
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("workbench") != json.dumps(key, sort_keys=True):
                    return None
                arrays = {name: f.get_tensor(name) for name in _ARRAYS}
        except (SafetensorError, OSError, RuntimeError) as err:
            warnings.warn(f"latent dashboard cache {path} is unreadable ({err}); reading the corpus again",
                          stacklevel=3)
            return None
        return cls(**{k: v.long() if k in ("token_ids", "tokens") else v for k, v in arrays.items()})


def sae_digest(sae) -> str:
    """sha256 of the SAE's config and every weight's bytes: another SAE, or the same one retrained, differs."""
    h = hashlib.sha256(json.dumps(sae.cfg.to_dict(), sort_keys=True, default=str).encode())
    for name, tensor in sorted(sae.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}{t.dtype}{tuple(tensor.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _counted(model: ModelHandle, ids: list[list[int]]) -> torch.Tensor:
    """[n_tokens] bool over every token of ``ids``, text after text: where the SAE acts."""
    input_ids, mask = pad_token_ids(ids, pad_id(model), "right", multiple=1)
    return sae_positions(model, input_ids, mask.bool())[mask.bool()]


def _chunks(lengths: torch.Tensor, chunk_tokens: int) -> list[list[int]]:
    """Text indices, longest first, in runs of about ``chunk_tokens`` tokens: texts of like length share a batch,
    so little of each forward pass is padding."""
    chunks, current, total = [], [], 0
    for k in lengths.argsort(descending=True, stable=True).tolist():
        current.append(k)
        total += int(lengths[k])
        if total >= chunk_tokens:
            chunks.append(current)
            current, total = [], 0
    return chunks + ([current] if current else [])


def _encode(sae, acts: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row, latent, value) of every non-zero latent of ``acts`` [n, d_in] at rows where ``keep``, on the CPU."""
    weight = sae.W_dec
    z = sae.encode(acts.to(weight.device, weight.dtype))
    z = (z.to_dense() if z.is_sparse else z).masked_fill(~keep.to(z.device)[:, None], 0)
    rows, latents = z.nonzero(as_tuple=True)
    return rows.cpu(), latents.cpu(), z[rows, latents].float().cpu()


@torch.inference_mode()
def read_latents(model: ModelHandle, sae, ids: list[list[int]], chunk_tokens: int = 32_768, progress: bool = True
                 ) -> LatentActivations:
    """Every latent's non-zero activations over the token-id lists ``ids``, read at the SAE's hook point by
    :func:`probes.cache.extract`, about ``chunk_tokens`` tokens per call (texts longest first, so batches carry
    little padding), and encoded :data:`ENCODE_TOKENS` tokens at a time."""
    hook = sae_hook_name(sae, model)
    lengths = torch.tensor([len(seq) for seq in ids])
    starts, counted = lengths.cumsum(0) - lengths, _counted(model, ids)
    rows, cols, vals = [], [], []
    with progress_bar(total=int(lengths.sum()), desc="latent activations", unit="token", progress=progress) as bar:
        for chunk in _chunks(lengths, chunk_tokens):
            acts = extract(model, [ids[k] for k in chunk], [hook], positions="all", progress=False).acts[:, 0]
            where = torch.cat([torch.arange(starts[k], starts[k] + lengths[k]) for k in chunk])  # corpus positions
            for part, at in zip(acts.split(ENCODE_TOKENS), where.split(ENCODE_TOKENS), strict=True):
                r, latent, value = _encode(sae, part, counted[at])
                rows.append(at[r])
                cols.append(latent)
                vals.append(value)
            bar.update(len(where))
    rows_all, cols_all = torch.cat(rows), torch.cat(cols)
    order = torch.argsort(cols_all * len(counted) + rows_all)  # by latent, then by corpus position
    indptr = torch.zeros(sae.cfg.d_sae + 1, dtype=torch.long)
    indptr[1:] = torch.bincount(cols_all, minlength=sae.cfg.d_sae).cumsum(0)
    return LatentActivations(torch.tensor([t for seq in ids for t in seq]), lengths, counted, indptr,
                             rows_all[order], torch.cat(vals)[order])


@dataclass
class Context:
    """One top-activating context: ``tokens`` around the peak token (index ``peak`` among them), the latent's
    activation on each, and where the peak is in the corpus (``text``, ``position``)."""

    text: int
    position: int
    tokens: list[str]
    acts: list[float]
    peak: int


@dataclass
class LatentSummary:
    """What one latent does over the corpus: firing rate over the ``n_tokens`` counted tokens, the histogram of its
    non-zero activations (``counts`` over ``edges``), its top contexts and its decoder row's logit lens."""

    latent: int
    hook_name: str
    d_sae: int
    n_tokens: int
    n_firing: int
    max_activation: float
    counts: list[int]
    edges: list[float]
    contexts: list[Context]
    lens: LogitLens

    @property
    def firing_rate(self) -> float:
        return self.n_firing / max(self.n_tokens, 1)


def _windows(acts: LatentActivations, latent: int, n: int, before: int, after: int
             ) -> list[tuple[int, int, int, int]]:
    """(text, start, peak, end) token indices of the ``n`` highest activations, one per distinct window (the same
    passage repeated across texts, e.g. shared demonstrations, is shown once), highest first."""
    toks, vals = acts.of(latent)
    ends = acts.lengths.cumsum(0)
    starts = ends - acts.lengths
    texts = torch.searchsorted(ends, toks, right=True)
    seen, out = set(), []
    for j in vals.argsort(descending=True, stable=True).tolist():
        t, k = int(toks[j]), int(texts[j])
        lo, hi = max(int(starts[k]), t - before), min(int(ends[k]), t + after + 1)
        window = (tuple(acts.token_ids[lo:hi].tolist()), t - lo)
        if window not in seen:
            seen.add(window)
            out.append((k, lo, t, hi))
            if len(out) == n:
                break
    return out


def summarize(model: ModelHandle, acts: LatentActivations, latent: int, hook_name: str, lens: LogitLens,
              n_contexts: int = 10, window: tuple[int, int] = (16, 4), bins: int = 30) -> LatentSummary:
    """One latent's summary with its decoder row's ``lens``: ``n_contexts`` contexts of ``window`` (tokens before,
    after) the peak, and a ``bins``-bin histogram from 0 (or the lowest activation, if negative) to the highest."""
    toks, vals = acts.of(latent)
    top = float(vals.max()) if len(vals) else 0.0
    low = min(0.0, float(vals.min())) if len(vals) else 0.0
    counts, edges = torch.histogram(vals, bins=bins, range=(low, top if top > low else low + 1.0))
    dense = torch.zeros(len(acts.token_ids))
    dense[toks] = vals
    ends = (acts.lengths.cumsum(0) - acts.lengths).tolist()
    contexts = [Context(text, peak - ends[text], token_strings(model, acts.token_ids[lo:hi]),
                        dense[lo:hi].tolist(), peak - lo)
                for text, lo, peak, hi in _windows(acts, latent, n_contexts, *window)]
    return LatentSummary(latent, hook_name, acts.d_sae, int(acts.counted.sum()), len(vals), top,
                         counts.long().tolist(), edges.tolist(), contexts, lens)


class LatentDashboards:
    """Dashboards of every latent of one SAE over one corpus: build once (:meth:`build`), then :meth:`panel`,
    :meth:`figure` or :meth:`write` any latent."""

    def __init__(self, model: ModelHandle, sae, acts: LatentActivations, hook_name: str, from_cache: bool = False):
        self.model, self.sae, self.acts, self.hook_name, self.from_cache = model, sae, acts, hook_name, from_cache

    @classmethod
    def build(cls, model: ModelHandle, sae, corpus: Sequence[str] | None = None, *, n_tokens: int = DEFAULT_TOKENS,
              max_length: int = 256, chunk_tokens: int = 32_768, cache: bool | str | os.PathLike = True,
              progress: bool = True) -> LatentDashboards:
        """Read ``corpus`` (default: :func:`default_corpus` of ``n_tokens`` tokens; each text cut to ``max_length``
        tokens) at the SAE's hook point for every latent at once (:func:`read_latents`, ``chunk_tokens`` per
        extraction call), or take it from the cache (``cache``: True for the workbench cache, a folder, or False for
        none)."""
        hook = sae_hook_name(sae, model)
        if sae.cfg.d_in != model.d_model:
            raise WorkbenchError(f"the SAE reads width d_in={sae.cfg.d_in}, model {model.name!r} has "
                                 f"d_model={model.d_model}")
        ids = None if corpus is None else _corpus_ids(model, corpus, max_length)
        key = {"format": FORMAT, "model": model.name, "weights": weights_fingerprint(model), "hook": hook,
               "sae": sae_digest(sae), "corpus": hashlib.sha256(json.dumps(ids).encode()).hexdigest()
               if ids is not None else default_corpus_key(model, sae, n_tokens, max_length)}
        path = _cache_path(cache, key)
        acts = LatentActivations.load(path, key) if path else None
        if acts is not None:
            return cls(model, sae, acts, hook, from_cache=True)
        if ids is None:
            ids = text_token_ids(model, default_corpus(model, sae, n_tokens, max_length=max_length), max_length)
        acts = read_latents(model, sae, ids, chunk_tokens, progress)
        if path:
            acts.save(path, key)
        return cls(model, sae, acts, hook)

    def check_latent(self, latent: int) -> int:
        """``latent`` as an int, refused in one line unless it is in 0..d_sae-1."""
        d_sae = self.acts.d_sae
        try:
            i = operator.index(latent)
        except TypeError:
            i = None
        if i is None or isinstance(latent, bool) or not 0 <= i < d_sae:
            raise WorkbenchError(f"latent {latent!r} is out of range: this SAE has {d_sae} latents, 0..{d_sae - 1}")
        return i

    def lenses(self, latents: Sequence[int], k: int = 10) -> dict[int, LogitLens]:
        """The logit lens of each latent's decoder row, ``k`` tokens each way, 256 rows per pass over the
        unembedding."""
        checked, out = [self.check_latent(i) for i in as_list(latents, "latents")], {}
        for start in range(0, len(checked), 256):
            part = checked[start:start + 256]
            logits = direction_logits(self.model, self.sae.W_dec[part])
            out.update({i: lens_of_logits(self.model, row, k) for i, row in zip(part, logits, strict=True)})
        return out

    def summaries(self, latents: Sequence[int], k: int = 10, **kwargs) -> dict[int, LatentSummary]:
        """:func:`summarize` of each latent (``k`` logit-lens tokens each way; other keyword arguments as there),
        every index checked first."""
        lenses = self.lenses(latents, k)
        return {i: summarize(self.model, self.acts, i, self.hook_name, lens, **kwargs) for i, lens in lenses.items()}

    def summary(self, latent: int, **kwargs) -> LatentSummary:
        """One latent's :meth:`summaries`."""
        return self.summaries([latent], **kwargs)[self.check_latent(latent)]

    def panel(self, latent: int, **kwargs) -> dashboard_plots.Panel:
        """One latent's dashboard as HTML that opens offline (shown by a notebook; ``str()`` gives the HTML)."""
        return dashboard_plots.panel(self.summary(latent, **kwargs))

    def figure(self, latent: int, **kwargs) -> go.Figure:
        """One latent's histogram and logit lens as a plotly figure."""
        return dashboard_plots.figure(self.summary(latent, **kwargs))

    def write(self, folder: str | os.PathLike, latents: Sequence[int], **kwargs) -> dict[int, Path]:
        """One page ``folder/latent_<i>.html`` per latent (each written atomically, all indices checked before the
        first); {latent: path}."""
        return {i: dashboard_plots.write_page(s, Path(folder) / f"latent_{i}.html")
                for i, s in self.summaries(latents, **kwargs).items()}


def write_selected(model: ModelHandle, saes: Mapping[int, object], latents: Mapping, folder: str | os.PathLike,
                   n_tokens: int = DEFAULT_TOKENS, progress: bool = True) -> dict[str, list[dict]]:
    """Pages of each layer's selected latents (``latents[layer]``: {"context": [ids], "memory": [ids]}, as SpARE
    records them) under ``folder/layer<L>/``: {layer: [{"latent", "favours", "page", "firing_rate", "promotes"}]},
    each page path relative to ``folder``'s parent (where a run's report page sits)."""
    folder, out = Path(folder), {}
    for layer, sae in saes.items():
        chosen = latents.get(layer, latents.get(str(layer), {}))
        picked = [(int(i), favours) for favours in ("context", "memory") for i in chosen.get(favours, [])]
        out[str(layer)] = rows = []
        if not picked:
            continue
        summaries = LatentDashboards.build(model, sae, n_tokens=n_tokens, progress=progress).summaries(
            [i for i, _ in picked])
        for latent, favours in picked:
            s = summaries[latent]
            path = dashboard_plots.write_page(s, folder / f"layer{layer}" / f"latent_{latent}.html")
            rows.append({"latent": latent, "favours": favours, "page": path.relative_to(folder.parent).as_posix(),
                         "firing_rate": s.firing_rate, "promotes": [t for t, _ in s.lens.promoted[:5]]})
    return out
