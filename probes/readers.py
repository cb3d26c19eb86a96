"""Reading the workbench's files: a truncated or corrupt file is reported with its path and the remedy.

Each reader takes ``remedy`` (what the user should do, e.g. "delete it to rebuild") and turns the raw errors of the
libraries (``SafetensorError``, ``EOFError``, ``JSONDecodeError``, ``OSError``) into a :class:`CorruptFileError`.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from probes.errors import WorkbenchError

_UNREADABLE = (SafetensorError, EOFError, json.JSONDecodeError, UnicodeDecodeError, zlib.error, OSError)


class CorruptFileError(WorkbenchError):
    """A file exists but cannot be read (truncated, corrupt); the message names it and the remedy."""

    def __init__(self, path: str | os.PathLike, remedy: str, cause: BaseException):
        self.path = Path(path)
        super().__init__(f"{path} is truncated or corrupt ({type(cause).__name__}: {cause}); {remedy}")


def _existing(path: str | os.PathLike, remedy: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; {remedy}")
    return path


def check_safetensors(path: str | os.PathLike, remedy: str) -> dict[str, str]:
    """The header metadata of a safetensors file, after checking that the file is complete (cheap: no tensor
    is read)."""
    path = _existing(path, remedy)
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except _UNREADABLE as err:
        raise CorruptFileError(path, remedy, err) from err


def load_safetensors(path: str | os.PathLike, remedy: str, device: str | torch.device = "cpu"
                     ) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, on ``device``."""
    path = _existing(path, remedy)
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except _UNREADABLE as err:
        raise CorruptFileError(path, remedy, err) from err


def read_json(path: str | os.PathLike, remedy: str) -> Any:
    """The parsed content of a JSON file."""
    path = _existing(path, remedy)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except _UNREADABLE as err:
        raise CorruptFileError(path, remedy, err) from err


def read_jsonl_gz(path: str | os.PathLike, remedy: str) -> list[Any]:
    """The parsed lines (blank lines skipped) of a gzipped JSON-lines file."""
    path = _existing(path, remedy)
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except _UNREADABLE as err:
        raise CorruptFileError(path, remedy, err) from err
