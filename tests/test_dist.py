"""Several ranks (torchrun, gloo on the CPU) against one process; mixed precision.

The torchrun tests start real 2-rank process groups (``torchrun --standalone
--nproc_per_node 2``, OMP_NUM_THREADS=1), so they take a few seconds each.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, TINY, read_log, tiny_args
from s2dm import load_checkpoint
from s2dm.cli import main
from s2dm.errors import UserError
from s2dm.io.config import load_config
from s2dm.util import dist

# optim.eps=1e-4: Adam divides by √v + eps, so a gradient that is zero in exact arithmetic
# (e.g. the part of a bias that a GroupNorm removes) but ±1e-10 of float noise would become a
# ±lr step whose sign depends on the order of the reduction. With eps far above that noise the
# comparison tests the arithmetic of the split, not the noise (default eps: ~1e-5 after 10 steps).
EQUIV = ("train.device=cpu", "optim.eps=1e-4", "train.checkpoint_every=4", "train.log_every=2")
STEPS = 8

# Runs `s2dm` under a hook: records which rank wrote which file, and (by env) poisons the loss
# value of one rank (NaN in the value only: the gradients stay finite, so only the all-reduced
# flag can make the other rank skip too).
WORKER = r'''
import os, sys
rank = int(os.environ.get("RANK", "0"))
import s2dm.io.config as C
import s2dm.training.loop as T
import s2dm.training.state as S
import s2dm.training.step as St
record = os.path.join(os.environ["S2DM_TEST_WRITES"], f"rank{rank}.txt")

def note(what):
    with open(record, "a") as f:
        f.write(what + "\n")

def hook(name, obj, attr):
    orig = getattr(obj, attr)
    def wrapped(*a, **k):
        note(name)
        return orig(*a, **k)
    setattr(obj, attr, wrapped)

hook("checkpoint", S, "save_run_checkpoint")
hook("grid", T, "write_mosaic")
hook("config", C.Config, "dump")
hook("truncate_log", T, "truncate_log")
if os.environ.get("S2DM_TEST_POISON_RANK") == str(rank):
    orig = St.compute_loss
    def poisoned(cfg, model, x0, draws, schedule):
        loss, terms = orig(cfg, model, x0, draws, schedule)
        return loss + float("nan") * loss.detach(), terms
    St.compute_loss = poisoned
from s2dm.cli import main
sys.exit(main(sys.argv[1:]))
'''


def _env():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def torchrun(*args, nproc=2, env=None, timeout=300):
    exe = Path(sys.executable).parent / "torchrun"
    launcher = [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]
    cmd = launcher + ["--standalone", "--nproc_per_node", str(nproc), *map(str, args)]
    # torchrun leaves a torchelastic_* folder in the temporary directory: give it one that goes
    with tempfile.TemporaryDirectory() as tmp:
        return subprocess.run(cmd, cwd=ROOT, env={**_env(), "TMPDIR": tmp, **(env or {})}, capture_output=True,
                              text=True, timeout=timeout)


def one_process(*args, timeout=300):
    """`python -m s2dm ...` in a fresh process with the ranks' thread count (bitwise PNGs)."""
    return subprocess.run([sys.executable, "-m", "s2dm", *map(str, args)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def max_diff(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max(float((sa[k] - sb[k]).abs().max()) for k in sa)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same training (global batch 32) as one process and as 2 ranks x 16."""
    base = tmp_path_factory.mktemp("dist")
    worker = base / "worker.py"
    worker.write_text(WORKER)
    writes = base / "writes"
    writes.mkdir()
    single, double = base / "single", base / "double"
    ok(one_process(*tiny_args(single, STEPS, *EQUIV)))
    proc = ok(torchrun(worker, *tiny_args(double, STEPS, *EQUIV), env={"S2DM_TEST_WRITES": str(writes)}))
    return single, double, writes, proc


@pytest.mark.slow
def test_two_ranks_end_at_the_weights_of_one_process(runs):
    single, double, _, _ = runs
    a, b = load_checkpoint(single), load_checkpoint(double)
    assert a.step == b.step == STEPS
    assert max_diff(a.model, b.model) < 1e-5
    assert max_diff(a.ema, b.ema) < 1e-5
    # The logged losses are over the global batch: the same numbers as one process.
    la = [r for r in read_log(single) if "loss" in r]
    lb = [r for r in read_log(double) if "loss" in r]
    assert [r["step"] for r in la] == [r["step"] for r in lb] == [2, 4, 6, 8]
    for ra, rb in zip(la, lb):
        for key in ("loss", "l0", "lskip", "loss_t_q1", "loss_t_q4", "grad_norm"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-4), key


@pytest.mark.slow
def test_only_rank_0_writes_and_the_log_states_the_split(runs):
    _, double, writes, proc = runs
    assert not (writes / "rank1.txt").exists()
    assert sorted(set((writes / "rank0.txt").read_text().split())) == ["checkpoint", "config", "grid"]
    start = read_log(double)[0]
    assert start["event"] == "start" and start["world_size"] == 2 and start["batch_size"] == 32
    assert start["batch_per_rank"] == 16 and start["backend"] == "gloo"
    assert "global batch 32 = 2 ranks x 16 per rank" in proc.stdout
    assert proc.stdout.count("done: ") == 1  # results are printed once
    steps = [r["step"] for r in read_log(double)]
    assert len(steps) == len(set(steps))  # one writer: no duplicated log lines
    assert sorted(p.name for p in (double / "checkpoints").glob("*.pt")) == ["ckpt_00000004.pt", "ckpt_00000008.pt"]


@pytest.mark.slow
def test_resume_on_another_number_of_ranks(runs, tmp_path):
    """A 2-rank run stopped at step 4 and continued by one process ends where both did."""
    single, double, _, _ = runs
    out = tmp_path / "resumed"
    shutil.copytree(double, out)
    for extra in ("ckpt_00000008.pt",):
        (out / "checkpoints" / extra).unlink()
    (out / "checkpoints" / "latest").write_text("ckpt_00000004.pt\n")
    assert main(tiny_args(out, STEPS, *EQUIV)) == 0
    assert max_diff(load_checkpoint(out).model, load_checkpoint(single).model) < 1e-5


@pytest.mark.slow
def test_nonfinite_loss_on_one_rank_is_skipped_by_all_and_stops(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    (tmp_path / "w").mkdir()
    out = tmp_path / "run"
    proc = torchrun(worker, *tiny_args(out, 20, *EQUIV, "train.max_nonfinite=3"),
                    env={"S2DM_TEST_WRITES": str(tmp_path / "w"), "S2DM_TEST_POISON_RANK": "1"})
    assert proc.returncode != 0, proc.stderr[-3000:]  # torchrun exits 1 when a rank fails (rank 0: 2)
    assert "exitcode  : 2" in proc.stderr
    assert proc.stderr.count("error: loss was non-finite for 3 steps in a row (step 3)") == 1  # rank 0 only
    skipped = [r for r in read_log(out) if r.get("event") == "nonfinite_skipped"]
    assert [r["step"] for r in skipped] == [1, 2, 3]
    assert not (out / "checkpoints").exists() or not list((out / "checkpoints").glob("*.pt"))


def test_batch_not_divisible_by_the_ranks(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(dist, "world_size", lambda: 3)
    assert main(tiny_args(tmp_path / "run", 2)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: train.batch_size: 32 is not divisible by the 3 ranks")
    assert not (tmp_path / "run").exists()
    with pytest.raises(UserError, match="train.batch_size: 30 is not divisible by the 4 ranks"):
        monkeypatch.setattr(dist, "world_size", lambda: 4)
        dist.per_rank_batch(30)


def test_shards_cover_everything_once():
    for n in (0, 1, 5, 16, 17):
        for w in (1, 2, 3, 8):
            parts = [dist.shard(list(range(n)), r, w) for r in range(w)]
            assert sum(parts, []) == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_draws_are_sliced_from_the_global_batch():
    from s2dm.training.draws import PlannedBatches, draw_step

    cfg = load_config("configs/digits.yaml", ["train.batch_size=8", "data.random_flip=true"])
    full = draw_step(cfg, 3, (8, 1, 8, 8))
    part = full.rows(4, 8)
    assert torch.equal(part.t, full.t[4:]) and torch.equal(part.noise, full.noise[4:])
    assert torch.equal(part.flip, full.flip[4:]) and torch.equal(part.skip_noise, full.skip_noise[4:])
    whole = PlannedBatches(100, 8, 0, 0, 3)
    halves = [PlannedBatches(100, 8, 0, 0, 3, rows=(a, a + 4)) for a in (0, 4)]
    for batch, first, second in zip(whole, *halves):
        assert batch == first + second


# ---------------------------------------------------------------- sampling and FID

@pytest.fixture(scope="module")
def sampled(runs, tmp_path_factory):
    """`s2dm sample` of 23 seeds (uneven split, batches of 4) by 2 ranks and by one process."""
    single = runs[0]
    base = tmp_path_factory.mktemp("sampled")
    args = ["sample", "--ckpt", single, "--seeds", "0-22", "--steps", "3", "--batch-size", "4",
            "--device", "cpu"]
    ok(one_process(*args, "--out", base / "one"))
    proc = ok(torchrun("-m", "s2dm", *args, "--out", base / "two"))
    return base / "one", base / "two", proc


def pngs(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).glob("[0-9]*.png"))}


@pytest.mark.slow
def test_an_error_or_warning_every_rank_meets_is_said_once(runs, tmp_path):
    """A missing checkpoint (found by each rank itself, outside any collective) is one error
    line, not one more per rank with "[rank 1]"; a grid warning is one warning line."""
    proc = torchrun("-m", "s2dm", "sample", "--ckpt", tmp_path / "nowhere", "--out", tmp_path / "x")
    assert proc.returncode != 0
    said = [ln for ln in proc.stderr.splitlines() if "checkpoint not found" in ln]
    assert len(said) == 1 and said[0].startswith("error: ") and "[rank" not in proc.stderr, proc.stderr[-3000:]
    proc = ok(torchrun("-m", "s2dm", "sample", "--ckpt", runs[0], "--seeds", "0-1", "--grid", "quad",
                       "--steps", "300", "--device", "cpu", "--out", tmp_path / "quad"))
    warned = [ln for ln in proc.stderr.splitlines() if "warning:" in ln]
    assert len(warned) == 1 and "coincide" in warned[0], proc.stderr[-3000:]


@pytest.mark.slow
def test_sharded_sampling_writes_the_same_png_files(sampled):
    one, two, proc = sampled
    a, b = pngs(one), pngs(two)
    assert len(a) == 23 and a == b
    meta_a, meta_b = (json.loads((f / "metadata.json").read_text()) for f in (one, two))
    assert meta_a["n_images"] == meta_b["n_images"] == 23 and meta_a["nfe"] == meta_b["nfe"]
    assert (two / "preview" / "mosaic.png").read_bytes() == (one / "preview" / "mosaic.png").read_bytes()
    assert proc.stdout.count("23 images in") == 1


@pytest.mark.slow
def test_sharded_reference_statistics_equal_one_process(tmp_path):
    from s2dm.metrics.statistics import Stats

    one, two = tmp_path / "one.npz", tmp_path / "two.npz"
    args = ["fid", "ref", "--config", "configs/digits.yaml", "--features", "pixels", "--num-images", "301",
            "--batch-size", "40", "--device", "cpu"]
    assert main([*args, "--out", str(one)]) == 0
    ok(torchrun("-m", "s2dm", *args, "--out", two))
    a, b = Stats.load(one), Stats.load(two)
    assert a.n == b.n == 301
    np.testing.assert_allclose(b.mu, a.mu, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(b.sigma, a.sigma, rtol=1e-10, atol=1e-14)


@pytest.mark.slow
def test_evaluation_while_training_is_sharded(tmp_path):
    """2 ranks evaluate at step 4: each samples 35 of the 70 seeds and extracts its part of the
    reference; the value is one process's scoring of the same checkpoint."""
    from s2dm.core.schedule import NoiseSchedule
    from s2dm.metrics.features import FeatureExtractor
    from s2dm.metrics.fid import frechet_distance, reference_stats
    from s2dm.metrics.sampled import sample_stats
    from s2dm.metrics.statistics import Stats
    from s2dm.samplers.options import SampleOptions

    out = tmp_path / "two"
    ok(torchrun("-m", "s2dm", *tiny_args(out, 4, *EQUIV, "train.eval_every=4", "train.eval.n=70",
                                         "train.eval.steps=3", "train.eval.batch_size=16")))
    (rec,) = [r for r in read_log(out) if r.get("event") == "eval"]
    assert (rec["step"], rec["metric"]) == (4, "FD-pixels-70")
    ck = load_checkpoint(out / "checkpoints" / "ckpt_00000004.pt")
    stats = sample_stats(ck.ema, NoiseSchedule.from_config(ck.config.diffusion), range(70),
                         SampleOptions(steps=3), FeatureExtractor("pixels", device="cpu", progress=False),
                         image_shape=(1, 8, 8), batch_size=16, device="cpu", source="one process")
    ref = Stats.load(out / "ref_pixels.npz")
    one = reference_stats("configs/digits.yaml", tmp_path / "one.npz", features="pixels", progress=False)
    np.testing.assert_allclose(ref.sigma, one.sigma, rtol=1e-10, atol=1e-14)  # as the sharded `fid ref`
    # float64 sums in another order; the digits' always-black pixels make sqrtm ill-conditioned:
    # 9e-10 relative spread measured (scripts/fd_noise.py), 1e-8 is ~10x that.
    assert rec["value"] == pytest.approx(frechet_distance(stats, ref), rel=1e-8)


@pytest.mark.slow
def test_sharded_eval_gives_the_same_fd_and_images(runs, sampled, tmp_path, capsys):
    single = runs[0]
    ref = tmp_path / "ref.npz"
    assert main(["fid", "ref", "--config", "configs/digits.yaml", "--features", "pixels", "--out", str(ref)]) == 0
    args = ["eval", "--ckpt", single, "--samplers", "ddim", "--steps", "3", "--num-images", "90", "--ref", ref,
            "--features", "pixels", "--batch-size", "16", "--fid-batch-size", "25", "--device", "cpu"]
    ok(one_process(*args, "--out", tmp_path / "one"))
    proc = ok(torchrun("-m", "s2dm", *args, "--out", tmp_path / "two"))
    rows = [json.loads(next((tmp_path / d / "cells").rglob("*.json")).read_text())["row"] for d in ("one", "two")]
    assert rows[0]["n"] == rows[1]["n"] == 90
    # Not float64 rounding: the product of two singular covariances (always-black pixels) makes
    # sqrtm ill-conditioned. Measured with scripts/fd_noise.py on 90 such samples vs the digits
    # reference: relative spread 9e-10 under rounding-size perturbations; 1e-8 is ~10x that.
    assert rows[1]["value"] == pytest.approx(rows[0]["value"], rel=1e-8)
    folders = [next((tmp_path / d / "samples").rglob("ddim-3")) for d in ("one", "two")]
    assert pngs(folders[0]) == pngs(folders[1]) and len(pngs(folders[0])) == 90
    assert proc.stdout.count("1 cell:") == 1
    # `s2dm fid` of two folders, sharded: the same number as one process
    fid_args = ["fid", folders[0], sampled[0], "--features", "pixels", "--json", "--batch-size", "7",
                "--device", "cpu"]
    capsys.readouterr()
    assert main([str(a) for a in fid_args]) == 0
    v1 = json.loads(capsys.readouterr().out)["value"]
    v2 = json.loads(ok(torchrun("-m", "s2dm", *fid_args)).stdout)["value"]
    # 23 images < 64 pixels: a rank-deficient covariance. Measured (scripts/fd_noise.py, 90 vs
    # 23 samples of a tiny run): relative spread 3.0e-8; one process with --batch-size 1..1000
    # spreads 1.6e-8. 3e-7 is 10x the larger.
    assert v2 == pytest.approx(v1, rel=3e-7)


def test_moments_about_another_shift_add_up():
    from s2dm.metrics.statistics import RunningMoments

    rng = np.random.default_rng(0)
    x = rng.normal(5.0, 2.0, size=(50, 6))
    whole, parts = RunningMoments(), [RunningMoments(), RunningMoments()]
    for i in range(0, 50, 10):
        whole.update(x[i:i + 10])
        parts[i >= 30].update(x[i:i + 10])
    n1, s1, ss1 = parts[1].sums_about(parts[0].shift)
    merged = RunningMoments()
    merged.shift, merged.n, merged.s, merged.ss = parts[0].shift, parts[0].n + n1, parts[0].s + s1, parts[0].ss + ss1
    for got, want in zip(merged.finalize(), whole.finalize()):
        np.testing.assert_allclose(got, want, rtol=1e-12)


# ---------------------------------------------------------------- precision

def test_bf16_on_the_cpu_trains(tmp_path):
    out = tmp_path / "run"
    assert main(tiny_args(out, 6, "train.precision=bf16", "train.device=cpu", "train.channels_last=true")) == 0
    log = [r for r in read_log(out) if "loss" in r]
    assert log and all(np.isfinite(r["loss"]) for r in log)
    assert read_log(out)[0]["precision"] == "bf16"
    ck = load_checkpoint(out)
    assert ck.state["scaler"] is None and ck.step == 6


def test_fp16_grad_scaler_state_is_saved_and_restored(tmp_path):
    from s2dm.training.state import new_state, restore

    # fp16 on a CPU is slow: a narrower model and 4 steps (2 + 2 resumed)
    cfg_args = ("train.precision=fp16", "train.device=cpu", "train.checkpoint_every=2", "train.log_every=2",
                "model.ch=16")
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(tiny_args(straight, 4, *cfg_args)) == 0
    assert main(tiny_args(split, 2, *cfg_args)) == 0
    saved = torch.load(split / "checkpoints" / "ckpt_00000002.pt", weights_only=False)["scaler"]
    assert saved is not None and saved["scale"] > 0 and "_growth_tracker" in saved
    log = [r for r in read_log(split) if "loss" in r]
    assert "loss_scale" in log[-1] and "fp16_overflow_skipped" in log[-1]
    # restore() puts the scaler state back (a scale the default would never have)
    cfg = load_config(split / "config.yaml")
    state = new_state(cfg, torch.device("cpu"))
    assert state.scaler.get_scale() == 65536.0
    ckpt = split / "checkpoints" / "ckpt_00000002.pt"
    blob = torch.load(ckpt, weights_only=False)
    blob["scaler"] = {**saved, "scale": 123.0, "_growth_tracker": 7}
    torch.save(blob, ckpt)
    restore(state, cfg, split / "checkpoints", torch.device("cpu"))
    assert state.scaler.get_scale() == 123.0 and state.scaler.state_dict()["_growth_tracker"] == 7
    blob["scaler"] = saved
    torch.save(blob, ckpt)
    # ...and a resumed fp16 run continues exactly
    assert main(tiny_args(split, 4, *cfg_args)) == 0
    a, b = load_checkpoint(straight), load_checkpoint(split)
    assert max_diff(a.model, b.model) == 0.0 and max_diff(a.ema, b.ema) == 0.0
    assert b.state["scaler"] == a.state["scaler"]


def test_bad_precision_names_the_key(tmp_path, capsys):
    assert main(tiny_args(tmp_path / "run", 2, "train.precision=fp8")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: train.precision: 'fp8' is not one of fp32, bf16, fp16")


def test_precision_keys_may_change_on_resume(tmp_path):
    out = tmp_path / "run"
    assert main(tiny_args(out, 3, "train.device=cpu")) == 0
    assert main(tiny_args(out, 5, "train.device=cpu", "train.precision=bf16", "train.channels_last=true")) == 0
    assert load_checkpoint(out).step == 5


def test_tiny_overrides_are_what_the_equivalence_uses():
    # guard: the equivalence test relies on TINY having no dropout (a per-rank stream)
    cfg = load_config("configs/digits.yaml", TINY)
    assert cfg.model.dropout == 0.0 and cfg.train.batch_size % 2 == 0


@pytest.mark.parametrize("precision, ieee", [("fp32", True), ("bf16", False), ("fp16", False)])
def test_fp32_on_a_gpu_turns_tf32_off(precision, ieee):
    """PyTorch runs float32 convolutions in TF32 on a GPU by default; s2dm's fp32 is IEEE float32
    (the flags are process-wide and settable without a GPU; a CPU run leaves them alone)."""
    import torch.backends.cuda
    import torch.backends.cudnn

    from s2dm.training.precision import ieee_float32

    flags = (torch.backends.cudnn, torch.backends.cuda.matmul)
    before = [f.allow_tf32 for f in flags]
    try:
        for f in flags:
            f.allow_tf32 = True
        ieee_float32(precision, torch.device("cpu"))
        assert all(f.allow_tf32 for f in flags)
        ieee_float32(precision, torch.device("cuda"))
        assert [f.allow_tf32 for f in flags] == [not ieee, not ieee]
    finally:
        for f, value in zip(flags, before):
            f.allow_tf32 = value
