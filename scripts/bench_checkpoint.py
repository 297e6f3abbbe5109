"""Time a full-state checkpoint write (model, EMA, Adam, RNG; atomic + fsync) against one
training step, for the digits and CIFAR10 configs, on this machine; and the redraw of
``curves.png`` that goes with every checkpoint, on the log of a 100k-step run.

    .venv/bin/python scripts/bench_checkpoint.py [--repeats 3] [--cifar-batch 16]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from s2dm.core.schedule import NoiseSchedule
from s2dm.io.checkpoint import save_run_checkpoint
from s2dm.io.config import load_config
from s2dm.training.curves import write_run_curves
from s2dm.training.step import train_step
from s2dm.training.state import RunState, new_state


def measure(config: str, batch: int, repeats: int) -> dict:
    cfg = load_config(config, [f"train.batch_size={batch}", "train.device=cpu"])
    state: RunState = new_state(cfg, torch.device("cpu"))
    schedule = NoiseSchedule.from_config(cfg.diffusion)
    shape = (batch, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    x0 = torch.randn(shape).clamp(-1, 1)
    train_step(cfg, state, x0, schedule, "cpu")  # warm-up; fills Adam's state
    step_times, save_times = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            t0 = time.perf_counter()
            train_step(cfg, state, x0, schedule, "cpu")
            step_times.append(time.perf_counter() - t0)
            state.step += 1
            t0 = time.perf_counter()
            path = save_run_checkpoint(Path(tmp), state.to_checkpoint(cfg), keep_last=1)
            save_times.append(time.perf_counter() - t0)
        size = path.stat().st_size
    step, save = statistics.median(step_times), statistics.median(save_times)
    return {"config": config, "batch": batch, "step_s": step, "save_s": save, "mb": size / 2**20,
            "ratio": save / step}


def curves_seconds(repeats: int, windows: int = 2000, evals: int = 20) -> float:
    """Median seconds of ``write_run_curves`` on a log of ``windows`` log windows (a 100k-step run
    logged every 50 steps) and ``evals`` evaluations, after one draw that pays for matplotlib's
    imports."""
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        lines = [{"step": 0, "event": "start"}]
        for i in range(windows):
            loss = 1.0 / (1 + i / 100)
            lines.append({"step": 50 * (i + 1), "loss": loss, "l0": 0.9 * loss, "lskip": 1.0, "grad_norm": 1.0,
                          **{f"loss_t_q{q}": loss * (4 - q) for q in range(1, 5)}})
        lines += [{"step": s, "event": "eval", "metric": "FD-pixels-1k", "value": 1.0 / s, "n": 1000}
                  for s in range(50 * windows // evals, 50 * windows + 1, 50 * windows // evals)]
        (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        write_run_curves(run)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            write_run_curves(run)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cifar-batch", type=int, default=16)
    args = p.parse_args()
    rows = [measure("digits.yaml", 128, args.repeats),  # bare names: the shipped configs, from any folder
            measure("cifar10.yaml", args.cifar_batch, args.repeats)]
    print("| config | batch | train step (s) | checkpoint write (s) | size (MiB) | write ÷ step |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['config']} | {r['batch']} | {r['step_s']:.3f} | {r['save_s']:.3f} | {r['mb']:.1f} | {r['ratio']:.2f} |")
    curves = curves_seconds(args.repeats)
    print(f"\n`curves.png` redrawn with each checkpoint, on a 100k-step run's log (2,000 windows, 20 evaluations): "
          f"{curves:.2f} s = {curves / rows[0]['save_s']:.1f}× the digits checkpoint write")


if __name__ == "__main__":
    main()
