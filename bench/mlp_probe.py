"""Speed of the all-layer MLP probe: probes.mlp_probe.MLPProbe (every layer and weight decay trained together, batched
matmuls on the device) vs scikit-learn MLPRegressor fitted layer by layer and weight decay by weight decay.

    python -m bench.mlp_probe                       # the embedded model's shapes (3,000 entities, 31 layers, 576)
    python -m bench.mlp_probe --sklearn-layers 2    # time scikit-learn on 2 layers, extrapolate to all
    python -m bench.mlp_probe --quick               # small shapes, a CPU smoke run (< 1 min)

Same data (Gaussian features whose later layers carry a nonlinear function of a planted latent, seeded), the
paper's probe (256 ReLU units, learning rate 1e-3, batches of 512, the weight decays 0.01, 0.03, 0.1, 0.3), the same
number of epochs in both with early stopping switched off (so both do the same work), 10% of the training rows held
out for validation in both. scikit-learn's penalty is an L2 term (``alpha``) in Adam's gradient rather than AdamW's
decoupled decay; its alphas are set to the same values. Both timings cover fitting every (layer, weight decay) pair
and predicting the held-out 20%.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import r2_score
from sklearn.neural_network import MLPRegressor

from bench.timing import sync
from probes.mlp_probe import WEIGHT_DECAYS, MLPProbe

SHAPES = {"paper": [(3_000, 31, 576)], "quick": [(1_000, 4, 64)]}


def make_data(n: int, layers: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """X [n, layers, d] float32 and y [n, 2]: layer l holds a nonlinear function of a 2-D latent with gain 0 .. 2."""
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((n, 2))
    features = np.concatenate([latent, np.sin(2 * latent), latent[:, :1] * latent[:, 1:]], 1)  # [n, 5]
    x = rng.standard_normal((n, layers, d), dtype=np.float32)
    for layer, gain in enumerate(np.linspace(0.0, 2.0, layers)):
        x[:, layer] += (features @ (gain * rng.standard_normal((5, d)) / np.sqrt(5))).astype(np.float32)
    y = np.stack([np.tanh(latent[:, 0]) * 30 + 40, latent[:, 1] ** 2 * 20], 1) + 0.3 * rng.standard_normal((n, 2))
    return x, y


def time_ours(x: torch.Tensor, y: np.ndarray, split: int, epochs: int) -> tuple[float, np.ndarray]:
    """Seconds for fit + predict of every layer and weight decay, and the held-out R² per layer."""
    sync(x.device)
    start = time.perf_counter()
    probe = MLPProbe(epochs=epochs, patience=epochs + 1).fit(x[:split], y[:split])
    pred = probe.predict(x[split:])
    sync(x.device)
    seconds = time.perf_counter() - start
    return seconds, np.array([r2_score(y[split:], p) for p in pred.cpu().numpy()])


def time_sklearn(x: np.ndarray, y: np.ndarray, split: int, layers: int, epochs: int) -> tuple[float, np.ndarray]:
    """Seconds for the first ``layers`` layers (each weight decay fitted, the best on validation kept), and their
    held-out R²."""
    mu, sd = y[:split].mean(0), y[:split].std(0)
    r2 = []
    start = time.perf_counter()
    for layer in range(layers):
        xm, xs = x[:split, layer].mean(0), x[:split, layer].std(0) + 1e-12
        fits = []
        for alpha in WEIGHT_DECAYS:
            ref = MLPRegressor(hidden_layer_sizes=(256,), alpha=alpha, batch_size=512, learning_rate_init=1e-3,
                               max_iter=epochs, early_stopping=True, validation_fraction=0.1,
                               n_iter_no_change=epochs + 1, random_state=0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                fits.append(ref.fit((x[:split, layer] - xm) / xs, (y[:split] - mu) / sd))
        best = max(fits, key=lambda f: f.best_validation_score_)
        r2.append(r2_score(y[split:], best.predict((x[split:, layer] - xm) / xs) * sd + mu))
    return time.perf_counter() - start, np.array(r2)


def bench_shape(n: int, layers: int, d: int, device: torch.device, sklearn_layers: int | None, epochs: int) -> dict:
    x, y = make_data(n, layers, d)
    split = int(0.8 * n)
    ours_s, ours_r2 = time_ours(torch.from_numpy(x).to(device), y, split, epochs)
    k = min(layers, sklearn_layers or layers)
    sk_s, sk_r2 = time_sklearn(x, y, split, k, epochs)
    sk_s *= layers / k
    return {"shape": f"{n:,} x {layers} x {d:,}", "ours_s": ours_s, "sklearn_s": sk_s, "ratio": sk_s / ours_s,
            "max_abs_dr2": float(np.abs(ours_r2[:k] - sk_r2).max()), "r2_range": (float(ours_r2.min()),
                                                                                 float(ours_r2.max())),
            "sklearn_layers": k, "layers": layers}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small shapes (a CPU smoke run)")
    parser.add_argument("--epochs", type=int, default=20, help="epochs in both (the paper's 20)")
    parser.add_argument("--sklearn-layers", type=int, default=None, metavar="K",
                        help="time scikit-learn on the first K layers only and extrapolate linearly to all layers")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    warm = torch.randn(64, 2, 16, device=device)  # pay one-off start-up (CUDA context, kernels) untimed
    MLPProbe(hidden=8, epochs=1).fit(warm, torch.randn(64, device=device)).predict(warm)
    rows = [bench_shape(*shape, device, args.sklearn_layers, args.epochs)
            for shape in SHAPES["quick" if args.quick else "paper"]]
    print(f"\nall-layer MLP probe, {len(WEIGHT_DECAYS)} weight decays x {args.epochs} epochs, fit on 80% + predict "
          f"20%: MLPProbe on {name} (torch {torch.__version__}) vs scikit-learn MLPRegressor on the CPU, "
          "layer by layer")
    print(f"{'n x layers x d':20s} {'ours s':>8s} {'sklearn s':>10s} {'ratio':>8s} {'max|dR2|':>9s} {'R2 range':>12s}"
          "  sklearn timing")
    for r in rows:
        timing = (f"extrapolated from {r['sklearn_layers']} of {r['layers']} layers"
                  if r["sklearn_layers"] < r["layers"] else f"all {r['layers']} layers")
        print(f"{r['shape']:20s} {r['ours_s']:8.2f} {r['sklearn_s']:10.2f} {r['ratio']:7.1f}x {r['max_abs_dr2']:9.2f} "
              f"{r['r2_range'][0]:5.2f}..{r['r2_range'][1]:4.2f}  {timing}")
    print("ratio: scikit-learn seconds / ours; max|dR2| over the layers scikit-learn fitted (different optimisers "
          "and initialisations: a check that both learned, not an equality).")
    return rows


if __name__ == "__main__":
    main()
