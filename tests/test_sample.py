import json
from pathlib import Path

import pytest
import torch

from s2dm.cli import main
from s2dm.core.schedule import NoiseSchedule
from s2dm.io.checkpoint import load_checkpoint, resolve_checkpoint
from s2dm.samplers.generate import generate
from s2dm.util.images import to_uint8
from s2dm.errors import GridWarning, UserError
from s2dm.samplers.options import SampleOptions
from s2dm.sampling.folder import MOSAIC, default_folder, made_with, made_with_text, parse_seeds, sample_to_folder


def files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("[0-9]*.png"))}


@pytest.mark.parametrize("options", [dict(sampler="ddim"), dict(sampler="ddim", eta=1.0), dict(sampler="ddpm")])
def test_images_depend_only_on_their_seed(tiny_run, tmp_path, options):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    options = SampleOptions(steps=5, **options)
    sample_to_folder(tiny_run, a, options, seeds=list(range(6)), batch_size=6)
    sample_to_folder(tiny_run, b, options, seeds=list(range(6)), batch_size=4)
    sample_to_folder(tiny_run, c, options, seeds=[4, 5], batch_size=1)
    fa, fb, fc = files(a), files(b), files(c)
    assert len(fa) == 6 and fa == fb
    assert fc == {k: fa[k] for k in ("000004.png", "000005.png")}
    assert len(set(fa.values())) == 6  # different seeds, different images


def test_resume_skips_existing_and_gives_same_images(tiny_run, tmp_path):
    out = tmp_path / "s"
    sample_to_folder(tiny_run, out, SampleOptions(steps=5), seeds=list(range(5)), batch_size=2)
    before = files(out)
    kept = out / "000000.png"
    mtime = kept.stat().st_mtime_ns
    (out / "000001.png").unlink()
    (out / "000003.png").unlink()
    meta = sample_to_folder(tiny_run, out, SampleOptions(steps=5), seeds=range(5), batch_size=2)  # a range works too
    assert files(out) == before and kept.stat().st_mtime_ns == mtime
    assert meta["n_images"] == 5 and meta["nfe"] == 5 and meta["timesteps"][-1] == -1 and meta["seeds"] == "0-4"
    with pytest.raises(UserError, match="steps"):
        sample_to_folder(tiny_run, out, SampleOptions(steps=7), seeds=list(range(5)))


def test_a_checkpoint_saved_again_is_not_resumed_into_its_old_images(tiny_run, tmp_path):
    """Same path, same step, new file (a run retrained into its folder): the folder's images are
    an earlier model's, so adding to them is refused (they were kept and labelled as the new)."""
    import os
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    out = tmp_path / "s"
    sample_to_folder(str(run), out, SampleOptions(steps=2), seeds=[0, 1], batch_size=2)
    ckpt = resolve_checkpoint(run)
    st = ckpt.stat()
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # as a new save of the same step would
    with pytest.raises(UserError, match=f"holds images made with an earlier file at {ckpt.resolve()}"):
        sample_to_folder(str(run), out, SampleOptions(steps=2), seeds=[0, 1, 2], batch_size=2)
    assert sorted(p.name for p in out.glob("*.png")) == ["000000.png", "000001.png"]


def test_cli_sample_writes_metadata_and_grid(tiny_run, tmp_path, capsys):
    out = tmp_path / "p"
    assert main(["sample", "--ckpt", str(tiny_run), "--out", str(out), "--sampler", "pndm", "--steps", "5",
                 "--n", "4", "--eps-scale", "skip:9,tau:0.99"]) == 0
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["nfe"] == 5 + 9 and meta["settings"]["sampler"] == "pndm"
    assert meta["eps_scale"] == "skip:9,tau:0.99" and meta["config"]["loss"]["type"] == "s2"
    assert (out / "preview" / "mosaic.png").is_file() and len(files(out)) == 4
    assert "NFE 14" in capsys.readouterr().out


@pytest.mark.parametrize("args,msg", [
    (["--sampler", "euler"], "unknown sampler"),
    (["--steps", "2000"], "exceeds"),
    (["--grid", "cosine"], "unknown grid"),
    (["--seeds", "5-2"], "empty"),
])
def test_cli_sample_user_errors(tiny_run, tmp_path, capsys, args, msg):
    code = main(["sample", "--ckpt", str(tiny_run), "--out", str(tmp_path / "x")] + args)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and msg in err and err.count("\n") == 1


def test_weights_that_are_not_finite_give_one_error_line(tiny_run, tmp_path, capsys):
    """A checkpoint whose EMA holds a NaN samples NaN images: one error line, not to_uint8's
    ValueError with a traceback (clamp would have let inf through as ±1)."""
    ck = torch.load(resolve_checkpoint(tiny_run), map_location="cpu", weights_only=False)
    name = next(k for k in ck["ema"] if k.endswith("conv_out.weight"))
    ck["ema"][name] = torch.full_like(ck["ema"][name], float("nan"))
    torch.save(ck, tmp_path / "nan.pt")
    out = tmp_path / "s"
    code = main(["sample", "--ckpt", str(tmp_path / "nan.pt"), "--out", str(out), "--steps", "2", "--n", "3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1] == ("error: the samples of image seeds 0..2 are not finite: the network's output is "
                                     "NaN or infinite (are the checkpoint's weights finite?)"), err
    assert not list(out.glob("*.png"))


@pytest.mark.parametrize("verb, args", [
    ("sample", ["sample", "--steps", "2", "--n", "2", "--out"]),
    ("export", ["export", "--to", "ddim", "--out"]),
])
def test_a_checkpoint_without_ema_is_refused_until_asked_for_the_raw_weights(tiny_run, tmp_path, capsys, verb, args):
    """sample, export and eval share one check (io.checkpoint.pick_weights): one line that names
    --no-ema, nothing written; with --no-ema the raw weights are used."""
    ck = torch.load(resolve_checkpoint(tiny_run), map_location="cpu", weights_only=False)
    ck["ema"] = None
    torch.save(ck, tmp_path / "raw.pt")
    out = tmp_path / ("s" if verb == "sample" else "s.ckpt")
    cmd = [args[0], "--ckpt", str(tmp_path / "raw.pt")] + args[1:] + [str(out)]
    assert main(cmd) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {tmp_path / 'raw.pt'} holds no EMA weights; {verb} the raw ones with --no-ema"], err
    assert not out.exists()
    assert main(cmd + ["--no-ema"]) == 0 and out.exists()


def test_each_spelling_of_an_eps_scale_resumes_the_same_folder(tiny_run, capsys):
    """1.005 and const:1.005 (skip:9 and skip:9,tau:0.99) are one ε-scale, one folder name and
    one recorded setting: a second spelling resumes the folder instead of being refused, also
    a folder whose metadata.json recorded the text as typed (as earlier versions did)."""
    base = ["sample", "--ckpt", str(tiny_run), "--steps", "2", "--batch-size", "2"]
    folder = Path(tiny_run) / "samples" / "ddim-2-epsconst_1.005"
    assert main(base + ["--n", "2", "--eps-scale", "1.005"]) == 0
    meta = json.loads((folder / "metadata.json").read_text())
    assert meta["settings"]["eps_scale"] == "const:1.005"
    meta["settings"]["eps_scale"] = "1.005"  # as earlier versions wrote it
    (folder / "metadata.json").write_text(json.dumps(meta))
    assert main(base + ["--n", "3", "--eps-scale", "const:1.005"]) == 0, capsys.readouterr().err
    assert sorted(p.name for p in folder.glob("*.png")) == ["000000.png", "000001.png", "000002.png"]
    assert main(base + ["--n", "1", "--eps-scale", "skip:9"]) == 0
    assert main(base + ["--n", "2", "--eps-scale", "skip:9,tau:0.99,variant:independent"]) == 0, capsys.readouterr().err
    assert len(list((Path(tiny_run) / "samples" / "ddim-2-epsskip_9_tau_0.99").glob("*.png"))) == 2
    # another setting is refused in words, not Python's (None, True, quotes)
    out = str(Path(tiny_run) / "samples" / "ddim-2-epsskip_9_tau_0.99")
    capsys.readouterr()
    for extra, says in (([], "eps_scale skip:9,tau:0.99, not none"), (["--eps-scale", "skip:9", "--no-ema"], "ema on, not off")):
        assert main(base + ["--n", "1", "--out", out] + extra) == 2
        assert f"holds images made with {says}; choose another output folder" in capsys.readouterr().err


def test_parse_seeds():
    assert parse_seeds("0-3,7", None) == [0, 1, 2, 3, 7]
    assert parse_seeds(None, 3) == [0, 1, 2]
    assert parse_seeds("10-19", 2) == [10, 11]
    for bad in ("a-b", "3-1", "1,1"):
        with pytest.raises(UserError):
            parse_seeds(bad, None)
    # a million seeds at most: a typo of a range is an error, not a MemoryError
    assert len(parse_seeds("0-999999", None)) == 1_000_000
    for spec, n in (("0-1000000", None), ("0-5,10-1000000000000", None), (None, 1_000_001)):
        with pytest.raises(UserError, match="more than s2dm samples in one call"):
            parse_seeds(spec, n)


def test_no_ckpt_and_no_out_sample_the_newest_run_into_its_folder(tmp_path, monkeypatch, capsys):
    import os
    import shutil

    from conftest import tiny_args

    older, newer = tmp_path / "runs" / "older", tmp_path / "runs" / "newer"
    assert main(tiny_args(newer, 1)) == 0
    shutil.copytree(newer, older)  # same weights, but its checkpoint is made older below
    for ckpt in (older / "checkpoints").glob("ckpt_*.pt"):
        os.utime(ckpt, (1, 1))
    (tmp_path / "runs" / "broken" / "checkpoints").mkdir(parents=True)  # no checkpoint: not a candidate
    (tmp_path / "runs" / "broken" / "checkpoints" / "latest").write_text("ckpt_00000009.pt\n")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["sample", "--sampler", "ddim", "--steps", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "sampling runs/newer (the newest run under runs/" in out
    folder = newer / "samples" / "ddim-2"
    assert len(files(folder)) == 64 and "64 images in runs/newer/samples/ddim-2 (" in out  # the default n
    # fewer seeds into that folder: what was asked is counted, and what the folder holds beside it
    assert main(["sample", "--sampler", "ddim", "--steps", "2", "--n", "3", "--device", "cpu"]) == 0
    assert "3 images in runs/newer/samples/ddim-2; the folder holds 64 (" in capsys.readouterr().out
    meta = json.loads((folder / "metadata.json").read_text())
    assert (meta["seeds"], meta["n_images"]) == ("0-63", 64)  # the folder's, not the last call's
    # other settings go to their own folder, named by what differs from the defaults
    assert main(["sample", "--sampler", "ddim", "--steps", "2", "--eta", "0.5", "--grid", "quad", "--no-ema",
                 "--n", "2", "--device", "cpu"]) == 0
    assert len(files(newer / "samples" / "ddim-2-quad-eta0.5-noema")) == 2


def test_sample_defaults_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["sample", "--steps", "2"]) == 2
    assert capsys.readouterr().err.startswith("error: no trained run under runs/")
    for n in ("0", "-3"):
        assert main(["sample", "--steps", "2", "--n", n]) == 2
        assert "must be positive" in capsys.readouterr().err
    loose = tmp_path / "model.ckpt"
    loose.write_bytes(b"")
    assert main(["sample", "--ckpt", str(loose), "--steps", "2"]) == 2
    assert "--out is needed" in capsys.readouterr().err


class _PerRowTimesteps(torch.nn.Module):
    """The network as samplers called it before: t materialised per image."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, t):
        return self.model(x, t.contiguous())


@pytest.mark.parametrize("sampler", ["ddim", "pndm", "deis"])
def test_embedding_the_shared_timestep_once_keeps_the_images(tiny_run, sampler):
    """The sampling path embeds a batch's one t once; its PNG pixels are those of the per-row
    path within one uint8 level (measured here: identical; x0 within 8.3e-7)."""
    ck = load_checkpoint(tiny_run)
    schedule = NoiseSchedule.from_config(ck.config.diffusion)
    kwargs = dict(image_shape=(1, 8, 8), batch_size=50, sampler=sampler, steps=20)
    now, _ = generate(ck.ema, schedule, range(100), **kwargs)
    before, _ = generate(_PerRowTimesteps(ck.ema), schedule, range(100), **kwargs)
    levels = (to_uint8(now).int() - to_uint8(before).int()).abs()
    assert levels.max() <= 1 and (levels > 0).float().mean() <= 1e-3


@pytest.mark.parametrize("sampler", ["ddim", "pndm", "ddpm"])
def test_an_image_is_the_same_float_for_float_in_any_batch(tiny_run, sampler):
    """Not only its PNG: the sampler's output itself. On CPU a convolution of fewer than 16
    rows rounds differently (measured: up to 2e-5 for batches of 1 to 15 before they were
    padded), which a uint8 PNG hides most of the time and a float comparison does not."""
    ck = load_checkpoint(tiny_run)
    schedule = NoiseSchedule.from_config(ck.config.diffusion)
    kwargs = dict(image_shape=(1, 8, 8), sampler=sampler, steps=5)
    whole, _ = generate(ck.ema, schedule, range(40), batch_size=40, **kwargs)
    for batch_size in (1, 7, 17):
        parts, _ = generate(ck.ema, schedule, range(40), batch_size=batch_size, **kwargs)
        assert torch.equal(parts, whole), batch_size


def test_metadata_describes_the_folder_and_the_steps_walked(tiny_run, tmp_path):
    """Seeds and count of every image the folder holds (two calls' seeds), the mosaic of its
    first images, the steps as walked (a quad grid collapses points) and DDPM's η of 1."""
    out = tmp_path / "s"
    sample_to_folder(tiny_run, out, SampleOptions(steps=3), seeds=[10, 11], batch_size=2)
    meta = sample_to_folder(tiny_run, out, SampleOptions(steps=3), seeds=[0, 1, 2], batch_size=2)
    assert (meta["seeds"], meta["n_images"]) == ("0-2,10-11", 5) and parse_seeds(meta["seeds"], None) == [0, 1, 2, 10, 11]
    sample_to_folder(tiny_run, tmp_path / "one", SampleOptions(steps=3), seeds=[0, 1, 2, 10, 11])
    assert (out / MOSAIC).read_bytes() == (tmp_path / "one" / MOSAIC).read_bytes()  # all five, as one call
    with pytest.warns(GridWarning, match="coincide"):
        meta = sample_to_folder(tiny_run, tmp_path / "q", SampleOptions(steps=50, grid="quad"), seeds=[0])
    assert meta["settings"]["steps"] == 50 and meta["steps"] == meta["nfe"] == 49 == len(meta["timesteps"]) - 1
    meta = sample_to_folder(tiny_run, tmp_path / "p", SampleOptions(sampler="ddpm", steps=3), seeds=[0])
    assert meta["settings"]["eta"] == 0.0 and meta["eta"] == 1.0  # as asked; as the steps ran
    assert made_with(tmp_path / "p") == {
        "sampler": "ddpm", "steps": 3, "grid": "uniform", "eta": 1.0, "order": 3, "eps_scale": None,
        "legacy_pndm_index": False, "checkpoint": meta["settings"]["checkpoint"], "checkpoint_step": 20,
        "checkpoint_stamp": meta["settings"]["checkpoint_stamp"],
        "ema": True, "complete": True, "nfe": 3}
    assert made_with(tmp_path) is None  # no metadata.json


def test_a_checkpoint_other_than_the_newest_samples_into_its_own_folder(tiny_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("samples"))
    older = sorted((run / "checkpoints").glob("ckpt_*.pt"))[0]
    assert older.name == "ckpt_00000010.pt"
    options = SampleOptions(steps=2)
    assert default_folder(run, options) == default_folder(run / "checkpoints" / "ckpt_00000020.pt", options) \
        == run / "samples" / "ddim-2"
    assert default_folder(older, options) == run / "samples" / "ddim-2-step10"
    assert default_folder(older, options, use_ema=False) == run / "samples" / "ddim-2-noema-step10"
    assert main(["sample", "--ckpt", str(older), "--steps", "2", "--n", "2"]) == 0
    assert main(["sample", "--ckpt", str(run), "--steps", "2", "--n", "2"]) == 0  # no clash with the older's
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["ddim-2", "ddim-2-step10"]


def test_fid_says_how_a_sample_folder_was_made(tiny_run, tmp_path, capsys):
    folder = tmp_path / "s"
    sample_to_folder(tiny_run, folder, SampleOptions(steps=3), seeds=range(8))
    capsys.readouterr()
    assert main(["fid", str(folder), str(folder), "--features", "pixels", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["a"]["made_with"] == made_with(folder) and res["a"]["made_with"]["sampler"] == "ddim"
    meta = json.loads((folder / "metadata.json").read_text())
    (folder / "metadata.json").write_text(json.dumps({**meta, "complete": False}))  # as a killed run leaves it
    assert main(["fid", str(folder), str(folder), "--features", "pixels"]) == 0
    out, err = capsys.readouterr()
    assert (f"   made with ddim, 3 steps (NFE 3), grid uniform, η 0, EMA weights of step 20 "
            f"({meta['settings']['checkpoint']})") in out.splitlines()
    warning = (f"warning: {folder}: its metadata.json says s2dm sample has not finished it (complete: false); "
               "rerun that command to finish the folder")
    assert warning in err.splitlines()
    assert main(["fid", str(folder), str(folder), "--features", "pixels", "--json"]) == 0
    out, err = capsys.readouterr()
    assert warning in err.splitlines() and json.loads(out)["a"]["made_with"]["complete"] is False  # --json too


def test_the_image_bar_never_passes_its_total(tiny_run, tmp_path, monkeypatch):
    """Each network call adds its share B/NFE; 7/10 added ten times is 7.000000000000001 > 7,
    which made tqdm warn 'clamping frac' and show a negative time left."""
    import s2dm.sampling.folder as folder
    from tqdm.auto import tqdm

    seen = []

    class Watched(tqdm):
        def update(self, n=1):
            out = super().update(n)
            seen.append((self.n, self.total))
            return out

    monkeypatch.setattr(folder, "tqdm", Watched)
    sample_to_folder(tiny_run, tmp_path / "s", SampleOptions(steps=10), seeds=range(7), batch_size=7)
    assert len(seen) > 10 and all(n <= total for n, total in seen) and seen[-1] == (7, 7)


def test_a_folder_being_added_to_is_unfinished_until_done(tiny_run, tmp_path, monkeypatch):
    import s2dm.sampling.folder as folder

    out = tmp_path / "s"
    sample_to_folder(tiny_run, out, SampleOptions(sampler="ddpm", steps=3), seeds=[0, 1])
    (out / "42.png").write_bytes((out / "000001.png").read_bytes())  # a stray copy: not seed 42's image

    def killed(img, path):
        raise OSError("disk full")

    monkeypatch.setattr(folder, "save_png", killed)
    with pytest.raises(OSError):
        sample_to_folder(tiny_run, out, SampleOptions(sampler="ddpm", steps=3), seeds=range(4))
    made = made_with(out)  # as a killed second call leaves it: unfinished, η from the sampler, no NFE yet
    assert made["complete"] is False and made["eta"] == 1.0 and made["nfe"] is None
    assert made_with_text(made).startswith("made with ddpm, 3 steps, grid uniform, η 1, EMA weights of step 20 (")
    monkeypatch.undo()
    meta = sample_to_folder(tiny_run, out, SampleOptions(sampler="ddpm", steps=3), seeds=range(4))
    assert meta["complete"] is True and (meta["seeds"], meta["n_images"]) == ("0-3", 4)  # 42.png is no seed's


def test_the_newest_checkpoints_folder_after_the_run_trains_further(tmp_path, capsys):
    """ddim-2 is the newest checkpoint's folder: once the run trains past the checkpoint whose
    images it holds, the same command moves them to ddim-2-step10 and samples the new one."""
    from conftest import tiny_args

    run = tmp_path / "run"
    assert main(tiny_args(run, 10)) == 0
    sample = ["sample", "--ckpt", str(run), "--steps", "2", "--n", "3"]
    assert main(sample) == 0
    step10 = files(run / "samples" / "ddim-2")
    assert main(tiny_args(run, 20)) == 0
    capsys.readouterr()
    assert main(sample) == 0
    err = capsys.readouterr().err
    moved = run / "samples" / "ddim-2-step10"
    assert f"note: {run / 'samples' / 'ddim-2'} held the images of step 10, which the run has trained past: " \
           f"moved to {moved}" in err
    assert files(moved) == step10 and made_with(moved)["checkpoint_step"] == 10
    assert made_with(run / "samples" / "ddim-2")["checkpoint_step"] == 20
    step20 = files(run / "samples" / "ddim-2")
    assert step20.keys() == step10.keys() and step20 != step10  # the newer weights' images
    # sampling step 10 again adds to its folder, not to a third one
    assert main(["sample", "--ckpt", str(run / "checkpoints" / "ckpt_00000010.pt"), "--steps", "2", "--n", "4"]) == 0
    assert sorted(p.name for p in (run / "samples").iterdir() if p.is_dir()) == ["ddim-2", "ddim-2-step10"]
    assert len(files(moved)) == 4
    # both folders of step 10 (a copy): nothing moves, and the error says why
    import shutil

    shutil.rmtree(run / "samples" / "ddim-2")
    shutil.copytree(moved, run / "samples" / "ddim-2")
    with pytest.raises(UserError, match=r"ddim-2 holds the images of step 10, which the run has trained past, and "
                                        r".*ddim-2-step10, where they would move, exists too; merge or delete one"):
        default_folder(run, SampleOptions(steps=2))


def test_a_moved_run_adds_to_its_sample_folders(tiny_run, tmp_path):
    import shutil

    first, second = tmp_path / "a" / "run", tmp_path / "b" / "run"
    shutil.copytree(tiny_run, first, ignore=shutil.ignore_patterns("samples"), copy_function=shutil.copy2)
    sample = ["sample", "--steps", "2", "--n", "2"]
    assert main([*sample, "--ckpt", str(first)]) == 0
    shutil.move(first.parent, second.parent)  # mv keeps the checkpoint's size and time
    assert main([*sample[:-1], "3", "--ckpt", str(second)]) == 0
    meta = made_with(second / "samples" / "ddim-2")
    assert meta["checkpoint"] == str((second / "checkpoints" / "ckpt_00000020.pt").resolve())
    assert len(files(second / "samples" / "ddim-2")) == 3


def test_images_without_metadata_are_kept_only_if_these_settings_make_them(tiny_run, tmp_path, capsys):
    out = tmp_path / "s"
    sample_to_folder(tiny_run, out, SampleOptions(steps=3), seeds=range(4), batch_size=4)
    ddim = files(out)
    (out / "metadata.json").unlink()
    with pytest.raises(UserError, match=r"holds 4 images but no metadata.json, and 000000.png is not what these "
                                        r"settings make from this checkpoint"):
        sample_to_folder(tiny_run, out, SampleOptions(sampler="deis", steps=3), seeds=range(8), batch_size=8)
    assert files(out) == ddim and not (out / "metadata.json").exists()  # nothing written
    capsys.readouterr()
    sample_to_folder(tiny_run, out, SampleOptions(steps=3), seeds=range(6), batch_size=8)
    assert "images 0,3 are what these settings make, so the folder's images are kept" in capsys.readouterr().err
    assert {k: v for k, v in files(out).items() if k in ddim} == ddim and len(files(out)) == 6
    assert made_with(out)["complete"] and made_with(out)["sampler"] == "ddim"


def test_the_deis_order_does_not_tell_ddim_folders_apart(tiny_run, tmp_path):
    out = tmp_path / "s"
    sample_to_folder(tiny_run, out, SampleOptions(steps=3), seeds=range(2), batch_size=2)
    sample_to_folder(tiny_run, out, SampleOptions(steps=3, order=2), seeds=range(3), batch_size=2)
    assert len(files(out)) == 3
    deis = tmp_path / "d"
    sample_to_folder(tiny_run, deis, SampleOptions(sampler="deis", steps=3), seeds=range(2), batch_size=2)
    with pytest.raises(UserError, match="holds images made with order 3, not 2"):
        sample_to_folder(tiny_run, deis, SampleOptions(sampler="deis", steps=3, order=2), seeds=range(2))


@pytest.mark.parametrize("kwargs,message", [
    (dict(seeds=[]), "seeds: no image seeds given"),
    (dict(seeds=[-3]), "seeds: image seeds are integers >= 0, not -3"),
    (dict(seeds=[1, 1]), "seeds: seed 1 is given twice"),
    (dict(seeds=[0.5]), "seeds: image seeds are integers >= 0, not 0.5"),
    (dict(seeds=range(2), batch_size=0), "batch_size: expected a positive integer, got 0"),
])
def test_the_api_checks_seeds_and_batch_size_before_writing(tiny_run, tmp_path, kwargs, message):
    from s2dm.errors import SamplerError

    out = tmp_path / "s"
    with pytest.raises(SamplerError, match=message):
        sample_to_folder(tiny_run, out, SampleOptions(steps=2), **kwargs)
    assert not out.exists()
    ck = load_checkpoint(tiny_run)
    schedule = NoiseSchedule.from_config(ck.config.diffusion)
    with pytest.raises(SamplerError, match=message):
        generate(ck.ema, schedule, kwargs["seeds"], image_shape=(1, 8, 8), batch_size=kwargs.get("batch_size", 4))


def test_generate_samples_in_eval_mode_and_gives_the_mode_back(tiny_run):
    """A model in training mode (dropout 0.1) gives the images of its eval mode, every call."""
    ck = load_checkpoint(tiny_run)
    schedule = NoiseSchedule.from_config(ck.config.diffusion)
    dropouts = [m for m in ck.model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts
    for m in dropouts:  # the digits config has none; with it, a training-mode call would draw masks
        m.p = 0.1
    want, _ = generate(ck.model, schedule, [2], image_shape=(1, 8, 8), steps=3)
    ck.model.train()
    got = [generate(ck.model, schedule, [2], image_shape=(1, 8, 8), steps=3)[0] for _ in range(2)]
    assert torch.equal(got[0], want) and torch.equal(got[1], want) and ck.model.training


def test_eta_folder_names_keep_the_digits_that_tell_them_apart():
    names = {SampleOptions(eta=e).folder_name() for e in (0.1234561, 0.1234562)}
    assert names == {"ddim-50-eta0.1234561", "ddim-50-eta0.1234562"}
    assert SampleOptions(eta=0.5).folder_name() == "ddim-50-eta0.5" and SampleOptions(eta=1.0).folder_name() == "ddim-50-eta1"


def test_seeds_of_any_integer_type(tiny_run):
    import numpy as np

    from s2dm.samplers.generate import checked_seeds

    assert checked_seeds(torch.arange(3)) == checked_seeds(np.arange(3)) == checked_seeds(range(3)) == [0, 1, 2]
    for bad in (True, 1.0, torch.tensor(1.0), torch.tensor(True), np.bool_(True)):
        with pytest.raises(UserError, match="image seeds are integers >= 0"):
            checked_seeds([bad])


def test_best_then_latest_then_a_run_started_over(tmp_path, capsys):
    """--which best while best is the newest, more training, best again, then the plain
    command: step 2's images are made once and move to ddim-2-step10; a run started over
    with fewer steps leaves them where they are, and the refusal blames no --out."""
    from conftest import tiny_args

    run = tmp_path / "run"
    assert main(tiny_args(run, 10, "train.eval_every=10", "train.eval.n=70", "train.eval.steps=2")) == 0
    best = ["sample", "--ckpt", str(run), "--steps", "2", "--n", "2", "--which", "best"]
    assert main(best) == 0
    first = files(run / "samples" / "ddim-2")
    # train on with evaluation off: best stays at step 10, the newest becomes 20
    assert main(tiny_args(run, 20)) == 0
    capsys.readouterr()
    assert main(best) == 0 and resolve_checkpoint(run, "best") != resolve_checkpoint(run)
    assert "held the images of step 10" in capsys.readouterr().err
    assert files(run / "samples" / "ddim-2-step10") == first and not (run / "samples" / "ddim-2").exists()
    assert main(["sample", "--ckpt", str(run), "--steps", "2", "--n", "2"]) == 0
    assert made_with(run / "samples" / "ddim-2")["checkpoint_step"] == 20
    # started over with 10 steps: ddim-2 holds step 20's images, which this run does not have
    assert main([*tiny_args(run, 10), "--resume", "never", "--force"]) == 0
    capsys.readouterr()
    assert main(["sample", "--ckpt", str(run), "--steps", "2", "--n", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: {run / 'samples' / 'ddim-2'} holds images made with checkpoint") and "--out" not in err
    assert made_with(run / "samples" / "ddim-2")["checkpoint_step"] == 20 and not (run / "samples" / "ddim-2-step20").exists()



def test_what_the_step_less_folder_move_leaves_alone(tmp_path, capsys):
    """Sampling an unrelated older checkpoint moves nothing; an unfinished folder (a run may
    be writing it) stays; a folder of an earlier s2dm (no checkpoint stamp) moves."""
    import json as json_

    from conftest import tiny_args

    run = tmp_path / "run"
    assert main(tiny_args(run, 30, "train.keep_last=5")) == 0
    assert main(["sample", "--ckpt", str(run / "checkpoints" / "ckpt_00000020.pt"), "--steps", "2", "--n", "2"]) == 0
    assert main(["sample", "--ckpt", str(run), "--steps", "2", "--n", "2"]) == 0  # step 30 into ddim-2
    assert main(tiny_args(run, 40, "train.keep_last=5")) == 0
    # step 10, unrelated to ddim-2's step 30: nothing moves
    assert main(["sample", "--ckpt", str(run / "checkpoints" / "ckpt_00000010.pt"), "--steps", "2", "--n", "2"]) == 0
    assert made_with(run / "samples" / "ddim-2")["checkpoint_step"] == 30
    meta_path = run / "samples" / "ddim-2" / "metadata.json"
    meta = json_.loads(meta_path.read_text())
    meta_path.write_text(json_.dumps({**meta, "complete": False}))  # as while a run writes it
    capsys.readouterr()
    assert main(["sample", "--ckpt", str(run), "--steps", "2", "--n", "2"]) == 2
    assert "holds images made with checkpoint" in capsys.readouterr().err and meta_path.is_file()
    del meta["settings"]["checkpoint_stamp"]  # a folder of an earlier s2dm
    meta_path.write_text(json_.dumps(meta))
    assert main(["sample", "--ckpt", str(run), "--steps", "2", "--n", "2"]) == 0
    assert made_with(run / "samples" / "ddim-2-step30")["checkpoint_step"] == 30
    assert made_with(run / "samples" / "ddim-2")["checkpoint_step"] == 40
