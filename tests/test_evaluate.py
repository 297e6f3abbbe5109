"""``s2dm eval``: checkpoints x samplers x steps → results.csv / results.md / fid_vs_nfe.png,
scored with FD-pixels against a digits reference; resumable cell by cell."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from s2dm.cli import main
from s2dm.metrics import evaluate as ev
from s2dm.samplers import expected_nfe


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "digits_pixels.npz"
    assert main(["fid", "ref", "--config", "configs/digits.yaml", "--features", "pixels", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Two checkpoints of one 2-step run of a tiny UNet: the run folder (newest, step 2) and
    step 1's file."""
    run = tmp_path_factory.mktemp("runs") / "tiny"
    sets = ["train.steps=2", "model.ch=32", "model.ch_mult=[1,2]", "model.num_res_blocks=1",
            "train.batch_size=16", "sample.steps=2", "sample.mosaic_images=4", "train.checkpoint_every=1",
            "train.sample_every=1000"]
    args = ["train", "--config", "configs/digits.yaml", "--out", str(run)]
    for item in sets:
        args += ["--set", item]
    assert main(args) == 0
    older = sorted((run / "checkpoints").glob("ckpt_*.pt"))[0]
    assert older.name == "ckpt_00000001.pt"
    return [str(run), str(older)]


def eval_args(ckpts, ref, out, *extra):
    return ["eval", "--ckpt", *ckpts, "--samplers", "ddim,deis", "--steps", "2,4", "--n", "32",
            "--ref", str(ref), "--out", str(out), "--features", "pixels", "--batch-size", "32", *extra]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def evaluated(ckpts, ref, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    assert main(eval_args(ckpts, ref, out)) == 0
    return out


def pixel_fd(folder, seeds, ref):
    """FD-pixels recomputed here from the PNGs with numpy + pytorch-fid's distance."""
    import warnings

    from pytorch_fid.fid_score import calculate_frechet_distance

    x = np.stack([np.asarray(Image.open(Path(folder) / f"{s:06d}.png"), np.float64).reshape(-1) / 255.0
                  for s in seeds])
    with np.load(ref) as f, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy: singular product (N=32 < D=64), `disp` deprecation
        return calculate_frechet_distance(x.mean(0), np.cov(x, rowvar=False), f["mu"], f["sigma"])


def test_results_csv(evaluated, ckpts, ref):
    rows = read_csv(evaluated / "results.csv")
    assert len(rows) == 8
    assert [(r["label"], r["sampler"], r["steps"]) for r in rows] == [
        (label, s, k) for label in ("tiny", "ckpt_00000001") for s in ("ddim", "deis") for k in ("2", "4")]
    for r in rows:
        assert r["metric"] == "FD-pixels-32" and r["features"] == "pixels"
        assert r["n"] == "32" and r["seeds"] == "0-31" and r["grid"] == "uniform"
        assert r["eta"] == ("0.0" if r["sampler"] == "ddim" else "")  # the steps' η: DEIS has none
        assert r["legacy_pndm_index"] == "False"
        assert int(r["nfe"]) == expected_nfe(r["sampler"], int(r["steps"]))
        assert r["ref"] == str(ref) and r["ref_n"] == "1797"
        assert float(r["value"]) > 0
    assert {r["checkpoint_step"] for r in rows} == {"2", "1"}
    assert rows[0]["checkpoint"].endswith("ckpt_00000002.pt") and rows[4]["checkpoint"] == str(Path(ckpts[1]).resolve())
    # a cell's value is the distance of exactly its 32 PNGs (seeds 0..31) to the reference
    folder = evaluated / "samples" / "ckpt_00000001" / "deis-4"
    # np.cov here vs s2dm's running moments: rounding-size differences, which the singular
    # covariance (32 images < 64 pixels) amplifies; scripts/fd_noise.py measures a relative
    # spread of 2.5e-9 for 32 such samples vs the digits reference, so 3e-8 (~10x).
    assert float(rows[7]["value"]) == pytest.approx(pixel_fd(folder, range(32), ref), rel=3e-8)
    # paired design: every cell holds the same seeds
    for label in ("tiny", "ckpt_00000001"):
        for cell in ("ddim-2", "ddim-4", "deis-2", "deis-4"):
            names = sorted(p.name for p in (evaluated / "samples" / label / cell).glob("[0-9]*.png"))
            assert names == [f"{s:06d}.png" for s in range(32)]
    # different checkpoints give different values (the table compares something real)
    assert rows[0]["value"] != rows[4]["value"]


def test_results_markdown_and_plot(evaluated):
    rows = read_csv(evaluated / "results.csv")
    md = (evaluated / "results.md").read_text()
    assert "| sampler | steps | NFE | tiny | ckpt_00000001 | Δ ckpt_00000001 (%) |" in md
    assert "Lower is better; Δ = relative change against the first checkpoint." in md
    assert "FD-pixels-32" in md and "n = 32" in md and "grid uniform, DDIM η = 0.0, DEIS order 3." in md
    by = {(r["label"], r["sampler"], r["steps"]): float(r["value"]) for r in rows}
    for s, k, nfe in (("ddim", "2", 2), ("deis", "4", expected_nfe("deis", 4))):
        a, b = by[("tiny", s, k)], by[("ckpt_00000001", s, k)]
        line = f"| {s} | {k} | {nfe} | {a:.4f} | {b:.4f} | {100 * (b - a) / a:+.2f} |"
        assert line in md, md
    png = evaluated / "fid_vs_nfe.png"
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 300


def test_rerun_recomputes_nothing_and_a_deleted_cell_is_redone(evaluated, ckpts, ref, monkeypatch, capsys):
    before = (evaluated / "results.csv").read_text()

    def fail(*args, **kwargs):
        raise AssertionError("a finished cell was recomputed")

    monkeypatch.setattr(ev, "frechet_distance", fail)
    monkeypatch.setattr(ev, "sample_to_folder", fail)
    assert main(eval_args(ckpts, ref, evaluated)) == 0
    assert (evaluated / "results.csv").read_text() == before
    monkeypatch.undo()

    calls = []
    real = ev.frechet_distance

    def counting(a, b):
        calls.append(a.source)
        return real(a, b)

    monkeypatch.setattr(ev, "frechet_distance", counting)
    (evaluated / "cells" / "tiny" / "deis-2.json").unlink()
    assert main(eval_args(ckpts, ref, evaluated)) == 0
    assert calls == [str(evaluated / "samples" / "tiny" / "deis-2")]
    assert (evaluated / "results.csv").read_text() == before  # same images, same value
    capsys.readouterr()


def test_no_keep_samples_and_changed_settings(ckpts, ref, tmp_path, capsys):
    args = ["eval", "--ckpt", ckpts[0], "--samplers", "ddim", "--steps", "2", "--n", "8", "--ref", str(ref),
            "--out", str(tmp_path), "--no-keep-samples"]
    assert main(args) == 0
    cell = tmp_path / "samples" / "tiny" / "ddim-2"
    assert not list(cell.glob("[0-9]*.png")) and (cell / "metadata.json").is_file()
    first = read_csv(tmp_path / "results.csv")
    assert len(first) == 1 and first[0]["metric"] == "FD-pixels-8" and first[0]["nfe"] == "2"
    # another n is another measurement: the cell is recomputed (images regenerated)
    assert main(args[:-3] + ["--n", "10", "--out", str(tmp_path), "--keep-samples"]) == 0
    second = read_csv(tmp_path / "results.csv")
    assert second[0]["n"] == "10" and second[0]["metric"] == "FD-pixels-10"
    assert len(list(cell.glob("[0-9]*.png"))) == 10
    record = json.loads((tmp_path / "cells" / "tiny" / "ddim-2.json").read_text())
    assert record["key"]["n"] == 10 and record["row"]["value"] == float(second[0]["value"])
    capsys.readouterr()


def test_a_checkpoint_saved_again_is_sampled_again(ckpts, ref, tmp_path, capsys):
    """The same path and step saved again (a run retrained into its folder): the cell is redone
    from new images; its kept sample folder held the old model's, which were scored again."""
    import os
    import shutil

    run = tmp_path / "run"
    shutil.copytree(ckpts[0], run)
    args = ["eval", "--ckpt", str(run), "--samplers", "ddim", "--steps", "2", "--n", "8", "--ref", str(ref),
            "--out", str(tmp_path / "ev"), "--features", "pixels"]
    assert main(args) == 0
    first = read_csv(tmp_path / "ev" / "results.csv")[0]
    ckpt = next((run / "checkpoints").glob("ckpt_00000002.pt"))
    ck = torch.load(ckpt, weights_only=False)
    for name in ck["ema"]:
        ck["ema"][name] = ck["ema"][name] * 0.5  # another model at the same step
    torch.save(ck, ckpt)
    os.utime(ckpt, ns=(ckpt.stat().st_atime_ns, ckpt.stat().st_mtime_ns + 10**9))  # coarse-mtime file systems
    assert main(args) == 0
    second = read_csv(tmp_path / "ev" / "results.csv")[0]
    folder = tmp_path / "ev" / "samples" / "run" / "ddim-2"
    assert second["checkpoint_step"] == first["checkpoint_step"] == "2" and second["value"] != first["value"]
    # the images scored are the new model's: 1e-6 is far above the rounding spread (see above: 2.5e-9
    # at 32 images) and far below the two models' difference
    assert float(second["value"]) == pytest.approx(pixel_fd(folder, range(8), ref), rel=1e-6)
    capsys.readouterr()


def expect_error(capsys, args, *words):
    rc = main([str(a) for a in args])
    _, err = capsys.readouterr()
    assert rc == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in err, err
    for w in words:
        assert w in last, last


def test_each_row_says_how_its_steps_were_taken(ckpts, ref, tmp_path):
    """DDPM's steps are η = 1 whatever --eta says, and PNDM's legacy index is its own cell,
    column and header note, never a silent change of the same-named cell."""
    out = tmp_path / "e"
    args = ["eval", "--ckpt", ckpts[0], "--samplers", "ddpm,pndm", "--steps", "4", "--n", "8", "--ref", str(ref),
            "--out", str(out), "--features", "pixels", "--batch-size", "8"]
    assert main(args) == 0 and main([*args, "--legacy-pndm-index"]) == 0
    rows = {r["sampler"]: r for r in read_csv(out / "results.csv")}
    assert rows["ddpm"]["eta"] == "1.0" and rows["pndm"]["eta"] == ""
    assert rows["ddpm"]["legacy_pndm_index"] == rows["pndm"]["legacy_pndm_index"] == "True"
    md = (out / "results.md").read_text()
    assert "grid uniform, DDPM's ancestral steps (η = 1), PNDM's legacy index (t paired with ᾱ[t+1])." in md
    assert "η = 0" not in md
    cells = sorted(p.name for p in (out / "cells" / "tiny").glob("*.json"))
    assert cells == ["ddpm-4-legacy.json", "ddpm-4.json", "pndm-4-legacy.json", "pndm-4.json"]


def test_cells_of_other_sampler_settings_live_side_by_side(ckpts, ref, tmp_path):
    """A cell is named as s2dm sample names its folder: an --eta 0.5 or --grid quad run into the
    same DIR adds its cells beside the first run's (it replaced them before)."""
    out = tmp_path / "e"
    base = ["eval", "--ckpt", ckpts[0], "--samplers", "ddim", "--steps", "3", "--n", "8", "--ref", str(ref),
            "--out", str(out), "--features", "pixels", "--batch-size", "8"]
    for extra in ([], ["--eta", "0.5"], ["--grid", "quad"], []):
        assert main(base + extra) == 0
    assert sorted(p.name for p in (out / "cells" / "tiny").glob("*.json")) == [
        "ddim-3-eta0.5.json", "ddim-3-quad.json", "ddim-3.json"]
    assert {r["eta"] for r in read_csv(out / "results.csv")} == {"0.0"}  # the last command's cells


def test_a_warning_is_said_once_per_command(ckpts, ref, tmp_path, capsys):
    """Each cell validates its options: 64 steps' grid warning came once per cell."""
    capsys.readouterr()
    assert main(["eval", "--ckpt", ckpts[0], "--samplers", "ddim,deis", "--steps", "64", "--n", "8", "--ref", str(ref),
                 "--out", str(tmp_path / "e"), "--features", "pixels", "--batch-size", "8"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "uniform grid: 64 steps" in line]
    assert len(lines) == 1 and "warning: uniform grid: 64 steps do not divide T=1000" in lines[0]


def test_bad_eval_input(ckpts, ref, tmp_path, capsys):
    base = ["eval", "--ckpt", ckpts[0], "--n", "8", "--out", tmp_path / "o"]
    expect_error(capsys, base + ["--ref", tmp_path], "--ref must be a .npz")
    expect_error(capsys, base + ["--ref", ref, "--samplers", "ddim,foo"], "unknown sampler 'foo'")
    expect_error(capsys, base + ["--ref", ref, "--steps", "2,x"], "--steps")
    expect_error(capsys, base + ["--ref", ref, "--features", "inception"], "holds pixels statistics")
    expect_error(capsys, ["eval", "--ckpt", ckpts[0], ckpts[0], "--n", "8", "--ref", ref, "--out", tmp_path],
                 "given twice")
    # pixel statistics of 16x16 images cannot score 8x8 digits: refused before sampling
    folder = tmp_path / "big"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((16, 16), 40 * i, np.uint8), mode="L").save(folder / f"{i}.png")
    assert main(["fid", "ref", str(folder), "--features", "pixels", "--out", str(tmp_path / "big.npz")]) == 0
    expect_error(capsys, base + ["--ref", tmp_path / "big.npz"], "1x8x8", "1x16x16")
    assert not (tmp_path / "o" / "samples").exists()


def test_a_checkpoint_without_ema_is_refused_before_any_cell(ckpts, ref, tmp_path, capsys):
    """Found before the progress bar and before OUT is made; --no-ema scores the raw weights."""
    ck = torch.load(Path(ckpts[1]), map_location="cpu", weights_only=False)
    ck["ema"] = None
    bare = tmp_path / "no_ema.pt"
    torch.save(ck, bare)
    out = tmp_path / "o"
    expect_error(capsys, ["eval", "--ckpt", ckpts[1], bare, "--n", "4", "--steps", "2", "--samplers", "ddim",
                          "--ref", ref, "--out", out, "--features", "pixels"], "no_ema.pt holds no EMA weights", "--no-ema")
    assert not out.exists()
    assert main(["eval", "--ckpt", str(bare), "--n", "4", "--steps", "2", "--samplers", "ddim", "--ref", str(ref),
                 "--out", str(out), "--features", "pixels", "--no-ema"]) == 0
    assert read_csv(out / "results.csv")[0]["weights"] == "raw weights (no EMA)"


def test_checkpoint_labels(tmp_path):
    from s2dm.io.checkpoint import checkpoint_name

    paths = []
    for run in ("base", "s2"):
        d = tmp_path / run / "checkpoints"
        d.mkdir(parents=True)
        (d / checkpoint_name(100)).write_bytes(b"x")
        paths.append(str(d / checkpoint_name(100)))
    assert ev.checkpoint_labels(paths) == ["base-ckpt_00000100", "s2-ckpt_00000100"]
    # checkpoints of two runs: each file names its run, not just its step
    assert ev.checkpoint_labels([str(tmp_path / "base"), paths[1]]) == ["base", "s2-ckpt_00000100"]
    (tmp_path / "s2" / "checkpoints" / checkpoint_name(50)).write_bytes(b"x")
    two = [str(tmp_path / "s2" / "checkpoints" / checkpoint_name(50)), paths[1]]
    assert ev.checkpoint_labels(two) == ["ckpt_00000050", "ckpt_00000100"]  # one run: its file names
    assert ev.checkpoint_labels([two[0], *paths]) == ["s2-ckpt_00000050", "base-ckpt_00000100", "s2-ckpt_00000100"]


def _eval_row(label, sampler, steps, value):
    return {"checkpoint": f"/r/{label}.pt", "label": label, "checkpoint_step": 1, "sampler": sampler,
            "grid": "uniform", "steps": steps, "nfe": expected_nfe(sampler, steps), "eta": 0.0, "order": "",
            "eps_scale": "", "n": 32, "seeds": "0-31", "metric": "FD-pixels-32", "value": value,
            "features": "pixels", "ref": "ref.npz", "ref_n": 1797, "weights_sha256": ""}


def test_plot_and_table_without_hand_work(tmp_path):
    """One panel per sampler, one colour and marker per checkpoint in every panel, one legend
    naming every checkpoint (``b`` is missing from the first panel); no "-0.0000" in the table."""
    from matplotlib.colors import to_hex

    rows = ([_eval_row("a", "ddim", k, 0.2 - k / 100) for k in (2, 4)]
            + [_eval_row(lab, "deis", k, 0.3 - k / 100 + i * 1e-3) for i, lab in enumerate("ab") for k in (2, 4)])
    fig = ev.plot_fid_vs_nfe(rows, tmp_path / "p.png")
    styles = [{ln.get_label(): (to_hex(ln.get_color()), ln.get_marker()) for ln in ax.get_lines()
               if not ln.get_label().startswith("_")} for ax in fig.axes]
    assert [ax.get_title() for ax in fig.axes] == ["ddim", "deis"]
    assert sorted(styles[0]) == ["a"] and styles[1]["a"] == styles[0]["a"] and styles[1]["b"] != styles[1]["a"]
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["a", "b"]
    md = ev.results_markdown([_eval_row("a", "ddim", 2, -1e-9)], ["a"], ["ddim"], [2])
    assert "| ddim | 2 | 2 | 0.0000 |" in md and "-0.0000" not in md
    # one checkpoint: no Δ column, and no legend for one
    assert "Lower is better." in md and "Δ" not in md


def test_many_series_keep_their_own_colour_and_stay_near_their_nfe():
    """Up to 17 series each get a colour of their own (the 10th took the 1st's, and a star names
    its series by colour); however many, the offsets keep every point within ±4 % of its NFE."""
    from matplotlib.colors import to_hex

    from s2dm.util.plots import COLOURS, series_styles

    styles = series_styles([f"run{i}" for i in range(len(COLOURS))])
    assert len({to_hex(s.colour) for s in styles.values()}) == len(COLOURS) >= 17
    for n in (2, 5, 10, 30):
        offsets = [s.offset for s in series_styles([f"r{i}" for i in range(n)]).values()]
        assert 0.96 < min(offsets) and max(offsets) < 1.042


def test_a_reference_without_its_n_says_so():
    """A plain pytorch-fid ``.npz`` records no N: the header says "N unknown" (not "N = None"),
    as ``s2dm fid`` does; a recorded N is printed as it is."""
    unknown = dict(_eval_row("a", "ddim", 2, 0.1), ref_n=None)
    md = ev.results_markdown([unknown], ["a"], ["ddim"], [2])
    assert "reference `ref.npz` (N unknown)" in md and "None" not in md
    md = ev.results_markdown([_eval_row("a", "ddim", 2, 0.1)], ["a"], ["ddim"], [2])
    assert "reference `ref.npz` (N = 1797)" in md


def test_eps_scale_sweep_scores_every_scale_from_the_same_x_T(ckpts, ref, tmp_path, capsys):
    out = tmp_path / "sweep"
    sweep = "none,const:0.98,linear:0,1.02,skip:9,tau:0.99,variant:shared"
    args = ["eval", "--ckpt", ckpts[0], "--samplers", "ddim", "--steps", "2,4", "--n", "32", "--ref", str(ref),
            "--out", str(out), "--features", "pixels", "--batch-size", "32", "--eps-scale", sweep]
    assert main(args) == 0
    rows = read_csv(out / "results.csv")
    labels = [None, "const:0.98", "linear:0,1.02", "skip:9,tau:0.99,variant:shared"]
    assert [(int(r["steps"]), r["eps_scale"] or None) for r in rows] == [(k, e) for k in (2, 4) for e in labels]
    for k in (2, 4):
        cell = [r for r in rows if int(r["steps"]) == k]
        best = min(cell, key=lambda r: float(r["value"]))
        assert [r["best_scale"] for r in cell] == [str(r is best) for r in cell]
        # every value is the FD of its own folder's PNGs (the oracle), and the scales differ
        for r in cell:
            name = f"ddim-{k}" + (f"-eps{ev._safe(r['eps_scale'])}" if r["eps_scale"] else "")
            assert float(r["value"]) == pytest.approx(pixel_fd(out / "samples" / "tiny" / name, range(32), ref),
                                                      rel=1e-6)
        assert len({r["value"] for r in cell}) == 4
    # linear:0,B is const:B: the same images as a const:1.02 cell would give
    const = tmp_path / "const"
    assert main(args[:-1] + ["const:1.02"] + ["--out", str(const)]) == 0
    a = sorted((out / "samples" / "tiny" / "ddim-2-epslinear_0_1.02").glob("*.png"))
    b = sorted((const / "samples" / "tiny" / "ddim-2-epsconst_1.02").glob("*.png"))
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b] and len(a) == 32
    md = (out / "results.md").read_text()
    assert "| sampler | steps | NFE | none | const:0.98 | linear:0,1.02 | skip:9,tau:0.99,variant:shared | best |" in md
    assert md.count("** ★") == 2  # one best per cell
    assert Image.open(out / "eps_sweep.png").size[0] > 300
    # the Python API returns the same table
    again = ev.evaluate([ckpts[0]], samplers=["ddim"], steps=[2, 4], n=32, ref=str(ref), out=str(out),
                        features="pixels", batch_size=32, eps_scales=[None, 0.98, {"linear": (0, 1.02)},
                                                                      "skip:9,tau:0.99,variant:shared"],
                        progress=False)
    assert [(r["eps_scale"], r["value"], str(r["best_scale"])) for r in again] == \
        [(r["eps_scale"], float(r["value"]), r["best_scale"]) for r in rows]


def test_a_bad_sweep_is_one_error_line(ckpts, ref, tmp_path, capsys):
    args = ["eval", "--ckpt", ckpts[0], "--samplers", "ddim", "--steps", "2", "--n", "32", "--ref", str(ref),
            "--out", str(tmp_path / "x"), "--features", "pixels"]
    for sweep, message in (("none,1.0,const:1", "error: --eps-scale: 'none,1.0,const:1' repeats const:1"),
                           ("none,,1.1", "error: --eps-scale: 'none,,1.1' has an empty item"),
                           ("none,linear:-1,1", "error: --eps-scale: linear:K,B divides ε by K·t + B, which must be > 0")):
        assert main(args + ["--eps-scale", sweep]) == 2
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()
