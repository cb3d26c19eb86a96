"""Speed of the all-layer ridge sweep: probes.linear.RidgeProbe on the device vs scikit-learn RidgeCV on the CPU.

    python -m bench.probes                 # both paper shapes; on a GPU if there is one
    python -m bench.probes --quick         # small shapes, for a CPU smoke run

Same data (Gaussian features with a planted linear signal), same 12 alphas, leave-one-out CV in both. scikit-learn
fits layer by layer; with --sklearn-layers K it fits only K layers and the table extrapolates linearly (marked).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from sklearn.linear_model import RidgeCV
from sklearn.metrics import r2_score

from probes.linear import DEFAULT_ALPHAS, RidgeProbe

SHAPES = {"paper": [(40_000, 31, 576), (20_000, 17, 2048)], "quick": [(4_000, 8, 128), (1_000, 4, 512)]}


def make_data(n: int, layers: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, layers, d), dtype=np.float32)
    w = rng.standard_normal((layers, d, 2), dtype=np.float32) / np.sqrt(d)
    y = np.einsum("nld,ldt->nt", x, w) / np.sqrt(layers) + 0.5 * rng.standard_normal((n, 2), dtype=np.float32)
    return x, y.astype(np.float64)


def bench_shape(n: int, layers: int, d: int, device: torch.device, sklearn_layers: int | None) -> dict:
    x, y = make_data(n, layers, d)
    split = int(0.8 * n)
    xt = torch.from_numpy(x).to(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    probe = RidgeProbe(DEFAULT_ALPHAS).fit(xt[:split], y[:split])
    ours_r2 = probe.score(xt[split:], y[split:])
    if device.type == "cuda":
        torch.cuda.synchronize()
    ours = time.perf_counter() - start

    fit_layers = min(layers, sklearn_layers or layers)
    mu, sd = y[:split].mean(0), y[:split].std(0)
    start = time.perf_counter()
    diffs = []
    for layer in range(fit_layers):
        ref = RidgeCV(alphas=DEFAULT_ALPHAS).fit(x[:split, layer], (y[:split] - mu) / sd)
        diffs.append(abs(r2_score(y[split:], ref.predict(x[split:, layer]) * sd + mu) - float(ours_r2[layer])))
    sk = (time.perf_counter() - start) * layers / fit_layers
    return {"shape": f"{n:,} x {layers} x {d:,}", "ours_s": ours, "sklearn_s": sk, "ratio": sk / ours,
            "max_abs_dr2": max(diffs), "extrapolated": fit_layers < layers, "sk_layers": fit_layers}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sklearn-layers", type=int, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    rows = [bench_shape(*shape, device, args.sklearn_layers) for shape in SHAPES["quick" if args.quick else "paper"]]
    print(f"\nall-layer ridge sweep, {len(DEFAULT_ALPHAS)} alphas, leave-one-out; ours on {name}, scikit-learn "
          f"RidgeCV on the CPU (train 80%, |dR2| on the other 20%)")
    print(f"{'n x layers x d':24s} {'ours s':>9s} {'sklearn s':>11s} {'ratio':>8s} {'max|dR2|':>10s}")
    for r in rows:
        mark = f" (from {r['sk_layers']} layers)" if r["extrapolated"] else ""
        print(f"{r['shape']:24s} {r['ours_s']:9.2f} {r['sklearn_s']:11.2f} {r['ratio']:7.1f}x "
              f"{r['max_abs_dr2']:10.1e}{mark}")
    return rows


if __name__ == "__main__":
    main()
