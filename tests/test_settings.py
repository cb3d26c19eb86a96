"""The settings framework (probes.settings): every experiment's settings class gives the same defaults from the
command line as from Python, its flags pass through torchrun, and what results.json records is JSON."""

import dataclasses
import importlib
import json
import shlex
from pathlib import Path

import pytest

from probes.cli_args import UsageError
from probes.settings import (
    ModelSettings,
    RunSettings,
    Settings,
    build_parser,
    check_torchrun_safe,
    flag_name,
    parse_settings,
    setting,
)

# The modules whose settings classes are checked (every experiment CLI and the libraries they share settings with).
MODULES = ("probes.extract", "probes.space_time", "probes.conflict", "steering.spare", "steering.train_saes",
           "steering.organism", "steering.orthogonalize", "steering.refusal", "steering.sae", "steering.sae_corpus")
# A value for each field a class cannot be built without (required on the command line, or one of two sources).
NEEDED = {"out": "runs/x", "layers": "1", "checkpoint": "ckpt", "direction": "r.safetensors", "dataset": "art"}


def settings_classes() -> list[type[Settings]]:
    """Every subclass of Settings defined in MODULES, the shared bases included."""
    for module in MODULES:
        importlib.import_module(module)
    found, todo = [], [Settings]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return sorted(set(found), key=lambda c: f"{c.__module__}.{c.__qualname__}")


CLASSES = settings_classes()
IDS = [c.__name__ for c in CLASSES]


def needed_argv(cls: type[Settings]) -> list[str]:
    """Command-line values for the fields of ``cls`` that NEEDED names and that are required (or that its checks
    need: an extraction's source)."""
    argv = []
    for field in dataclasses.fields(cls):
        needed = field.metadata.get("required") or (field.name == "dataset" and cls.__name__ == "ExtractSettings")
        if needed and field.name in NEEDED:
            argv += [flag_name(field), NEEDED[field.name]]
    return argv


def _needed_values(cls: type[Settings]) -> dict:
    """The values of :func:`needed_argv`, as the command line reads them."""
    parsed, argv = parse_settings(cls, needed_argv(cls)), needed_argv(cls)
    return {f.name: getattr(parsed, f.name) for f in dataclasses.fields(cls) if flag_name(f) in argv}


def test_the_experiment_classes_are_found():
    names = set(IDS)
    assert {"ExtractSettings", "SpaceTimeSettings", "ConflictSettings", "SpareSettings", "TrainSAEsSettings",
            "OrganismSettings", "OrthogonalizeSettings", "SAESettings", "CorpusSettings"} <= names


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_command_line_defaults_are_the_python_defaults(cls):
    assert parse_settings(cls, needed_argv(cls)) == cls(**_needed_values(cls))


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_every_flag_passes_through_torchrun(cls):
    check_torchrun_safe(cls)


def test_a_prefix_of_a_torchrun_option_is_caught():
    @dataclasses.dataclass(kw_only=True)
    class Ambiguous(Settings):
        n: int = setting(3, "what --n meant before: --nnodes and --nproc-per-node start with it", parse=int)
        master: str = setting("x", "a unique prefix of --master-addr: torchrun would take it silently")

    with pytest.raises(ValueError, match=r"\['--master', '--n'\] clash with torchrun"):
        check_torchrun_safe(Ambiguous)


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_a_bool_flag_flips_its_default(cls):
    """A bool field defaulting to False is ``--name``; one defaulting to True is ``--no-name``."""
    for field in dataclasses.fields(cls):
        default = getattr(cls(**_needed_values(cls)), field.name)
        if not isinstance(default, bool) or not field.metadata.get("cli", True):
            continue
        flag = flag_name(field) if not default else "--no-" + flag_name(field)[2:]
        assert getattr(parse_settings(cls, [*needed_argv(cls), flag]), field.name) is (not default), flag
        with pytest.raises(UsageError):
            parse_settings(cls, [*needed_argv(cls), "--no-" + flag[2:] if not default else flag_name(field)])


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_to_dict_is_json(cls):
    settings = parse_settings(cls, needed_argv(cls))
    assert json.loads(json.dumps(settings.to_dict(), allow_nan=False)) == settings.to_dict()
    assert set(settings.to_dict()) == {f.name for f in dataclasses.fields(cls)}


@dataclasses.dataclass(kw_only=True)
class Example(ModelSettings, RunSettings):
    layers: list[int] | None = setting(None, "layers", parse=lambda t: [int(x) for x in t.split(",")])
    positions: str = setting("last", "where")
    controls: bool = setting(True, "controls")
    judge: object = setting(None, "a Python-only function", cli=False)


def test_to_dict_writes_paths_tuples_functions_and_placement_as_json():
    settings = Example(out="runs/x", layers=(1, 2), judge=len, max_memory={0: "2GiB", "cpu": "8GiB"})
    assert settings.out == Path("runs/x")  # a string from Python or a notebook becomes a Path
    assert settings.to_dict() == {**settings.to_dict(), "out": "runs/x", "layers": [1, 2], "judge": "len",
                                  "max_memory": {"0": "2GiB", "cpu": "8GiB"}}
    json.dumps(settings.to_dict())
    assert "--judge" not in build_parser(Example).format_help()


def test_command_gives_the_same_settings_back():
    settings = Example(out="runs/my run", layers=[1, 2], positions="-3,-1", controls=False, seed=3, device="cpu")
    command = settings.command("my.module")
    assert command == ("python -m my.module --out 'runs/my run' --seed 3 --device cpu --layers 1,2 "
                       "--positions=-3,-1 --no-controls")
    assert parse_settings(Example, shlex.split(command)[3:]) == settings


def test_a_failed_check_is_a_usage_error_naming_it():
    with pytest.raises(UsageError, match="k must be in 1..d_sae=8"):
        parse_settings(importlib.import_module("steering.sae").SAESettings, ["--d-sae", "8", "--k", "9"])


def test_part_takes_the_fields_of_a_base():
    train_saes, corpus = importlib.import_module("steering.train_saes"), importlib.import_module("steering.sae_corpus")
    settings = train_saes.TrainSAEsSettings(layers=[1], headlines=7, k=4)
    part = settings.part(corpus.CorpusSettings)
    assert type(part) is corpus.CorpusSettings and part.headlines == 7
    assert part.to_dict() == {f.name: getattr(settings, f.name) for f in dataclasses.fields(corpus.CorpusSettings)}


def test_sae_training_defaults_are_the_shipped_saes_settings():
    """train_sae from Python and steering.train_saes from the shell share one set of defaults: those recorded by the
    shipped SAEs' training (its command gave no SAE or corpus setting)."""
    from steering.sae import SAE_DIR, SAESettings
    from steering.sae_corpus import CorpusSettings

    shipped = SAE_DIR / "embedded"
    record = json.loads((shipped / "training.json").read_text())
    assert record["corpus"]["settings"] == CorpusSettings().to_dict()
    trained = json.loads((shipped / "layer_15" / "cfg.json").read_text())["metadata"]["training"]
    defaults = SAESettings()
    assert {k: trained[k] for k in ("architecture", "d_sae", "epochs", "lr", "normalize", "k")} == {
        k: getattr(defaults, k) for k in ("architecture", "d_sae", "epochs", "lr", "normalize", "k")}
    assert (trained["batch_size"], trained["aux_coefficient"]) == (defaults.sae_batch_tokens, defaults.aux)
    assert trained["dead_window_steps"] == -(-defaults.dead_window // defaults.sae_batch_tokens)


def test_a_field_with_choices_refuses_other_values_from_python_too():
    from probes.settings import ModelSettings
    from steering.organism import OrganismSettings

    with pytest.raises(ValueError, match=r"dtype must be one of \('float32', 'bfloat16', 'float16'\), got 'float64'"):
        ModelSettings(dtype="float64")
    with pytest.raises(ValueError, match="harmless_objective must be one of"):
        OrganismSettings(harmless_objective="mse")
    assert ModelSettings(dtype="bfloat16").dtype == "bfloat16" and ModelSettings().dtype is None
