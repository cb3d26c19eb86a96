"""Speed of SpARE's latent ranking: mutual information of every SAE latent with a behaviour label, on the device
(steering.mutual_info) vs scikit-learn's mutual_info_classif on the CPU, same discretised values.

    python -m bench.spare                          # 2,000 prompts x 16,384 latents; on a GPU if there is one
    python -m bench.spare --n 500 --latents 2048   # a quick CPU run

Data: seeded synthetic SAE activations, sparse like real ones (about 2% of latents active per prompt, heavy-tailed
magnitudes), with a planted set of latents whose firing rate depends on the label.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from bench.timing import timed
from steering.mutual_info import mutual_information, mutual_information_sklearn, select_latents


def make_latents(n: int, n_latents: int, density: float = 0.02, n_informative: int = 64, seed: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations [n, n_latents] (float32, zero-inflated) and binary labels [n]."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.rand(n, generator=g) < 0.5
    rate = torch.full((n, n_latents), density)
    rate[:, :n_informative] = torch.where(labels[:, None], 3 * density, density / 3)
    active = torch.rand(n, n_latents, generator=g) < rate
    magnitude = torch.empty(n, n_latents).exponential_(1.0, generator=g)
    return active * magnitude, labels


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--latents", type=int, default=16384)
    parser.add_argument("--bins", type=int, default=4)
    parser.add_argument("--proportion", type=float, default=0.01, help="top proportion compared between the two")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    acts, labels = make_latents(args.n, args.latents)
    acts_device, labels_device = acts.to(device), labels.to(device)
    mutual_information(acts_device[:64], labels_device[:64], args.bins)  # warm-up (kernels, allocator)
    t_ours, ours = timed(lambda: mutual_information(acts_device, labels_device, args.bins), device)
    t_sk, reference = timed(lambda: mutual_information_sklearn(acts, labels, args.bins), torch.device("cpu"))
    ours = ours.cpu().numpy()
    top_ours = set(select_latents(torch.as_tensor(ours), args.proportion).tolist())
    top_sk = set(select_latents(torch.as_tensor(reference), args.proportion).tolist())
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\nmutual information, {args.n:,} prompts x {args.latents:,} latents, {args.bins} bins + zero")
    print(f"{'path':45s} {'seconds':>9s}")
    print(f"{'steering.mutual_info on ' + where:45s} {t_ours:9.3f}")
    print(f"{'scikit-learn mutual_info_classif (CPU)':45s} {t_sk:9.3f}")
    agreement = len(top_ours & top_sk) / len(top_ours)
    print(f"ratio scikit-learn / ours: {t_sk / t_ours:.1f}x; max |dMI| {np.abs(ours - reference).max():.1e} nats; "
          f"top {args.proportion:.0%} latents shared: {agreement:.3f}")
    return {"seconds_ours": t_ours, "seconds_sklearn": t_sk, "top_agreement": agreement,
            "max_abs_diff": float(np.abs(ours - reference).max())}


if __name__ == "__main__":
    main()
