"""Orthogonalizing a checkpoint on disk, shard by shard: equal to the in-memory edit, loadable by plain transformers,
within its memory bound, and clear about bad input."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from bench.orthogonalize_checkpoint import peak_memory, save_random_llama, weight_files
from probes.cli_args import run_cli
from probes.errors import WorkbenchError
from probes.models import load_model
from steering import orthogonalize as ortho
from steering.orthogonalize import main, orthogonalize, orthogonalize_checkpoint, save_checkpoint
from tests.numerics import FLOAT64_REL, rel_err

# pre-norm, post-norm, Conv1D + tied; MoEs stored as on the Hub, one tensor per expert (Mixtral, Qwen3-MoE; with
# dense first layers and shared experts: DeepSeek-V3, GLM-4 MoE) or fused [E, expert_dim, hidden] (Llama-4); hybrid
# mixers (gated DeltaNet, Mamba, Mamba-2 in parallel, short convolution); OPT's project_in; BLOOM's centred
# embedding LayerNorm
FAMILIES = ["llama", "gemma2", "gpt2", "qwen3_moe", "mixtral", "deepseek_v3", "glm4_moe", "llama4_text", "qwen3_next",
            "jamba", "falcon_h1", "lfm2", "opt", "bloom"]
SHARD = "200KB"  # a tiny model in 5-13 shards


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every weight of a checkpoint folder (the direction file left out)."""
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        if path.name != "direction.safetensors":
            with safe_open(str(path), framework="pt") as f:
                out.update({key: f.get_tensor(key) for key in f.keys()})
    return out


def _saved(family: str, dtype: str, folder: Path):
    """A random model of ``family`` saved in many shards, its direction (not unit norm) saved as a file."""
    model = load_model(f"random:{family}", device="cpu", dtype=dtype)
    model.hf_model.save_pretrained(folder / "src", max_shard_size=SHARD)
    model.tokenizer.save_pretrained(folder / "src")
    r = torch.randn(model.d_model, generator=torch.Generator().manual_seed(0))
    save_file({"direction": r}, str(folder / "r.safetensors"))
    return model, r


@pytest.mark.parametrize("family", FAMILIES)
def test_on_disk_edit_equals_the_in_memory_edit(family, tmp_path):
    model, r = _saved(family, "float64", tmp_path)
    assert len(list((tmp_path / "src").glob("model-*.safetensors"))) >= 4
    orthogonalize_checkpoint(tmp_path / "src", tmp_path / "r.safetensors", tmp_path / "out", progress=False)
    orthogonalize(model, r)
    save_checkpoint(model, tmp_path / "ref", r, layer=1, position=-1)

    edited, expected = _tensors(tmp_path / "out"), _tensors(tmp_path / "ref")
    assert edited.keys() == expected.keys()  # tied embeddings: the unembedding is written separately
    for key, tensor in expected.items():
        assert edited[key].dtype == tensor.dtype and edited[key].shape == tensor.shape, key
        if tensor.abs().max() > 0:
            assert rel_err(edited[key], tensor) < FLOAT64_REL, key
    ours, theirs = (json.loads((tmp_path / f / "direction.json").read_text()) for f in ("out", "ref"))
    assert {k: ours["orthogonalization"][k] for k in theirs["orthogonalization"]} == theirs["orthogonalization"]
    # tied embeddings are untied where the token embedding is edited (not OPT's, behind project_in)
    assert ours["untied_embeddings"] == theirs["untied_embeddings"] == (family != "opt") and ours["layer"] is None
    assert (tmp_path / "out" / "tokenizer.json").is_file() and (tmp_path / "out" / "generation_config.json").is_file()
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(edited)

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float64)
    params = dict(model.hf_model.named_parameters())
    for name, param in reloaded.named_parameters():
        if param.abs().max() > 0:
            assert rel_err(param.detach(), params[name].detach()) < FLOAT64_REL, name
    assert reloaded.config.tie_word_embeddings == (family == "opt")


def _save_fused(model, folder: Path, n_shards: int = 4) -> None:
    """``model`` saved under its own parameter names, in ``n_shards`` files: MoE experts fused ([E, d, inter] tensors,
    as some checkpoints store them) rather than one tensor per expert as ``save_pretrained`` writes them."""
    state = {name: param.detach().contiguous() for name, param in model.hf_model.named_parameters()}  # tied: once
    keys = sorted(state)
    weight_map = {}
    for i in range(n_shards):
        name = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = keys[i::n_shards]
        save_file({k: state[k] for k in part}, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    model.hf_model.config.save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "jamba"])
def test_fused_experts_on_disk_equal_the_in_memory_edit(family, tmp_path):
    """A checkpoint whose experts are fused [E, ., .] tensors is edited like one that stores each expert apart."""
    model = load_model(f"random:{family}", device="cpu", dtype="float64")
    (tmp_path / "src").mkdir()
    _save_fused(model, tmp_path / "src")
    assert any(k.endswith("experts.down_proj") for k in _tensors(tmp_path / "src"))
    r = torch.randn(model.d_model, generator=torch.Generator().manual_seed(0))
    orthogonalize_checkpoint(tmp_path / "src", r, tmp_path / "out", progress=False)
    orthogonalize(model, r)
    edited, expected = _tensors(tmp_path / "out"), dict(model.hf_model.named_parameters())
    assert edited.keys() == expected.keys()  # the tied unembedding written separately
    for key, tensor in expected.items():
        assert edited[key].shape == tensor.shape and rel_err(edited[key], tensor.detach()) < FLOAT64_REL, key
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float64)
    for name, param in reloaded.named_parameters():
        assert rel_err(param.detach(), expected[name].detach()) < FLOAT64_REL, name


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_float32_checkpoints_match_to_rounding(family, tmp_path):
    model, r = _saved(family, "float32", tmp_path)
    orthogonalize_checkpoint(tmp_path / "src", tmp_path / "r.safetensors", tmp_path / "out", progress=False)
    orthogonalize(model, r)
    save_checkpoint(model, tmp_path / "ref", r, layer=1, position=-1)
    edited, expected = _tensors(tmp_path / "out"), _tensors(tmp_path / "ref")
    for key, tensor in expected.items():
        assert edited[key].dtype == torch.float32
        # the same float32 arithmetic; BLAS may sum in another order for another memory alignment (a few ulps)
        assert (edited[key] - tensor).abs().max() <= 8 * torch.finfo(torch.float32).eps * tensor.abs().max(), key


def test_reads_the_direction_a_workbench_checkpoint_carries(tmp_path):
    model, r = _saved("llama", "float32", tmp_path)
    orthogonalize(model, r)
    save_checkpoint(model, tmp_path / "ref", r, layer=2, position=-3, source_model="tiny llama")
    orthogonalize_checkpoint(tmp_path / "src", tmp_path / "ref" / "direction.safetensors", tmp_path / "out",
                             source_model="my llama", progress=False)
    meta = json.loads((tmp_path / "out" / "direction.json").read_text())
    assert (meta["layer"], meta["position"], meta["source_model"]) == (2, -3, "my llama")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "layer 2, position -3" in card and "shard by shard" in card


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    _saved("llama", "float32", folder)
    return folder


def test_bad_checkpoints_are_named(checkpoint, tmp_path):
    r = checkpoint / "r.safetensors"
    with pytest.raises(WorkbenchError, match="r.safetensors is not a folder"):
        orthogonalize_checkpoint(r, r, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        orthogonalize_checkpoint(tmp_path, r, tmp_path / "out")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        orthogonalize_checkpoint(tmp_path, r, tmp_path / "out")
    broken = tmp_path / "broken"
    broken.mkdir()
    missing = sorted((checkpoint / "src").glob("model-*.safetensors"))[1].name
    for path in (checkpoint / "src").iterdir():
        if path.name != missing:
            (broken / path.name).write_bytes(path.read_bytes())
    with pytest.raises(FileNotFoundError, match=f"{missing} is missing"):
        orthogonalize_checkpoint(broken, r, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_directions_are_named(checkpoint, tmp_path):
    save_file({"direction": torch.randn(32)}, str(tmp_path / "narrow.safetensors"))
    with pytest.raises(WorkbenchError, match=r"narrow.safetensors has shape \[32\].*d_model is 64"):
        orthogonalize_checkpoint(checkpoint / "src", tmp_path / "narrow.safetensors", tmp_path / "out")
    save_file({"vectors": torch.randn(2, 3, 64), "excluded_dims": torch.zeros(0)}, str(tmp_path / "many.safetensors"))
    many = r"many.safetensors holds excluded_dims \[0\], vectors \[2, 3, 64\], not one direction"
    with pytest.raises(WorkbenchError, match=many):
        orthogonalize_checkpoint(checkpoint / "src", tmp_path / "many.safetensors", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors is missing"):
        orthogonalize_checkpoint(checkpoint / "src", tmp_path / "nowhere.safetensors", tmp_path / "out")
    save_file({"direction": torch.zeros(64)}, str(tmp_path / "zero.safetensors"))
    with pytest.raises(WorkbenchError, match="zero or non-finite norm"):
        orthogonalize_checkpoint(checkpoint / "src", tmp_path / "zero.safetensors", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["many.safetensors", "narrow.safetensors",
                                                          "zero.safetensors"]


def test_atomic_and_overwrite(checkpoint, tmp_path, monkeypatch):
    src, r, out = checkpoint / "src", checkpoint / "r.safetensors", tmp_path / "out"
    orthogonalize_checkpoint(src, r, out, progress=False)
    with pytest.raises(FileExistsError):
        orthogonalize_checkpoint(src, r, out, progress=False)
    edit = ortho._edit_shard
    calls = []

    def failing(*args):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return edit(*args)

    monkeypatch.setattr(ortho, "_edit_shard", failing)
    with pytest.raises(OSError, match="disk full"):
        orthogonalize_checkpoint(src, torch.ones(64), out, overwrite=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no half-written folder
    assert json.loads((out / "direction.json").read_text())["direction_file"] == str(r)  # the old one is intact


def test_cli(checkpoint, tmp_path, capsys):
    meta = main(["--checkpoint", str(checkpoint / "src"), "--direction", str(checkpoint / "r.safetensors"),
                 "--out", str(tmp_path / "out")])
    assert meta["orthogonalization"]["tensors_edited"] == 7
    assert json.loads(capsys.readouterr().out)["checkpoint"] == str(tmp_path / "out")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, ["--checkpoint", str(checkpoint / "src"), "--direction", str(tmp_path / "none.safetensors"),
                       "--out", str(tmp_path / "other")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "none.safetensors is missing" in err and "\n" not in err


def test_out_is_never_the_checkpoint_or_inside_or_around_it(checkpoint, tmp_path, capsys):
    """Refused with one line before anything is read or written, even with --overwrite: the edit would write into,
    or replace, the weights it reads."""
    src = checkpoint / "src"
    (tmp_path / "link").symlink_to(src)
    before = {p: p.stat().st_mtime_ns for p in src.rglob("*")}
    for out, where in [(src, "is"), (tmp_path / "link", "is"), (src / "edited", "is inside"),
                       (src / ".." / "src" / "x", "is inside"), (checkpoint, "contains")]:
        with pytest.raises(SystemExit) as exit_info:
            run_cli(main, ["--checkpoint", str(src), "--direction", str(checkpoint / "r.safetensors"),
                           "--out", str(out), "--overwrite"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"error: the output folder {out} {where} the checkpoint folder {src}: pick another folder for "
                       "the edited checkpoint"]
    assert {p: p.stat().st_mtime_ns for p in src.rglob("*")} == before and not (src / "edited").exists()


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the resident size from /proc")
def test_peak_memory_stays_near_one_shard(tmp_path):
    """A 145 MB model in ~10 MB shards: the edit's memory growth is a few shards, never the model."""
    save_random_llama(tmp_path / "small", layers=1, width=512, vocab=4096, shard_size="10MB")
    save_random_llama(tmp_path / "big", layers=10, width=512, vocab=4096, shard_size="10MB")
    shards = weight_files(tmp_path / "big")
    model_size, largest = sum(p.stat().st_size for p in shards), max(p.stat().st_size for p in shards)
    measured = peak_memory(tmp_path / "small", tmp_path / "big", tmp_path / "direction.safetensors", tmp_path / "out")
    growth = measured["peak"] - measured["before"]
    assert model_size > 120e6 and len(shards) >= 14
    assert growth < 3 * largest + 20e6, (growth, largest)
    assert growth < 0.5 * model_size, (growth, model_size)
    assert len(weight_files(tmp_path / "out")) == len(shards)
