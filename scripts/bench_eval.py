#!/usr/bin/env python
"""What an evaluation during training (``train.eval_every``) costs, per call and as a fraction of
the training between two calls, for the shipped digits and CIFAR10 configs' ``train.eval``
settings; prints Markdown.

Measured in this process, on this machine, with the code training runs:
- a training step: the real ``train_step`` (draws, loss, backward, clip, Adam, EMA);
- sampling: ``metrics.sampled.sample_stats`` (the evaluation's own path), per image-NFE;
- features: pytorch-fid's Inception per image (CIFAR10's FID), if its weights are found offline;
- the Fréchet distance of the metric's dimension (pytorch-fid's ``sqrtm``).

Digits is timed whole (one evaluation as configured, n = 1,000). CIFAR10 would take hours per
evaluation on a CPU, so its per-image figures are measured on a few images and scaled: the
per-call cost is n × (NFE × seconds per image-NFE + seconds per Inception image) + the
distance, and the fraction divides it by ``eval_every`` × batch × seconds per training image.
That fraction carries to a GPU as far as the sampling forward, the training step and Inception
speed up alike there (all three are convolutions); the seconds do not.

    .venv/bin/python scripts/bench_eval.py            # ~1 min on 2 CPU cores, alone (58 s measured)
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from s2dm import load_config  # noqa: E402
from s2dm.core.schedule import NoiseSchedule  # noqa: E402
from s2dm.errors import MetricError  # noqa: E402
from s2dm.io.config import EVAL_METRICS  # noqa: E402
from s2dm.metrics.features import FeatureExtractor  # noqa: E402
from s2dm.metrics.fid import frechet_distance  # noqa: E402
from s2dm.metrics.sampled import sample_stats  # noqa: E402
from s2dm.metrics.statistics import Stats  # noqa: E402
from s2dm.samplers import expected_nfe  # noqa: E402
from s2dm.samplers.options import SampleOptions  # noqa: E402
from s2dm.training.step import train_step  # noqa: E402
from s2dm.training.state import new_state  # noqa: E402
from s2dm.util.memory import keep_freed_memory  # noqa: E402


def seconds_per_training_image(cfg, batch: int, steps: int) -> float:
    """Best of ``steps`` real training steps at ``batch`` (after one untimed), per image."""
    cfg = copy.deepcopy(cfg)  # the caller's config keeps its own batch size
    cfg.train.batch_size = batch
    state = new_state(cfg, torch.device("cpu"))
    schedule = NoiseSchedule.from_config(cfg.diffusion)
    x0 = torch.randn(batch, cfg.data.channels, cfg.data.image_size, cfg.data.image_size).clamp(-1, 1)
    best = float("inf")
    for i in range(steps + 1):
        t0 = time.perf_counter()
        train_step(cfg, state, x0, schedule, "cpu")
        state.step += 1
        if i:
            best = min(best, time.perf_counter() - t0)
    return best / batch


def evaluation_seconds(cfg, ema, n: int, extractor) -> float:
    """One evaluation's sampling and features for n images, as ``Evaluator.run`` does them."""
    ev, d = cfg.train.eval, cfg.data
    t0 = time.perf_counter()
    sample_stats(ema, NoiseSchedule.from_config(cfg.diffusion), range(n), SampleOptions.of(ev), extractor,
                 image_shape=(d.channels, d.image_size, d.image_size), batch_size=min(ev.batch_size, n),
                 device="cpu", source="bench")
    return time.perf_counter() - t0


def distance_seconds(dim: int) -> float:
    """pytorch-fid's Fréchet distance of two random full-rank statistics of ``dim`` features."""
    rng = np.random.default_rng(0)
    stats = []
    for _ in range(2):
        a = rng.standard_normal((dim, dim)) / np.sqrt(dim)
        stats.append(Stats(rng.standard_normal(dim), a @ a.T + np.eye(dim), 10_000, "pixels"))
    t0 = time.perf_counter()
    frechet_distance(*stats)
    return time.perf_counter() - t0


def digits(train_steps: int) -> dict:
    cfg = load_config("digits.yaml")
    cfg.train.eval_every = 200  # the digits config has evaluation off; docs/training.md uses 200
    per_image = seconds_per_training_image(cfg, cfg.train.batch_size, train_steps)
    ema = new_state(cfg, torch.device("cpu")).ema
    extractor = FeatureExtractor("pixels", device="cpu", progress=False)
    ev = cfg.train.eval
    evaluation_seconds(cfg, ema, 64, extractor)  # warm-up
    call = evaluation_seconds(cfg, ema, ev.n, extractor) + distance_seconds(cfg.data.image_size ** 2)
    return row("digits (ch 32)", cfg, per_image, call, "measured whole")


def cifar10(train_steps: int, images: int) -> dict:
    cfg = load_config("cifar10.yaml")
    ev = cfg.train.eval
    per_image = seconds_per_training_image(cfg, 8, train_steps)
    ema = new_state(cfg, torch.device("cpu")).ema
    pixels = FeatureExtractor("pixels", device="cpu", progress=False)
    evaluation_seconds(cfg, ema, 2, pixels)  # warm-up
    sampling = evaluation_seconds(cfg, ema, images, pixels) / images  # per image: NFE forwards
    inception, how = 0.0, "no Inception weights found: sampling only"
    if EVAL_METRICS[ev.metric] == "inception":
        try:
            ext = FeatureExtractor("inception", device="cpu", batch_size=images, progress=False)
            ext.load()
            x = torch.randint(0, 256, (images, 3, 32, 32), dtype=torch.uint8)
            ext.stats_of_uint8([x[:2]], 2, "warm-up")
            t0 = time.perf_counter()
            ext.stats_of_uint8([x], images, "bench")
            inception, how = (time.perf_counter() - t0) / images, "per-image figures scaled"
        except MetricError as exc:
            how = f"{how} ({str(exc)[:60]}…)"
    call = ev.n * (sampling + inception) + distance_seconds(2048)
    return row("CIFAR10 (ch 128)", cfg, per_image, call, how, sampling / expected_nfe(ev.sampler, ev.steps),
               inception)


def row(name, cfg, per_train_image, call, how, per_nfe=None, inception=None) -> dict:
    ev = cfg.train.eval
    between = cfg.train.eval_every * cfg.train.batch_size * per_train_image
    return {"name": name, "eval": f"{ev.metric}, n {ev.n:,}, {ev.sampler} {ev.steps}", "every": cfg.train.eval_every,
            "train_image": per_train_image, "per_nfe": per_nfe, "inception": inception, "call": call,
            "between": between, "fraction": call / between, "how": how}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-steps", type=int, default=5, help="timed training steps per model (best of)")
    p.add_argument("--cifar-images", type=int, default=8, help="CIFAR10 images sampled to time one")
    args = p.parse_args()
    keep_freed_memory()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    rows = [digits(args.train_steps), cifar10(args.train_steps, args.cifar_images)]
    print("| config | evaluation | every | training s/image | sampling s/image-NFE | Inception s/image "
          "| one evaluation (s) | training between two (s) | fraction | how |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        nfe = "—" if r["per_nfe"] is None else f"{r['per_nfe']:.4f}"
        inc = "—" if not r["inception"] else f"{r['inception']:.3f}"
        print(f"| {r['name']} | {r['eval']} | {r['every']:,} | {r['train_image']:.5f} | {nfe} | {inc} | "
              f"{r['call']:,.1f} | {r['between']:,.0f} | {100 * r['fraction']:.1f} % | {r['how']} |")


if __name__ == "__main__":
    main()
