"""Every file the workbench writes goes through here, so a failure (disk full, a kill, an exception half-way) never
leaves a half-written result, files get the modes the umask asks for, and run folders never mix two runs.

A file is written under a temporary name in its own folder (``.<name>.<random>.tmp``), flushed to disk, then renamed
over the target with ``os.replace``: readers see the old file or the new one, never a mix. Files that belong
together are written as one folder (:func:`atomic_folder`) or as one file (safetensors with its metadata).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

TMP_SUFFIX = ".tmp"


def umask() -> int:
    """The process umask, read without changing it where the OS allows (``/proc``), else set and restored."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    old = os.umask(0o022)
    os.umask(old)
    return old


def _fsync_path(path: Path) -> None:
    """Flush a file or folder to disk (folders: where the OS supports it)."""
    flags = (os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)) if path.is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:
        if path.is_dir():
            return  # folders cannot be opened for fsync on some systems
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for any writer (``save_file``, ``fig.write_html``, ``gzip.open``);
    when the body finishes it is flushed, given the umask's mode and renamed to ``path`` (replacing it).

    On an exception the temporary file is removed and an existing ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _fsync_path(tmp)
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp creates 0600 whatever the umask
        os.replace(tmp, path)
        _fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically; serialised first, so an unserialisable value writes nothing."""
    return atomic_write_text(path, json.dumps(obj, indent=indent))


def write_plotlyjs(folder: str | os.PathLike) -> Path:
    """``folder/plotly.min.js`` (written atomically if missing): one copy per run folder, which every figure file and
    the report page load offline."""
    bundle = Path(folder) / "plotly.min.js"
    if not bundle.is_file():
        from plotly.offline import get_plotlyjs

        atomic_write_text(bundle, get_plotlyjs())
    return bundle


def write_figure(fig, path: str | os.PathLike) -> Path:
    """A plotly figure as HTML at ``path``, with ``plotly.min.js`` once beside it; both written atomically."""
    path = Path(path)
    write_plotlyjs(path.parent)
    with atomic_file(path) as tmp:
        fig.write_html(tmp, include_plotlyjs="directory")  # finds the bundle beside tmp and leaves it alone
    return path


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync_path(Path(folder) / name)
        _fsync_path(Path(folder))


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; when the body finishes, its files are flushed and it is renamed to
    ``path`` (with the umask's mode).

    On an exception nothing is left behind and an existing ``path`` is untouched; with ``overwrite`` an existing
    folder is replaced only once the new one is complete (and put back if the final rename fails).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True or choose another path")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent))
    old = tmp.with_name(tmp.name.removesuffix(TMP_SUFFIX) + ".old" + TMP_SUFFIX)
    try:
        yield tmp
        _umask_modes(tmp)
        _fsync_tree(tmp)
        if path.exists():
            if not overwrite:  # it appeared while the body ran
                raise FileExistsError(f"{path} was created meanwhile; pass overwrite=True or choose another path")
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except OSError:
            if old.exists():
                os.replace(old, path)
            raise
        _fsync_path(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _umask_modes(folder: Path) -> None:
    """Give ``folder`` and everything in it the umask's modes: mkdtemp creates 0700 and some writers (safetensors'
    ``save_file``) 0600, whatever the umask."""
    mask = umask()
    os.chmod(folder, 0o777 & ~mask)
    for root, dirs, names in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in names:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def prepare_run_folder(out: str | os.PathLike, outputs: Sequence[str], overwrite: bool) -> Path:
    """Make ``out`` ready for a new run, so that a folder never mixes the outputs of two runs.

    ``outputs`` names what this experiment writes in ``out`` (file or folder names, glob patterns allowed). If any
    of them, or a temporary file a killed run left for one, is there, the folder holds a previous run: refused
    unless ``overwrite``, which removes exactly those outputs first. Anything else (the user's files, a resumable
    cache the experiment keeps on purpose) is left alone.
    """
    out = Path(out)
    patterns = [*outputs, *(f".{p}.*{TMP_SUFFIX}" for p in outputs)]
    previous = sorted({p for pattern in patterns for p in out.glob(pattern)}) if out.is_dir() else []
    if previous and not overwrite:
        shown = ", ".join(p.name for p in previous[:5]) + (", ..." if len(previous) > 5 else "")
        raise FileExistsError(f"{out} holds the outputs of a previous run ({shown}); pass --overwrite "
                              "(overwrite=True) to replace them, or choose another output folder")
    for p in previous:
        _remove(p)
    out.mkdir(parents=True, exist_ok=True)
    return out


def check_not_shipped(path: str | os.PathLike, allowed: bool) -> Path:
    """Refuse a ``path`` inside the project's shipped ``data/`` folder unless ``allowed`` (an explicit user flag):
    the shipped SAEs, adapter and facts must not be replaced by accident."""
    from probes.datasets import DATA_DIR

    path = Path(path)
    if not allowed and path.resolve().is_relative_to(DATA_DIR.resolve()):
        raise PermissionError(f"{path} is inside the shipped data folder {DATA_DIR}; write elsewhere (e.g. runs/), "
                              "or pass --update-shipped to replace the shipped files on purpose")
    return path
