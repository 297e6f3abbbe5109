#!/usr/bin/env python
"""Sampler overhead on a real UNet: run time ÷ (NFE × one network forward).

For every s2dm sampler and step count, and for diffusers' DDIM and PNDM scheduler loops on
the same network, two estimates of the same ratio (1.00 = the update rules are free):
- direct: the sampling run's time ÷ the time of the same NFE bare forward calls, measured
  back to back and interleaved, best of ``--repeats``;
- split: 1 + overhead ÷ (NFE × forward), where the overhead is the same run with the
  network replaced by a stub that returns a precomputed ε (best of ``--stub-repeats``).
  The split estimate needs only short, repeatable timings, so it stays sharp on a busy
  machine, where the direct one picks up other processes' noise. Prints a Markdown table.

    .venv/bin/python scripts/bench_samplers.py                 # ~1–2 min on 2 CPU cores
    .venv/bin/python scripts/bench_samplers.py --steps 10 20 --ch 64 --image-size 32
"""
from __future__ import annotations

import argparse
import time

import torch

from s2dm.core.schedule import NoiseSchedule, timestep_grid
from s2dm.samplers import SAMPLERS, sample

CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
_clock = CLOCKS["cpu"]


def timed(fn) -> float:
    start = _clock()
    fn()
    return _clock() - start


def build_network(args):
    """s2dm's UNet if present, else a small stand-in conv net (named in the output)."""
    try:
        from s2dm.core.unet import UNet
    except ImportError:
        UNet = None
    if UNet is not None:
        net = UNet(args.channels, ch=args.ch, ch_mult=tuple(args.ch_mult), num_res_blocks=args.num_res_blocks,
                   attn_resolutions=tuple(args.attn), dropout=0.0, resamp_with_conv=True,
                   image_size=args.image_size)
        return net.eval(), "s2dm.core.unet.UNet"

    class StandIn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = torch.nn.Conv2d(args.channels, args.ch, 3, padding=1)
            self.mid = torch.nn.Sequential(*[torch.nn.Conv2d(args.ch, args.ch, 3, padding=1) for _ in range(4)])
            self.out = torch.nn.Conv2d(args.ch, args.channels, 3, padding=1)

        def forward(self, x, t):
            t = torch.as_tensor(t, dtype=x.dtype).reshape(-1)[:, None, None, None]
            return self.out(torch.tanh(self.mid(self.inp(x) + t / 1000)))

    return StandIn().eval(), "stand-in conv net (s2dm.core.unet not importable)"


def call_times(sampler, walked):
    """The timesteps a sampler evaluates, in order (F-PNDM mid-points rounded down)."""
    steps = list(zip(walked[:-1], walked[1:]))
    if sampler == "pndm":
        warm = [u for t, s in steps[:3] for u in (t, (t + s) // 2, (t + s) // 2, s)]
        return warm + [t for t, _ in steps[3:]]
    if sampler == "spndm":
        return [steps[0][0], steps[0][1]] + [t for t, _ in steps[1:]]
    return [t for t, _ in steps]


def bare_forwards(net, x, times):
    """The network alone, once per timestep in ``times``: what NFE × one forward costs."""
    def run():
        with torch.no_grad():
            for t in times:
                net(x, torch.full((x.shape[0],), int(t), dtype=torch.long))
    return run


def s2dm_run(model, x, schedule, name, steps):
    return lambda: sample(model, x, schedule, sampler=name, steps=steps, generator=torch.Generator().manual_seed(0))


def diffusers_run(model, x, scheduler, steps):
    def run():
        scheduler.set_timesteps(steps)  # also resets PNDM's multistep state
        with torch.no_grad():
            y = x
            for t in scheduler.timesteps:
                y = scheduler.step(model(y, t), t, y).prev_sample
    return run


def diffusers_schedulers(schedule):
    """The oracle configurations of diffusers' DDIM and F-PNDM (docs/method.md §5), if installed."""
    try:
        import diffusers
    except ImportError:
        return {}
    common = dict(num_train_timesteps=schedule.T, trained_betas=schedule.betas.numpy(), set_alpha_to_one=True,
                  steps_offset=0, timestep_spacing="leading")
    return {
        "diffusers DDIM": lambda: diffusers.DDIMScheduler(clip_sample=False, **common),
        "diffusers PNDM": lambda: diffusers.PNDMScheduler(skip_prk_steps=False, **common),
    }


def measure(run, bare, stub_run, repeats, stub_repeats):
    """(best run, best bare NFE forwards, best stub run); run and bare interleaved."""
    best_run = best_bare = float("inf")
    for _ in range(repeats):
        best_bare = min(best_bare, timed(bare))
        best_run = min(best_run, timed(run))
    best_stub = min(timed(stub_run) for _ in range(stub_repeats))
    return best_run, best_bare, best_stub


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50])
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=SAMPLERS)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--ch", type=int, default=32)
    p.add_argument("--ch-mult", type=int, nargs="+", default=[1, 2])
    p.add_argument("--num-res-blocks", type=int, default=1)
    p.add_argument("--attn", type=int, nargs="*", default=[8])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--stub-repeats", type=int, default=15)
    # One thread: on a shared 2-core machine a second OpenMP thread makes each forward's time
    # hostage to the other processes (seen here under load: 60 ms at 1 thread, 400+ at 2).
    p.add_argument("--threads", type=int, default=1)
    # cpu = this process's CPU time; with one thread that is the wall time on an idle core,
    # while wall time on a shared machine also counts the other processes' turns.
    p.add_argument("--clock", choices=sorted(CLOCKS), default="cpu")
    p.add_argument("--no-diffusers", action="store_true")
    return p.parse_args(argv)


def main(argv=None):
    global _clock
    args = parse_args(argv)
    _clock = CLOCKS[args.clock]
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    schedule = NoiseSchedule.linear()
    net, net_name = build_network(args)
    x_T = torch.randn(args.batch, args.channels, args.image_size, args.image_size)
    with torch.no_grad():
        for _ in range(3):  # warm-up: allocator, kernels
            eps_const = net(x_T, torch.full((args.batch,), 500))
        one = min(timed(lambda: net(x_T, torch.full((args.batch,), 500))) for _ in range(5))
    stub = lambda x, t: eps_const  # a free "network": what is left is the sampler's own cost
    params = sum(q.numel() for q in net.parameters()) / 1e6
    print(f"network: {net_name}, {params:.2f} M parameters; batch {args.batch}×{args.channels}×"
          f"{args.image_size}²; one forward ≈ {one * 1e3:.1f} ms; torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s); {args.clock} clock; best of {args.repeats} "
          f"(stub: {args.stub_repeats})\n")

    rows = []
    for steps in args.steps:
        for name in args.samplers:
            times = call_times(name, timestep_grid("uniform", steps, schedule.T).tolist())
            timings = measure(s2dm_run(net, x_T, schedule, name, steps), bare_forwards(net, x_T, times),
                              s2dm_run(stub, x_T, schedule, name, steps), args.repeats, args.stub_repeats)
            rows.append((name, steps, len(times), *timings))
        for name, make in ({} if args.no_diffusers else diffusers_schedulers(schedule)).items():
            scheduler = make()
            scheduler.set_timesteps(steps)
            times = scheduler.timesteps.tolist()
            timings = measure(diffusers_run(net, x_T, scheduler, steps), bare_forwards(net, x_T, times),
                              diffusers_run(stub, x_T, scheduler, steps), args.repeats, args.stub_repeats)
            rows.append((name, steps, len(times), *timings))

    print(f"| sampler | steps | NFE | run ({args.clock}, s) | NFE × forward (s) | ratio, direct "
          f"| sampler overhead (ms) | ratio, split |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, steps, nfe, run, bare, over in rows:
        print(f"| {name} | {steps} | {nfe} | {run:.3f} | {bare:.3f} | {run / bare:.3f} | {over * 1e3:.2f} "
              f"| {1 + over / bare:.4f} |")


if __name__ == "__main__":
    main()
