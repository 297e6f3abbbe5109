"""s2dm study: a record is reused, reported or a mosaic kept only when it was made from the
model, data and settings the study asks for now; and the checks made before anything is written."""
import copy
import csv
import json
import os
import re

import pytest
import yaml

from s2dm.cli import main
from s2dm.errors import UserError
from s2dm.study import plan, questions as Q, records, runner, text as T
from s2dm.study.spec import load_study
from s2dm.study.stats import Summary

from conftest import ROOT
from test_study import TOY


def write(tmp_path, data, name="toy.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def _mtimes(folder):
    return {p: p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_cells_and_mosaics_follow_the_model_not_its_path(tmp_path, monkeypatch):
    data = copy.deepcopy(TOY)
    data["eval"]["samplers"] = ["ddim"]
    cfg, out = write(tmp_path, data), tmp_path / "out"
    assert main(["study", "--config", str(cfg), "--out", str(out)]) == 0
    cells, mosaic = _mtimes(out / "cells"), out / "mosaics" / "s2dm.png"
    rows = {r["run"] + r["draw"]: r for r in csv.DictReader((out / "results.csv").open())}
    # the grid, η, checkpoint and reference of every number, the checkpoint relative to the study folder
    assert rows["s2dmmain"]["grid"] == "uniform" and float(rows["s2dmmain"]["eta"]) == 0.0
    assert rows["s2dmmain"]["checkpoint"].startswith("runs/s2dm-s0/checkpoints/") and rows["s2dmmain"]["ref"] == "ref_pixels.npz"
    assert "`uniform` timestep grid with η = 0" in (out / "report.md").read_text()

    # --out spelled otherwise (relative, from its parent): every record is reused
    monkeypatch.chdir(tmp_path)
    assert main(["study", "--config", str(cfg), "--out", "out"]) == 0
    assert _mtimes(out / "cells") == cells

    # a retrained s2dm (another loss.tau, its old run folder deleted) at the same path and step:
    # its cells and its mosaic are made again, the baseline's are kept
    made = mosaic.stat().st_mtime_ns
    data["runs"]["s2dm"]["set"]["loss.tau"] = 0.5
    cfg = write(tmp_path, data)
    assert main(["study", "--config", str(cfg), "--out", "out"]) == 2  # a changed config is refused
    for p in (out / "runs" / "s2dm-s0").rglob("*"):
        if p.is_file():
            p.unlink()
    assert main(["study", "--config", str(cfg), "--out", "out"]) == 0
    after = _mtimes(out / "cells")
    assert after[out / "cells" / "s2dm-s0" / "ddim-4.json"] != cells[out / "cells" / "s2dm-s0" / "ddim-4.json"]
    assert after[out / "cells" / "baseline-s0" / "ddim-4.json"] == cells[out / "cells" / "baseline-s0" / "ddim-4.json"]
    assert mosaic.stat().st_mtime_ns != made
    # other mosaic steps: every mosaic is made again
    made = {p: p.stat().st_mtime_ns for p in (out / "mosaics").glob("*.png")}
    data["eval"]["mosaic_steps"] = 2
    cfg = write(tmp_path, data)
    assert main(["study", "--config", str(cfg), "--out", "out"]) == 0
    assert all(p.stat().st_mtime_ns != t for p, t in made.items())

    # --report-only with another eval.n: the records of n=48 are stale, left out and counted; no mosaic is made
    made = _mtimes(out / "mosaics")
    (out / "mosaics" / "baseline.png").unlink()
    data["eval"]["n"] = 40
    assert main(["study", "--config", str(write(tmp_path, data)), "--out", "out", "--report-only"]) == 0
    report = (out / "report.md").read_text()
    assert "**Incomplete: 0 of 3 cells scored.** 3 records on disk were made with other settings" in report
    assert "FD-pixels-48" not in report and not (out / "results.csv").read_text().strip().count("\n")
    assert not (out / "mosaics" / "baseline.png").exists()
    assert {p: t for p, t in _mtimes(out / "mosaics").items()} == {p: t for p, t in made.items() if p.name != "baseline.png"}

    # train.steps lowered below what the runs are trained to: one error naming the run folder
    data["eval"]["n"] = 48
    data["set"]["train.steps"] = 8
    assert main(["study", "--config", str(write(tmp_path, data)), "--out", "out"]) == 2


@pytest.mark.slow
def test_a_run_trained_past_train_steps_is_refused(tmp_path, capsys):
    data = copy.deepcopy(TOY)
    data["runs"] = {"baseline": data["runs"]["baseline"]}
    data.pop("effect")
    data["eval"].update(samplers=["ddim"], n=8)
    out = tmp_path / "out"
    assert main(["study", "--config", str(write(tmp_path, data)), "--out", str(out)]) == 0
    data["set"]["train.steps"] = 8
    capsys.readouterr()
    assert main(["study", "--config", str(write(tmp_path, data)), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar: one error line
    assert err.startswith("error: ") and "baseline-s0 is trained to step 12 but the study asks train.steps=8" in err
    assert f"delete {out / 'runs' / 'baseline-s0'} to retrain it" in err and not (out / "runs" / "baseline-s0" / "study_done.json").read_text().count('"steps": 8')


def test_the_reference_is_made_again_for_other_data(tmp_path):
    data = copy.deepcopy(TOY)
    out = tmp_path / "out"
    out.mkdir()
    study = load_study(write(tmp_path, data))
    runner.reference(study, out, "pixels")
    ref = out / "ref_pixels.npz"
    made = ref.stat().st_mtime_ns
    runner.reference(study, out, "pixels")
    assert ref.stat().st_mtime_ns == made  # the same data: kept
    data["set"]["data.random_flip"] = True  # the loader's flips: the same images
    runner.reference(load_study(write(tmp_path, data)), out, "pixels")
    assert ref.stat().st_mtime_ns == made
    data["set"]["data.image_size"] = 16  # the digits resized: other images
    other = load_study(write(tmp_path, data))
    assert runner.reference(other, out, "pixels", make=False) is None  # --report-only: no statistics of other data
    runner.reference(other, out, "pixels")
    assert ref.stat().st_mtime_ns != made


def test_earlier_records_are_used_only_when_what_they_record_matches(tmp_path):
    """A record of an earlier s2dm (absolute paths, no stamp, hash, grid or η) is used when all
    it records matches and the checkpoint and reference are older than it."""
    ckpt = tmp_path / "runs" / "b-s0" / "checkpoints" / "c.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"x")
    (tmp_path / "ref_pixels.npz").write_bytes(b"y")
    wanted = {"checkpoint": "runs/b-s0/checkpoints/c.pt", "checkpoint_stamp": "1:2", "checkpoint_step": 12,
              "sampler": "ddim", "steps": 4, "grid": "uniform", "eta": 0.0, "order": 3, "eps_scale": None, "n": 48,
              "image_seeds": "0-47", "metric": "pixels", "ref": "ref_pixels.npz", "ref_n": 1797, "ref_sha256": "ab"}
    earlier = {k: v for k, v in wanted.items() if k not in records.LATER_KEYS}
    earlier.update(checkpoint=f"/elsewhere/study/{wanted['checkpoint']}", ref="study/ref_pixels.npz")
    path = tmp_path / "cell.json"
    path.write_text(json.dumps({"value": 1.0, "settings": earlier}))
    assert records.matching_record(path, wanted, tmp_path)["earlier"] is True
    assert records.matching_record(path, {**wanted, "n": 40}, tmp_path) is None
    assert records.matching_record(path, {**wanted, "eta": 0.5}, tmp_path) is None
    os.utime(ckpt, ns=(path.stat().st_mtime_ns + 10**9,) * 2)  # the checkpoint written after the record
    assert records.matching_record(path, wanted, tmp_path) is None
    path.write_text(json.dumps({"value": 1.0, "settings": wanted}))
    assert records.matching_record(path, wanted, tmp_path)["value"] == 1.0
    assert records.matching_record(path, {**wanted, "checkpoint_stamp": "3:4"}, tmp_path) is None


def test_opposite_point_estimates_are_counted_at_any_scale():
    small = {("a", "ddim", 10): Summary([1e-4, 2e-4]), ("b", "ddim", 10): Summary([3.0, 2.0])}
    other = {("a", "ddim", 10): Summary([-2.0, -1.0]), ("b", "ddim", 10): Summary([1.0, 2.0])}
    assert Q.disagreements(small, other)[1:] == (1, 2)


def test_a_pipe_in_a_table_cell_is_escaped():
    head, sep, row = T.table(["x", "noise |a−b|"], [["1", "|2|"]])
    assert head == "| x | noise \\|a−b\\| |" and sep == "|---|---|" and row == "| 1 | \\|2\\| |"


def test_fid_cells_keep_a_runs_samplers(tmp_path):
    data = copy.deepcopy(TOY)
    data["runs"]["s2dm"]["samplers"] = ["ddim"]
    data["eval"]["fid"] = {"n": 10, "steps": [4], "samplers": ["ddim", "deis"]}
    cells = plan.plan_cells(load_study(write(tmp_path, data)))
    fid = {(c.run, c.sampler) for c in cells if c.metric == "inception"}
    assert fid == {("baseline", "ddim"), ("baseline", "deis"), ("s2dm", "ddim")}


def test_a_copied_study_finds_its_training_config_by_bare_name(tmp_path):
    data = copy.deepcopy(TOY)
    data["train_config"] = "digits.yaml"
    assert load_study(write(tmp_path, data)).train_config == (ROOT / "configs" / "digits.yaml").resolve()
    data["train_config"] = "digits"  # the .yaml may be left out, as with --config
    assert load_study(write(tmp_path, data)).train_config == (ROOT / "configs" / "digits.yaml").resolve()
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "mine.yaml").write_text((ROOT / "configs" / "digits.yaml").read_text())
    data["train_config"] = "sub/mine.yaml"  # a path is taken relative to the study file, not the cwd
    assert load_study(write(tmp_path, data)).train_config == (tmp_path / "sub" / "mine.yaml").resolve()
    data["train_config"] = "nope.yaml"
    with pytest.raises(UserError, match=r"train_config nope.yaml not found at .*nope.yaml nor among the shipped configs"):
        load_study(write(tmp_path, data))


@pytest.mark.parametrize("where, change, words", [
    ("run", {"loss.typo": 1}, "runs.s2dm.set: loss.typo: unknown key"),
    ("run", {"train.steps": "abc"}, "runs.s2dm.set: train.steps"),
    ("study", {"loss.typo": 1}, ": set: loss.typo: unknown key"),
])
def test_a_bad_set_key_names_the_run_and_leaves_no_folder(tmp_path, capsys, where, change, words):
    data = copy.deepcopy(TOY)
    (data["runs"]["s2dm"]["set"] if where == "run" else data["set"]).update(change)
    out = tmp_path / "out"
    assert main(["study", "--config", str(write(tmp_path, data)), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_report_only_needs_records(tmp_path, capsys):
    """--report-only on a folder that does not exist (a typo) or holds nothing of the study: one
    error line, exit 2, and no folder made."""
    cfg = write(tmp_path, copy.deepcopy(TOY))
    missing, empty = tmp_path / "typo", tmp_path / "empty"
    empty.mkdir()
    for out, words in ((missing, "does not exist, so there is nothing to report"),
                       (empty, "holds no scored cell of this study")):
        capsys.readouterr()
        assert main(["study", "--config", str(cfg), "--out", str(out), "--report-only"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"error: --report-only: {out} ") and words in err[-1], err
        assert "Traceback" not in "\n".join(err)
    assert not missing.exists() and not (empty / "report.md").exists()


@pytest.mark.parametrize("change, says", [
    ({"steps": [5000]}, "toy.yaml: eval.steps: 5000 exceeds the number of training timesteps T=1000"),
    ({"order": 7}, "toy.yaml: eval.order: DEIS order must be one of"),
    ({"fid": {"n": 10, "steps": [4]}}, "toy.yaml: eval.fid needs the FID Inception weights"),
    ({"mosaic_steps": 5000}, "toy.yaml: eval.mosaic_steps: 5000 exceeds the number of training timesteps T=1000"),
])
def test_cells_and_fid_weights_are_checked_before_any_training(tmp_path, capsys, monkeypatch, change, says):
    """They were found when the cells were scored, after the training, and named by the
    Python API's keywords (`steps: steps=5000`, `inception_weights=PATH`, `allow_download=True`)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-hub"))
    monkeypatch.setattr("s2dm.metrics.inception.fid_helper_torchscript", lambda: None)
    data = copy.deepcopy(TOY)
    data["eval"].update(change)
    out = tmp_path / "out"
    assert main(["study", "--config", str(write(tmp_path, data)), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and says in err[0], err
    assert not re.search(r"\b(steps|order|inception_weights|allow_download)=", err[0]), err  # no API keyword
    assert not out.exists()


def test_a_refused_resume_in_a_study_says_what_the_study_can_do(tmp_path, capsys):
    """The study has no resume='never' nor force=True: its remedy is another folder or
    deleting the run folder (a run folder trained with another model.ch)."""
    data = copy.deepcopy(TOY)
    data["set"] = {**data["set"], "train.steps": 2, "train.checkpoint_every": 2, "train.log_every": 2}
    out = tmp_path / "out"
    assert main(["study", "--config", str(write(tmp_path, data)), "--out", str(out), "--workers", "1"]) == 0
    (out / "runs" / "baseline-s0" / "study_done.json").unlink()
    data["set"]["model.ch"] = 32
    capsys.readouterr()
    assert main(["study", "--config", str(write(tmp_path, data)), "--out", str(out), "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: model.ch: the run folder was trained with 16, the config asks for 32; "), err
    assert err.endswith(f"; choose another study folder, or delete {out / 'runs' / 'baseline-s0'} to retrain it") \
        and "force" not in err


def test_the_deis_order_does_not_redo_other_samplers_cells(tmp_path):
    ckpt = tmp_path / "c.pt"
    ckpt.write_bytes(b"x")
    key = {"checkpoint": "c.pt", "checkpoint_stamp": "1:2", "checkpoint_step": 12, "sampler": "ddim", "steps": 4,
           "grid": "uniform", "eta": 0.0, "order": 3, "eps_scale": None, "n": 48, "image_seeds": "0-47",
           "metric": "pixels", "ref": "ref_pixels.npz", "ref_n": 1797, "ref_sha256": "ab"}
    path = tmp_path / "cell.json"
    path.write_text(json.dumps({"value": 1.0, "settings": key}))
    assert records.matching_record(path, {**key, "order": 2}, tmp_path)["value"] == 1.0  # DDIM's images: the same
    path.write_text(json.dumps({"value": 1.0, "settings": {**key, "sampler": "deis"}}))
    assert records.matching_record(path, {**key, "sampler": "deis", "order": 2}, tmp_path) is None


def test_a_partial_studys_cells_say_how_many_seeds_they_hold(tmp_path):
    from s2dm.study.report import run_cell
    from s2dm.study.stats import CellStats

    study = load_study(write(tmp_path, {**copy.deepcopy(TOY), "runs": {
        "baseline": {"set": {"loss.type": "l0"}, "seeds": [0, 1]}, "s2dm": {"set": {"loss.type": "s2"}, "seeds": [0, 1]}}}))
    cell = CellStats("ddim", 4, 4, "FD-pixels-48", runs={"baseline": Summary([1.0, 1.2]), "s2dm": Summary([0.9])},
                     diffs={}, baseline_mean={}, noise=None, noise_run=None)
    assert run_cell(cell, study, "baseline") == "1.100 ± 0.141"
    assert run_cell(cell, study, "s2dm") == "0.900 (1 seed of 2)"


def test_a_report_without_cells_leaves_no_plot_of_earlier_ones(tmp_path):
    from s2dm.study import report

    study = load_study(write(tmp_path, copy.deepcopy(TOY)))
    plot = tmp_path / "fd_vs_nfe.png"
    plot.write_bytes(b"an earlier study's cells")
    assert report.plot_fd_vs_nfe([], study, plot) is None and not plot.exists()


def test_training_time_adds_up_over_interrupted_invocations(tmp_path, monkeypatch):
    """A model stopped by Ctrl-C and trained on in a second invocation: the cost counts both."""
    import time

    from s2dm.errors import Interrupted

    study = load_study(write(tmp_path, copy.deepcopy(TOY)))
    out = tmp_path / "out"
    calls = []

    def fake_train(cfg, folder, resume, progress):
        (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
        calls.append(folder)
        time.sleep(0.3)
        if len(calls) == 1:
            raise Interrupted("stopped by signal 2", 130)

    monkeypatch.setattr(runner, "train", fake_train)
    monkeypatch.setattr(runner, "checkpoint_step", lambda folder: 12)
    with pytest.raises(Interrupted):
        runner._train_job(study, out, "baseline", 0, False)
    name, took = runner._train_job(study, out, "baseline", 0, False)
    assert name == "baseline-s0" and 0.6 <= took < 5  # both invocations' 0.3 s (a sleep is never shorter)
    assert json.loads((out / "runs" / name / "study_done.json").read_text())["seconds"] == took
