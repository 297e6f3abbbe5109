#!/usr/bin/env python
"""GPU benchmark of the CIFAR10 configuration (configs/cifar10.yaml, 35.7 M parameters), one
process, one device; prints Markdown tables. ``scripts/bench_gpu.sh`` runs it.

1. Training: s2dm's real ``train_step`` (per-step draws, S²-DM loss, backward, grad clip,
   Adam, EMA, the loss/grad-norm sync) at the config's batch 128, for ``train.precision``
   fp32, bf16, bf16 + ``train.channels_last``, bf16 + ``train.compile``: images/s and peak
   memory (``torch.cuda.max_memory_allocated``, reset before each variant).
2. Reference: the same bare training step (forward, L0, backward, Adam; data on the device)
   for s2dm's UNet and for diffusers' ``UNet2DModel`` in the DDPM CIFAR10 layout
   (google/ddpm-cifar10-32, same parameter count, dropout 0.1), fp32 and bf16: images/s,
   peak memory and the ratio s2dm / diffusers (> 1: s2dm is faster).
3. Sampling: ``s2dm.samplers.generate.generate`` (what ``s2dm sample`` runs) with DDIM, 20 steps
   (NFE 20), EMA weights, batch 256: images/s.
4. FID features: ``FeatureExtractor`` (pytorch-fid's Inception, 299x299 resize, pool3) on
   uint8 32x32 batches: images/s. The real FID weights when found offline, else stand-in
   weights of the same architecture (same speed).

Timing: warm-up steps (compilation included), then ``--windows`` windows of ``--steps``
steps, each between two ``torch.cuda.synchronize()``; the median window is reported. The
default run takes about 3-4 minutes on one H100, most of it compiling.

Without CUDA it runs a reduced CPU part and says so: batch 8, 1 warm-up and 3 timed steps,
fp32 and bf16 training only (no compile, no channels_last), the diffusers reference at fp32,
bf16 timed on one step without warm-up (CPUs without native bf16 emulate it: minutes per
step), 4 samples, 16 FID images; no peak memory (the CPU allocator does not report one).

    scripts/bench_gpu.sh                  # on a GPU machine
    OMP_NUM_THREADS=2 .venv/bin/python scripts/bench_gpu.py --device cpu
"""
from __future__ import annotations

import argparse
import gc
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the stand-in Inception weights of the tests

from s2dm.core.losses import l0_loss  # noqa: E402
from s2dm.core.schedule import NoiseSchedule  # noqa: E402
from s2dm.core.unet import build_model, count_parameters  # noqa: E402
from s2dm.io.config import load_config  # noqa: E402
from s2dm.samplers.generate import MIN_ROWS  # noqa: E402
from s2dm.training.precision import autocast  # noqa: E402
from standins import standin_state_dict  # noqa: E402

CIFAR10_PARAMETERS = 35_746_307


def ddpm_cifar10_diffusers_kwargs(dropout: float) -> dict:
    """``UNet2DModel`` arguments of the DDPM CIFAR10 layout (from s2dm's converter when
    present, else the same arguments written out)."""
    for module in ("s2dm.interop.layouts",):
        try:
            mod = __import__(module, fromlist=["diffusers_unet_kwargs"])
            return mod.diffusers_unet_kwargs(dropout=dropout)
        except (ImportError, AttributeError):
            continue
    return dict(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
        layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
        norm_num_groups=32, norm_eps=1e-6, act_fn="silu", downsample_padding=0, flip_sin_to_cos=False,
        freq_shift=1, time_embedding_type="positional", resnet_time_scale_shift="default", dropout=dropout,
    )


# ---------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> str:
    if device.type != "cuda":
        return "—"
    return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f}"


def seconds_per_call(fn, device, warmup: int, steps: int, windows: int) -> float:
    """Median over windows of (window time / steps), windows bounded by device syncs."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(windows):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        sync(device)
        times.append((time.perf_counter() - t0) / steps)
    return statistics.median(times)


def log(msg: str) -> None:
    print(f"  {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------
# 1. the s2dm training step
# ---------------------------------------------------------------------------------------
def bench_train_step(args, device, precision: str, channels_last: bool, compile_: bool) -> dict:
    from s2dm.training.step import train_step, wrap_for_training
    from s2dm.training.state import new_state

    cfg = load_config(ROOT / args.config, [
        f"train.batch_size={args.batch}", f"train.precision={precision}",
        f"train.channels_last={str(channels_last).lower()}", f"train.compile={str(compile_).lower()}",
        f"train.device={device}",
    ])
    reset_memory(device)
    state = new_state(cfg, device)
    state.net = wrap_for_training(cfg, state.model, device)
    schedule = NoiseSchedule.from_config(cfg.diffusion)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand((args.batch, 3, 32, 32), generator=g) * 2 - 1  # what the loader hands over (CPU)
    if device.type == "cuda":
        x0 = x0.pin_memory()

    def step():
        res = train_step(cfg, state, x0, schedule, device)
        state.step += 1
        return res

    warmup, steps = args.warmup, args.steps
    reduced = device.type == "cpu" and precision != "fp32"
    if reduced:
        warmup, steps = 0, 1  # CPUs without native bf16 emulate it: minutes per step
    first = None
    if warmup:  # the first step (compilation, allocator growth) is timed on its own
        t0 = time.perf_counter()
        step()
        sync(device)
        first = time.perf_counter() - t0
    sec = seconds_per_call(step, device, max(0, warmup - 1), steps, args.windows)
    out = {"images_s": args.batch / sec, "ms": sec * 1e3, "peak": peak_gib(device),
           "first_s": "—" if first is None else f"{first:.1f}", "reduced": reduced}
    reset_memory(device)
    return out


# ---------------------------------------------------------------------------------------
# 2. the bare step, s2dm's UNet and diffusers' UNet2DModel
# ---------------------------------------------------------------------------------------
def bench_bare_step(args, device, which: str, precision: str) -> dict:
    cfg = load_config(ROOT / args.config)
    reset_memory(device)
    torch.manual_seed(0)
    if which == "s2dm":
        module = build_model(cfg).to(device).train()
        net = module
    else:
        import diffusers

        module = diffusers.UNet2DModel(**ddpm_cifar10_diffusers_kwargs(cfg.model.dropout)).to(device).train()

        def net(x, t):
            return module(x, t, return_dict=False)[0]
    n_params = count_parameters(module)
    if n_params != CIFAR10_PARAMETERS:
        raise SystemExit(f"{which}: {n_params:,} parameters, expected {CIFAR10_PARAMETERS:,}")
    opt = torch.optim.Adam(module.parameters(), lr=cfg.optim.lr)
    schedule = NoiseSchedule.from_config(cfg.diffusion)
    g = torch.Generator().manual_seed(1)
    B, T = args.batch, cfg.diffusion.num_timesteps
    x0 = (torch.rand((B, 3, 32, 32), generator=g) * 2 - 1).to(device)
    half = torch.randint(0, T, ((B + 1) // 2,), generator=g)
    t = torch.cat([half, T - 1 - half])[:B].to(device)
    noise = torch.randn((B, 3, 32, 32), generator=g).to(device)

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast(precision, device):
            loss = l0_loss(net, x0, t, schedule, noise=noise)
        loss.backward()
        opt.step()

    sec = seconds_per_call(step, device, args.warmup, args.steps, args.windows)
    out = {"images_s": B / sec, "ms": sec * 1e3, "peak": peak_gib(device)}
    reset_memory(device)
    return out


# ---------------------------------------------------------------------------------------
# 3. sampling and 4. FID features
# ---------------------------------------------------------------------------------------
def bench_sampling(args, device) -> dict:
    from s2dm.core.ema import make_ema
    from s2dm.samplers.generate import generate

    cfg = load_config(ROOT / args.config)
    reset_memory(device)
    torch.manual_seed(0)
    ema = make_ema(build_model(cfg)).to(device)
    schedule = NoiseSchedule.from_config(cfg.diffusion)
    n, batch = args.sample_n, args.sample_batch
    seeds = iter(range(10**9))

    def run():
        generate(ema, schedule, [next(seeds) for _ in range(batch)], image_shape=(3, 32, 32),
                 batch_size=batch, device=device, sampler="ddim", steps=20, grid="uniform")

    calls = max(1, n // batch)
    sec = seconds_per_call(run, device, 1, calls, 1)
    out = {"images_s": batch / sec, "images": calls * batch, "batch": batch, "peak": peak_gib(device)}
    reset_memory(device)
    return out


def bench_fid_features(args, device) -> dict:
    from s2dm.metrics import features, inception

    reset_memory(device)
    ext = features.FeatureExtractor("inception", device=str(device), batch_size=args.fid_batch, progress=False)
    try:
        ext.load()
        weights = "pytorch-fid FID Inception weights"
    except Exception:  # no offline weights here: the same network with stand-in weights
        ext._model = inception.build_inception(standin_state_dict(0), 2048).to(device)
        weights = "stand-in weights (same architecture and speed)"
    g = torch.Generator().manual_seed(2)
    batch = torch.randint(0, 256, (args.fid_batch, 3, 32, 32), generator=g, dtype=torch.uint8)
    calls = max(1, args.fid_n // args.fid_batch)
    sec = seconds_per_call(lambda: ext._features(batch), device, 1, calls, 1)
    out = {"images_s": args.fid_batch / sec, "images": calls * args.fid_batch, "weights": weights,
           "peak": peak_gib(device)}
    reset_memory(device)
    return out


# ---------------------------------------------------------------------------------------
# Defaults on a GPU and on a CPU (the reduced part). A CPU's sampling batch is generate's
# MIN_ROWS: a smaller call is padded to it, so the network would run more images than counted.
DEFAULTS = {"gpu": dict(batch=128, warmup=10, steps=20, windows=3, sample_n=1024, sample_batch=256, fid_n=2000,
                        fid_batch=200),
            "cpu": dict(batch=8, warmup=1, steps=3, windows=1, sample_n=16, sample_batch=16, fid_n=16, fid_batch=8)}


def _default_text(key: str) -> str:
    return f"(default {DEFAULTS['gpu'][key]} on CUDA, {DEFAULTS['cpu'][key]} on a CPU)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="auto (cuda if present) | cuda | cuda:N | cpu")
    p.add_argument("--config", default="configs/cifar10.yaml")
    p.add_argument("--batch", type=int, default=None, help=f"training batch {_default_text('batch')}")
    p.add_argument("--warmup", type=int, default=None, help=f"untimed steps per variant {_default_text('warmup')}")
    p.add_argument("--steps", type=int, default=None, help=f"steps per timing window {_default_text('steps')}")
    p.add_argument("--windows", type=int, default=None,
                   help=f"timing windows, median reported {_default_text('windows')}")
    p.add_argument("--sample-n", type=int, default=None, help=f"images timed for sampling {_default_text('sample_n')}")
    p.add_argument("--sample-batch", type=int, default=None, help=f"sampling batch {_default_text('sample_batch')}")
    p.add_argument("--fid-n", type=int, default=None, help=f"images timed for FID features {_default_text('fid_n')}")
    p.add_argument("--fid-batch", type=int, default=None, help=f"Inception batch {_default_text('fid_batch')}")
    p.add_argument("--no-compile", action="store_true", help="skip the bf16 + compile variant")
    p.add_argument("--skip-diffusers", action="store_true", help="skip the diffusers reference")
    args = p.parse_args()

    cuda = torch.cuda.is_available() and args.device != "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    device = torch.device(args.device if cuda and args.device.startswith("cuda") else "cuda" if cuda else "cpu")
    for key, value in DEFAULTS["gpu" if cuda else "cpu"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if cuda:
        # fp32 means IEEE fp32, for s2dm and diffusers alike: PyTorch's default runs float32
        # convolutions in TF32 (matmuls are IEEE by default). Legacy flags, as s2dm's training sets them.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        where = f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
        variants = [("fp32", False, False), ("bf16", False, False), ("bf16", True, False)]
        if not args.no_compile:
            variants.append(("bf16", False, True))
        bare_precisions = ["fp32", "bf16"]
    else:
        where = f"CPU only ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        variants = [("fp32", False, False), ("bf16", False, False)]
        bare_precisions = ["fp32"]
    import diffusers

    print(f"# bench_gpu: {where}\n")
    if not cuda:
        print(f"**No CUDA device: the reduced CPU part** (training batch {args.batch}, {args.steps} timed steps, bf16 "
              "a single step without warm-up (emulated on most CPUs), no compile, no channels_last, no peak memory). "
              "These are not GPU figures.\n")
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, config {args.config}; training batch "
          f"{args.batch}, {args.warmup} warm-up steps, median of {args.windows} window(s) of {args.steps} steps.\n")

    t_start = time.perf_counter()
    print("## Training step (s2dm train_step: draws, S²-DM loss, backward, clip, Adam, EMA)\n")
    print("| train.precision | channels_last | compile | images/s | ms/step | peak memory (GiB) | first step (s) |")
    print("|---|---|---|---:|---:|---:|---:|")
    for precision, cl, comp in variants:
        log(f"train {precision} channels_last={cl} compile={comp}")
        r = bench_train_step(args, device, precision, cl, comp)
        timed = " (1 step, no warm-up)" if r["reduced"] else ""
        print(f"| {precision}{timed} | {'yes' if cl else 'no'} | {'yes' if comp else 'no'} | {r['images_s']:.2f} | "
              f"{r['ms']:.0f} | {r['peak']} | {r['first_s']} |", flush=True)

    if not args.skip_diffusers:
        print("\n## The same bare step (forward, L0, backward, Adam), s2dm UNet vs diffusers UNet2DModel "
              "(DDPM CIFAR10 layout, 35.7 M parameters each)\n")
        print("| precision | s2dm images/s | diffusers images/s | ratio s2dm/diffusers | s2dm peak (GiB) | "
              "diffusers peak (GiB) |")
        print("|---|---:|---:|---:|---:|---:|")
        for precision in bare_precisions:
            log(f"bare step {precision}: s2dm")
            a = bench_bare_step(args, device, "s2dm", precision)
            log(f"bare step {precision}: diffusers")
            b = bench_bare_step(args, device, "diffusers", precision)
            print(f"| {precision} | {a['images_s']:.2f} | {b['images_s']:.2f} | **{a['images_s'] / b['images_s']:.2f}** | "
                  f"{a['peak']} | {b['peak']} |", flush=True)

    print("\n## Sampling and FID features\n")
    print("| what | images/s | images timed | peak memory (GiB) |")
    print("|---|---:|---:|---:|")
    log("sampling DDIM-20")
    s = bench_sampling(args, device)
    padded = f" (padded to {MIN_ROWS} rows a network call)" if s["batch"] < MIN_ROWS else ""
    print(f"| sampling, DDIM 20 steps (NFE 20), fp32, batch {s['batch']}{padded} | {s['images_s']:.2f} | {s['images']} | "
          f"{s['peak']} |", flush=True)
    log("FID features")
    f = bench_fid_features(args, device)
    print(f"| FID Inception features (32x32 → 299x299, pool3), batch {args.fid_batch}, {f['weights']} | "
          f"{f['images_s']:.2f} | {f['images']} | {f['peak']} |")
    print(f"\nTotal time: {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
