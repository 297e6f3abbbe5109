#!/usr/bin/env python
"""Speed of the paths a study spends its time on, against the same paths as they were before
the speed work; prints Markdown.

``sampling`` (one process, alternating rounds, best of each): image-NFE/s of
``s2dm.samplers.generate.generate`` (what ``s2dm sample``, ``s2dm eval`` and ``s2dm study``
run), DDIM, for the study model (digits, ``model.ch: 16``), the digits default and the CIFAR10
model. "before" is the same call with the network as it was (t materialised per image, so the
time embedding was computed B times; attention projections as batched GEMMs over a weight
expanded B times) and, for the study model, the study's old batch of 2,500 images per call.
Beside each figure: the fraction of the arithmetic limit (the model's FLOPs per image-NFE ×
image-NFE/s ÷ the GFLOP/s of a 2048² matmul on the same threads) and whether the images are
the same (largest difference between the two paths' PNG pixels, in uint8 levels).

``training`` (one process, alternating): steps/s of the real ``train_step`` (draws, S²-DM
loss, backward, clip, Adam, EMA) at batch 128 for the study model and the digits default;
"before" is the network as it was and Adam's per-parameter loop (``optim.fused: false``).

Both in-process parts run with freed memory kept (util/memory.py), as the CLI does.

``study`` (child processes, rotating rounds): the study model's training steps/s and sampling
image-NFE/s as ``s2dm study`` gets them: "before" (one process with every thread, glibc's
allocator defaults, the old code and batch), "one process" (the same layout with today's code
and memory kept: ``s2dm train`` and ``s2dm sample``), and "study workers" (one single-threaded
process per CPU, summed).

``compile`` (not in the default run: about 3 minutes): the study model's forward (inductor,
frozen weights) and training step with ``torch.compile`` against eager, each compiled in a
fresh process twice: with an empty inductor cache, and with the cache the first process left
(as every later process that compiles the same model finds it). Beside each: the compile's
cost and the break-even, the image-NFE or steps after which compiling has paid for itself.

``bf16`` (not in the default run): bfloat16 autocast against float32 for the digits models,
sampling (with the PNG difference it makes) and training: what a lower precision would buy on
this CPU (native bfloat16 kernels where it has AVX-512 BF16 or AMX) and what it costs in pixels.

    .venv/bin/python scripts/bench_speed.py                 # ~7 min on 2 CPU cores, alone
    .venv/bin/python scripts/bench_speed.py --parts compile bf16
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from s2dm import build_model, load_config  # noqa: E402
from s2dm.core.schedule import NoiseSchedule  # noqa: E402
from s2dm.core.unet import AttnBlock  # noqa: E402
from s2dm.io.data import load_dataset  # noqa: E402
from s2dm.samplers.generate import MIN_ROWS, generate  # noqa: E402
from s2dm.training.step import train_step, wrap_for_training  # noqa: E402
from s2dm.training.state import new_state  # noqa: E402
from s2dm.util.images import to_uint8  # noqa: E402
from s2dm.util.dist import available_cpus  # noqa: E402
from s2dm.util.memory import keep_freed_memory  # noqa: E402

MODELS = {  # name: (config, overrides, sampling batch before, now)
    # The study sampled 2,500 images per call, now 500 (study_digits.yaml's eval.batch_size):
    # the same images (any batch size gives them), as fast once freed memory is kept.
    "study (digits, ch 16)": ("digits.yaml", {"model.ch": 16}, 2500, 500),
    "digits default (ch 32)": ("digits.yaml", {}, 256, 256),  # s2dm sample's --batch-size
    "CIFAR10 (ch 128)": ("cifar10.yaml", {}, None, None),  # --cifar-batch
}


# -- the network as it was before the speed work -----------------------------------------------
def _attention_before(self, x):
    """AttnBlock.forward before: q/k/v and the output projection as batched GEMMs over a weight
    expanded to the batch (whose backward is B small GEMMs and a sum)."""
    b, c, h, w = x.shape
    hn = self.norm(x).reshape(b, c, h * w)
    w_qkv = torch.cat([self.q.weight, self.k.weight, self.v.weight]).reshape(3 * c, c)
    b_qkv = torch.cat([self.q.bias, self.k.bias, self.v.bias])
    qkv = torch.baddbmm(b_qkv, hn.transpose(1, 2), w_qkv.t().expand(b, c, 3 * c))
    q, k, v = qkv[:, None].split(c, dim=3)
    out = F.scaled_dot_product_attention(q, k, v)[:, 0]
    w_out = self.proj_out.weight.reshape(c, c)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        y = torch.baddbmm(self.proj_out.bias, out, w_out.t().expand(b, c, c))
        return x + y.view(b, h, w, c).permute(0, 3, 1, 2)
    y = torch.baddbmm(self.proj_out.bias[:, None], w_out.expand(b, c, c), out.transpose(1, 2))
    return x + y.view(b, c, h, w)


class Before(torch.nn.Module):
    """The same weights, run as before: t materialised per image, the old attention."""

    def __init__(self, model):
        super().__init__()
        self.inner = as_before(copy.deepcopy(model))

    def forward(self, x, t):
        return self.inner(x, t.contiguous())


def as_before(model):
    """Patch a model in place to the old attention (training keeps its own module)."""
    for module in model.modules():
        if isinstance(module, AttnBlock):
            module.forward = types.MethodType(_attention_before, module)
    return model


# -- measuring ---------------------------------------------------------------------------------
def alternate(fns: dict, rounds: int) -> dict:
    """Best time of each variant over ``rounds`` rounds, the order alternating (after one
    untimed call each)."""
    for fn in fns.values():
        fn()
    best = {k: float("inf") for k in fns}
    names = list(fns)
    for r in range(rounds):
        for k in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            fns[k]()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def matmul_gflops() -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(5))
    return 2 * 2048 ** 3 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# FlopCounterMode knows the GPU attention kernels only; on a CPU the attention's two matmuls
# (QK^T and PV: 4·HW²·C FLOPs) would count 0.
def _attention_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(q_shape, k_shape, v_shape)


CPU_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops}


def flops_per_image(model, shape) -> float:
    x = torch.randn(2, *shape)
    with torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as counter:
        model(x, torch.tensor(500).expand(2))
    return counter.get_total_flops() / 2


def model_of(name, cifar_batch: int = MIN_ROWS):
    """(config, model in eval mode, sampling batch before, now)."""
    config, sets, before, now = MODELS[name]
    cfg = load_config(config, [f"{k}={json.dumps(v)}" for k, v in sets.items()])
    torch.manual_seed(0)
    return cfg, build_model(cfg).eval(), before or cifar_batch, now or cifar_batch


def time_sampling(variants: dict, schedule, n: int, shape, steps: int, rounds: int):
    """Best seconds of ``generate`` (DDIM, image seeds 0..n−1) of each variant ``key: (network,
    batch)``, the rounds alternating; and each variant's images."""
    images = {}

    def call(key, net, batch):
        def go():
            images[key], _ = generate(net, schedule, range(n), image_shape=shape, batch_size=batch, sampler="ddim",
                                      steps=steps)
        return go
    return alternate({k: call(k, net, batch) for k, (net, batch) in variants.items()}, rounds), images


def png_levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a − b| per pixel, in uint8 levels of the PNGs the images would be saved as."""
    return (to_uint8(a).int() - to_uint8(b).int()).abs()


def time_training(fns: dict, steps: int, rounds: int) -> dict:
    """Best seconds of ``steps`` training steps of each variant (``training_step_fn``), alternating."""
    return alternate({k: (lambda f=f: f(steps)) for k, f in fns.items()}, rounds)


# -- parts -------------------------------------------------------------------------------------
def part_sampling(args, out):
    peak = matmul_gflops()
    rows = []
    for name in args.models:
        cfg, model, before, now = model_of(name, args.cifar_batch)
        shape = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
        schedule = NoiseSchedule.from_config(cfg.diffusion)
        n = max(before, now)  # images per round: whole batches of both
        steps = args.steps if n >= 64 else 2
        best, images = time_sampling({"before": (Before(model).eval(), before), "now": (model, now)}, schedule, n,
                                     shape, steps, args.rounds)
        levels = png_levels(images["now"], images["before"])
        flops = flops_per_image(model, shape)
        rate = {k: n * steps / v for k, v in best.items()}
        rows.append([name, f"{before} → {now}", f"ddim-{steps}", f"{rate['before']:,.0f}", f"{rate['now']:,.0f}",
                     f"**{rate['now'] / rate['before']:.2f}×**", f"{flops / 1e6:,.1f}",
                     f"{rate['before'] * flops / 1e9 / peak:.0%} → {rate['now'] * flops / 1e9 / peak:.0%}",
                     f"{int(levels.max())} ({float((levels > 0).float().mean()):.1e} of pixels)"])
        print(f"  sampling {name}: " + " | ".join(rows[-1]), file=sys.stderr, flush=True)
    out += [f"**Sampling: image-NFE/s of `generate`** ({torch.get_num_threads()} threads; matmul {peak:.0f} GFLOP/s)",
            "", table(["model", "batch", "sampler", "before", "now", "speed-up", "MFLOP / image-NFE",
                       "of arithmetic limit", "PNG difference (uint8 levels)"], rows), ""]


def training_step_fn(cfg, before: bool):
    cfg = copy.deepcopy(cfg)
    cfg.optim.fused = not before
    state = new_state(cfg, torch.device("cpu"))
    if before:
        as_before(state.model)
    state.net = wrap_for_training(cfg, state.model, torch.device("cpu"))
    data = load_dataset(cfg.data)
    x0 = torch.stack([data[i] for i in range(cfg.train.batch_size)])
    schedule = NoiseSchedule.from_config(cfg.diffusion)

    def steps(n):
        for _ in range(n):
            train_step(cfg, state, x0, schedule, "cpu")
            state.step += 1
    return steps


def part_training(args, out):
    rows = []
    for name in args.models:
        if name.startswith("CIFAR"):
            continue  # minutes per step on a CPU; bench_gpu.py measures it on a GPU
        cfg = model_of(name)[0]
        fns = {k: training_step_fn(cfg, k == "before") for k in ("before", "now")}
        n = args.train_steps
        rate = {k: n / v for k, v in time_training(fns, n, args.rounds).items()}
        rows.append([name, str(cfg.train.batch_size), f"{rate['before']:.2f}", f"{rate['now']:.2f}",
                     f"**{rate['now'] / rate['before']:.2f}×**"])
        print(f"  training {name}: " + " | ".join(rows[-1]), file=sys.stderr, flush=True)
    out += [f"**Training: steps/s of `train_step`** ({torch.get_num_threads()} threads; S²-DM loss, "
            "clip, Adam, EMA)", "", table(["model", "batch", "before", "now", "speed-up"], rows), ""]


def worker_main(args) -> None:
    """A child of the ``study`` part: one job for ``--seconds``, its rate printed as JSON;
    ``--before``: the code, batch and allocator settings as they were."""
    torch.set_num_threads(args.threads)
    if not args.before:
        keep_freed_memory()
    cfg, model, before, now = model_of(args.models[0])
    if args.worker == "train":
        steps = training_step_fn(cfg, before=args.before)
        steps(3)
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < args.seconds:
            steps(5)
            n += 5
    else:
        batch = before if args.before else now
        net = Before(model).eval() if args.before else model
        shape = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
        schedule = NoiseSchedule.from_config(cfg.diffusion)

        def call(steps):  # as a study cell: 5,000 images in batches
            generate(net, schedule, range(max(before, now)), image_shape=shape, batch_size=batch,
                     sampler="ddim", steps=steps)
        call(1)
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < args.seconds:
            call(5)
            n += 5 * max(before, now)
    print(json.dumps({"rate": n / (time.perf_counter() - t0)}))


def children(kind: str, model: str, threads: int, count: int, seconds: float, before: bool) -> float:
    """Summed rate of ``count`` children running at once with ``threads`` threads each."""
    cmd = [sys.executable, __file__, "--worker", kind, "--threads", str(threads), "--seconds", str(seconds),
           "--models", model] + (["--before"] if before else [])
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(count)]
    return sum(json.loads(p.communicate()[0].strip().splitlines()[-1])["rate"] for p in procs)


def part_study(args, out):
    """The study model's jobs as ``s2dm study`` runs them, in child processes."""
    cpus = available_cpus()
    name = next(iter(MODELS))
    layouts = {  # name: (threads, processes, before)
        "before": (cpus, 1, True),
        "one process": (cpus, 1, False),
        "study workers": (1, cpus, False),
    }
    rows = []
    for kind, unit in (("train", "steps/s"), ("sample", "image-NFE/s")):
        # Rounds rotate the layouts; the best round of each counts (separate processes: a round
        # that other processes disturbed only loses).
        best = dict.fromkeys(layouts, 0.0)
        for r in range(args.worker_rounds):
            order = list(layouts)[r % 3:] + list(layouts)[:r % 3]
            for layout in order:
                threads, count, before = layouts[layout]
                best[layout] = max(best[layout], children(kind, name, threads, count, args.seconds, before))
        one, study = best["one process"] / best["before"], best["study workers"] / best["before"]
        rows.append([kind, unit] + [f"{v:,.1f}" for v in best.values()] + [f"{one:.2f}×", f"**{study:.2f}×**"])
        print(f"  study {kind}: " + " | ".join(rows[-1]), file=sys.stderr, flush=True)
    out += [f"**The study model end to end, in child processes** (best of {args.worker_rounds} rotating rounds of "
            f"{args.seconds:g} s each)", "",
            f"before: 1 process × {cpus} threads, glibc's allocator defaults, the old network, sampling batch "
            f"{MODELS[name][2]}, Adam's loop. one process: the same process layout with today's code "
            f"(`s2dm train`, `s2dm sample`). study workers: {cpus} processes × 1 thread, summed (`s2dm study`).", "",
            table(["job", "unit", "before", "one process", "study workers", "one process ÷ before",
                   "study ÷ before"], rows), ""]


def compile_worker(args) -> dict:
    """A child of the ``compile`` part: the study model's forward (frozen weights) and training
    step compiled with inductor, the compile's cost and the speed-up against eager."""
    import torch._inductor.config as inductor_config  # only this part compiles

    keep_freed_memory()
    inductor_config.freezing = True  # inference weights as constants: oneDNN's prepacked convolutions
    cfg, model, _, batch = model_of(next(iter(MODELS)))
    x = torch.randn(batch, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    t = torch.tensor(500).expand(batch)
    compiled = torch.compile(copy.deepcopy(model), dynamic=False)
    with torch.inference_mode():
        first = _timed(lambda: compiled(x, t))
        best = alternate({"eager": lambda: model(x, t), "compiled": lambda: compiled(x, t)}, args.rounds)
        diff = float((compiled(x, t) - model(x, t)).abs().max())
    result = {"forward": {"first": first, "eager": best["eager"] / batch, "compiled": best["compiled"] / batch,
                          "diff": diff}}
    fns = {"eager": training_step_fn(cfg, before=False)}
    cfg.train.compile = True
    fns["compiled"] = training_step_fn(cfg, before=False)
    first = _timed(lambda: fns["compiled"](1))
    n = args.train_steps
    best = time_training(fns, n, args.rounds)
    result["training"] = {"first": first, "eager": best["eager"] / n, "compiled": best["compiled"] / n}
    return result


def part_compile(args, out):
    """Compile cost with an empty inductor cache (a first run) and with the cache the first
    child left (any later process compiling the same model: inductor keeps its kernels on disk)."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
        cmd = [sys.executable, __file__, "--worker", "compile", "--rounds", str(args.rounds),
               "--train-steps", str(args.train_steps)] + (["--threads", str(args.threads)] if args.threads else [])
        runs = [json.loads(subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=True)
                           .stdout.strip().splitlines()[-1]) for _ in ("cold", "warm")]
    rows = []
    for job, unit in (("forward", "image-NFE"), ("training", "steps")):
        for cache, run in zip(("empty", "warm"), runs):
            r = run[job]
            saving = r["eager"] - r["compiled"]  # seconds per image-NFE or step
            cost = r["first"] - r["compiled"]  # the first call's extra time: compiling
            even = f"{cost / saving:,.0f} {unit}" if saving > 0 else "never"
            rows.append([job, cache, f"{1 / r['eager']:,.1f}", f"{1 / r['compiled']:,.1f}",
                         f"{r['eager'] / r['compiled']:.2f}×", f"{cost:.1f}", even,
                         f"{r['diff']:.1e}" if "diff" in r else ""])
            print("  compile: " + " | ".join(rows[-1]), file=sys.stderr, flush=True)
    model, threads = next(iter(MODELS)), args.threads or torch.get_num_threads()
    out += [f"**torch.compile of the {model}**, forward at batch {MODELS[model][3]} (frozen weights) and the "
            f"training step at batch 128, {threads} thread{'s' if threads > 1 else ''}; each in a fresh "
            "process, first with an empty inductor cache, then with the cache the first one left", "",
            table(["job", "inductor cache", "eager (per s)", "compiled (per s)", "speed-up", "compile (s)",
                   "break-even", "max |Δε|"], rows), ""]


class Bf16(torch.nn.Module):
    """The same weights run under bfloat16 autocast, ε returned as float32."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, x, t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.inner(x, t).float()


def part_bf16(args, out):
    """bfloat16 autocast against float32, sampling and training, the digits models: what a
    lower precision would buy on this CPU, and what it costs in pixels."""
    rows = []
    for name in [m for m in args.models if not m.startswith("CIFAR")]:
        cfg, model, _, batch = model_of(name)
        shape = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
        schedule = NoiseSchedule.from_config(cfg.diffusion)
        best, images = time_sampling({"fp32": (model, batch), "bf16": (Bf16(model).eval(), batch)}, schedule, batch,
                                     shape, args.steps, args.rounds)
        levels = png_levels(images["bf16"], images["fp32"])
        bf16_cfg = copy.deepcopy(cfg)
        bf16_cfg.train.precision = "bf16"
        fns = {"fp32": training_step_fn(cfg, before=False), "bf16": training_step_fn(bf16_cfg, before=False)}
        train = time_training(fns, args.train_steps, args.rounds)
        rows.append([name, f"{best['fp32'] / best['bf16']:.2f}×", f"{int(levels.max())}",
                     f"{float((levels > 0).float().mean()):.1%}", f"{train['fp32'] / train['bf16']:.2f}×"])
        print(f"  bf16 {name}: " + " | ".join(rows[-1]), file=sys.stderr, flush=True)
    out += [f"**bfloat16 autocast vs float32** ({torch.get_num_threads()} threads; DDIM-{args.steps}, the "
            "sampling batch of each model; training at its batch)", "",
            table(["model", "sampling speed-up", "PNG difference, max uint8 levels", "pixels that differ",
                   "training speed-up"], rows), ""]


def table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", nargs="+", choices=("sampling", "training", "study", "compile", "bf16"),
                   default=["sampling", "training", "study"])
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--steps", type=int, default=10, help="DDIM steps per sampling call (default 10)")
    p.add_argument("--cifar-batch", type=int, default=MIN_ROWS,
                   help=f"CIFAR10 sampling batch on a CPU (default and least {MIN_ROWS}: generate pads smaller "
                        "calls to it, so the network would run more images than were counted)")
    p.add_argument("--train-steps", type=int, default=20, help="training steps per timed round (default 20)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per variant (default 5)")
    p.add_argument("--seconds", type=float, default=10, help="study part: seconds per child (default 10)")
    p.add_argument("--worker-rounds", type=int, default=3, help="study part: rounds per layout (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--worker", choices=("train", "sample", "compile"), help=argparse.SUPPRESS)
    p.add_argument("--before", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.cifar_batch < MIN_ROWS:
        p.error(f"--cifar-batch {args.cifar_batch}: at least {MIN_ROWS}, the rows generate runs a network call with")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker == "compile":
        print(json.dumps(compile_worker(args)))
        return 0
    if args.worker:
        worker_main(args)
        return 0
    keep_freed_memory()  # as the CLI: both code paths of the in-process parts run with it
    start = time.perf_counter()
    out = [f"`python scripts/bench_speed.py {' '.join(argv if argv is not None else sys.argv[1:])}`".replace(" `", "`"), ""]
    for part in args.parts:
        globals()[f"part_{part}"](args, out)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    out.append(f"torch {torch.__version__}; {available_cpus()} CPUs; load average {load:.1f} at the end (this "
               f"script's own processes count in it); total {time.perf_counter() - start:.0f} s.")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
