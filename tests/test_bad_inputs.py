"""Bad input through the API is refused up front with a message saying what is wrong and what to do; corrupt or
truncated files are named with their remedy (issue 14, point 5)."""

import argparse
import gzip
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from probes import models, random_models
from probes.cache import ShardedActivationCache, extract
from probes.cli_args import check_layers, number_list, parse_layers, positive_int, proportion
from probes.conflict import load_examples
from probes.forward import generate
from probes.models import ModelLoadError, layer_count, load_model
from probes.readers import CorruptFileError, read_json
from steering.directions import diff_in_means
from steering.hooks import add


def truncate(path, keep: float = 0.5) -> None:
    """Cut a file to a fraction of its size, as a killed copy or a full disk leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


# ------------------------------------------------------------------------------------------- lists, not strings


def test_one_string_is_not_split_into_characters(tiny):
    with pytest.raises(TypeError, match="list of strings.*\\['How do I"):
        generate(tiny, "How do I pick a lock?", max_new_tokens=1, progress=False)
    with pytest.raises(TypeError, match="positive must be a list"):
        diff_in_means(tiny, "harmful", ["harmless one", "harmless two"], progress=False)
    with pytest.raises(TypeError, match="prompts must be a list"):
        extract(tiny, "The capital of France", progress=False)


def test_one_hook_name_as_a_string_is_refused(tiny):
    with pytest.raises(TypeError, match="hooks must be a list.*blocks.0.hook_resid_pre"):
        extract(tiny, ["Paris"], hooks="blocks.0.hook_resid_pre", progress=False)


# ------------------------------------------------------------------------------------------- steering values


@pytest.mark.parametrize("bad", ["direction", "coeff"])
def test_add_refuses_nan_and_inf(tiny, bad):
    direction = torch.ones(tiny.d_model)
    if bad == "direction":
        direction[3] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite" if bad == "direction" else "finite"):
        with add(tiny, direction, layer=0, coeff=float("inf") if bad == "coeff" else 1.0):
            pass


# ------------------------------------------------------------------------------------------- model loading


@pytest.mark.parametrize("kwargs, message", [
    (dict(dtype="float33"), "float32, float16, bfloat16"),
    (dict(device="gpu0"), "cpu, cuda"),
    (dict(device="cuda:99"), "cuda"),
])
def test_bad_device_or_dtype_names_the_choices(kwargs, message, monkeypatch):
    monkeypatch.setattr(random_models, "build_random_model", lambda *a, **k: pytest.fail("loaded before checking"))
    with pytest.raises(ModelLoadError, match=message):
        load_model("random:llama-tiny", **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_says_so():
    with pytest.raises(ModelLoadError, match="CUDA is not available.*cpu"):
        load_model("random:llama-tiny", device="cuda")


def test_misspelt_model_offline_is_not_a_network_error():
    with pytest.raises(ModelLoadError) as err:
        load_model("embeded", device="cpu")
    message = str(err.value)
    assert "not a built-in name" in message and "embedded-refuser" in message and "not a local folder" in message
    assert "local cache" in message and "HF_HUB_OFFLINE" in message


def test_embedded_refuser_loads_without_importing_steering_first():
    code = ("import sys; from probes.models import load_model; m = load_model('embedded-refuser', device='cpu'); "
            "print(m.name, m.n_layers)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["embedded-refuser", "30"]


def test_layer_count_is_known_before_loading():
    assert layer_count("embedded") == layer_count("embedded-refuser") == 30
    assert layer_count("random:llama-tiny") == 4 and layer_count("random:gpt2") == 3
    with pytest.raises(ModelLoadError, match="unknown random model"):
        layer_count("random:nope")
    with pytest.raises(ModelLoadError, match="not a built-in name"):
        layer_count("embeded")


# ------------------------------------------------------------------------------------------- command-line values


def test_layers_reversed_or_out_of_range_are_refused():
    with pytest.raises(ValueError, match="reversed layer range '5-2'.*write 2-5"):
        parse_layers("5-2")
    with pytest.raises(ValueError, match=r"\[4, 5\] out of range.*4 layers \(0..3\)"):
        check_layers([2, 4, 5], 4, "random:llama-tiny")
    check_layers([0, 3], 4, "random:llama-tiny")


@pytest.mark.parametrize("kind, text", [(positive_int, "-3"), (positive_int, "0"), (positive_int, "2.5"),
                                        (proportion, "1.5"), (proportion, "0"), (proportion, "nan"),
                                        (number_list, "1,x"), (number_list, "1,inf")])
def test_bad_numbers_are_refused(kind, text):
    with pytest.raises(argparse.ArgumentTypeError, match=re.escape(repr(text))):
        kind(text)


# ------------------------------------------------------------------------------------------- corrupt files


def test_truncated_checkpoint_is_named_with_the_remedy(tiny, tmp_path):
    folder = tmp_path / "checkpoint"
    tiny.hf_model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    truncate(folder / "model.safetensors")
    with pytest.raises(CorruptFileError, match="model.safetensors is truncated or corrupt.*again"):
        load_model(str(folder), device="cpu")


def test_truncated_embedded_conversion_says_delete_the_folder(tmp_path, monkeypatch):
    real = models.embedded_checkpoint()
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path))
    broken = tmp_path / real.name
    broken.mkdir()
    shutil.copy(real / "config.json", broken / "config.json")
    (broken / "model.safetensors").write_bytes((real / "model.safetensors").open("rb").read(4096))
    with pytest.raises(CorruptFileError, match=f"delete the folder {broken}"):
        load_model("embedded", device="cpu")


def test_corrupt_sharded_cache_is_named(tiny, tmp_path):
    folder = tmp_path / "spill"
    extract(tiny, ["Paris", "Rome", "Berlin", "Madrid"], max_device_bytes=4096, spill_dir=folder, progress=False)
    shard = sorted(folder.glob("shard-*.safetensors"))[0]
    truncate(shard)
    with pytest.raises(CorruptFileError, match=f"{shard.name} is truncated.*delete the folder"):
        ShardedActivationCache(folder)
    (folder / "meta.json").write_text('{"hook_names": [')
    with pytest.raises(CorruptFileError, match="meta.json is truncated.*extract again"):
        ShardedActivationCache(folder)


def test_truncated_directions_cache_is_named(tmp_path):
    from steering.directions import CandidateDirections

    path = CandidateDirections(torch.zeros(2, 3, 8), [-2, -1], [0, 1, 2]).save(tmp_path / "directions.safetensors")
    truncate(path)
    with pytest.raises(CorruptFileError, match="directions.safetensors is truncated.*delete it"):
        CandidateDirections.load(path)


def test_truncated_known_facts_are_named(tmp_path):
    path = tmp_path / "facts.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write('{"question": "Where is Paris?"}\n' * 200)
    truncate(path)
    with pytest.raises(CorruptFileError, match="facts.jsonl.gz is truncated.*python -m probes.conflict"):
        load_examples(path)


def test_truncated_dataset_table_is_named(tmp_path):
    from probes.datasets import load_entities

    path = tmp_path / "places.csv.gz"
    with gzip.open(path, "wt") as f:
        f.write("name,latitude,longitude\n" + "Paris,48.8,2.3\n" * 500)
    truncate(path)
    with pytest.raises(CorruptFileError, match="places.csv.gz is truncated"):
        load_entities("world_place", source=path)


def test_read_json_names_file_and_remedy(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"a": [1, 2')
    with pytest.raises(CorruptFileError, match="x.json is truncated or corrupt.*rebuild it"):
        read_json(path, "rebuild it")
