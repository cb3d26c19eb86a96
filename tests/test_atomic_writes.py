"""Every file is written atomically with the umask's mode; pairs of files are one unit; run folders never mix runs;
nothing shipped is replaced by accident. Failures are injected (disk full mid-write, a failed rename)."""

import errno
import json
import os
import stat
from pathlib import Path

import pytest
import torch

from probes import files
from probes.cache import ActivationCache

ENOSPC = OSError(errno.ENOSPC, "No space left on device")


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]


def _half_then_enospc(monkeypatch, names: tuple[str, ...]) -> None:
    """Writes to files whose name starts with one of ``names`` (or to their temporary files) stop half-way with a
    full disk, whichever way they are written (Path.write_text / write_bytes)."""
    original = {"write_text": Path.write_text, "write_bytes": Path.write_bytes}

    def hit(path: Path) -> bool:
        return any(path.name.startswith(n) or path.name.startswith(f".{n}") for n in names)

    def make(kind: str):
        def write(self, data, *args, **kwargs):
            if not hit(self):
                return original[kind](self, data, *args, **kwargs)
            original[kind](self, data[: len(data) // 2], *args, **kwargs)
            raise ENOSPC
        return write

    for kind in original:
        monkeypatch.setattr(Path, kind, make(kind))


@pytest.fixture
def umask():
    """Set a umask for the test, restored afterwards."""
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ------------------------------------------------------------------------------------------------ crash points


@pytest.mark.parametrize("fail", ["write", "fsync", "replace"])
def test_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, monkeypatch, fail):
    path = tmp_path / "results.json"
    files.atomic_write_json(path, {"run": 1})
    if fail == "write":
        _half_then_enospc(monkeypatch, ("results.json",))
    else:
        def boom(*args, **kwargs):
            raise ENOSPC
        monkeypatch.setattr(files.os, fail, boom)
    with pytest.raises(OSError, match="No space"):
        files.atomic_write_json(path, {"run": 2, "pad": "x" * 10_000})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"run": 1}
    assert _leftovers(tmp_path) == []


def test_extract_cli_never_leaves_half_a_results_json(tiny, tmp_path, monkeypatch):
    from probes import extract as cli

    monkeypatch.setattr(cli, "load_model", lambda *a, **k: tiny)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one prompt\nanother prompt here\n")
    out = tmp_path / "run"
    _half_then_enospc(monkeypatch, ("results.json",))
    with pytest.raises(OSError, match="No space"):
        cli.main(["--model", "random:llama-tiny", "--prompts-file", str(prompts), "--out", str(out)])
    assert not (out / "results.json").exists()  # no invalid JSON where a result is expected
    assert _leftovers(out) == []


def test_space_time_partial_results_survive_a_full_disk(tiny, tmp_path, monkeypatch):
    from probes import space_time

    def reproduce(model, settings, progress, on_dataset):
        on_dataset({"model": "m", "datasets": {"art": {}}})
        _half_then_enospc(monkeypatch, ("results.json",))
        on_dataset({"model": "m", "datasets": {"art": {}, "headline": {"pad": "x" * 10_000}}})

    monkeypatch.setattr(space_time, "reproduce", reproduce)
    with pytest.raises(OSError, match="No space"):
        space_time.run(space_time.SpaceTimeSettings(datasets=["art", "headline"], n_entities=10, out=tmp_path), tiny)
    monkeypatch.undo()
    assert json.loads((tmp_path / "results.json").read_text()) == {"model": "m", "datasets": {"art": {}},
                                                                   "complete": False}
    assert _leftovers(tmp_path) == []


def test_cache_save_is_atomic_and_overwrite_is_explicit(tmp_path, monkeypatch):
    from probes import cache as cache_module

    path = tmp_path / "acts.safetensors"
    ActivationCache(torch.ones(2, 3, 4), ["a", "b", "c"], {"n_prompts": 2}).save(path)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite"):
        ActivationCache(torch.zeros(2, 3, 4), ["a", "b", "c"], {"n_prompts": 2}).save(path)

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)
        raise ENOSPC

    monkeypatch.setattr(cache_module, "save_file", full_disk)
    with pytest.raises(OSError, match="No space"):
        ActivationCache(torch.zeros(2, 3, 4), ["a", "b", "c"], {"n_prompts": 2}).save(path, overwrite=True)
    assert path.read_bytes() == before and _leftovers(tmp_path) == []


def test_known_facts_file_is_atomic_and_overwrite_is_explicit(tmp_path, monkeypatch):
    import gzip

    from probes import conflict

    example = conflict.ConflictExample(**{k: ("x",) if "answers" in k else "x"
                                          for k in conflict.ConflictExample.__dataclass_fields__})
    path = conflict.save_examples([example], tmp_path / "facts.jsonl.gz")
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        conflict.save_examples([example, example], path)

    def broken_gzip(name, *args, **kwargs):
        Path(name).write_bytes(b"\x1f\x8b partial")
        raise ENOSPC

    monkeypatch.setattr(gzip, "open", broken_gzip)
    with pytest.raises(OSError, match="No space"):
        conflict.save_examples([example, example], path, overwrite=True)
    assert path.read_bytes() == before and _leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------------ one unit


def test_direction_cache_is_one_unit(tmp_path, monkeypatch):
    """Run A caches its directions; run B (other settings) is interrupted while writing them: a rerun of A gets A's
    vectors, a rerun of B recomputes; B's completed cache is never taken for A's, whatever lies beside it."""
    from steering import directions, refusal, step_cache
    from steering.directions import CandidateDirections

    a = CandidateDirections(torch.randn(2, 3, 8, dtype=torch.float64), [-2, -1], [0, 1, 2], excluded_dims=[1])
    b = CandidateDirections(torch.randn(2, 3, 8, dtype=torch.float64), [-2, -1], [0, 1, 2])
    cache = step_cache.StepCache(tmp_path / "cache", {"weights": "a"})
    path = tmp_path / "cache" / "directions" / "candidates.safetensors"

    def step(n_train: int, candidates: CandidateDirections | None = None) -> CandidateDirections:
        """The directions step's cache: ``candidates`` is what a recomputation gives (None: it must not happen)."""
        compute = (lambda: candidates) if candidates is not None else (lambda: pytest.fail("recomputed"))
        return step_cache.cached(cache, "directions", "candidates", {"n_train": n_train}, compute, refusal.CANDIDATES)

    step(6, a)

    def interrupted(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(directions, "save_file", interrupted)
        with pytest.raises(KeyboardInterrupt):
            step(8, b)
    assert torch.equal(step(6).vectors, a.vectors) and step(6).excluded_dims == [1]
    assert _leftovers(tmp_path) == []

    assert step(8, b) is b  # recomputed
    (path.parent / "candidates.json").write_text(json.dumps({"n_train": 6, "weights": "a"}))  # a stale file beside
    assert torch.equal(step(8).vectors, b.vectors)
    assert step(6, a) is a


# ------------------------------------------------------------------------------------------------ umask


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_modes_follow_the_umask(tmp_path, umask, mask, file_mode, dir_mode):
    umask(mask)
    assert files.umask() == mask
    assert _mode(files.atomic_write_json(tmp_path / "results.json", {})) == file_mode
    cache = ActivationCache(torch.ones(1, 2, 3), ["a", "b"], {"n_prompts": 1})
    assert _mode(cache.save(tmp_path / "acts.safetensors")) == file_mode
    with files.atomic_folder(tmp_path / "checkpoint") as tmp:
        (tmp / "config.json").write_text("{}")
        (tmp / "shard").mkdir()
        os.close(os.open(tmp / "shard" / "weights.safetensors", os.O_CREAT | os.O_WRONLY, 0o600))  # as safetensors
    assert _mode(tmp_path / "checkpoint") == dir_mode == _mode(tmp_path / "checkpoint" / "shard")
    assert _mode(tmp_path / "checkpoint" / "config.json") == file_mode
    assert _mode(tmp_path / "checkpoint" / "shard" / "weights.safetensors") == file_mode


# ------------------------------------------------------------------------------------------------ run folders


def test_rerun_in_a_used_folder_is_refused_or_replaces_only_the_runs_outputs(tiny, tmp_path, monkeypatch):
    from probes import extract as cli

    loads = []
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: loads.append(1) or tiny)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one prompt\nanother prompt here\n")
    out = tmp_path / "run"
    args = ["--model", "random:llama-tiny", "--prompts-file", str(prompts), "--out", str(out)]
    cli.main(args)
    (out / "activations").mkdir()  # a torchrun run's sharded cache, from an earlier run in this folder
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        cli.main(args)
    assert loads == [1]  # refused before the model loads
    cli.main([*args, "--overwrite"])
    assert not (out / "activations").exists() and (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "results.json").read_text())["n_prompts"] == 2


def test_overwrite_clears_old_figures_but_keeps_the_refusal_cache(tmp_path):
    from probes import space_time
    from steering import refusal

    st = tmp_path / "space_time"
    st.mkdir()
    (st / "results.json").write_text('{"complete": false}')
    (st / "art_predictions.html").write_text("old figure")
    (st / ".results.json.abc.tmp").write_text("a killed run's temporary file")
    with pytest.raises(FileExistsError):
        files.prepare_run_folder(st, space_time.run_outputs(), overwrite=False)
    files.prepare_run_folder(st, space_time.run_outputs(), overwrite=True)
    assert list(st.iterdir()) == []

    rf = tmp_path / "refusal"
    (rf / "cache").mkdir(parents=True)
    (rf / "cache" / "selection.json").write_text("{}")
    (rf / "checkpoint").mkdir()
    (rf / "selection_heatmaps.html").write_text("old")
    files.prepare_run_folder(rf, refusal.OUTPUTS, overwrite=True)
    assert sorted(p.name for p in rf.rglob("*")) == ["cache", "selection.json"]


def test_spare_and_refusal_runs_refuse_a_used_folder(tiny, tmp_path):
    from steering import refusal, spare, spare_protocol

    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(FileExistsError, match="previous run"):
        refusal.run(refusal.RefusalSettings(out=tmp_path, model=tiny.name), model=tiny)
    with pytest.raises(FileExistsError, match="previous run"):
        spare_protocol.run(tiny, [], {}, spare.SpareSettings(out=tmp_path))


# ------------------------------------------------------------------------------------------------ shipped data


def _fake_training(monkeypatch, train_saes, tiny) -> None:
    def save_sae(sae, path, metadata=None, overwrite=False):
        Path(path).mkdir(parents=True)
        (Path(path) / "cfg.json").write_text(json.dumps(metadata))

    monkeypatch.setattr(train_saes, "load_model", lambda *a, **k: tiny)
    monkeypatch.setattr(train_saes, "corpus_sources",
                        lambda model, settings, seed=0, batch_size=32: {"x": ["a", "b", "c"]})
    monkeypatch.setattr(train_saes, "token_activations", lambda model, texts, layers, max_tokens=None, batch_size=32:
                        {layer: torch.zeros(2, 4) for layer in layers})
    monkeypatch.setattr(train_saes, "train_sae", lambda *a, **k: object())
    monkeypatch.setattr(train_saes, "float16_copy", lambda sae: torch.nn.Identity())
    monkeypatch.setattr(train_saes, "evaluate_sae", lambda sae, acts: {"explained_variance": 1.0})
    monkeypatch.setattr(train_saes, "reconstruction_ce", lambda model, sae, texts: {})
    monkeypatch.setattr(train_saes, "save_sae", save_sae)


def test_train_saes_never_writes_into_data_unless_asked(tiny, tmp_path, monkeypatch):
    from probes.datasets import DATA_DIR
    from steering import train_saes

    _fake_training(monkeypatch, train_saes, tiny)
    monkeypatch.setattr(train_saes, "SAE_DIR", tmp_path / "data_sae", raising=False)  # (the old default)
    monkeypatch.chdir(tmp_path)
    args = ["--model", "random:llama-tiny", "--layers", "1", "--heldout-texts", "1"]
    train_saes.main(args)
    out = tmp_path / "runs" / "sae" / "random:llama-tiny"
    assert json.loads((out / "training.json").read_text())["layers"]["1"]["explained_variance"] == 1.0
    assert (out / "layer_1" / "cfg.json").is_file()
    with pytest.raises(FileExistsError, match="--overwrite"):
        train_saes.main(args)
    train_saes.main([*args[:3], "2", *args[4:], "--overwrite"])  # the folder is one run: layer 1 is gone
    assert sorted(p.name for p in out.iterdir()) == ["layer_2", "training.json"]
    with pytest.raises(PermissionError, match="--update-shipped"):
        train_saes.main([*args, "--out", str(DATA_DIR / "sae" / "embedded"), "--overwrite"])


def test_no_default_overwrite_in_the_library():
    """Every overwrite=True in probes/ and steering/ comes from a user's choice (there are none left)."""
    root = Path(__file__).resolve().parents[1]
    hits = [f"{p.relative_to(root)}:{i}" for d in ("probes", "steering") for p in (root / d).glob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1)
            if "overwrite=True" in line and "pass overwrite=True" not in line and "(overwrite=True)" not in line]
    assert hits == []
