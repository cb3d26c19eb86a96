"""Speed and memory of orthogonalizing a checkpoint on disk, shard by shard, against a plain copy of its files.

    python -m bench.orthogonalize_checkpoint                       # ~480 MB random Llama in 50 MB shards
    python -m bench.orthogonalize_checkpoint --layers 32 --width 2048 --shard-size 500MB --dtype bfloat16

Rows, measured side by side in one run on the same files (in the page cache after a first untimed pass): (a)
``shutil.copy`` of every file; (b) the same plus ``fsync`` of each file, as the atomic edit flushes its output; (c)
``steering.orthogonalize.orthogonalize_checkpoint``. Throughput is checkpoint bytes per second. The edit's peak
memory is measured in a fresh process (peak resident size during the edit minus the size before it, after a warm-up
edit of a one-layer checkpoint) and compared with the model and its largest shard.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig

from bench.timing import timed
from steering.orthogonalize import orthogonalize_checkpoint

ROOT = Path(__file__).resolve().parents[1]

PEAK_SCRIPT = """
import json, sys
from pathlib import Path
from steering.orthogonalize import orthogonalize_checkpoint

def status(field):  # kB in /proc/self/status; VmHWM is the peak resident size of this process since exec
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024

small, big, direction, out = sys.argv[1:5]
orthogonalize_checkpoint(small, direction, out + "-warmup", progress=False)  # imports and caches, not the model
try:
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current size (Linux >= 4.0)
except OSError:
    pass  # then the peak may include the warm-up: an over-estimate
before = status("VmRSS")
orthogonalize_checkpoint(big, direction, out, progress=False)
print(json.dumps({"before": before, "peak": status("VmHWM")}))
"""


def save_random_llama(folder: Path, layers: int, width: int, vocab: int, shard_size: str,
                      dtype: torch.dtype = torch.float32) -> None:
    """A Llama checkpoint with random weights (tied embeddings, MLP 3x wide) in shards of ``shard_size``, and a
    random direction beside it (``folder.parent / "direction.safetensors"``)."""
    config = LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=3 * width, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.no_grad():
        AutoModelForCausalLM.from_config(config, dtype=dtype).save_pretrained(folder, max_shard_size=shard_size)
    save_file({"direction": torch.randn(width)}, str(folder.parent / "direction.safetensors"))


def peak_memory(small: Path, big: Path, direction: Path, out: Path) -> dict[str, int]:
    """Resident bytes of a fresh process before editing ``big`` on disk, and at its peak during the edit (Linux)."""
    env = {**os.environ, "TQDM_DISABLE": "1"}
    done = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(small), str(big), str(direction), str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("model*.safetensors"))


def _copy(src: Path, dst: Path, flush: bool) -> None:
    dst.mkdir()
    for path in src.iterdir():
        shutil.copy(path, dst / path.name)
        if flush:
            with open(dst / path.name, "rb+") as f:
                os.fsync(f.fileno())


def measure(work: Path, layers: int, width: int, vocab: int, shard_size: str, dtype: torch.dtype,
            repeats: int) -> dict:
    src = work / "model"
    save_random_llama(src, layers, width, vocab, shard_size, dtype)
    save_random_llama(work / "small" / "model", 1, width, vocab, shard_size, dtype)
    direction = work / "direction.safetensors"
    files = weight_files(src)
    size = sum(p.stat().st_size for p in files)
    cpu = torch.device("cpu")
    runs = {
        "(a) shutil.copy": lambda out: _copy(src, out, flush=False),
        "(b) shutil.copy + fsync": lambda out: _copy(src, out, flush=True),
        "(c) orthogonalize_checkpoint": lambda out: orthogonalize_checkpoint(src, direction, out, progress=False),
    }
    seconds = {name: [] for name in runs}
    for i in range(repeats + 1):  # the first pass warms the page cache and the imports, untimed
        for name, run in runs.items():
            out = work / f"out-{len(seconds[name])}-{i}"
            t, _ = timed(lambda run=run, out=out: run(out), cpu)
            shutil.rmtree(out)
            if i:
                seconds[name].append(t)
    memory = peak_memory(work / "small" / "model", src, direction, work / "peak")
    return {"model_bytes": size, "shards": len(files), "largest_shard_bytes": max(p.stat().st_size for p in files),
            "seconds": {name: min(ts) for name, ts in seconds.items()}, **memory,
            "peak_growth_bytes": memory["peak"] - memory["before"]}


def report(result: dict) -> None:
    size = result["model_bytes"]
    print(f"checkpoint: {size / 1e6:,.0f} MB in {result['shards']} shards (largest "
          f"{result['largest_shard_bytes'] / 1e6:,.1f} MB)\n")
    print("| path | seconds | GB/s |\n|---|---:|---:|")
    for name, t in result["seconds"].items():
        print(f"| {name} | {t:.2f} | {size / t / 1e9:.2f} |")
    copy, edit = result["seconds"]["(a) shutil.copy"], result["seconds"]["(c) orthogonalize_checkpoint"]
    synced = result["seconds"]["(b) shutil.copy + fsync"]
    growth = result["peak_growth_bytes"]
    print(f"\nedit / copy throughput: {copy / edit:.2f}x (vs copy + fsync: {synced / edit:.2f}x)")
    print(f"peak memory growth of the edit: {growth / 1e6:,.1f} MB = {growth / size:.1%} of the model, "
          f"{growth / result['largest_shard_bytes']:.2f}x its largest shard")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--shard-size", default="50MB", help="max_shard_size of save_pretrained")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as work:
        result = measure(Path(work), args.layers, args.width, args.vocab, args.shard_size,
                         getattr(torch, args.dtype), args.repeats)
    report(result)
    return result


if __name__ == "__main__":
    main()
