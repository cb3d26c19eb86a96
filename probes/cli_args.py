"""Command-line values shared by the experiment CLIs, and how every CLI reports a user error.

Values are checked by argparse types (:func:`positive_int`, :func:`proportion`, ...) or right after parsing, before
any model is loaded; :func:`run_cli` prints a user error as one line ``error: ...`` and exits with status 2
(``--debug`` shows the traceback instead).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Callable, Sequence

from probes.errors import WorkbenchError

# What a user can fix: bad arguments, unknown models, missing or corrupt files, a full disk (WorkbenchError is a
# ValueError). Anything else is a bug in the workbench and keeps its traceback.
USER_ERRORS = (ValueError, OSError)


class UsageError(WorkbenchError):
    """A command-line argument argparse refused."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a ``--debug`` flag, raising :class:`UsageError` instead of printing usage and exiting, so that
    :func:`run_cli` reports it like every other user error."""

    def __init__(self, description: str | None = None, **kwargs):
        super().__init__(description=description, formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)
        self.add_argument("--debug", action="store_true", help="show the full traceback of an error")

    def error(self, message: str):
        raise UsageError(f"{message}; see {self.prog} --help")


def one_line(err: BaseException) -> str:
    """An error's message on one line (multi-line messages joined with '; ')."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return "; ".join(lines) or type(err).__name__


def run_cli(main: Callable[[list[str] | None], object], argv: Sequence[str] | None = None,
            kept: str = "nothing half-written is left in the output folder") -> None:
    """Run a CLI's ``main(argv)``; a user error (:data:`USER_ERRORS`) prints ``error: <message>`` on one line and
    exits with status 2, unless ``--debug`` is given (then the traceback is shown). Ctrl-C prints one line saying
    what was interrupted and what was ``kept``, and exits with status 130."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if "--debug" in argv:
            main(argv)
            return
        try:
            main(argv)
        except USER_ERRORS as err:
            print(f"error: {one_line(err)}", file=sys.stderr)
            raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(f"interrupted: {_program()} stopped; {kept}", file=sys.stderr)
        raise SystemExit(130) from None


def _program() -> str:
    """The running command as a user typed it: ``python -m steering.refusal`` rather than ``__main__.py``."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return f"python -m {spec.name}" if spec and spec.name else Path(sys.argv[0]).name


def _number(text: str, kind: type, what: str, ok: Callable[[float], bool]):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if not (math.isfinite(value) and ok(value)):
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
    return value


def positive_int(text: str) -> int:
    """argparse type: a count, at least 1."""
    return _number(text, int, "a positive integer (1 or more)", lambda v: v >= 1)


def non_negative_int(text: str) -> int:
    """argparse type: 0 or more."""
    return _number(text, int, "an integer >= 0", lambda v: v >= 0)


def positive_float(text: str) -> float:
    """argparse type: a finite number above 0."""
    return _number(text, float, "a number > 0", lambda v: v > 0)


def non_negative_float(text: str) -> float:
    """argparse type: a finite number, 0 or more."""
    return _number(text, float, "a number >= 0", lambda v: v >= 0)


def proportion(text: str) -> float:
    """argparse type: a fraction in (0, 1]."""
    return _number(text, float, "a proportion in (0, 1], e.g. 0.01", lambda v: 0 < v <= 1)


def number_list(text: str) -> list[float]:
    """argparse type: comma-separated finite numbers, e.g. ``0.5,2``."""
    return [_number(x.strip(), float, f"a number (in {text!r}; write e.g. 0.5,2)", lambda v: True)
            for x in text.split(",")]


def name_list(text: str) -> list[str]:
    """argparse type: comma-separated names, e.g. ``world_place,art``."""
    return [x.strip() for x in text.split(",") if x.strip()]


def choice_list(known: Sequence[str], what: str) -> Callable[[str], list[str]]:
    """argparse type: comma-separated names, each one of ``known`` (``what`` names them in the error)."""
    def parse(text: str) -> list[str]:
        names = name_list(text)
        unknown = [n for n in names if n not in known]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown or no {what} {unknown or text!r}; known: {','.join(known)}")
        return names
    return parse


def positive_int_list(text: str) -> list[int]:
    """argparse type: comma-separated counts, e.g. ``1,4,16``."""
    return [positive_int(x.strip()) for x in text.split(",")]


def layer_list(text: str) -> list[int]:
    """argparse type: :func:`parse_layers` with its message kept."""
    try:
        return parse_layers(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def check_layers(layers: Sequence[int] | None, n_layers: int | None, model: str) -> None:
    """Refuse layers the model does not have (known before its weights load: :func:`probes.models.layer_count`;
    ``None``: not known yet, nothing checked)."""
    bad = [layer for layer in layers or [] if n_layers is not None and not 0 <= layer < n_layers]
    if bad:
        raise WorkbenchError(f"layer(s) {bad} out of range: model {model!r} has {n_layers} layers (0..{n_layers - 1})")


def parse_layers(text: str | None) -> list[int] | None:
    """``"0-11"`` or ``"2,4,6"`` (or a mix, ``"0-3,8"``) -> sorted layer indices; ``None`` stays ``None`` (all)."""
    if text is None:
        return None
    layers: set[int] = set()
    for part in text.split(","):
        lo, hi = _layer_range(part.strip(), text)
        if hi < lo:
            raise WorkbenchError(f"reversed layer range {part.strip()!r} in {text!r}; write {hi}-{lo}")
        layers.update(range(lo, hi + 1))
    return sorted(layers)


def _layer_range(part: str, text: str) -> tuple[int, int]:
    lo, _, hi = part.partition("-")
    try:
        return int(lo), int(hi or lo)
    except ValueError:
        raise WorkbenchError(f"cannot read layers {text!r}; write e.g. 0-11 or 2,4,6") from None


def format_layers(layers: list[int] | None) -> str:
    """The inverse of :func:`parse_layers`: ``[0, 1, 2, 3, 8]`` -> ``"0-3,8"``; ``None`` -> ``"all"``."""
    if layers is None:
        return "all"
    runs: list[list[int]] = []
    for layer in sorted(set(layers)):
        if runs and layer == runs[-1][1] + 1:
            runs[-1][1] = layer
        else:
            runs.append([layer, layer])
    return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in runs)


def device_map_arg(text: str) -> str | dict:
    """argparse type: a device-map mode, or a JSON file holding ``{module name: device}``."""
    from probes.models import DEVICE_MAP_MODES

    if text in DEVICE_MAP_MODES:
        return text
    try:
        with open(text) as f:
            mapping = json.load(f)
    except (OSError, ValueError) as err:
        raise argparse.ArgumentTypeError(f"{text!r} is neither one of {', '.join(DEVICE_MAP_MODES)} nor a readable "
                                         f"JSON file of module -> device ({err})") from None
    if not isinstance(mapping, dict):
        raise argparse.ArgumentTypeError(f"{text} must hold a JSON object mapping module names to devices")
    return mapping


def max_memory_arg(text: str) -> dict[int | str, str]:
    """argparse type: ``"0=20GiB,1=20GiB,cpu=60GiB"`` -> ``{0: "20GiB", 1: "20GiB", "cpu": "60GiB"}``."""
    limits: dict[int | str, str] = {}
    for part in text.split(","):
        device, sep, size = (x.strip() for x in part.partition("="))
        if not sep or not device or not size:
            raise argparse.ArgumentTypeError(f"cannot read max memory {text!r}; write e.g. 0=20GiB,1=20GiB,cpu=60GiB")
        limits[int(device) if device.isdigit() else device] = size
    return limits
