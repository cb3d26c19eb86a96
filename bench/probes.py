"""Speed of the all-layer ridge sweep: probes.linear.RidgeProbe on the device vs scikit-learn RidgeCV on the CPU,
and vs scikit-learn RidgeCV with ``array_api_dispatch`` on the same device (torch tensors in, torch tensors out).

    python -m bench.probes                         # the paper's shapes; on a GPU if there is one
    python -m bench.probes --sklearn-layers 4      # time scikit-learn on 4 layers, extrapolate to all
    python -m bench.probes --quick                 # small shapes, a CPU smoke run (< 1 min)

Same data (Gaussian features carrying a planted linear signal of both targets, stronger in later layers, plus
target noise; seeded), same 12 alphas, leave-one-out CV in both, targets standardised on the training split.
Both timings cover fit + predict on the held-out 20%; the data starts on the device for ours (activations live
there) and in a numpy array for scikit-learn, which fits layer by layer.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("SCIPY_ARRAY_API", "1")  # scikit-learn's Array API path needs it set before scipy loads

import numpy as np
import sklearn
import torch
from sklearn.linear_model import RidgeCV
from sklearn.metrics import r2_score

from bench.timing import sync
from probes.linear import DEFAULT_ALPHAS, RidgeProbe

SHAPES = {"paper": [(40_000, 31, 576), (20_000, 17, 2048)], "quick": [(4_000, 8, 128), (400, 4, 512)]}


def make_data(n: int, layers: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """X [n, layers, d] float32 and y [n, 2]: layer l holds y along random directions with gain 0.3 .. 3."""
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((n, 2))
    x = rng.standard_normal((n, layers, d), dtype=np.float32)
    for layer, gain in enumerate(np.linspace(0.3, 3.0, layers)):
        x[:, layer] += (latent @ (gain * rng.standard_normal((2, d)) / np.sqrt(d))).astype(np.float32)
    y = latent * [10.0, 50.0] + [40.0, 0.0] + 0.3 * rng.standard_normal((n, 2))
    return x, y


def time_ours(x: torch.Tensor, y: np.ndarray, split: int) -> tuple[float, np.ndarray, np.ndarray]:
    """Seconds for fit + predict, the held-out R² per layer and the chosen alphas."""
    sync(x.device)
    start = time.perf_counter()
    probe = RidgeProbe(DEFAULT_ALPHAS).fit(x[:split], y[:split])
    pred = probe.predict(x[split:])
    sync(x.device)
    seconds = time.perf_counter() - start
    return seconds, np.array([r2_score(y[split:], p) for p in pred.cpu().numpy()]), probe.alpha_


def time_sklearn(x: np.ndarray, y: np.ndarray, split: int, layers: int) -> tuple[float, np.ndarray, np.ndarray]:
    """Seconds for the first ``layers`` layers, their held-out R² and chosen alphas."""
    mu, sd = y[:split].mean(0), y[:split].std(0)
    start = time.perf_counter()
    preds, alphas = [], []
    for layer in range(layers):
        ref = RidgeCV(alphas=DEFAULT_ALPHAS).fit(x[:split, layer], (y[:split] - mu) / sd)
        preds.append(ref.predict(x[split:, layer]) * sd + mu)
        alphas.append(ref.alpha_)
    seconds = time.perf_counter() - start
    return seconds, np.array([r2_score(y[split:], p) for p in preds]), np.array(alphas)


def time_sklearn_array_api(x: torch.Tensor, y: np.ndarray, split: int,
                           layers: int) -> tuple[float, np.ndarray] | None:
    """Seconds for scikit-learn RidgeCV with ``array_api_dispatch`` on ``x``'s device, first ``layers`` layers, and
    their held-out R²; None where this scikit-learn cannot (too old, or no Array API support for RidgeCV)."""
    mu, sd = y[:split].mean(0), y[:split].std(0)
    target = torch.from_numpy((y[:split] - mu) / sd).to(x.device, x.dtype)
    try:
        with sklearn.config_context(array_api_dispatch=True):
            sync(x.device)
            start = time.perf_counter()
            preds = []
            for layer in range(layers):
                ref = RidgeCV(alphas=DEFAULT_ALPHAS).fit(x[:split, layer], target)
                preds.append(ref.predict(x[split:, layer]))
            sync(x.device)
            seconds = time.perf_counter() - start
    except (ImportError, TypeError, ValueError, RuntimeError) as err:
        print(f"scikit-learn {sklearn.__version__} Array API path unavailable: {type(err).__name__}: {err}")
        return None
    return seconds, np.array([r2_score(y[split:], p.double().cpu().numpy() * sd + mu) for p in preds])


def bench_shape(n: int, layers: int, d: int, device: torch.device, sklearn_layers: int | None,
                array_api: bool) -> dict:
    x, y = make_data(n, layers, d)
    split = int(0.8 * n)
    x_dev = torch.from_numpy(x).to(device)
    ours_s, ours_r2, ours_alpha = time_ours(x_dev, y, split)
    k = min(layers, sklearn_layers or layers)
    sk_s, sk_r2, sk_alpha = time_sklearn(x, y, split, k)
    sk_s *= layers / k
    api = time_sklearn_array_api(x_dev, y, split, k) if array_api else None
    return {"shape": f"{n:,} x {layers} x {d:,}", "ours_s": ours_s, "sklearn_s": sk_s, "ratio": sk_s / ours_s,
            "api_s": api[0] * layers / k if api else None,
            "api_max_abs_dr2": float(np.abs(ours_r2[:k] - api[1]).max()) if api else None,
            "max_abs_dr2": float(np.abs(ours_r2[:k] - sk_r2).max()),
            "same_alphas": bool(np.all(ours_alpha[:k] == sk_alpha)),
            "r2_range": (float(ours_r2.min()), float(ours_r2.max())), "sklearn_layers": k, "layers": layers}


def api_columns(row: dict) -> str:
    """The Array API path's seconds, its time over ours, and its largest |dR²| to ours ('-' when not run)."""
    if row["api_s"] is None:
        return f"{'-':>8s} {'-':>7s} {'-':>9s}"
    return f"{row['api_s']:8.2f} {row['api_s'] / row['ours_s']:6.1f}x {row['api_max_abs_dr2']:9.1e}"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small shapes (a CPU smoke run)")
    parser.add_argument("--sklearn-layers", type=int, default=None, metavar="K",
                        help="time scikit-learn on the first K layers only and extrapolate linearly to all layers")
    parser.add_argument("--no-array-api", action="store_true",
                        help="skip scikit-learn's Array API path (RidgeCV on the device)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    warm = torch.randn(64, 2, 16, device=device)  # pay one-off start-up (CUDA context, solver handles) untimed
    RidgeProbe().fit(warm, torch.randn(64, device=device)).predict(warm)
    rows = [bench_shape(*shape, device, args.sklearn_layers, not args.no_array_api)
            for shape in SHAPES["quick" if args.quick else "paper"]]
    print(f"\nall-layer ridge sweep, {len(DEFAULT_ALPHAS)} alphas, leave-one-out CV, fit on 80% + predict 20%: "
          f"RidgeProbe on {name} (torch {torch.__version__}) vs scikit-learn RidgeCV on the CPU, layer by layer")
    print(f"{'n x layers x d':22s} {'ours s':>8s} {'sklearn s':>10s} {'ratio':>8s} {'max|dR2|':>9s} "
          f"{'alphas':>7s} {'API s':>8s} {'ratio':>7s} {'API|dR2|':>9s} {'R2 range':>12s}  sklearn timing")
    for r in rows:
        timing = (f"extrapolated from {r['sklearn_layers']} of {r['layers']} layers"
                  if r["sklearn_layers"] < r["layers"] else f"all {r['layers']} layers")
        print(f"{r['shape']:22s} {r['ours_s']:8.2f} {r['sklearn_s']:10.2f} {r['ratio']:7.1f}x "
              f"{r['max_abs_dr2']:9.1e} {'same' if r['same_alphas'] else 'DIFFER':>7s} {api_columns(r)} "
              f"{r['r2_range'][0]:5.2f}..{r['r2_range'][1]:4.2f}  {timing}")
    print("max|dR2| and alphas compare the layers scikit-learn fitted; API = scikit-learn RidgeCV with "
          "array_api_dispatch on the same device as ours (its ratio: API seconds / ours).")
    return rows


if __name__ == "__main__":
    main()
