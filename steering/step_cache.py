"""A pipeline's resumable cache: one folder per step under ``OUT/cache``, each value stored with the key it was made
with (the settings it depends on, the model's name and its weights' fingerprint), so that a rerun after an
interruption or with other settings recomputes only what changed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

from probes.files import atomic_write_json
from probes.models import ModelHandle
from probes.provenance import weights_fingerprint
from probes.readers import read_json
from probes.settings import OutputSettings

T = TypeVar("T")


@dataclass(frozen=True)
class Store:
    """How a step's value is written to its cache file together with its key, and read back as (value, key)."""

    suffix: str
    save: Callable[[Any, Path, dict], Any]
    load: Callable[[Path], tuple[Any, Any]]


def _save_json(value: Any, path: Path, key: dict) -> None:
    atomic_write_json(path, {"key": key, "value": value}, indent=None)


def _load_json(path: Path) -> tuple[Any, Any]:
    saved = read_json(path, "delete it and rerun (it is recomputed)")
    return (saved.get("value"), saved.get("key")) if isinstance(saved, dict) else (None, None)


JSON = Store(".json", _save_json, _load_json)


@dataclass(frozen=True)
class StepCache:
    """A run's resumable cache, ``OUT/cache``: one folder per step, each value stored with the key it was made
    with, which always includes ``base``: the model's name and its weights' fingerprint."""

    root: Path
    base: dict

    @classmethod
    def of(cls, settings: OutputSettings, model: ModelHandle) -> "StepCache":
        """``settings.out/cache`` for ``model`` as it is now (before any edit of its weights)."""
        return cls(Path(settings.out) / "cache", {"model": model.name, "weights": weights_fingerprint(model)})


def cached(cache: StepCache | None, step: str, name: str, key: dict, compute: Callable[[], T],
           store: Store = JSON) -> T:
    """``compute()``, or the value stored in ``cache.root/step/name`` if it was made with the same ``key`` (plus
    ``cache.base``); a new value replaces the stored one, atomically. ``cache=None`` computes and stores nothing."""
    if cache is None:
        return compute()
    path = cache.root / step / f"{name}{store.suffix}"
    key = {**cache.base, **key}
    if path.is_file():
        value, saved_key = store.load(path)
        if saved_key == key:
            return value
    value = compute()
    store.save(value, path, key)
    return value
