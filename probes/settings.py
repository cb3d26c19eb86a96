"""One settings dataclass per experiment: its fields carry the defaults and the help text, the command line is built
from them, the experiment function takes the object, and ``results.json`` records it under ``settings``.

Declare a field with :func:`setting`::

    @dataclass(kw_only=True)
    class MySettings(ModelSettings, RunSettings):
        n_prompts: int = setting(64, "prompts per group", parse=positive_int)

    settings = parse_settings(MySettings, argv, __doc__)   # --model, --device, ..., --out, --n-prompts
    run(settings)                                           # the same defaults from Python: run(MySettings(out=...))

Shared flags are declared once, in :class:`ModelSettings` (``--model``, ``--device``, ``--dtype`` = the model's
dtype, the placement flags), :class:`RunSettings` (``--out``, ``--overwrite``, ``--seed``; without the seed:
:class:`OutputSettings`) and :class:`BatchSettings` (``--batch-size`` = prompts per forward pass), so they mean the
same in every CLI. A field's flag is its name with dashes; :func:`check_torchrun_safe` tells whether a CLI's flags
pass through ``torchrun``.
"""

from __future__ import annotations

import dataclasses
import shlex
import types
import typing
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from probes.cli_args import ArgumentParser, UsageError, device_map_arg, max_memory_arg, positive_int

S = TypeVar("S", bound="Settings")

def setting(default: Any, help: str, *, parse: Callable[[str], Any] | None = None, choices: Sequence | None = None,
            required: bool = False, flag: str | None = None, cli: bool = True) -> Any:
    """A settings field: its default, its help text and how the command line reads it (``parse``: an argparse
    type; ``choices``; ``required``: the CLI insists on it even though Python callers may leave the default;
    ``flag``: a flag other than the field's name; ``cli=False``: Python only, e.g. a judge function)."""
    meta = {"help": help, "parse": parse, "choices": choices, "required": required, "flag": flag, "cli": cli}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(kw_only=True)
class Settings:
    """Base of every experiment's settings: the dict that ``results.json`` records, and the command line. A
    subclass's ``__post_init__`` checks its values (a ``ValueError`` is a usage error on the command line) and calls
    ``super().__post_init__()``."""

    def __post_init__(self) -> None:
        """Paths given as strings (from Python or a notebook) become :class:`Path`; a field declared with
        ``choices`` refuses any other value (from Python as from the command line)."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value, choices = getattr(self, f.name), f.metadata.get("choices")
            if isinstance(value, str) and Path in (hints[f.name], *typing.get_args(hints[f.name])):
                setattr(self, f.name, Path(value))
            if choices is not None and value is not None and value not in choices:
                raise ValueError(f"{f.name} must be one of {tuple(choices)}, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        """Every field as a JSON value (paths as strings, tuples as lists; Python-only fields by name)."""
        return {f.name: _json_value(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def replace(self: S, **changes) -> S:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def part(self, cls: type[S]) -> S:
        """The fields of ``cls``, a base class of this one, as a ``cls`` (e.g. the corpus part of SAE training)."""
        return cls(**{f.name: getattr(self, f.name) for f in dataclasses.fields(cls)})

    def command(self, module: str) -> str:
        """The command line that gives these settings: ``python -m module`` and each flag whose value differs from
        its default (recorded beside a run's outputs, whether it was started from the shell or from Python)."""
        hints, words = typing.get_type_hints(type(self)), [f"python -m {module}"]
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not f.metadata.get("cli", True) or value is None or value == _default(f):
                continue
            if hints[f.name] is bool:
                words.append(flag_name(f) if value else "--no-" + flag_name(f)[2:])
            else:
                text = _shown(value)
                words.append(f"{flag_name(f)}={shlex.quote(text)}" if text.startswith("-")
                             else f"{flag_name(f)} {shlex.quote(text)}")
        return " ".join(words)


def _json_value(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return getattr(value, "__name__", repr(value))


@dataclasses.dataclass(kw_only=True)
class ModelSettings(Settings):
    """Which model, where and in which dtype (``--dtype`` is always the model's; a cache's is ``--cache-dtype``)."""

    model: str = setting("embedded", "model: embedded, embedded-refuser, random:<preset>, a Hugging Face id or a "
                                     "local folder")
    device: str | None = setting(None, "device for the model, e.g. cpu, cuda, cuda:1 (default: cuda if available)")
    dtype: str | None = setting(None, "the model's dtype: float32, bfloat16 or float16 (default: float32)",
                                choices=("float32", "bfloat16", "float16"))
    device_map: str | dict | None = setting(None, "spread the model over devices: auto, balanced, balanced_low_0, "
                                                  "sequential, or a JSON file mapping module names to devices (0, "
                                                  "cpu, disk); instead of --device", parse=device_map_arg)
    max_memory: dict | None = setting(None, "memory per device for --device-map, e.g. 0=20GiB,1=20GiB,cpu=60GiB",
                                      parse=max_memory_arg)
    offload_folder: str | None = setting(None, "folder for the weights that fit on no device (disk offload)")

    def placement(self) -> dict:
        """:func:`probes.models.load_model` keyword arguments; a memory limit or an offload folder alone means
        ``device_map="auto"``."""
        device_map = self.device_map
        if device_map is None and (self.max_memory or self.offload_folder):
            device_map = "auto"
        return {"device_map": device_map, "max_memory": self.max_memory, "offload_folder": self.offload_folder}

    def load_kwargs(self) -> dict:
        """Everything :func:`probes.models.load_model` takes besides the name."""
        return {"device": self.device, "dtype": self.dtype, **self.placement()}


@dataclasses.dataclass(kw_only=True)
class OutputSettings(Settings):
    """Where a run writes and whether it may replace a previous run there (a run with nothing random to seed)."""

    out: Path | None = setting(None, "output folder of the run", parse=Path, required=True)
    overwrite: bool = setting(False, "replace the outputs of a previous run in --out")


@dataclasses.dataclass(kw_only=True)
class RunSettings(OutputSettings):
    """Where a run writes, whether it may replace a previous run there, and its seed."""

    seed: int = setting(0, "random seed (splits, sampling, initialisation)", parse=int)


@dataclasses.dataclass(kw_only=True)
class BatchSettings(Settings):
    """How many prompts go through the model at once."""

    batch_size: int = setting(32, "prompts per forward pass", parse=positive_int)


def flag_name(field: dataclasses.Field) -> str:
    """The command-line flag of a settings field."""
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def _is_bool(field: dataclasses.Field, hints: dict) -> bool:
    return hints[field.name] is bool


def _parse_type(field: dataclasses.Field, hints: dict) -> Callable[[str], Any] | None:
    if field.metadata.get("parse"):
        return field.metadata["parse"]
    hint = hints[field.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if isinstance(hint, types.UnionType) and len(args) == 1 else hint
    return base if base in (int, float, Path) else None


def build_parser(cls: type[Settings], description: str | None = None) -> ArgumentParser:
    """An argument parser with one flag per field of ``cls`` (booleans: ``--name`` when the default is False,
    ``--no-name`` when it is True); defaults and help come from the fields."""
    parser = ArgumentParser(description)
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]
    for field in fields:
        flag, default = flag_name(field), _default(field)
        help_text = field.metadata.get("help", "")
        if _is_bool(field, hints):
            name = flag if not default else "--no-" + flag[2:]
            parser.add_argument(name, dest=field.name, action="store_false" if default else "store_true",
                                help=help_text)
            continue
        shown = "" if default is None or field.metadata.get("required") else f" (default: {_shown(default)})"
        parser.add_argument(flag, dest=field.name, type=_parse_type(field, hints), default=default,
                            choices=field.metadata.get("choices"), required=field.metadata.get("required", False),
                            help=help_text + shown)
    return parser


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def _shown(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def parse_settings(cls: type[S], argv: Sequence[str] | None, description: str | None = None) -> S:
    """Read ``cls`` from the command line (``argv``; ``None``: ``sys.argv``)."""
    args = build_parser(cls, description).parse_args(argv)
    try:
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})
    except (TypeError, ValueError) as err:
        raise UsageError(str(err)) from None


def torchrun_options() -> set[str]:
    """The long options of ``torchrun`` (torch.distributed.run), ``--help`` aside."""
    from torch.distributed.run import get_args_parser

    return {o for a in get_args_parser()._actions for o in a.option_strings if o.startswith("--")} - {"--help"}


def check_torchrun_safe(cls: type[Settings]) -> None:
    """Raise if a flag of ``cls`` is a torchrun option or a prefix of one: torchrun's parser would take it, or
    refuse the command as ambiguous, before ours sees it."""
    ours = {o for a in build_parser(cls)._actions for o in a.option_strings if o.startswith("--")} - {"--help"}
    theirs = torchrun_options()
    clashes = sorted({o for o in ours for t in theirs if t.startswith(o)})
    if clashes:
        raise ValueError(f"{cls.__name__}: flags {clashes} clash with torchrun's options")
