"""Every CLI refuses a user error with one line ``error: ...`` and exit status 2, before any model is loaded
(``--model`` names a model that does not exist: had it been looked at first, the error would be about it);
``--debug`` shows the traceback instead (issue 14, point 5).

The cases run each CLI's ``main`` through ``probes.cli_args.run_cli`` in this process, exactly what its
``__main__`` does, to avoid paying a Python + torch start-up per case; two tests start real processes.
"""

import importlib
import os
import subprocess
import sys

import pytest

from probes import cli_args

NO_MODEL = "no-such-model-xyz"


def run_cli(module: str, *args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd, env={**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"})


CASES = [
    ("probes.extract", ["--model", NO_MODEL, "--dataset", "world_place", "--n-prompts", "-3"],
     "--n-prompts: '-3' is not a positive"),
    ("probes.extract", ["--model", NO_MODEL], "give exactly one of --dataset and --prompts-file"),
    ("probes.extract", ["--model", NO_MODEL, "--dataset", "art", "--cache-dtype", "int8"],
     "--cache-dtype: invalid choice"),
    ("probes.extract", ["--model", NO_MODEL, "--prompts-file", "missing.txt"], "no prompts file at missing.txt"),
    ("probes.extract", ["--model", NO_MODEL, "--dataset", "world_plac"], "unknown entity dataset 'world_plac'"),
    ("probes.extract", ["--model", NO_MODEL, "--dataset", "art", "--template", "Tell me"], "no {entity} placeholder"),
    ("probes.space_time", ["--model", NO_MODEL, "--datasets", "world_place,mars"], "unknown dataset(s) ['mars']"),
    ("probes.space_time", ["--model", NO_MODEL, "--templates", "empty,loud"], "unknown template(s) ['loud']"),
    ("probes.space_time", ["--model", NO_MODEL, "--n-entities", "-2"], "--n-entities: '-2' is not a positive"),
    ("probes.space_time", ["--model", NO_MODEL, "--neuron-ks", "1,0"], "--neuron-ks: '0' is not a positive"),
    ("steering.refusal", ["--model", NO_MODEL, "--n-train", "-3"], "--n-train: '-3' is not a positive"),
    ("steering.refusal", ["--model", NO_MODEL, "--n-val", "0"], "--n-val: '0' is not a positive"),
    ("steering.refusal", ["--model", NO_MODEL], f"unknown model '{NO_MODEL}': not a built-in name"),
    ("steering.refusal", ["--model", "random:llama", "--device", "gpu0"], "unknown device 'gpu0'"),
    ("steering.refusal", ["--model", "random:llama", "--dtype", "float33"], "--dtype: invalid choice: 'float33'"),
    ("steering.spare", ["--model", NO_MODEL, "--proportion", "1.5"], "--proportion: '1.5' is not a proportion"),
    ("steering.spare", ["--model", NO_MODEL, "--n-examples", "0"], "--n-examples: '0' is not a positive"),
    ("steering.spare", ["--model", NO_MODEL, "--strengths", "1,x"], "--strengths: 'x' is not a number"),
    ("steering.spare", ["--model", NO_MODEL, "--layers", "5-2"], "reversed layer range '5-2'"),
    ("steering.spare", ["--model", "random:llama", "--layers", "1,7"], "[7] out of range"),
    ("steering.spare", ["--model", NO_MODEL, "--methods", "spare,rome"], "unknown or no methods ['rome']"),
    ("steering.spare", ["--model", NO_MODEL, "--cad-alphas", "-0.5"], "cad_alphas must be >= 0"),
    ("steering.spare", ["--model", NO_MODEL, "--strengths", "0"], "strengths must be > 0"),
    ("steering.spare", ["--model", NO_MODEL, "--n-examples", "8"], "too few to draw 3 demonstrations"),
    ("steering.spare", ["--model", NO_MODEL, "--methods", "dola", "--directions", "context"],
     "dola cannot steer toward the context"),
    ("steering.organism", ["--model", NO_MODEL, "--n-harmful", "0"], "--n-harmful: '0' is not a positive"),
    ("steering.organism", ["--model", NO_MODEL, "--train-batch-size", "0"], "--train-batch-size: '0' is not a pos"),
    ("steering.organism", ["--model", "random:llama", "--layers", "0-5"], "[3, 4, 5] out of range"),
    ("steering.organism", ["--evaluate", "2"], "no refusal adapter at"),
    ("steering.train_saes", ["--model", "random:llama", "--layers", "2-9"], "out of range"),
    ("steering.train_saes", ["--model", NO_MODEL, "--layers", "1", "--k", "-1"], "--k: '-1' is not a positive"),
    ("steering.train_saes", ["--model", NO_MODEL, "--layers", "1", "--k", "64", "--d-sae", "32"],
     "k must be in 1..d_sae=32"),
    ("steering.train_saes", ["--model", NO_MODEL], "the following arguments are required: --layers"),
    ("probes.conflict", ["--model", NO_MODEL, "--rows-per-kind", "0"], "--rows-per-kind: '0' is not a positive"),
    ("probes.conflict", ["--model", NO_MODEL, "--kinds", "city_state,moons"], "unknown or no fact kinds ['moons']"),
    ("probes.conflict", ["--model", NO_MODEL], f"unknown model '{NO_MODEL}'"),
]


@pytest.mark.parametrize("module, args, message", CASES, ids=[f"{m}:{' '.join(a[2:])}" for m, a, _ in CASES])
def test_user_error_is_one_line_and_status_2(module, args, message, tmp_path, monkeypatch, capsys):
    out = ["--out", str(tmp_path / "out")] if module not in ("steering.train_saes", "probes.conflict") else []
    if module == "probes.conflict":
        out = ["--out", str(tmp_path / "facts.jsonl.gz")]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        cli_args.run_cli(importlib.import_module(module).main, [*args, *out])
    stderr = capsys.readouterr().err
    assert exit_.value.code == 2, stderr[-3000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    assert message in lines[0]


def test_a_real_process_prints_one_line_and_exits_2(tmp_path):
    done = run_cli("steering.refusal", "--model", NO_MODEL, "--n-train", "-3", "--out", str(tmp_path / "out"))
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines() == ["error: argument --n-train: '-3' is not a positive integer "
                                                "(1 or more); see refusal.py --help"]


def test_debug_shows_the_traceback(tmp_path):
    done = run_cli("steering.refusal", "--model", NO_MODEL, "--out", str(tmp_path / "out"), "--debug")
    assert done.returncode not in (0, 2)
    assert "Traceback" in done.stderr and "ModelLoadError" in done.stderr


def test_torchrun_refuses_a_device_map(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2"), monkeypatch.setenv("RANK", "1"), monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(SystemExit) as exit_:
        cli_args.run_cli(importlib.import_module("probes.extract").main,
                         ["--model", NO_MODEL, "--dataset", "world_place", "--device-map", "auto",
                          "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    assert "torchrun gives each process its own device" in capsys.readouterr().err


@pytest.mark.parametrize("debug", [[], ["--debug"]])
def test_ctrl_c_is_one_line_and_status_130(debug, tmp_path, monkeypatch, capsys):
    """Ctrl-C while a CLI runs (here: while its model loads) prints one line saying what stopped and what was kept,
    and exits with 130, the shell's status for SIGINT; with --debug too."""
    extract = importlib.import_module("probes.extract")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(extract, "load_model", interrupted)
    with pytest.raises(SystemExit) as exit_:
        cli_args.run_cli(extract.main, ["--model", NO_MODEL, "--dataset", "art", "--out", str(tmp_path / "out"),
                                        *debug], kept="nothing half-written is left")
    assert exit_.value.code == 130
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted: ")
    assert lines[0].endswith(" stopped; nothing half-written is left")
