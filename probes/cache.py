"""Extract activations into device-resident caches: only the requested hooks, only the requested tokens.

The residual stream (``blocks.{l}.hook_resid_pre`` / ``hook_resid_post``) is captured with forward hooks on the
plain Hugging Face decoder layers, which share their weights with the bridge: plain-forward speed, and the forward
pass stops after the last requested layer. Any other bridge hook name runs through the bridge's own hook points.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from probes import positions as pos
from probes.architecture import mlp_neuron_input, on_residual
from probes.devices import Halving, free_cuda_bytes, model_devices
from probes.errors import WorkbenchError, as_list
from probes.files import atomic_file, atomic_folder
from probes.forward import PAD_MULTIPLE, pad_id, pad_token_ids, position_ids
from probes.models import ModelHandle, default_device
from probes.progress import progress_bar
from probes.provenance import weights_fingerprint
from probes.readers import check_safetensors, read_json

FORMAT_VERSION = 1
RESIDUAL_HOOK = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")
COMPONENT_HOOK = re.compile(r"^blocks\.(\d+)\.hook_(attn|mlp)_out$")
NEURON_HOOK = re.compile(r"^blocks\.(\d+)\.mlp\.hook_post$")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


class CacheError(WorkbenchError):
    """A cache file is unreadable, truncated, or does not match what the caller asked for."""


class _StopForward(Exception):
    """Raised by the last requested hook: the rest of the forward pass is not needed."""


def residual_hooks(model: ModelHandle, layers: Sequence[int] | None = None) -> list[str]:
    """Residual stream hook names: before each block, plus after the last one (n_layers + 1 points by default).

    Index ``i`` of the result is "the residual stream after ``i`` blocks", as in ``output_hidden_states``.
    """
    names = [f"blocks.{layer}.hook_resid_pre" for layer in range(model.n_layers)]
    names.append(f"blocks.{model.n_layers - 1}.hook_resid_post")
    if layers is None:
        return names
    bad = [layer for layer in layers if not 0 <= layer <= model.n_layers]
    if bad:
        raise ValueError(f"residual layers {bad} out of range 0..{model.n_layers}")
    return [names[layer] for layer in layers]


def _check_hooks(model: ModelHandle, hooks: Sequence[str]) -> list[str]:
    hooks = as_list(hooks, "hooks")
    if not hooks:
        raise ValueError("no hook points requested")
    if len(set(hooks)) != len(hooks):
        raise ValueError(f"hook points requested twice: {sorted({h for h in hooks if hooks.count(h) > 1})}")
    known = model.bridge.hook_dict
    unknown = [h for h in hooks if h not in known]
    if unknown:
        examples = [h for h in known if h.startswith("blocks.0.")][:12]
        raise ValueError(f"unknown hook point(s) {unknown} for model {model.name!r} "
                         f"(layers 0..{model.n_layers - 1}); names look like {examples}; "
                         "model.hook_names() lists them all")
    return hooks


def hook_width(model: ModelHandle, hooks: Sequence[str]) -> int:
    """Width of the activations at ``hooks``; all must be [batch, seq, width] tensors of one width."""
    if all(RESIDUAL_HOOK.match(h) for h in hooks):
        return model.d_model
    shapes: dict[str, tuple] = {}

    def record(tensor, hook):
        shapes[hook.name] = tuple(tensor.shape)
        return tensor

    ids = torch.tensor([[model.tokenizer.eos_token_id or 0] * 2], device=model.device)
    with torch.inference_mode(), model.bridge.hooks(fwd_hooks=[(h, record) for h in hooks]):
        model.bridge.original_model(input_ids=ids, use_cache=False)
    by_name = {h: shapes.get(model.bridge.hook_dict[h].name) for h in hooks}
    odd = {h: s for h, s in by_name.items() if s is None or len(s) != 3}
    if odd:
        raise ValueError(f"hook points {odd} do not give [batch, seq, width] activations; the cache gathers token "
                         "positions, so use hooks on the residual stream, attention/MLP outputs or MLP neurons")
    widths = {s[-1] for s in by_name.values()}
    if len(widths) > 1:
        raise ValueError(f"hook points of different widths {by_name}: extract them in separate calls")
    return widths.pop()


def _prompts_digest(prompts: Sequence[str], spans: Sequence | None) -> str:
    payload = json.dumps([list(prompts), [list(s) for s in spans] if spans is not None else None])
    return hashlib.sha256(payload.encode()).hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------------------- results


@dataclass
class ActivationCache:
    """Activations ``acts`` [n_prompts, n_hooks, d_model] (one position) or [n_prompts, n_positions, n_hooks, d];
    with ``positions="all"``, [n_tokens, n_hooks, d]: every real token, prompt after prompt, ``meta["lengths"]``
    tokens each."""

    acts: torch.Tensor
    hook_names: list[str]
    meta: dict = field(default_factory=dict)

    def __getitem__(self, hook: str | int) -> torch.Tensor:
        """Activations of one hook point (by name or index): [n, d] or [n, n_positions, d]."""
        i = self.hook_names.index(hook) if isinstance(hook, str) else hook
        return self.acts[..., i, :]

    def __len__(self) -> int:
        return self.acts.shape[0]

    def first_tokens(self) -> torch.Tensor:
        """For an all-tokens cache: [n_tokens] bool, True at each prompt's first token (an attention sink with a
        norm many times the others', which readers of every token usually leave out)."""
        if self.meta.get("positions") != "all":
            raise ValueError("first_tokens() needs a cache of every token (extract with positions='all')")
        starts = torch.tensor([0, *self.meta["lengths"][:-1]]).cumsum(0)
        first = torch.zeros(self.acts.shape[0], dtype=torch.bool)
        first[starts] = True
        return first.to(self.acts.device)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "ActivationCache":
        return ActivationCache(self.acts.to(device=device, dtype=dtype), self.hook_names, dict(self.meta))

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write safetensors with the metadata in its header, atomically (:func:`probes.files.atomic_file`); an
        existing file is replaced only with ``overwrite``."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True or choose another path")
        with atomic_file(path) as tmp:
            save_file({"acts": self.acts.contiguous()}, str(tmp),
                      metadata={"workbench": json.dumps({**self.meta, "hook_names": self.hook_names})})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device | None = None, *,
             model: str | ModelHandle | None = None, hooks: Sequence[str] | None = None,
             positions: pos.PositionSpec | None = None,
             prompts: Sequence[str] | None = None, spans: Sequence | None = None,
             dtype: torch.dtype | None = None) -> "ActivationCache":
        """Read a saved cache onto ``device`` (default: CUDA if present); every expectation given (model, hooks,
        ...) must match, else :class:`CacheError`. A model handle is checked by name and by the fingerprint of its
        weights (:func:`probes.provenance.weights_fingerprint`); a name alone cannot tell other weights apart."""
        if Path(path).is_dir():  # a folder of shards, e.g. from probes.distributed.extract_distributed
            sharded = ShardedActivationCache(path, device or default_device())
            check_metadata(sharded.meta, path, model=model, hooks=hooks, positions=positions, prompts=prompts,
                           spans=spans, dtype=dtype)
            return sharded.dense()
        meta = read_metadata(path)
        check_metadata(meta, path, model=model, hooks=hooks, positions=positions, prompts=prompts, spans=spans,
                       dtype=dtype)
        try:
            with safe_open(str(path), framework="pt", device=str(device or default_device())) as f:
                acts = f.get_tensor("acts")
        except (SafetensorError, OSError, RuntimeError) as err:
            raise CacheError(f"activation cache {path} is unreadable or truncated ({err}); delete it and "
                             "extract again") from err
        hook_names = meta.pop("hook_names")
        return cls(acts, hook_names, meta)


def read_metadata(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no activation cache at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            shape = f.get_slice("acts").get_shape()
    except (SafetensorError, OSError, RuntimeError, KeyError) as err:
        raise CacheError(f"activation cache {path} is unreadable or truncated ({err}); delete it and extract "
                         "again") from err
    if "workbench" not in header:
        raise CacheError(f"{path} is a safetensors file but not a workbench activation cache (no metadata)")
    meta = json.loads(header["workbench"])
    rows = sum(meta.get("lengths", [])) if meta.get("positions") == "all" else meta.get("n_prompts")
    if rows != shape[0]:
        raise CacheError(f"activation cache {path} holds {shape[0]} rows but its metadata says {rows}")
    return meta


def check_metadata(meta: dict, path, *, model=None, hooks=None, positions=None, prompts=None, spans=None,
                   dtype=None) -> None:
    """Compare what a cache holds with what the caller asks for; raise one error listing every difference."""
    wanted = {}
    if isinstance(model, ModelHandle):
        wanted["model"], wanted["weights"] = model.name, weights_fingerprint(model)
    elif model is not None:
        wanted["model"] = model
    if hooks is not None:
        wanted["hook_names"] = as_list(hooks, "hooks")
    if positions is not None:
        wanted["positions"] = positions if isinstance(positions, str) else [int(i) for i in positions]
    if prompts is not None:
        wanted["prompts_sha256"] = _prompts_digest(prompts, spans)
    if dtype is not None:
        wanted["dtype"] = _dtype_name(dtype)
    diffs = [f"{k}: cache has {meta.get(k)!r}, asked for {v!r}" for k, v in wanted.items() if meta.get(k) != v]
    if meta.get("format") != FORMAT_VERSION:
        diffs.append(f"format: cache has {meta.get('format')!r}, this version reads {FORMAT_VERSION}")
    if diffs:
        raise CacheError(f"activation cache {path} does not match the request (stale?):\n  " + "\n  ".join(diffs)
                         + "\nDelete it or write to another path.")


@dataclass
class GroupMeans:
    """Per-group means [n_groups, n_positions, n_hooks, d] in float64, without keeping the rows."""

    sums: torch.Tensor
    counts: torch.Tensor
    groups: list
    hook_names: list[str]

    @property
    def means(self) -> torch.Tensor:
        return self.sums / self.counts.clamp(min=1).to(self.sums.dtype)[:, None, None, None]

    def mean(self, group) -> torch.Tensor:
        return self.means[self.groups.index(group)]

    def difference(self, a, b) -> torch.Tensor:
        """mean(a) - mean(b): [n_positions, n_hooks, d] in float64."""
        return self.mean(a) - self.mean(b)


class ShardedActivationCache:
    """A cache on disk in safetensors shards (rows split across files), read back one hook point at a time."""

    def __init__(self, directory: str | os.PathLike, device: str | torch.device | None = None):
        self.directory = Path(directory)
        meta_file = self.directory / "meta.json"
        if not meta_file.is_file():
            raise CacheError(f"{self.directory} is not a sharded activation cache (no meta.json)")
        remedy = f"delete the folder {self.directory} and extract again"
        self.meta = read_json(meta_file, remedy)
        self.hook_names: list[str] = self.meta["hook_names"]
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        missing = [s for s in self.meta["shards"] if not (self.directory / s).is_file()]
        if missing:
            raise CacheError(f"sharded cache {self.directory} is missing {missing}; {remedy}")
        for shard in self.meta["shards"]:
            check_safetensors(self.directory / shard, remedy)

    def __len__(self) -> int:
        return self.meta["n_prompts"]

    def layer(self, hook: str | int) -> torch.Tensor:
        """All rows of one hook point: [n, d] or [n, n_positions, d], on this cache's device."""
        h = self.hook_names.index(hook) if isinstance(hook, str) else hook
        parts = []
        for shard in self.meta["shards"]:
            with safe_open(str(self.directory / shard), framework="pt", device=str(self.device)) as f:
                parts.append(f.get_slice("acts")[h])
        out = torch.cat(parts)
        return out.squeeze(1) if isinstance(self.meta["positions"], str) else out

    def iter_layers(self) -> Iterator[tuple[str, torch.Tensor]]:
        for h, name in enumerate(self.hook_names):
            yield name, self.layer(h)

    def dense(self) -> ActivationCache:
        """All shards in memory as one :class:`ActivationCache` (rows in shard order), as a one-file cache loads."""
        parts = []
        for shard in self.meta["shards"]:
            with safe_open(str(self.directory / shard), framework="pt", device=str(self.device)) as f:
                parts.append(f.get_tensor("acts"))  # [n_hooks, rows, n_positions, d]
        acts = torch.cat(parts, dim=1).movedim(0, 2).contiguous()
        if len(acts) != len(self):
            raise CacheError(f"sharded cache {self.directory} holds {len(acts)} rows but its index says {len(self)}")
        meta = {k: v for k, v in self.meta.items() if k not in ("hook_names", "shards")}
        return ActivationCache(acts.squeeze(1) if isinstance(meta["positions"], str) else acts, self.hook_names, meta)


# ---------------------------------------------------------------------------------------------------- sinks


class _DenseSink:
    def __init__(self, n: int, n_pos: int, n_hooks: int, d: int, dtype: torch.dtype, device: torch.device):
        self.acts = torch.empty(n, n_pos, n_hooks, d, dtype=dtype, device=device)

    def write(self, rows: torch.Tensor, slot: int, values: torch.Tensor) -> None:
        self.acts[rows, :, slot] = values.to(self.acts.device, self.acts.dtype)


class _TokenSink:
    """Every real token of every prompt, prompt after prompt: acts [n_tokens, n_hooks, d]."""

    def __init__(self, lengths: list[int], n_hooks: int, d: int, dtype: torch.dtype, device: torch.device):
        self.starts = [0, *itertools.accumulate(lengths)]
        self.acts = torch.empty(self.starts[-1], n_hooks, d, dtype=dtype, device=device)
        self._rows: torch.Tensor | None = None
        self._index: torch.Tensor | None = None

    def write(self, rows: torch.Tensor, slot: int, values: torch.Tensor) -> None:
        """``values`` [n_real_tokens, d]: the tokens of ``rows``, row after row (the token index is built once per
        batch, not once per hook)."""
        if rows is not self._rows:
            self._rows = rows
            self._index = torch.cat([torch.arange(self.starts[r], self.starts[r + 1]) for r in rows.tolist()]
                                    ).to(self.acts.device)
        self.acts[self._index, slot] = values.to(self.acts.device, self.acts.dtype)


class _MeanSink:
    def __init__(self, labels: torch.Tensor, n_groups: int, n_pos: int, n_hooks: int, d: int, device: torch.device):
        self.labels = labels.to(device)
        self.sums = torch.zeros(n_groups, n_pos, n_hooks, d, dtype=torch.float64, device=device)
        self.counts = torch.bincount(self.labels, minlength=n_groups)

    def write(self, rows: torch.Tensor, slot: int, values: torch.Tensor) -> None:
        self.sums[:, :, slot].index_add_(0, self.labels[rows], values.to(self.sums.device, torch.float64))


# ---------------------------------------------------------------------------------------------------- engine


@dataclass
class _Plan:
    prompts: list  # materialised: a generator of prompts is read once
    hooks: list[str]
    spec: pos.PositionSpec
    token_spans: list[tuple[int, int]] | None
    input_ids: list[list[int]]
    batches: list[list[int]]


def default_batch_tokens(device: torch.device, model: ModelHandle | None = None) -> int:
    """Tokens per forward pass: 4096 on the CPU; on CUDA, what half the free memory of the model's fullest device
    holds, at a rough peak of 16 activations of width d_model + d_mlp per token (an out-of-memory error halves the
    batch anyway)."""
    if device.type != "cuda":
        return 4096
    free = free_cuda_bytes([device, *(model_devices(model.hf_model) if model is not None else [])])
    cfg = model.hf_model.config.get_text_config() if model is not None else None
    width = (cfg.hidden_size + (getattr(cfg, "intermediate_size", None) or 4 * cfg.hidden_size)) if cfg else 8192
    per_token = 16 * width * (model.dtype.itemsize if model is not None else 4)
    return int(min(max(free // 2 // per_token, 256), 1 << 20))


def _plan(model: ModelHandle, prompts: Sequence[str], hooks, positions, spans, batch_tokens,
          add_special_tokens: bool) -> _Plan:
    prompts = as_list(prompts, "prompts")
    if not prompts:
        raise ValueError("the prompt list is empty")
    pretokenized = all(isinstance(p, (list, tuple)) for p in prompts)
    if not pretokenized and not all(isinstance(p, str) for p in prompts):
        raise ValueError("every prompt must be a string (or every prompt a list of token ids)")
    if spans is not None and (pretokenized or len(spans) != len(prompts)):
        raise ValueError(f"{len(spans)} spans for {len(prompts)} prompts: give one (start, end) per text prompt")
    hooks = _check_hooks(model, residual_hooks(model) if hooks is None else hooks)
    spec = pos.validate(positions, spans is not None)
    if pretokenized:
        enc = {"input_ids": [list(map(int, p)) for p in prompts]}
    else:
        enc = model.tokenizer(prompts, add_special_tokens=add_special_tokens,
                              return_offsets_mapping=spans is not None)
    input_ids = enc["input_ids"]
    empty = [i for i, ids in enumerate(input_ids) if not ids]
    if empty:
        raise ValueError(f"prompts {empty[:5]} tokenize to nothing")
    shortest = min(range(len(input_ids)), key=lambda i: len(input_ids[i]))
    if not isinstance(spec, str) and len(input_ids[shortest]) < -min(spec):
        raise ValueError(f"position {min(spec)} is before the start of prompt {shortest} "
                         f"({len(input_ids[shortest])} tokens); use positions within the shortest prompt")
    token_spans = None
    if spans is not None:
        token_spans = [pos.span_token_range(off, sp) for off, sp in zip(enc["offset_mapping"], spans, strict=True)]
        # a causal model's activations at the span do not depend on the tokens after it: those are not run
        if spec in ("span_last", "span_mean"):
            input_ids = [ids[:last + 1] for ids, (_, last) in zip(input_ids, token_spans, strict=True)]
    order = sorted(range(len(prompts)), key=lambda i: -len(input_ids[i]))
    batches, current = [], []
    for i in order:  # longest first: each batch's first prompt sets its padded length
        if current and (len(current) + 1) * len(input_ids[current[0]]) > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    batches.append(current)
    return _Plan(prompts, hooks, spec, token_spans, input_ids, batches)


def _run(model: ModelHandle, plan: _Plan, sink, padding_side: str, progress: bool, desc: str,
         pad_multiple: int | None = None) -> None:
    """Forward passes over ``plan.batches``; each batch's activations reach ``sink`` only once its pass is done,
    so a batch cut in half after an out-of-memory error is never counted twice. Batches are padded to a multiple
    of ``pad_multiple`` tokens; default :data:`probes.forward.PAD_MULTIPLE` on CUDA, where few distinct shapes
    matter, and 1 on the CPU, where padding a 4-token prompt to 8 would double its cost."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    device = model.device
    pad_multiple = pad_multiple or (PAD_MULTIPLE if device.type == "cuda" else 1)
    points = _plain_points(model, plan.hooks)
    state: dict = {}

    def store(slot: int, hidden: torch.Tensor, last: bool) -> None:
        state["pending"].append((slot, state["where"].gather(hidden)))
        if last:
            raise _StopForward

    with contextlib.ExitStack() as stack:
        if points is not None:
            _add_layer_hooks(stack, model.architecture.blocks, points, store)
            forward = model.hf_model
        else:
            _add_bridge_hooks(stack, model, plan.hooks, store)
            forward = model.bridge.original_model
        bar = stack.enter_context(progress_bar(total=sum(map(len, plan.batches)), desc=desc, unit="prompt",
                                               progress=progress))

        def run_batch(batch: list[int]) -> None:
            ids, mask = pad_token_ids([plan.input_ids[i] for i in batch], pad_id(model), padding_side, device,
                                      pad_multiple)
            spans = [plan.token_spans[i] for i in batch] if plan.token_spans else None
            state["where"], state["pending"] = pos.resolve(plan.spec, mask, spans), []
            try:
                forward(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False)
            except _StopForward:
                pass
            rows = torch.tensor(batch)
            for slot, values in state.pop("pending"):
                sink.write(rows, slot, values)
            bar.update(len(batch))

        halving = Halving(desc)
        with torch.inference_mode():
            for batch in plan.batches:
                halving.run(batch, run_batch)


def _plain_points(model: ModelHandle, hooks: Sequence[str]
                  ) -> list[tuple[int, str | torch.nn.Module | NeuronInput]] | None:
    """Where each hook point sits on the plain model: (layer, "pre" | "post") on the residual stream, or (layer,
    module) for an attention or MLP output read from the module that writes it
    (:meth:`probes.architecture.Architecture.component_output`); None when some hook needs the bridge."""
    points = []
    for hook in hooks:
        if m := RESIDUAL_HOOK.match(hook):
            points.append((int(m.group(1)), m.group(2)))
        elif (m := COMPONENT_HOOK.match(hook)) and \
                (module := model.architecture.component_output(int(m.group(1)), m.group(2))) is not None:
            points.append((int(m.group(1)), module))
        elif (m := NEURON_HOOK.match(hook)) and \
                (module := mlp_neuron_input(model.bridge, model.hf_model, int(m.group(1)))) is not None:
            points.append((int(m.group(1)), NeuronInput(module)))
        else:
            return None
    return points


@dataclass(frozen=True)
class NeuronInput:
    """A point read from a module's forward input (the MLP neurons entering the down projection)."""

    module: torch.nn.Module


def _add_layer_hooks(stack: contextlib.ExitStack, layers,
                     points: list[tuple[int, str | torch.nn.Module | NeuronInput]], store) -> None:
    """Hooks on the plain decoder layers (:func:`probes.architecture.on_residual`) and on the modules writing
    attention and MLP outputs; the pass stops after the latest point in the network (a block's output, or the
    stream entering a block when nothing is read further on)."""
    def rank(point):
        return point[0], point[1] != "pre"

    stop_at = max(points, key=rank)
    for slot, (layer, where) in enumerate(points):
        is_last = (layer, where) == stop_at and isinstance(where, str)

        def read(hidden, slot=slot, last=is_last) -> None:
            store(slot, hidden, last)
        if isinstance(where, str):
            stack.callback(on_residual(layers[layer], where, read).remove)
        elif isinstance(where, NeuronInput):
            stack.callback(where.module.register_forward_pre_hook(
                lambda module, args, read=read: read(args[0])).remove)
        else:
            stack.callback(where.register_forward_hook(
                lambda module, args, output, read=read: read(output[0] if isinstance(output, tuple) else output)
            ).remove)
    if not isinstance(stop_at[1], str):  # a component output is last: stop once its block is done
        stack.callback(on_residual(layers[stop_at[0]], "post", lambda hidden: _raise_stop()).remove)


def _raise_stop():
    raise _StopForward


def _add_bridge_hooks(stack: contextlib.ExitStack, model: ModelHandle, hooks: list[str], store) -> None:
    """The bridge's own hook points, for names beyond the residual stream; stop after the last block needed."""
    def make(slot):
        def bridge_hook(tensor, hook):
            store(slot, tensor, False)
            return tensor
        return bridge_hook
    stack.enter_context(model.bridge.hooks(fwd_hooks=[(name, make(slot)) for slot, name in enumerate(hooks)]))
    blocks = [int(m.group(1)) for h in hooks if (m := _BLOCK.match(h))]
    if len(blocks) == len(hooks):
        def stop_hook(module, args, output):
            raise _StopForward
        stack.callback(model.bridge.blocks[max(blocks)].register_forward_hook(stop_hook).remove)


def extract(model: ModelHandle, prompts: Sequence[str], hooks: Sequence[str] | None = None,
            positions: pos.PositionSpec = "last", spans: Sequence[tuple[int, int]] | None = None,
            dtype: torch.dtype = torch.float32, batch_tokens: int | None = None, padding_side: str = "right",
            add_special_tokens: bool = True, progress: bool = True, max_device_bytes: int | None = None,
            spill_dir: str | os.PathLike | None = None, device: str | torch.device | None = None,
            pad_multiple: int | None = None) -> ActivationCache | ShardedActivationCache:
    """Activations of ``prompts`` (texts, or lists of token ids) at ``hooks`` (default: :func:`residual_hooks`).

    positions: ``"last"`` (last token), ``"span_last"`` / ``"span_mean"`` (last token of / mean over the character
    span given per prompt in ``spans``, see :func:`probes.positions.mark_span`), negative token indices such as
    ``model.post_instruction_positions()``, or ``"all"`` (every real token: [n_tokens, n_hooks, d], prompt after
    prompt, each prompt's count in ``meta["lengths"]``). The result lives on ``device`` (default: the model's input
    device, which for a model spread over devices is where its embedding computes); if it would need more than
    ``max_device_bytes`` (default: 80% of free CUDA memory, unlimited on the CPU) it is written to ``spill_dir`` in
    shards and a :class:`ShardedActivationCache` is returned instead (not for ``"all"``: that raises instead).
    Each batch is padded to a multiple of ``pad_multiple`` tokens (:func:`probes.forward.pad_token_ids`; 1: to its
    longest prompt, as a tokenizer pads; default: by device, see :func:`_run`).
    """
    device = torch.device(device) if device is not None else model.device
    plan = _plan(model, prompts, hooks, positions, spans, batch_tokens or default_batch_tokens(model.device, model),
                 add_special_tokens)
    n, n_pos, n_hooks = len(plan.input_ids), pos.n_positions(plan.spec), len(plan.hooks)
    width = hook_width(model, plan.hooks)
    row_bytes = n_pos * n_hooks * width * torch.empty((), dtype=dtype).element_size()
    budget = max_device_bytes if max_device_bytes is not None else _free_device_bytes(device)
    meta = {"format": FORMAT_VERSION, "model": model.name, "hook_names": plan.hooks,
            "positions": plan.spec if isinstance(plan.spec, str) else list(plan.spec), "dtype": _dtype_name(dtype),
            "n_prompts": n, "width": width, "prompts_sha256": _prompts_digest(plan.prompts, spans),
            "weights": weights_fingerprint(model)}
    if plan.spec == "all":
        return _extract_tokens(model, plan, meta, dtype, device, row_bytes, budget, padding_side, progress,
                               pad_multiple)
    if n * row_bytes > budget:
        if spill_dir is None:
            raise ValueError(f"the cache needs {n * row_bytes / 2**30:.2f} GiB, over the device budget of "
                             f"{budget / 2**30:.2f} GiB: pass spill_dir= to write it to disk in shards")
        return _extract_sharded(model, plan, meta, dtype, max(1, budget // (2 * row_bytes)), padding_side,
                                progress, Path(spill_dir), pad_multiple)
    sink = _DenseSink(n, n_pos, n_hooks, width, dtype, device)
    _run(model, plan, sink, padding_side, progress, "extract", pad_multiple)
    acts = sink.acts.squeeze(1) if isinstance(plan.spec, str) else sink.acts
    meta.pop("hook_names")
    return ActivationCache(acts, plan.hooks, meta)


def _extract_tokens(model: ModelHandle, plan: _Plan, meta: dict, dtype: torch.dtype, device: torch.device,
                    token_bytes: int, budget: float, padding_side: str, progress: bool, pad_multiple: int | None
                    ) -> ActivationCache:
    """Every real token of every prompt, in memory on ``device`` (``token_bytes`` per token; too many for the
    budget: read fewer prompts per call)."""
    lengths = [len(ids) for ids in plan.input_ids]
    n_bytes = sum(lengths) * token_bytes
    if n_bytes > budget:
        raise ValueError(f"every token of these prompts needs {n_bytes / 2**30:.2f} GiB, over the device budget of "
                         f"{budget / 2**30:.2f} GiB: extract fewer prompts per call")
    sink = _TokenSink(lengths, len(plan.hooks), meta["width"], dtype, device)
    _run(model, plan, sink, padding_side, progress, "extract", pad_multiple)
    meta = {k: v for k, v in meta.items() if k != "hook_names"}
    return ActivationCache(sink.acts, plan.hooks, {**meta, "lengths": lengths})


def _free_device_bytes(device: torch.device) -> float:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return 0.8 * free
    return math.inf


def _extract_sharded(model: ModelHandle, plan: _Plan, meta: dict, dtype, rows_per_shard: int, padding_side: str,
                     progress: bool, directory: Path, pad_multiple: int | None) -> ShardedActivationCache:
    if directory.exists():
        raise CacheError(f"{directory} exists already; remove it or choose another spill_dir")
    with atomic_folder(directory) as tmp:  # shards and meta.json are one unit
        shards = []
        all_rows = list(range(len(plan.input_ids)))
        for k, start in enumerate(range(0, len(all_rows), rows_per_shard)):
            rows = all_rows[start:start + rows_per_shard]
            sub = _Plan([plan.prompts[i] for i in rows], plan.hooks, plan.spec,
                        [plan.token_spans[i] for i in rows] if plan.token_spans else None,
                        [plan.input_ids[i] for i in rows], [])
            sub.batches = _rebatch(plan.batches, rows)
            sink = _DenseSink(len(rows), pos.n_positions(plan.spec), len(plan.hooks), meta["width"], dtype,
                              model.device)
            _run(model, sub, sink, padding_side, progress, f"shard {k}", pad_multiple)
            name = f"shard-{k:05d}.safetensors"
            save_file({"acts": sink.acts.movedim(2, 0).contiguous()}, str(tmp / name))
            shards.append(name)
            del sink
        (tmp / "meta.json").write_text(json.dumps({**meta, "shards": shards}, indent=1))
    return ShardedActivationCache(directory, model.device)


def _rebatch(batches: list[list[int]], rows: list[int]) -> list[list[int]]:
    """The global length-sorted batches restricted to ``rows``, renumbered to positions within ``rows``."""
    local = {r: i for i, r in enumerate(rows)}
    out = [[local[i] for i in b if i in local] for b in batches]
    return [b for b in out if b]


def extract_group_means(model: ModelHandle, prompts: Sequence[str], labels: Sequence,
                        hooks: Sequence[str] | None = None, positions: pos.PositionSpec = "last",
                        spans: Sequence[tuple[int, int]] | None = None, batch_tokens: int | None = None,
                        padding_side: str = "right", add_special_tokens: bool = True,
                        progress: bool = True, device: str | torch.device | None = None) -> GroupMeans:
    """Mean activation per label (float64, on ``device``, default the model's input device) without keeping any
    row: for difference-in-means."""
    labels = list(labels)
    if positions == "all":
        raise ValueError("group means are taken at fixed positions; positions='all' is for extract")
    if len(labels) != len(prompts):
        raise ValueError(f"{len(labels)} labels for {len(prompts)} prompts")
    groups = sorted(set(labels), key=str)
    codes = torch.tensor([groups.index(x) for x in labels])
    plan = _plan(model, prompts, hooks, positions, spans, batch_tokens or default_batch_tokens(model.device, model),
                 add_special_tokens)
    sink = _MeanSink(codes, len(groups), pos.n_positions(plan.spec), len(plan.hooks), hook_width(model, plan.hooks),
                     torch.device(device) if device is not None else model.device)
    _run(model, plan, sink, padding_side, progress, "group means")
    return GroupMeans(sink.sums, sink.counts, groups, plan.hooks)
