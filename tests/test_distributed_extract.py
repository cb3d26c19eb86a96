"""Data-parallel extraction (probes.distributed): 2 CPU processes on the gloo backend give the one-process cache.

Both ranks build the same seeded random model. The prompt counts are odd, so the ranks' shares differ in size.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import probes.distributed
import probes.extract
from probes.cache import ActivationCache, CacheError, ShardedActivationCache, extract, residual_hooks
from probes.distributed import extract_distributed, share
from probes.extract import ExtractSettings
from probes.models import load_model
from probes.positions import mark_span
from probes.settings import build_parser
from tests.numerics import assert_rel_close

ROOT = Path(__file__).resolve().parent.parent
MODEL = "random:llama"
PROMPTS = ["The Eiffel Tower is located in the city of", "Hi there", "What is the location of the Golden Gate Bridge?",
           "Tokyo is the capital of", "A river runs through it", "Name the tallest mountain on Earth, please",
           "Where is Lake Titicaca?"]
ENTITIES = [mark_span(t, e) for t, e in [("Where is {entity}?", "Mount Everest"),
                                         ("{entity} is a lake", "Lake Titicaca"),
                                         ("Tell me about {entity} please", "the Sahara desert"),
                                         ("{entity}", "Paris"), ("The city of {entity} lies on a river", "Budapest")]]


@pytest.fixture(scope="module")
def model():
    return load_model(MODEL, device="cpu")


def assert_same_cache(actual: ActivationCache, expected: ActivationCache) -> None:
    """Same metadata, hook names and shape; every row (prompt) equal within float32 rounding, so no row moved."""
    assert actual.meta == expected.meta
    assert actual.hook_names == expected.hook_names
    assert actual.acts.shape == expected.acts.shape and actual.acts.dtype == expected.acts.dtype
    assert_rel_close(actual.acts, expected.acts, dim=-1)


def test_shares_are_contiguous_and_cover_every_row():
    for n, world_size in [(7, 2), (5, 3), (2, 4), (0, 2)]:
        rows = [list(share(n, r, world_size)) for r in range(world_size)]
        assert sum(rows, []) == list(range(n))
        assert max(map(len, rows)) - min(map(len, rows)) <= 1


def test_a_sharded_cache_loads_whole_like_a_one_file_cache(model, tmp_path):
    dense = extract(model, PROMPTS, positions=[-2, -1], progress=False)
    row_bytes = 2 * len(dense.hook_names) * model.d_model * 4
    spilled = extract(model, PROMPTS, positions=[-2, -1], max_device_bytes=3 * row_bytes, spill_dir=tmp_path / "s",
                      progress=False)
    assert len(spilled.meta["shards"]) > 1
    assert_same_cache(ActivationCache.load(tmp_path / "s", "cpu", prompts=PROMPTS), dense)


def test_torchrun_extract_equals_one_process_run(tmp_path):
    """The CLI under torchrun (2 gloo ranks) writes one sharded cache equal to the one-process CLI's cache."""
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n")
    args = ["--model", MODEL, "--prompts-file", str(prompts_file), "--positions=-2,-1"]
    run = _torchrun_extract(*args, "--out", str(tmp_path / "two"))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.count("wrote ") == 1  # only rank 0 reports
    assert "4/4" in run.stderr and "3/3" not in run.stderr  # only rank 0 (4 of the 7 prompts) shows a bar
    probes.extract.main([*args, "--out", str(tmp_path / "one")])

    two = ActivationCache.load(tmp_path / "two" / "activations", "cpu", prompts=PROMPTS)
    assert_same_cache(two, ActivationCache.load(tmp_path / "one" / "activations.safetensors", "cpu"))
    sharded = ShardedActivationCache(tmp_path / "two" / "activations")
    assert sharded.meta["shards"] == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert torch.equal(sharded.layer(2), two[2])
    results = json.loads((tmp_path / "two" / "results.json").read_text())
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    assert results["world_size"] == 2 and results["n_prompts"] == len(PROMPTS)
    assert results["shape"] == one["shape"] and results["hook_names"] == one["hook_names"]
    assert results["mean_norm_per_layer"] == pytest.approx(one["mean_norm_per_layer"], rel=1e-5)


def _torchrun_extract(*args: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 -m probes.extract ARGS`` on 2 CPU (gloo) ranks."""
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "probes.extract", *args], cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)


def test_every_extract_flag_passes_through_torchrun(tmp_path):
    """Every flag of probes.extract, given after ``torchrun ... -m probes.extract``, reaches the workbench (none is
    taken or refused as ambiguous by torchrun's own parser): the run records each value under ``settings``. The
    placement flags, which spread one model over the devices while torchrun gives each process its own, are
    refused with one line per rank."""
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n")
    given = {"--model": MODEL, "--device": "cpu", "--dtype": "float32", "--dataset": "world_place",
             "--template": "Where is {entity}?", "--n-prompts": "5", "--positions": "span_mean",
             "--cache-dtype": "float16", "--out": str(tmp_path / "run"), "--overwrite": None, "--debug": None}
    placement = {"--prompts-file": str(prompts_file), "--device-map": "auto", "--max-memory": "cpu=8GiB",
                 "--offload-folder": str(tmp_path / "offload"), "--out": str(tmp_path / "refused")}
    flags = {o for a in build_parser(ExtractSettings)._actions for o in a.option_strings if o.startswith("--")}
    assert set(given) | set(placement) == flags - {"--help"}  # a new flag must be added here

    run = _torchrun_extract(*(w for k, v in given.items() for w in (k, v) if w is not None))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["world_size"] == 2 and results["n_prompts"] == 5 and results["dtype"] == "float16"
    assert results["settings"] == {**ExtractSettings(out=tmp_path / "run", dataset="world_place").to_dict(),
                                   "model": MODEL, "device": "cpu", "dtype": "float32", "n_prompts": 5,
                                   "template": "Where is {entity}?", "positions": "span_mean",
                                   "cache_dtype": "float16", "overwrite": True}

    refused = _torchrun_extract(*(w for kv in placement.items() for w in kv), "--model", MODEL)
    assert refused.returncode != 0 and not (tmp_path / "refused").exists()
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: --device-map/--max-memory/--offload-folder spread one model over the devices, "
                      "torchrun gives each process its own device: use one or the other"] * 2


def _lost_device(*args, **kwargs):
    raise RuntimeError("device lost")


def _worker(rank: int, world_size: int, tmp: Path) -> None:
    """One rank of the Python-API test: a run where rank 1 fails, then a good run with spans where rank 0's share
    spills to disk in several shards, in one process group."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp / 'rendezvous'}", rank=rank, world_size=world_size)
    model = load_model(MODEL, device="cpu")
    prompts, spans = [p for p, _ in ENTITIES], [s for _, s in ENTITIES]
    outcome = {}
    real_extract = probes.distributed.extract
    if rank == 1:
        probes.distributed.extract = _lost_device
    try:
        extract_distributed(model, prompts, tmp / "failed", spans=spans, positions="span_mean", progress=False)
    except RuntimeError as err:
        outcome["failed_run_error"] = str(err)
    probes.distributed.extract = real_extract
    row_bytes = len(residual_hooks(model)) * model.d_model * 4
    cache = extract_distributed(model, prompts, tmp / "good", spans=spans, positions="span_mean", progress=False,
                                max_device_bytes=2 * row_bytes)  # a share over 2 rows spills, one row per shard
    outcome["good_rows"] = len(cache)
    (tmp / f"rank{rank}.json").write_text(json.dumps(outcome))
    dist.destroy_process_group()


def test_python_api_equals_one_process_and_a_failed_rank_leaves_no_cache(model, tmp_path):
    mp.spawn(_worker, args=(2, tmp_path), nprocs=2, join=True)
    outcomes = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    for outcome in outcomes:  # every rank raised, naming the rank that failed, and no cache appeared
        assert "rank 1: RuntimeError: device lost" in outcome["failed_run_error"]
    assert not (tmp_path / "failed").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind
    with pytest.raises(FileNotFoundError):
        ActivationCache.load(tmp_path / "failed", "cpu")
    with pytest.raises(CacheError):
        ShardedActivationCache(tmp_path / "failed")

    prompts, spans = [p for p, _ in ENTITIES], [s for _, s in ENTITIES]
    assert [o["good_rows"] for o in outcomes] == [len(prompts)] * 2  # every rank gets the whole cache back
    # rank 0's 3 rows spill (one shard per row), rank 1's 2 rows just fit its budget (one shard): one index
    assert ShardedActivationCache(tmp_path / "good").meta["shards"] == [
        *(f"rank-00000/shard-{k:05d}.safetensors" for k in range(3)), "shard-00001.safetensors"]
    expected = extract(model, prompts, spans=spans, positions="span_mean", progress=False)
    assert_same_cache(ActivationCache.load(tmp_path / "good", "cpu", prompts=prompts, spans=spans), expected)
