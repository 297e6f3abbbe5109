"""Evaluation while training (train.eval_every), checkpoints/best, TensorBoard, s2dm plot."""
import errno
import json
import signal

import numpy as np
import pytest
import torch

import s2dm.training.evaluation as evaluation
from conftest import read_log, tiny_args
from s2dm import load_checkpoint
from s2dm.cli import main
from s2dm.io.checkpoint import checkpoint_step, point, prune, resolve_checkpoint, save_run_checkpoint
from s2dm.metrics.fid import compare, reference_stats
from s2dm.metrics.statistics import Stats
from s2dm.samplers.options import SampleOptions
from s2dm.sampling.folder import sample_to_folder
from test_fault_tolerance import EXTRA, STEPS, digest, spawn, wait_for_step

# 70 images > 64 pixels: the smallest n whose FD-pixels covariance is not singular by rank.
EVAL = ("train.eval_every=4", "train.eval.n=70", "train.eval.steps=3", "train.eval.batch_size=32")


def evals(run):
    return [r for r in read_log(run) if r.get("event") == "eval"]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A 12-step run (EXTRA: a log line and a checkpoint every 2 steps) evaluated every 4 steps."""
    out = tmp_path_factory.mktemp("eval") / "run"
    assert main(tiny_args(out, STEPS, *EXTRA, *EVAL)) == 0
    return out


def test_eval_records_and_the_best_pointer(evaluated):
    records = evals(evaluated)
    assert [r["step"] for r in records] == [4, 8, 12]
    for r in records:
        assert {"step", "event", "metric", "value", "n", "sampler", "steps", "nfe", "seconds"} <= set(r)
        assert (r["metric"], r["n"], r["sampler"], r["steps"], r["nfe"]) == ("FD-pixels-70", 70, "ddim", 3, 3)
        assert r["value"] > 0 and r["seconds"] > 0
    best = min(records, key=lambda r: r["value"])
    assert [r["best"] for r in records] == [r["value"] == min(x["value"] for x in records[:i + 1])
                                            for i, r in enumerate(records)]
    assert resolve_checkpoint(evaluated, "best").name == f"ckpt_{best['step']:08d}.pt"
    # each log line of an eval step comes before its evaluation
    steps = [(r["step"], r.get("event", "window")) for r in read_log(evaluated) if r["step"] in (4, 8)]
    assert steps == [(4, "window"), (4, "eval"), (8, "window"), (8, "eval")]


def test_eval_value_is_what_s2dm_sample_and_fid_give(evaluated, tmp_path):
    """The oracle: the PNGs of `s2dm sample` on the step's checkpoint, scored by `s2dm fid`
    against the data set's reference made by `s2dm fid ref`."""
    rec = evals(evaluated)[1]
    ckpt = evaluated / "checkpoints" / f"ckpt_{rec['step']:08d}.pt"
    folder = tmp_path / "samples"
    sample_to_folder(str(ckpt), str(folder), SampleOptions(sampler="ddim", steps=3), seeds=list(range(70)),
                     device="cpu")
    ref = reference_stats("configs/digits.yaml", tmp_path / "ref.npz", features="pixels", progress=False)
    cached = Stats.load(evaluated / "ref_pixels.npz")
    assert cached.n == ref.n == 1797
    np.testing.assert_allclose(cached.sigma, ref.sigma, rtol=0, atol=1e-15)  # float64 sums, another batching
    value = compare(folder, tmp_path / "ref.npz", progress=False)["value"]
    # Batches of 32 vs 50 images only reorder float64 sums; the digits' always-black pixels make
    # sqrtm ill-conditioned: 9e-10 relative spread measured (scripts/fd_noise.py), 1e-8 is ~10x.
    assert rec["value"] == pytest.approx(value, rel=1e-8)


def test_evaluation_draws_none_of_the_training_randomness(evaluated, tmp_path):
    plain = tmp_path / "plain"
    assert main(tiny_args(plain, STEPS, *EXTRA)) == 0
    assert digest(plain) == digest(evaluated)
    for name in ("optimizer",):
        a, b = load_checkpoint(plain).state[name], load_checkpoint(evaluated).state[name]
        assert all(torch.equal(a["state"][k]["exp_avg"], b["state"][k]["exp_avg"]) for k in a["state"])
    window = [{k: v for k, v in r.items() if k not in ("steps_per_s", "images_per_s")}
              for r in read_log(evaluated) if "loss" in r]
    assert window == [{k: v for k, v in r.items() if k not in ("steps_per_s", "images_per_s")}
                      for r in read_log(plain) if "loss" in r]


def test_sample_which_best(evaluated, tmp_path, capsys):
    assert main(["sample", "--ckpt", str(evaluated), "--which", "best", "--steps", "3", "--n", "4",
                 "--device", "cpu"]) == 0
    best = resolve_checkpoint(evaluated, "best")
    # the folder of a checkpoint other than the newest carries its step; the newest's does not
    name = "ddim-3" if best == resolve_checkpoint(evaluated) else f"ddim-3-step{checkpoint_step(best)}"
    meta = json.loads((evaluated / "samples" / name / "metadata.json").read_text())
    assert meta["settings"]["checkpoint"] == str(best.resolve())
    # the pointer file itself names the checkpoint it points at (it was read as a corrupt checkpoint)
    assert main(["sample", "--ckpt", str(evaluated / "checkpoints" / "best"), "--steps", "3", "--n", "4",
                 "--out", str(tmp_path / "p")]) == 0
    assert json.loads((tmp_path / "p" / "metadata.json").read_text())["settings"]["checkpoint"] == str(best.resolve())
    assert main(["sample", "--ckpt", str(best), "--which", "best", "--n", "4"]) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("error: --which best names a run folder's")


def test_keep_last_0_leaves_the_newest_and_the_best_alone(tmp_path, monkeypatch):
    """When best moves on, the checkpoint it held goes (it was kept only as the best)."""
    values = iter([2.0, 1.0])  # step 8 beats step 4
    monkeypatch.setattr(evaluation, "frechet_distance", lambda a, b: next(values))
    out = tmp_path / "run"
    assert main(tiny_args(out, 8, *EXTRA, *EVAL, "train.keep_last=0")) == 0
    assert [r["best"] for r in evals(out)] == [True, True]
    assert sorted(p.name for p in (out / "checkpoints").glob("ckpt_*.pt")) == ["ckpt_00000008.pt"]


def test_the_best_checkpoint_is_never_pruned(tmp_path):
    ckpts = tmp_path / "checkpoints"
    first = save_run_checkpoint(ckpts, {"step": 1, "model": {}}, keep_last=0)
    point(ckpts, "best", first)
    for step in (2, 3, 4):
        save_run_checkpoint(ckpts, {"step": step, "model": {}}, keep_last=0)
    assert sorted(p.name for p in ckpts.glob("ckpt_*.pt")) == ["ckpt_00000001.pt", "ckpt_00000004.pt"]
    assert resolve_checkpoint(tmp_path, "best") == first and resolve_checkpoint(tmp_path).name == "ckpt_00000004.pt"
    point(ckpts, "best", ckpts / "ckpt_00000004.pt")  # best moves on: the one it held goes with keep_last 0
    prune(ckpts, keep_last=0)
    assert sorted(p.name for p in ckpts.glob("ckpt_*.pt")) == ["ckpt_00000004.pt"]


@pytest.mark.parametrize("setting, message", [
    ("train.eval.metric=fud", "error: train.eval.metric: 'fud' is not one of fd-pixels, fid"),
    ("train.eval_every=3", "error: train.eval_every: 3 is not a multiple of train.log_every (2)"),
    ("train.eval.n=64", "error: train.eval.n: 64 images give a covariance of rank at most 63 in 64-d features"),
    ("train.eval.sampler=dimm", "error: train.eval.sampler: unknown sampler 'dimm'"),
])
def test_bad_eval_settings_fail_at_config_load(tmp_path, capsys, setting, message):
    out = tmp_path / "run"
    assert main(tiny_args(out, STEPS, *EXTRA, *EVAL, setting)) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err
    assert not out.exists()


def test_fid_without_inception_weights_fails_before_the_run_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    monkeypatch.setattr("s2dm.metrics.inception.fid_helper_torchscript", lambda: None)
    out = tmp_path / "run"
    assert main(tiny_args(out, STEPS, *EXTRA, *EVAL, "train.eval.metric=fid", "train.eval.n=2049")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: train.eval.metric: fid needs the FID Inception weights") and err.count("\n") == 1
    # it names the config key that gives the file, and no option train lacks (allow_download)
    assert "train.eval.inception_weights: PATH;" in err and "allow_download" not in err, err
    assert not out.exists()
    assert main(tiny_args(out, STEPS, *EXTRA, *EVAL, "train.eval.metric=fid", "train.eval.n=2049",
                          f"train.eval.inception_weights={tmp_path / 'nowhere.pth'}")) == 2
    err = capsys.readouterr().err
    assert f"train.eval.inception_weights: file not found: {tmp_path / 'nowhere.pth'}" in err, err
    assert not out.exists()


def test_a_failed_evaluation_stops_the_run_and_loses_no_checkpoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real = evaluation.sample_stats
    calls = []

    def disk_full_at_step_8(*args, source, **kwargs):
        calls.append(source)
        if source == "step 8":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, source=source, **kwargs)

    monkeypatch.setattr(evaluation, "sample_stats", disk_full_at_step_8)
    assert main(tiny_args(out, STEPS, *EXTRA, *EVAL)) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("error: the evaluation of step 8 failed: [Errno 28] No space left on device")
    assert [p.name for p in sorted((out / "checkpoints").glob("ckpt_*.pt"))][-1] == "ckpt_00000008.pt"
    assert load_checkpoint(out).step == 8
    monkeypatch.undo()
    assert main(tiny_args(out, STEPS, *EXTRA, *EVAL)) == 0  # resumes, evaluates step 8 first
    assert [r["step"] for r in evals(out)] == [4, 8, 12]


def test_reference_statistics_that_cannot_be_written(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert main(tiny_args(out, 4, *EXTRA)) == 0  # a run without evaluation, then it is switched on

    def full(self, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Stats, "save", full)
    assert main(tiny_args(out, STEPS, *EXTRA, *EVAL)) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == (f"error: could not write the reference statistics {out / 'ref_pixels.npz'}: No space left "
                       "on device; no checkpoint was touched")
    assert load_checkpoint(out).step == 4 and not (out / "ref_pixels.npz").exists()


def test_changed_eval_settings_on_resume_restart_best(evaluated, tmp_path):
    run = tmp_path / "run"
    assert main(tiny_args(run, 8, *EXTRA, *EVAL)) == 0
    made = (run / "ref_pixels.npz").stat().st_mtime_ns
    assert main(tiny_args(run, STEPS, *EXTRA, *EVAL, "train.eval.n=80")) == 0
    assert (run / "ref_pixels.npz").stat().st_mtime_ns == made  # the cached reference is reused
    records = evals(run)
    assert [(r["step"], r["n"]) for r in records] == [(4, 70), (8, 70), (12, 80)]
    assert records[2]["best"]  # the first of its settings, whatever its value
    assert resolve_checkpoint(run, "best").name == "ckpt_00000012.pt"
    assert [r["value"] for r in records[:2]] == [r["value"] for r in evals(evaluated)[:2]]


@pytest.mark.slow
def test_sigkill_with_evaluation_resumes_bit_identically(tmp_path, evaluated):
    out = tmp_path / "run"
    for step in (3, 9):
        proc = spawn(out, extra=EVAL)
        wait_for_step(out, step, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert main(tiny_args(out, STEPS, *EXTRA, *EVAL)) == 0
    assert digest(out) == digest(evaluated)
    assert [(r["step"], r["value"]) for r in evals(out)] == [(r["step"], r["value"]) for r in evals(evaluated)]
    assert resolve_checkpoint(out, "best").name == resolve_checkpoint(evaluated, "best").name


def test_tensorboard_events_hold_the_logged_scalars_and_grids(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main(tiny_args(out, 8, *EXTRA, *EVAL, "train.tensorboard=true", "train.sample_every=4")) == 0
    acc = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    logged = [r for r in read_log(out) if "loss" in r]
    loss = acc.Scalars("loss/total")
    assert [e.step for e in loss] == [r["step"] for r in logged]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in logged], rel=1e-6)  # float32 in events
    for tag in ("loss/L0", "loss/L_skip", "loss_by_t/q1_small_t", "loss_by_t/q4_large_t", "train/grad_norm",
                "train/lr", "train/steps_per_s", "train/nonfinite_skipped"):
        assert len(acc.Scalars(tag)) == len(logged), tag
    ev = acc.Scalars("eval/FD-pixels-70")
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in ev] == [(r["step"], r["value"]) for r in evals(out)]
    assert [e.step for e in acc.Images("samples/ema_mosaic")] == [4, 8]


def _tb_steps(run) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    return {**{t: [(e.step, e.value) for e in acc.Scalars(t)] for t in tags["scalars"]},
            **{t: [e.step for e in acc.Images(t)] for t in tags["images"]}}


def test_tensorboard_after_a_resume_holds_what_a_straight_run_holds(tmp_path):
    """A resumed run purges only the earlier process's events after its checkpoint's step: the
    scalars, mosaic and evaluation at that step stay (purge_step was the step itself)."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    args = (*EXTRA, *EVAL, "train.tensorboard=true", "train.sample_every=4", "train.checkpoint_every=4")
    assert main(tiny_args(straight, 8, *args)) == 0
    assert main(tiny_args(split, 4, *args)) == 0
    assert main(tiny_args(split, 8, *args)) == 0
    a, b = _tb_steps(straight), _tb_steps(split)
    assert a["samples/ema_mosaic"] == [4, 8] and [s for s, _ in a["loss/total"]] == [2, 4, 6, 8]
    for timing in [t for t in a if t.endswith("_per_s")]:  # steps/s, images/s: only their steps compare
        assert [s for s, _ in a.pop(timing)] == [s for s, _ in b.pop(timing)], timing
    assert a == b and "eval/FD-pixels-70" in a


def test_tensorboard_missing_is_one_line_at_start_up(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "tensorboard", None)  # as if not installed
    out = tmp_path / "run"
    assert main(tiny_args(out, 4, *EXTRA, "train.tensorboard=true")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: train.tensorboard: true needs the tensorboard package: pip install "
                          "'s2dm[tensorboard]'") and err.count("\n") == 1
    assert not out.exists()


def test_plot_overlays_runs_and_training_writes_curves(evaluated, tmp_path, capsys):
    assert (evaluated / "curves.png").is_file()
    plain = tmp_path / "baseline"
    assert main(tiny_args(plain, 4, *EXTRA, "loss.type=l0")) == 0
    png = tmp_path / "both.png"
    capsys.readouterr()
    assert main(["plot", str(plain), str(evaluated), "--out", str(png)]) == 0
    assert capsys.readouterr().out.strip() == f"curves of 2 runs: {png}"
    from PIL import Image
    assert Image.open(png).size[0] > 600
    assert main(["plot", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(tmp_path / "nothing") in err and err.count("\n") == 1


def test_fd_cnn_during_training(tmp_path, capsys):
    """The classifier metric: trained (or found in the cache) at start-up, labelled FD-cnn-N, with
    its accuracy beside the reference; n must exceed its 64 features."""
    out = tmp_path / "run"
    assert main(tiny_args(out, 4, *EXTRA, *EVAL, "train.eval.metric=fd-cnn", "train.eval.n=64")) == 2
    assert capsys.readouterr().err.startswith("error: train.eval.n: 64 images give a covariance of rank at most 63 "
                                              "in 64-d features (the FD-cnn classifier's), so the Fréchet distance would be singular")
    assert not out.exists()
    assert main(tiny_args(out, 4, *EXTRA, *EVAL, "train.eval.metric=fd-cnn")) == 0
    (rec,) = evals(out)
    assert (rec["metric"], rec["features"], rec["n"]) == ("FD-cnn-70", "cnn", 70) and rec["value"] > 0
    ref = Stats.load(out / "ref_cnn.npz")
    assert ref.classifier_accuracy > 0.95 and ref.n == 1797
    assert main(tiny_args(tmp_path / "fashion", 4, *EXTRA, *EVAL, "train.eval.metric=fd-cnn",
                          "data.dataset=folder", "data.root=.")) == 2
    assert "train.eval.metric: fd-cnn needs a labelled data set (digits, fashion_mnist); folder has" in capsys.readouterr().err


def test_a_failed_start_of_evaluation_leaves_the_run_folder_as_it_was(tmp_path, capsys):
    """Inception weights that exist but do not load fail at start-up: a fresh run leaves no
    folder, a resume keeps its config.yaml, and --resume never --force keeps the old run."""
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a state dict")
    fid = (*EVAL, "train.eval.metric=fid", "train.eval.n=2049", f"train.eval.inception_weights={garbage}")
    fresh = tmp_path / "fresh"
    assert main(tiny_args(fresh, STEPS, *EXTRA, *fid)) == 2
    assert capsys.readouterr().err.startswith("error: cannot load Inception weights")
    assert not fresh.exists()

    out = tmp_path / "run"
    assert main(tiny_args(out, 4, *EXTRA)) == 0
    capsys.readouterr()
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(tiny_args(out, STEPS, *EXTRA, *fid)) == 2
    assert main([*tiny_args(out, STEPS, *EXTRA, *fid), "--resume", "never", "--force"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("error: cannot load Inception weights") for line in err), err
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before


def _digit_folder(folder, invert: bool, count: int = 100):
    """``count`` of the embedded digits as 8x8 grayscale PNGs (inverted: 255 - x)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    folder.mkdir()
    images = np.round(load_digits().images[:count] * 255 / 16).astype(np.uint8)
    for i, im in enumerate(images):
        Image.fromarray(255 - im if invert else im, mode="L").save(folder / f"{i:03d}.png")
    return folder


def test_the_reference_is_made_again_from_another_data_root(tmp_path):
    """ref_pixels.npz is reused only for the data it was made from: a resume that points
    data.root at another folder scores against that folder's statistics."""
    a, b = _digit_folder(tmp_path / "a", invert=False), _digit_folder(tmp_path / "b", invert=True)
    folder = ("data.dataset=folder", "data.image_size=8", "data.channels=1")
    out = tmp_path / "run"
    assert main(tiny_args(out, 4, *EXTRA, *EVAL, *folder, f"data.root={a}")) == 0
    ref_a = Stats.load(out / "ref_pixels.npz")
    assert main(tiny_args(out, 8, *EXTRA, *EVAL, *folder, f"data.root={b}")) == 0
    ref_b = Stats.load(out / "ref_pixels.npz")
    want_a = reference_stats(a, tmp_path / "a.npz", features="pixels")
    want_b = reference_stats(b, tmp_path / "b.npz", features="pixels")
    # the same uint8 pixels in float64 either way: equal to round-off (measured max |diff| ~1e-16)
    assert np.allclose(ref_a.mu, want_a.mu, atol=1e-12) and np.allclose(ref_b.mu, want_b.mu, atol=1e-12)
    assert np.allclose(ref_b.sigma, want_b.sigma, atol=1e-12) and not np.allclose(ref_a.mu, ref_b.mu, atol=0.1)
    assert json.loads((out / "ref_pixels.json").read_text())["data"]["root"] == str(b.resolve())
    assert [r["ref"] for r in evals(out)] == [str(out / "ref_pixels.npz")] * 2
    # a reference without its record (an earlier s2dm's, or a kill before the record): reused
    # only when config.yaml, what the run last trained on, names this data
    (out / "ref_pixels.json").unlink()
    assert main(tiny_args(out, 12, *EXTRA, *EVAL, *folder, f"data.root={a}")) == 0
    assert np.allclose(Stats.load(out / "ref_pixels.npz").mu, want_a.mu, atol=1e-12)


def test_a_reference_of_fewer_images_than_features_warns(tmp_path, capsys):
    small = _digit_folder(tmp_path / "small", invert=False, count=40)
    out = tmp_path / "run"
    assert main(tiny_args(out, 4, *EXTRA, *EVAL, "data.dataset=folder", "data.image_size=8",
                          "data.channels=1", f"data.root={small}")) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warned == ["warning: the reference has 40 training images for 64-d features: its covariance is "
                      "singular and the FD-pixels values are less accurate (more training images, or another "
                      "train.eval.metric, avoid it)"], warned


def test_a_reference_of_an_earlier_s2dm_is_reused_without_its_record(tmp_path):
    """A run folder from before ref_pixels.json: its reference is kept when its label and
    count match (a CIFAR10 FID reference is 50,000 Inception passes), not made again."""
    out = tmp_path / "run"
    assert main(tiny_args(out, 4, *EXTRA, *EVAL)) == 0
    (out / "ref_pixels.json").unlink()
    made = (out / "ref_pixels.npz").stat().st_mtime_ns
    assert main(tiny_args(out, 8, *EXTRA, *EVAL)) == 0
    assert (out / "ref_pixels.npz").stat().st_mtime_ns == made and not (out / "ref_pixels.json").exists()
