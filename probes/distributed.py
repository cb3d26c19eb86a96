"""Data-parallel extraction with ``torch.distributed``: one process per device, each extracting its share of prompts.

    torchrun --nproc-per-node 8 -m probes.extract --model M --dataset world_place --out runs/x

Every rank extracts a contiguous block of the prompts on its own device (``cuda:LOCAL_RANK``, or the CPU) and writes
it as safetensors shards into one temporary folder; rank 0 then writes the index (``meta.json``, the format of
:class:`probes.cache.ShardedActivationCache`) and renames the folder into place. The result loads with
:class:`~probes.cache.ShardedActivationCache` or ``ActivationCache.load`` and equals a one-process run: same rows in
the same order, same hook names, same metadata. If any rank fails, every rank raises and no cache appears.

From Python, start the processes yourself (``torchrun`` running a script, or ``torch.multiprocessing.spawn``), call
:func:`setup` (or ``init_process_group`` plus ``torch.cuda.set_device``) and then :func:`extract_distributed` on
every rank with the same arguments. The output folder must be on a file system all ranks share.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from probes.cache import ActivationCache, ShardedActivationCache, _prompts_digest, extract
from probes.files import atomic_file, atomic_folder
from probes.models import ModelHandle

LAUNCH_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK")


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (or a launcher setting the torch.distributed variables)."""
    return all(name in os.environ for name in LAUNCH_VARIABLES)


def setup(device: str | torch.device | None = None) -> torch.device:
    """Join the process group from the launcher's variables (nccl on CUDA, gloo on the CPU); return this rank's device.

    ``device`` None picks ``cuda:LOCAL_RANK`` when CUDA is present, else the CPU; a bare ``"cuda"`` also means
    ``cuda:LOCAL_RANK``, so that every rank of a node gets its own GPU.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"{device} does not exist: this machine has {torch.cuda.device_count()} GPU(s); start "
                             "at most that many processes per node (--nproc-per-node) or pass --device cpu")
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def teardown() -> None:
    """Leave the process group (if joined), so the launcher sees a clean exit."""
    if dist.is_initialized():
        dist.destroy_process_group()


def share(n: int, rank: int, world_size: int) -> range:
    """The rows of ``rank``: a contiguous block of ``n``; the first ``n % world_size`` ranks take one row more."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def extract_distributed(model: ModelHandle, prompts: Sequence, directory: str | os.PathLike, *,
                        spans: Sequence[tuple[int, int]] | None = None, overwrite: bool = False,
                        progress: bool = True, **options: Any) -> ShardedActivationCache:
    """Extract ``prompts`` over all ranks into one sharded cache at ``directory``; call it on every rank alike.

    ``options`` are those of :func:`probes.cache.extract` (hooks, positions, dtype, batch_tokens, ...). Only rank 0
    shows a progress bar. A rank whose share does not fit its device spills it to disk in several shards.
    """
    rank, world_size = dist.get_rank(), dist.get_world_size()
    prompts, directory = list(prompts), Path(directory)
    if not prompts:
        raise ValueError("the prompt list is empty")
    if options.get("positions") == "all":
        raise ValueError("positions='all' keeps every token in memory and has no sharded format; extract it with "
                         "probes.cache.extract")
    rows = share(len(prompts), rank, world_size)
    with contextlib.ExitStack() as stack:
        tmp = Path(_from_rank0(lambda: str(stack.enter_context(atomic_folder(directory, overwrite=overwrite)))))
        report = _guarded(lambda: _extract_share(model, prompts, spans, rows, tmp, rank, progress and rank == 0,
                                                 options))
        reports = _gather_or_raise(report)
        _from_rank0(lambda: _commit(stack, tmp, reports, prompts, spans))
    return ShardedActivationCache(directory, model.device)


def _extract_share(model: ModelHandle, prompts: list, spans, rows: range, tmp: Path, rank: int, progress: bool,
                   options: dict) -> dict:
    """Extract this rank's rows and write them into ``tmp``: the shard names (in row order) and the cache metadata."""
    if not rows:
        return {"shards": [], "meta": None}
    spill = tmp / f"rank-{rank:05d}"
    part = extract(model, prompts[rows.start:rows.stop], spans=list(spans)[rows.start:rows.stop] if spans else None,
                   progress=progress, spill_dir=spill, **options)
    if isinstance(part, ShardedActivationCache):
        (spill / "meta.json").unlink()  # the index of the whole cache lists these shards
        return {"shards": [f"{spill.name}/{s}" for s in part.meta["shards"]], "meta": part.meta}
    name = f"shard-{rank:05d}.safetensors"
    with atomic_file(tmp / name) as file:  # atomic_file also gives the umask's file mode
        save_file({"acts": _shard_layout(part)}, str(file))
    return {"shards": [name], "meta": {**part.meta, "hook_names": part.hook_names}}


def _shard_layout(cache: ActivationCache) -> torch.Tensor:
    """A dense cache's rows as the sharded format stores them: [n_hooks, n, n_positions, d]."""
    acts = cache.acts.unsqueeze(1) if isinstance(cache.meta["positions"], str) else cache.acts
    return acts.movedim(2, 0).contiguous()


def _commit(stack: contextlib.ExitStack, tmp: Path, reports: list[dict], prompts: list, spans) -> None:
    """Rank 0: write the index of every rank's shards, then let :func:`atomic_folder` rename the folder into place."""
    (tmp / "meta.json").write_text(json.dumps(_index(reports, prompts, spans), indent=1))
    stack.close()


def _index(reports: list[dict], prompts: list, spans) -> dict:
    """The metadata of a one-process run over all prompts, plus the shards of all ranks in rank order."""
    metas = [{k: v for k, v in r["meta"].items() if k not in ("n_prompts", "prompts_sha256", "shards")}
             for r in reports if r["meta"] is not None]
    if any(m != metas[0] for m in metas):
        raise RuntimeError(f"the ranks extracted different things (different models or options?): {metas}")
    return {**metas[0], "n_prompts": len(prompts), "prompts_sha256": _prompts_digest(prompts, spans),
            "shards": [s for r in reports for s in r["shards"]]}


def mean_norms(cache: ShardedActivationCache) -> list[float]:
    """Mean L2 norm of the activations per hook point; the hooks are split over the ranks, each read shard by shard."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    mine = _guarded(lambda: {h: _mean_norm(cache, h) for h in range(rank, len(cache.hook_names), world_size)})
    merged = {h: value for part in _gather_or_raise(mine) for h, value in part.items()}
    return [merged[h] for h in range(len(cache.hook_names))]


def _mean_norm(cache: ShardedActivationCache, hook: int) -> float:
    total, count = 0.0, 0
    for shard in cache.meta["shards"]:
        with safe_open(str(cache.directory / shard), framework="pt", device=str(cache.device)) as f:
            norms = f.get_slice("acts")[hook].float().norm(dim=-1)
        total, count = total + float(norms.double().sum()), count + norms.numel()
    return total / max(count, 1)


# ---------------------------------------------------------------------------------------------------- collectives
# Each step either succeeds on every rank or raises on every rank: a failing rank still takes part in the
# collective (sending its error), so no rank waits forever for one that has given up.


def _guarded(fn: Callable[[], Any]) -> dict:
    """Run ``fn`` and wrap its value, or its exception, for :func:`_gather_or_raise`."""
    try:
        return {"value": fn()}
    except Exception as err:  # noqa: BLE001 - handed to every rank, re-raised below
        return {"error": f"{type(err).__name__}: {err}", "exception": err}


def _gather_or_raise(outcome: dict) -> list:
    """Every rank's :func:`_guarded` value, in rank order; raise on all ranks if any rank failed."""
    local_exception = outcome.pop("exception", None)
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, outcome)
    failed = {r: g["error"] for r, g in enumerate(gathered) if "error" in g}
    if failed:
        message = "; ".join(f"rank {r}: {e}" for r, e in failed.items())
        raise RuntimeError(f"distributed extraction failed ({message}); no cache was written") from local_exception
    return [g["value"] for g in gathered]


def _from_rank0(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 only and hand its value to every rank; if it raises, raise on every rank."""
    box = [_guarded(fn) if dist.get_rank() == 0 else None]
    exception = box[0].pop("exception", None) if box[0] else None
    dist.broadcast_object_list(box, src=0)
    if "error" in box[0]:
        if exception is not None:
            raise exception
        raise RuntimeError(f"rank 0 failed: {box[0]['error']}")
    return box[0]["value"]
