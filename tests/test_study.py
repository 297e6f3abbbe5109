"""s2dm study: files, resume, and the report's statistics against a hand computation."""
import csv
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from s2dm.cli import main
from s2dm.errors import UserError
from s2dm.study import report as studyreport, stats as studystats, text as studytext
from s2dm.study.plan import plan_cells
from s2dm.study.spec import load_study
from s2dm.util import textfmt

from conftest import ROOT

TOY = {
    "train_config": str(ROOT / "configs" / "digits.yaml"),
    "set": {"model.ch": 16, "train.steps": 12, "train.batch_size": 32, "train.checkpoint_every": 12,
            "train.sample_every": 1000, "train.log_every": 4, "optim.warmup": 0, "sample.mosaic_images": 4,
            "sample.steps": 3},
    "runs": {"baseline": {"set": {"loss.type": "l0"}, "seeds": [0]},
             "s2dm": {"set": {"loss.type": "s2"}, "seeds": [0]}},
    "baseline": "baseline",
    "effect": "s2dm",
    "eval": {"samplers": ["ddim", "deis"], "steps": [4], "n": 48, "batch_size": 32, "noise_draw": "baseline",
             "mosaic_steps": 3},
    "quick": {"samplers": ["ddim"]},
}


def write_study(tmp_path, data=TOY, name="toy.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.slow
def test_study_writes_everything_and_resumes(tmp_path):
    cfg, out = write_study(tmp_path), tmp_path / "out"
    assert main(["study", "--config", str(cfg), "--out", str(out)]) == 0
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    # 2 runs x 2 cells, plus the baseline's second draw in both cells
    assert len(rows) == 6
    assert sorted((r["run"], r["sampler"], r["draw"]) for r in rows) == sorted(
        [(run, s, "main") for run in ("baseline", "s2dm") for s in ("ddim", "deis")]
        + [("baseline", s, "noise") for s in ("ddim", "deis")])
    assert all(r["metric"] == "FD-pixels-48" and float(r["value"]) > 0 for r in rows)
    noise = {r["sampler"]: r for r in rows if r["draw"] == "noise"}
    assert noise["ddim"]["image_seeds"] == "1000000-1000047"
    main_rows = {(r["run"], r["sampler"]): r for r in rows if r["draw"] == "main"}
    assert main_rows[("s2dm", "ddim")]["image_seeds"] == main_rows[("baseline", "ddim")]["image_seeds"] == "0-47"
    # an independent draw of the same model gives a different value: the metric has noise
    assert float(noise["ddim"]["value"]) != float(main_rows[("baseline", "ddim")]["value"])
    report = (out / "report.md").read_text()
    assert "s2dm − baseline" in report and "metric noise" in report and "## Reading, cell by cell" in report
    for png in ("fd_vs_nfe.png", "mosaics/baseline.png", "mosaics/s2dm.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # resume: nothing is retrained or re-sampled
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.suffix in (".json", ".jsonl", ".ckpt", ".pt")}
    before = (out / "results.csv").read_text()
    assert main(["study", "--config", str(cfg), "--out", str(out)]) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert (out / "results.csv").read_text() == before

    # a deleted cell is redone, and gives the same number (per-seed noise, fixed weights)
    cell = out / "cells" / "s2dm-s0" / "deis-4.json"
    cell.unlink()
    # --report-only reports what is there and scores nothing
    assert main(["study", "--config", str(cfg), "--out", str(out), "--report-only"]) == 0
    assert not cell.exists()
    assert "**Incomplete: 5 of 6 cells scored.**" in (out / "report.md").read_text()
    assert "- this invocation: the report only, from the records on disk" in (out / "report.md").read_text()
    assert len(list(csv.DictReader((out / "results.csv").read_text().splitlines()))) == 5
    assert main(["study", "--config", str(cfg), "--out", str(out)]) == 0
    assert "Incomplete" not in (out / "report.md").read_text()
    assert cell.is_file()

    def values(text):  # every column but the cell's wall time
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(text.splitlines())]

    assert values((out / "results.csv").read_text()) == values(before)


def test_quick_preset_and_plan(tmp_path):
    study = load_study(write_study(tmp_path), quick=True)
    assert study.quick and study.samplers == ["ddim"]
    cells = plan_cells(study)
    assert [(c.run, c.sampler, c.steps, c.draw) for c in cells] == [
        ("baseline", "ddim", 4, "main"), ("baseline", "ddim", 4, "noise"), ("s2dm", "ddim", 4, "main")]


@pytest.mark.parametrize("change, words", [
    (lambda d: d.update(bogus=1), "bogus: unknown key"),
    (lambda d: d["runs"]["baseline"].update(steps=3), "runs.baseline.steps: unknown key"),
    (lambda d: d["runs"]["baseline"].pop("seeds"), "runs.baseline.seeds: missing key"),
    (lambda d: d["eval"].update(n="many"), "eval.n: expected int"),
    (lambda d: d["runs"].update(ctl={"weights_of": "nope", "eps_scale": "skip:9", "seeds": [0]}), "not a trained run"),
    (lambda d: d["eval"].update(samplers=["euler"]), "eval.samplers: unknown sampler 'euler'; choose one of ddim"),
    (lambda d: d["runs"]["baseline"].update(samplers=["eulr"]), "runs.baseline.samplers: unknown sampler 'eulr'"),
    (lambda d: d["quick"].update(samplers=["eulr"]), "quick.samplers: unknown sampler 'eulr'"),
    (lambda d: d.update(baseline="missing"), "baseline 'missing'"),
    (lambda d: d.pop("quick"), "no `quick:` preset"),
    (lambda d: d.update(effect="nope"), "effect 'nope' must name a run other than the baseline"),
    # the independent draw on the main draw's image seeds: a metric noise of 0, any difference "measurable"
    (lambda d: d["eval"].update(noise_seed_offset=0), "eval.noise_seed_offset 0 must be at least the largest image count"),
    (lambda d: d["eval"].update(noise_seed_offset=-5), "eval.noise_seed_offset -5 must be at least"),
    # found after the training before (a traceback for the batch size)
    (lambda d: d["eval"].update(batch_size=0), "eval.batch_size must be at least 1, not 0"),
    (lambda d: d["eval"].update(mosaic_steps=0), "eval.mosaic_steps must be at least 1, not 0"),
    (lambda d: d["eval"].update(samplers=[]), "eval.samplers: expected a non-empty list of samplers"),
    (lambda d: d["eval"].update(samplers=["ddim", "ddim"]), "eval.samplers: repeats an item"),
    (lambda d: d["runs"]["s2dm"].update(samplers=["pndm"]), "runs.s2dm.samplers: pndm is not among the study's samplers"),
    (lambda d: d["runs"].update(ctl={"weights_of": "baseline", "seeds": [0]}),
     "runs.ctl samples baseline's weights: give it an eps_scale or a sweep"),
    (lambda d: d["quick"].update(runs=["s2dm"]), "quick.runs must keep the baseline, baseline"),
    (lambda d: d.update(train_config=str(ROOT / "configs" / "study_digits.yaml")),
     "toy.yaml: train_config: " + str(ROOT / "s2dm" / "configs" / "study_digits.yaml") + " is a study config"),
    (lambda d: (d["runs"].update(ctl={"weights_of": "s2dm", "eps_scale": "const:1.005", "seeds": [0]}),
                d["quick"].update(runs=["baseline", "ctl"])), "quick.runs keeps ctl but not s2dm, whose weights it samples"),
])
def test_bad_study_configs_fail_clearly(tmp_path, change, words, capsys):
    data = yaml.safe_load(yaml.safe_dump(TOY))
    change(data)
    path = write_study(tmp_path, data)
    quick = "quick" in words
    with pytest.raises(UserError, match=words.replace("(", r"\(")):
        load_study(path, quick=quick)
    assert main(["study", "--config", str(path), "--out", str(tmp_path / "o")] + ["--quick"] * quick) == 2
    assert words in capsys.readouterr().err


def test_the_noise_seed_offset_is_checked_only_against_draws_that_have_noise(tmp_path):
    """FID cells have no noise draw, and without eval.noise_draw no cell has one."""
    data = yaml.safe_load(yaml.safe_dump(TOY))
    data["eval"].update(noise_seed_offset=100, fid={"n": 5000, "steps": [4]})
    assert load_study(write_study(tmp_path, data)).noise_seed_offset == 100
    data["eval"].update(noise_seed_offset=5, fid={"n": 0})
    data["eval"].pop("noise_draw")
    assert load_study(write_study(tmp_path, data)).noise_seed_offset == 5


def test_a_run_named_twice_is_refused(tmp_path, capsys):
    """YAML keeps the last of a repeated key: the first s2dm run (skip 1) was dropped in silence."""
    text = write_study(tmp_path).read_text().replace("runs:\n", "runs:\n  s2dm:\n    seeds: [0]\n    set: {loss.skip: 1}\n", 1)
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    assert text.count("  s2dm:\n") == 2
    with pytest.raises(UserError, match=r"twice.yaml, line \d+, column 3: the key 's2dm' is given twice in one section"):
        load_study(path)


def test_a_study_without_effect_reports_the_control(tmp_path):
    data = yaml.safe_load(yaml.safe_dump(TOY))
    del data["effect"]
    data["runs"]["control"] = {"weights_of": "baseline", "eps_scale": "skip:9,tau:0.99", "seeds": [0]}
    out = tmp_path / "out"
    assert main(["study", "--config", str(write_study(tmp_path, data)), "--out", str(out), "--quick"]) == 0
    report = (out / "report.md").read_text()
    headline = report.split("\n## ")[0]
    # the pipes of |a−b| are escaped: 6 header cells over 6 separator cells
    assert "| sampler | steps | NFE | baseline | control − baseline | metric noise \\|a−b\\| |\n|---|---|---|---|---|---|" in headline
    assert "No `effect:` run is in this study, so this reads the ε-scaling control. Over 1 cell " in headline
    assert "s2dm − baseline" in report  # still in the every-run table
    assert "control − baseline = " in report.split("## Reading, cell by cell")[1]


def test_a_training_config_is_not_a_study(tmp_path, capsys):
    assert main(["study", "--config", "configs/digits.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --config: configs/digits.yaml is a training config (it has sections data, "
                          "model, diffusion, loss, optim, train, sample), not a study; study configs: "), err
    assert "study_digits.yaml" in err and "(by bare name, e.g. study_digits.yaml)" in err
    # the shipped study configs are named by bare name, which finds them from anywhere
    (tmp_path / "mine.yaml").write_text((ROOT / "configs" / "digits.yaml").read_text())
    assert main(["study", "--config", str(tmp_path / "mine.yaml")]) == 2
    assert "not a study; study configs: study_digits.yaml" in capsys.readouterr().err
    assert load_study("study_digits.yaml").baseline == "baseline"


# ---------------------------------------------------------------- wording

def test_counts_ranges_and_zeros_print_plainly():
    assert [textfmt.plural(n, "cell") for n in (0, 1, 2, 5000)] == ["0 cells", "1 cell", "2 cells", "5,000 cells"]
    assert textfmt.num(-1e-9, ".6f") == "0.000000" and textfmt.num(-0.0, "+.1f") == "0.0"
    assert textfmt.num(-0.0123, "+.3f") == "-0.012" and textfmt.num(None) == "—"
    assert textfmt.span("0.005", "0.005") == "0.005" and textfmt.span("1", "2") == "1–2"
    (c,) = studystats.cell_statistics(TABLE, "baseline")
    text = studyreport.overall_reading([c], "baseline", "s2dm", "control")
    assert "Over 1 cell the paired s2dm − baseline difference is -4.8 %; " in text
    assert "includes 0 in 1." in text and "in 0 cells" in text and "twice it in 0 of 1 cell." in text
    assert "draw-to-draw std (|a−b|/√2, two independent sample draws of one model) is 0.283;" in text
    # the s2dm difference's interval includes 0: a ratio to it would be a ratio of noise
    assert "The change the ε-scaling control makes" in text and " is -0.6 %; its share of the s2dm difference " \
        "is not given" in text
    # a difference told apart from 0 (every seed -1.0; the control -0.5 on every seed): the share is given
    clear = ([_row("baseline", s, v) for s, v in enumerate([10.0, 12.0, 11.0])]
             + [_row("s2dm", s, v - 1.0) for s, v in enumerate([10.0, 12.0, 11.0])]
             + [_row("control", s, v - 0.5) for s, v in enumerate([10.0, 12.0, 11.0])])
    (m,) = studystats.cell_statistics(clear, "baseline")
    assert "50 % of the s2dm difference in the same cell (1 cell where that difference is measurable)" in \
        studyreport.overall_reading([m], "baseline", "s2dm", "control")
    assert "50 % of the s2dm difference" in studyreport.reading(m, "baseline", "s2dm", "control")
    assert "no share is given" in studyreport.reading(c, "baseline", "s2dm", "control")
    zero = [dict(r, value=r["value"] - 1e-12) for r in TABLE]  # a difference of -1e-12 is 0, not -0
    (z,) = studystats.cell_statistics(zero + [_row("twin", s, v - 2e-12) for s, v in enumerate([10.0, 12.0, 11.0])],
                                       "baseline")
    assert studytext.diff_text(z.diffs["twin"], 11.0).startswith("0.000 [")
    assert "-0.000" not in studytext.diff_text(z.diffs["twin"], 11.0)
    assert "-0.000000" not in studyreport.csv_text([{"value": -1e-9}])


# ---------------------------------------------------------------- the plot

def line_styles(fig):
    """Per panel: {run: (colour, marker, line style)} of the plotted lines."""
    from matplotlib.colors import to_hex

    return [{ln.get_label(): (to_hex(ln.get_color()), ln.get_marker(), ln.get_linestyle())
             for ln in ax.get_lines() if not ln.get_label().startswith("_")} for ax in fig.axes]


def test_plot_gives_each_run_one_style_in_every_panel(tmp_path):
    data = yaml.safe_load(yaml.safe_dump(TOY))
    data["runs"].update(control={"weights_of": "baseline", "eps_scale": "skip:9,tau:0.99", "seeds": [0]},
                        skip49={"set": {"loss.skip": 49}, "seeds": [0], "samplers": ["deis"]})
    study = load_study(write_study(tmp_path, data))
    # skip49 only in the second panel; in the first panel the runs come in another order
    rows = [r for r in TABLE if r["run"] != "skip49"][::-1]
    rows += [dict(r, sampler="deis", steps=s, nfe=s, value=r["value"] + s / 100) for s in (10, 20) for r in TABLE]
    fig = studyreport.plot_fd_vs_nfe(rows, study, tmp_path / "fd.png")
    assert (tmp_path / "fd.png").read_bytes()[:4] == b"\x89PNG"
    first, second = line_styles(fig)[:2]
    assert sorted(first) == ["baseline", "control", "s2dm"] and "skip49" in second
    assert all(second[run] == style for run, style in first.items())  # the same style in both panels
    assert len({s[:2] for s in second.values()}) == len(second)  # different runs: different colour and marker
    assert second["control"][2] == "--" and second["baseline"][2] == "-"
    (legend,) = fig.legends  # one legend, naming every run in the study's order, skip49 included
    assert [t.get_text() for t in legend.get_texts()] == list(study.runs)


# ---------------------------------------------------------------- statistics by hand

def _row(run, seed, value, draw="main", sampler="ddim", steps=10):
    return {"run": run, "seed": seed, "sampler": sampler, "steps": steps, "nfe": steps, "draw": draw,
            "metric": "FD-pixels-5k", "value": value}


TABLE = ([_row("baseline", s, v) for s, v in enumerate([10.0, 12.0, 11.0])]
         + [_row("s2dm", s, v) for s, v in enumerate([9.5, 11.0, 10.9])]
         + [_row("control", s, v) for s, v in enumerate([9.8, 12.1, 10.9])]
         + [_row("skip49", 0, 10.6)]
         + [_row("baseline", 0, 10.4, draw="noise")])


def test_cell_statistics_equal_a_hand_computation():
    (c,) = studystats.cell_statistics(TABLE, "baseline")
    assert (c.sampler, c.steps, c.nfe, c.metric) == ("ddim", 10, 10, "FD-pixels-5k")
    assert c.runs["baseline"].mean == pytest.approx(11.0)
    assert c.runs["baseline"].std == pytest.approx(1.0)  # deviations -1, 1, 0 → var 2/2
    d = c.diffs["s2dm"]  # -0.5, -1.0, -0.1
    assert d.values == pytest.approx([-0.5, -1.0, -0.1])
    mean = -1.6 / 3
    sd = math.sqrt(((-0.5 - mean) ** 2 + (-1.0 - mean) ** 2 + (-0.1 - mean) ** 2) / 2)
    assert d.mean == pytest.approx(mean) and d.std == pytest.approx(sd)
    half = 4.302652729911275 * sd / math.sqrt(3)  # t(0.975, df=2)
    assert d.ci95 == pytest.approx((mean - half, mean + half))
    assert c.baseline_mean["s2dm"] == pytest.approx(11.0)
    # a one-seed ablation is paired on seed 0 only and has no interval
    assert c.diffs["skip49"].values == pytest.approx([0.6]) and c.diffs["skip49"].ci95 is None
    assert c.baseline_mean["skip49"] == pytest.approx(10.0)
    assert c.noise == pytest.approx(0.4) and c.noise_run == "baseline"
    assert studystats.noise_sd(c.noise) == pytest.approx(0.4 / math.sqrt(2))


def test_reading_and_report_text():
    (c,) = studystats.cell_statistics(TABLE, "baseline")
    text = studyreport.reading(c, "baseline", "s2dm", "control")
    assert "s2dm − baseline = -0.533 (-4.8 %)" in text
    assert "the 95 % interval includes 0" in text  # [-1.653, +0.587]
    # control − baseline: -0.2, 0.1, -0.1 → mean -0.0667, 12.5 % of -0.533
    assert "control moves the baseline by -0.067; no share is given: the s2dm difference is within the metric's noise" in text
    assert "does not exceed twice the metric's own draw-to-draw std (0.283)" in text
    assert studytext.diff_text(c.diffs["s2dm"], 11.0).startswith("-0.533 [-1.653, +0.587] (-4.8 %)")


def test_the_v1_report_prints_small_metrics_to_three_significant_digits(tmp_path):
    """FD-pixels-5k of digits is ~0.05-0.1: with a fixed 3 decimals its differences printed as
    0.000 and -0.001 (the quick study's ddim-10 cell below, from a real run's records)."""
    rows = [_row("baseline", 0, 0.098021), _row("s2dm", 0, 0.097983), _row("control", 0, 0.097091),
            _row("baseline", 0, 0.093805, draw="noise")]
    study = load_study(write_study(tmp_path, {**TOY, "runs": {**TOY["runs"], "control": {
        "weights_of": "baseline", "eps_scale": "skip:9,tau:0.99", "seeds": [0]}}}))
    text = studyreport.report_markdown(rows, study, {"this_invocation_seconds": 1, "train_seconds": 0,
                                                     "eval_seconds": 0})
    # 2 - floor(log10(0.098)) = 4 decimals: the baseline to 3 significant digits
    assert ("| ddim | 10 | 10 | 0.0980 | 0.0000 (1 seed: no interval) (0.0 %) | -0.0009 (1 seed: no interval) "
            "(-0.9 %) | 0.0042 |") in text
    assert "s2dm − baseline = 0.0000 (0.0 %)" in text and "control moves the baseline by -0.0009" in text  # the reading
    assert "| ddim | 10 | 10 | 0.098 |" not in text


def test_csv_round_trip(tmp_path):
    rec = {"run": "baseline", "seed": 0, "sampler": "ddim", "steps": 10, "nfe": 10, "draw": "main",
           "metric": "FD-pixels-5k", "value": 1.23456789, "seconds": 3.14159,
           "settings": {"n": 5000, "image_seeds": "0-4999", "eps_scale": None, "checkpoint_step": 1200}}
    rows = studyreport.rows_from_records([rec])
    (tmp_path / "r.csv").write_text(studyreport.csv_text(rows))
    back = read_csv(tmp_path / "r.csv")
    assert back[0]["value"] == pytest.approx(1.234568) and back[0]["steps"] == 10 and back[0]["eps_scale"] == ""


def read_csv(path) -> list:
    """results.csv → rows with numbers parsed (the inverse of ``report.csv_text``)."""
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            for k in ("seed", "steps", "nfe", "n", "checkpoint_step"):
                row[k] = int(row[k])
            row["value"], row["seconds"] = float(row["value"]), float(row["seconds"])
            rows.append(row)
    return rows


@pytest.mark.slow
def test_results_do_not_depend_on_the_number_of_workers(tmp_path):
    """Two worker processes (one thread each) and one in-process job at a time give the same
    weights and so the same numbers, bit for bit: every study job runs one thread."""
    cfg = write_study(tmp_path)
    tables = []
    for workers in ("1", "2"):
        out = tmp_path / f"out{workers}"
        assert main(["study", "--config", str(cfg), "--out", str(out), "--workers", workers, "--quick"]) == 0
        rows = list(csv.DictReader((out / "results.csv").read_text().splitlines()))
        tables.append([{k: v for k, v in r.items() if k != "seconds"} for r in rows])
        assert (out / "mosaics" / "baseline.png").is_file()
    assert len(tables[0]) == 3 and tables[0] == tables[1]
    assert (tmp_path / "out1" / "mosaics" / "s2dm.png").read_bytes() == (tmp_path / "out2" / "mosaics" / "s2dm.png").read_bytes()


def test_a_bad_worker_count_is_one_error_line(tmp_path, capsys):
    assert main(["study", "--config", str(write_study(tmp_path)), "--out", str(tmp_path / "o"), "--workers", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --workers: expected 'auto' or a positive integer, got '0'"]
    assert not (tmp_path / "o" / "runs").exists()


def test_a_missing_data_set_is_one_line_before_the_study_folder(tmp_path, capsys):
    """Checked with the configs, not by a worker after the folder was made (it was left empty)."""
    data = {**TOY, "runs": {**TOY["runs"], "s2dm": {"set": {"loss.type": "s2", "data.dataset": "cifar10",
                                                            "data.channels": 3, "data.root": str(tmp_path)},
                                                    "seeds": [0]}}}
    out = tmp_path / "o"
    assert main(["study", "--config", str(write_study(tmp_path, data)), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: CIFAR10 not found"), err
    assert not out.exists()


@pytest.mark.slow
def test_ctrl_c_stops_the_workers_after_a_checkpoint_and_the_study_resumes(tmp_path):
    """SIGINT to the process group (Ctrl-C) while two workers train: each training job saves and
    stops, the study exits 130 with one line, no process is left, and a rerun finishes."""
    data = {**TOY, "set": {**TOY["set"], "train.steps": 600, "train.checkpoint_every": 600}}
    cfg, out = write_study(tmp_path, data), tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "s2dm", "study", "--config", str(cfg), "--out", str(out),
                             "--workers", "2"], cwd=tmp_path, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    logs = [out / "runs" / name / "log.jsonl" for name in ("baseline-s0", "s2dm-s0")]
    deadline = time.time() + 600  # a hang guard: both start within seconds when the machine is free
    while not all(p.is_file() and p.read_text().count("\n") >= 2 for p in logs):  # both are training
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 130
    assert err.strip().splitlines()[-1].startswith("stopped by signal 2 at step ")
    for name in ("baseline-s0", "s2dm-s0"):
        assert list((out / "runs" / name / "checkpoints").glob("ckpt_*.pt"))  # saved on the way out
    assert main(["study", "--config", str(cfg), "--out", str(out), "--workers", "2", "--quick"]) == 0
    assert len(list(csv.DictReader((out / "results.csv").read_text().splitlines()))) == 3
