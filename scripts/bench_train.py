#!/usr/bin/env python
"""Training-step cost of the S²-DM skip-step loss, and s2dm's UNet against diffusers'.

Prints Markdown tables. Every comparison runs its variants in ONE process, alternating
(A B, B A, A B, …) after warm-up steps, and reports the median time of each and the median
of the per-repeat ratios (both clocks: wall, and this process's CPU time, which other
processes on a busy machine disturb less).

``--parts loss``: one full training step (forward, loss, backward, Adam step) with the
skip-step loss ÷ the same step with L0, same model, batch and optimiser, for the digits UNet
(configs/digits.yaml) and the CIFAR10 UNet (configs/cifar10.yaml). x0, t and ε are drawn
once outside the timed region (the same for both losses); the skip-step loss's independent
ε′ is drawn by the loss itself with ``randn`` INSIDE the timed step, as a training step
draws it once per step. Goal: ratio ≤ 1.03 (the skip-step loss makes no extra network call).

``--parts diffusers``: the CIFAR10 UNet (35,746,307 parameters) against diffusers'
``UNet2DModel`` in the published google/ddpm-cifar10-32 layout (same parameter count, checked),
fp32 on the CPU: a training step with L0 (dropout 0.1, train mode) and a forward-only pass
(eval mode, inference_mode: what a sampler calls), in images/s. tests/test_unet_equivalence.py
shows the two compute the same function given the same weights.

``--parts ablation`` (not in the default run): the current UNet against copies with one
choice undone: channels-last training; NCHW sampling; the plain upsample-then-convolve and
separate-q/k/v attention code s2dm had before.

``--parts compile`` (not in the default run: compiling costs 20–70 s here): the CIFAR10 UNet's
training step and forward with ``torch.compile`` against eager.

    .venv/bin/python scripts/bench_train.py                       # ~4–5 min on 2 CPU cores
    .venv/bin/python scripts/bench_train.py --parts diffusers --repeats 11 --batch-cifar 32
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from s2dm import build_model, load_config  # noqa: E402
from s2dm.core.losses import l0_loss, skip_step_loss  # noqa: E402
from s2dm.core.schedule import NoiseSchedule  # noqa: E402
from s2dm.core.unet import count_parameters  # noqa: E402

CIFAR10_PARAMETERS = 35_746_307

# google/ddpm-cifar10-32's layout (diffusers' conversion of the DDPM CIFAR10 model), with the
# training dropout 0.1 of DDPM and configs/cifar10.yaml (the published config leaves it at 0).
DDPM_CIFAR10_DIFFUSERS = dict(
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
    layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
    norm_num_groups=32, norm_eps=1e-6, act_fn="silu", downsample_padding=0, flip_sin_to_cos=False,
    freq_shift=1, time_embedding_type="positional", resnet_time_scale_shift="default", dropout=0.1,
)


# ---------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------
def alternate(variants: dict, repeats: int, warmup: int) -> dict:
    """Run each variant ``warmup`` times, then ``repeats`` rounds alternating the order.
    Returns {name: {"wall": [...], "cpu": [...]}}."""
    names = list(variants)
    for name in names:
        for _ in range(warmup):
            variants[name]()
    out = {n: {"wall": [], "cpu": []} for n in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            c0, w0 = time.process_time(), time.perf_counter()
            variants[name]()
            out[name]["wall"].append(time.perf_counter() - w0)
            out[name]["cpu"].append(time.process_time() - c0)
    return out


def med(xs) -> float:
    return statistics.median(xs)


def paired_ratio(res: dict, num: str, den: str, clock: str) -> float:
    """Median over repeats of time(num) / time(den) in the same round."""
    return med([a / b for a, b in zip(res[num][clock], res[den][clock])])


# ---------------------------------------------------------------------------------------
# workloads
# ---------------------------------------------------------------------------------------
def batch_for(cfg, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    x0 = torch.rand(shape, generator=g) * 2 - 1
    T = cfg.diffusion.num_timesteps
    half = torch.randint(0, T, ((batch + 1) // 2,), generator=g)  # antithetic, as training
    t = torch.cat([half, T - 1 - half])[:batch]
    noise = torch.randn(shape, generator=g)
    return x0, t, noise


def train_step(model, opt, loss_fn):
    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        opt.step()
    return step


def adam(model, cfg):
    o = cfg.optim
    return torch.optim.Adam(model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)


def part_loss(args, rows):
    for name, config, batch, repeats in (
        ("digits", "configs/digits.yaml", args.batch_digits, args.digits_repeats),
        ("CIFAR10", "configs/cifar10.yaml", args.batch_cifar, args.repeats),
    ):
        cfg = load_config(ROOT / config)
        torch.manual_seed(0)
        model = build_model(cfg).train()
        opt = adam(model, cfg)
        schedule = NoiseSchedule.from_config(cfg.diffusion)
        x0, t, noise = batch_for(cfg, batch)
        lc = cfg.loss

        def l0():
            return l0_loss(model, x0, t, schedule, noise=noise, reduction=lc.reduction, return_terms=True)[0]

        def s2():  # skip_noise=None: the loss draws ε′ with randn inside the timed step
            return skip_step_loss(model, x0, t, schedule, skip=lc.skip, tau=lc.tau, noise=noise,
                                  skip_noise=None, variant="independent", reduction=lc.reduction,
                                  return_terms=True)[0]

        res = alternate({"L0": train_step(model, opt, l0), "S2": train_step(model, opt, s2)},
                        repeats, args.warmup)
        extra = loss_overhead(x0, t, noise, schedule, lc, args.stub_repeats)
        shape = "×".join(str(s) for s in x0.shape[1:])
        rows.append([
            f"{name} UNet ({count_parameters(model) / 1e6:.2f} M), batch {batch}, {shape}",
            f"{med(res['L0']['wall']):.3f}", f"{med(res['S2']['wall']):.3f}",
            f"**{paired_ratio(res, 'S2', 'L0', 'wall'):.3f}**", f"{paired_ratio(res, 'S2', 'L0', 'cpu'):.3f}",
            f"{extra * 1e3:.2f}", f"{1 + extra / med(res['L0']['wall']):.4f}", str(repeats),
        ])
        print(f"  loss/{name}: done", file=sys.stderr, flush=True)


def loss_overhead(x0, t, noise, schedule, lc, repeats: int) -> float:
    """Seconds the skip-step loss adds to a step beyond L0, with the network replaced by a
    stub (ε_θ = a·x_t + b·ε₀, two parameters): the loss arithmetic, its backward and the ε′
    randn. Short calls, many repeats: sharp even when the full-step ratio is noisy."""
    a = torch.zeros((), requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    eps0 = torch.randn_like(x0)

    def stub(x, tt):
        return a * x + b * eps0

    def l0():
        l0_loss(stub, x0, t, schedule, noise=noise, reduction=lc.reduction, return_terms=True)[0].backward()

    def s2():
        skip_step_loss(stub, x0, t, schedule, skip=lc.skip, tau=lc.tau, noise=noise, skip_noise=None,
                       variant="independent", reduction=lc.reduction, return_terms=True)[0].backward()

    res = alternate({"L0": l0, "S2": s2}, repeats, 10)
    return med([s - l for s, l in zip(res["S2"]["wall"], res["L0"]["wall"])])


def cifar_pair(args):
    import diffusers

    cfg = load_config(ROOT / "configs/cifar10.yaml")
    torch.manual_seed(0)
    ours = build_model(cfg)
    theirs = diffusers.UNet2DModel(**DDPM_CIFAR10_DIFFUSERS)
    n_ours, n_theirs = count_parameters(ours), count_parameters(theirs)
    if not n_ours == n_theirs == CIFAR10_PARAMETERS:
        raise SystemExit(f"parameter counts differ: s2dm {n_ours:,}, diffusers {n_theirs:,}")
    return cfg, ours, theirs, diffusers.__version__


def part_diffusers(args, rows):
    cfg, ours, theirs, _ = cifar_pair(args)
    schedule = NoiseSchedule.from_config(cfg.diffusion)
    x0, t, noise = batch_for(cfg, args.batch_cifar)
    nets = {"s2dm": ours, "diffusers": lambda x, tt: theirs(x, tt, return_dict=False)[0]}
    mods = {"s2dm": ours, "diffusers": theirs}

    steps = {}
    for name in nets:
        mods[name].train()
        opt = adam(mods[name], cfg)
        steps[name] = train_step(mods[name], opt, lambda n=name: l0_loss(nets[n], x0, t, schedule, noise=noise))
    train = alternate(steps, args.repeats, args.warmup)
    print("  diffusers/train: done", file=sys.stderr, flush=True)

    x_t = torch.randn_like(x0)

    def forward(name):
        def run():
            with torch.inference_mode():
                nets[name](x_t, t)
        return run

    for m in mods.values():
        m.eval()
    fwd = alternate({n: forward(n) for n in nets}, args.fwd_repeats, args.warmup)
    print("  diffusers/forward: done", file=sys.stderr, flush=True)

    B = args.batch_cifar
    for label, res, n in (("training step (L0, Adam)", train, args.repeats),
                          ("forward only (eval, inference_mode)", fwd, args.fwd_repeats)):
        rows.append([
            label, str(B), f"{B / med(res['s2dm']['wall']):.2f}", f"{B / med(res['diffusers']['wall']):.2f}",
            f"**{paired_ratio(res, 'diffusers', 's2dm', 'wall'):.3f}×**",
            f"{paired_ratio(res, 'diffusers', 's2dm', 'cpu'):.3f}×", str(n),
        ])


# The pre-optimisation AttnBlock/Upsample forwards (s2dm before the evaluation shortcuts).
def _plain_attn_forward(self, x):
    b, c, h, w = x.shape
    hn = self.norm(x)
    q, k, v = (m(hn).reshape(b, 1, c, h * w).transpose(2, 3) for m in (self.q, self.k, self.v))
    out = F.scaled_dot_product_attention(q, k, v)
    return x + self.proj_out(out.transpose(2, 3).reshape(b, c, h, w))


def _plain_upsample_forward(self, x):
    x = F.interpolate(x, scale_factor=2.0, mode="nearest")
    return x if self.conv is None else self.conv(x)


def part_ablation(args, rows):
    """Current s2dm UNet against itself with one choice undone, CIFAR10 UNet."""
    from s2dm.core.unet import AttnBlock, Upsample

    cfg = load_config(ROOT / "configs/cifar10.yaml")
    schedule = NoiseSchedule.from_config(cfg.diffusion)
    x0, t, noise = batch_for(cfg, args.batch_cifar)
    torch.manual_seed(0)
    now = build_model(cfg)

    def copy(plain=False, nhwc_sampling=True):
        m = build_model(cfg)
        m.load_state_dict(now.state_dict())
        m.cpu_inference_channels_last = nhwc_sampling
        if plain:
            for mod in m.modules():
                if isinstance(mod, AttnBlock):
                    mod.forward = types.MethodType(_plain_attn_forward, mod)
                elif isinstance(mod, Upsample):
                    mod.forward = types.MethodType(_plain_upsample_forward, mod)
        return m

    def nhwc(m):
        return lambda x, tt: m(x.contiguous(memory_format=torch.channels_last), tt)

    B = args.batch_cifar
    for label, variants in (
        ("training step (L0, Adam)", {
            "current (NCHW)": (now, now),
            "NHWC (channels-last) training": (m := copy(), nhwc(m)),
            "plain upsample-then-conv and attention": (m := copy(plain=True), m),
        }),
        ("forward only (eval, inference_mode)", {
            "current (NHWC on the CPU)": (now, now),
            "NCHW sampling": (m := copy(nhwc_sampling=False), m),
            "NCHW + plain upsample/attention (before)": (m := copy(plain=True, nhwc_sampling=False), m),
        }),
    ):
        fns = {}
        for name, (mod, fn) in variants.items():
            if label.startswith("training"):
                mod.train()
                fns[name] = train_step(mod, adam(mod, cfg), lambda f=fn: l0_loss(f, x0, t, schedule, noise=noise))
            else:
                mod.eval()

                def run(f=fn):
                    with torch.inference_mode():
                        f(x0, t)
                fns[name] = run
        res = alternate(fns, args.repeats if label.startswith("training") else args.fwd_repeats, args.warmup)
        first = next(iter(fns))
        for name in fns:
            rows.append([label, name, str(B), f"{B / med(res[name]['wall']):.2f}",
                         f"{paired_ratio(res, name, first, 'wall'):.3f}", f"{paired_ratio(res, name, first, 'cpu'):.3f}"])
        print(f"  ablation/{label.split()[0]}: done", file=sys.stderr, flush=True)


def part_compile(args, rows):
    cfg = load_config(ROOT / "configs/cifar10.yaml")
    schedule = NoiseSchedule.from_config(cfg.diffusion)
    x0, t, noise = batch_for(cfg, args.batch_cifar)
    torch.manual_seed(0)
    eager = build_model(cfg)
    compiled_mod = build_model(cfg)
    compiled_mod.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_mod)
    B = args.batch_cifar
    for label, mode in (("training step (L0, Adam)", "train"), ("forward only (eval, inference_mode)", "eval")):
        variants = {}
        for name, mod, fn in (("eager", eager, eager), ("compiled", compiled_mod, compiled)):
            if mode == "train":
                mod.train()
                variants[name] = train_step(mod, adam(mod, cfg), lambda f=fn: l0_loss(f, x0, t, schedule, noise=noise))
            else:
                mod.eval()

                def run(f=fn):
                    with torch.inference_mode():
                        f(x0, t)
                variants[name] = run
        c0 = time.perf_counter()
        for _ in range(max(1, args.warmup)):
            variants["compiled"]()
        first = time.perf_counter() - c0
        res = alternate(variants, args.repeats if mode == "train" else args.fwd_repeats, 1)
        rows.append([
            label, str(B), f"{B / med(res['eager']['wall']):.2f}", f"{B / med(res['compiled']['wall']):.2f}",
            f"**{paired_ratio(res, 'eager', 'compiled', 'wall'):.3f}×**",
            f"{paired_ratio(res, 'eager', 'compiled', 'cpu'):.3f}×", f"{first:.0f}",
        ])
        print(f"  compile/{mode}: " + " | ".join(rows[-1]), file=sys.stderr, flush=True)


def table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", choices=("loss", "diffusers", "ablation", "compile"), default=["loss", "diffusers"])
    p.add_argument("--batch-digits", type=int, default=128)
    p.add_argument("--batch-cifar", type=int, default=16)
    p.add_argument("--repeats", type=int, default=7, help="timed rounds of CIFAR10 training steps (default 7)")
    p.add_argument("--fwd-repeats", type=int, default=15, help="timed rounds of CIFAR10 forward passes (default 15)")
    p.add_argument("--digits-repeats", type=int, default=21, help="timed rounds for the digits model (default 21)")
    p.add_argument("--stub-repeats", type=int, default=200, help="rounds for the stub-network loss timing (default 200)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls of each variant first (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    start = time.perf_counter()
    out = [f"`{' '.join(['python', 'scripts/bench_train.py'] + (argv if argv is not None else sys.argv[1:]))}`", ""]
    versions = f"torch {torch.__version__}"

    if "loss" in args.parts:
        rows = []
        part_loss(args, rows)
        out += ["**Skip-step loss vs L0: one training step (forward, loss, backward, Adam step)**", "",
                table(["model, batch", "L0 step (s)", "S²-DM step (s)", "S²-DM ÷ L0 (wall)", "÷ (CPU time)",
                       "loss extra (ms, stub net)", "1 + extra ÷ L0 step", "repeats"], rows),
                "", "Goal ≤ 1.03. x0, t, ε drawn outside the timed step; the skip-step loss draws ε′ with randn inside it. "
                "The last two columns time the two losses' own arithmetic (forward + backward + the ε′ randn) "
                f"with a two-parameter stub in place of the UNet ({args.stub_repeats} alternated rounds): a sharp "
                "estimate of the same ratio that other processes on a busy machine cannot blur.", ""]
    if "diffusers" in args.parts:
        rows = []
        import diffusers
        versions += f", diffusers {diffusers.__version__}"
        part_diffusers(args, rows)
        out += [f"**CIFAR10 UNet ({CIFAR10_PARAMETERS:,} parameters each), fp32, CPU: s2dm vs diffusers UNet2DModel**", "",
                table(["", "batch", "s2dm img/s", "diffusers img/s", "s2dm speed-up (wall)", "(CPU time)", "repeats"], rows),
                "", "Goal ≥ 1.10×. Speed-up = median over rounds of diffusers' time ÷ s2dm's time in the same round.", ""]
    if "ablation" in args.parts:
        rows = []
        part_ablation(args, rows)
        out += ["**Ablation: s2dm's CIFAR10 UNet with one evaluation choice undone**", "",
                table(["", "variant", "batch", "img/s", "time ÷ current (wall)", "(CPU time)"], rows), ""]
    if "compile" in args.parts:
        rows = []
        part_compile(args, rows)
        out += ["**torch.compile (default mode) on s2dm's CIFAR10 UNet**", "",
                table(["", "batch", "eager img/s", "compiled img/s", "compile speed-up (wall)", "(CPU time)", "warm-up incl. compile (s)"], rows), ""]

    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    if max(load0, load1) > (os.cpu_count() or 1) and torch.get_num_threads() > 1:
        out.append("NOTE: the machine was busy; with several threads each op waits for all of them to be "
                   "scheduled, which inflates every time here. `--threads 1` measures more steadily.")
    out.append(f"{versions}; {torch.get_num_threads()} threads; {cpu}; load average {load0:.1f} → {load1:.1f} "
               f"(other processes share the CPU when it exceeds the core count, {os.cpu_count()}); "
               f"total {time.perf_counter() - start:.0f} s.")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
