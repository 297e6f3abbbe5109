"""How precisely can a Fréchet distance be computed at all? The noise that test tolerances
are set from.

Perturbs each side's covariance by a symmetric random matrix of relative size 1e-16 (the
rounding that another batch size, summation order or number of ranks causes) and prints the
relative spread of the distance over the draws. A singular covariance (N ≤ D, or pixels that
are always black) makes scipy's matrix square root ill-conditioned and the spread large.

    python scripts/fd_noise.py A B [--draws 30]    # A, B: image folders or .npz statistics
"""
from __future__ import annotations

import argparse
import warnings

import numpy as np
from pytorch_fid.fid_score import calculate_frechet_distance

from s2dm.metrics.features import FeatureExtractor
from s2dm.metrics.fid import open_side


def spread(a, b, draws: int, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)

    def perturbed(sigma):
        e = rng.standard_normal(sigma.shape) * 1e-16 * np.abs(sigma).max()
        return sigma + (e + e.T) / 2

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        v = np.array([calculate_frechet_distance(a.mu, perturbed(a.sigma), b.mu, perturbed(b.sigma))
                      for _ in range(draws)])
    return float((v.max() - v.min()) / abs(v.mean()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--draws", type=int, default=30)
    args = p.parse_args()
    pixels = FeatureExtractor("pixels", device="cpu", progress=False)
    sides = []
    for path in (args.a, args.b):
        side = open_side(path)
        sides.append(side.stats if side.stats is not None else pixels.stats_of_images(side.images))
    a, b = sides
    print(f"N {a.n} and {b.n}, D {a.dim}: relative spread of the distance over {args.draws} draws "
          f"of rounding-size perturbations: {spread(a, b, args.draws):.2e}")


if __name__ == "__main__":
    main()
