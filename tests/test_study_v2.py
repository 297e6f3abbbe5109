"""s2dm study v2: ε-scale sweeps, FD-cnn scored from FD-pixels' sampling pass, and the H1–H4
report, its numbers checked against hand computations on synthetic records."""
import copy
import csv
import io
import json
import math

import pytest
import yaml

from s2dm.errors import UserError
from s2dm.metrics import classifier as C
from s2dm.study import questions as Q, report as R, stats as ST, steps as H4
from s2dm.study import plan, records, runner
from s2dm.study.spec import load_study, path_name

from conftest import ROOT

T2 = 4.302652729911275  # t(0.975, df=2): 3 training seeds

V2 = {
    "train_config": str(ROOT / "configs" / "digits.yaml"),
    "set": {"model.ch": 16},
    "runs": {"baseline": {"set": {"loss.type": "l0"}, "seeds": [0, 1, 2]},
             "s2dm": {"set": {"loss.type": "s2"}, "seeds": [0, 1, 2]},
             "base-sum": {"set": {"loss.type": "l0", "loss.reduction": "sum"}, "seeds": [0, 1, 2]},
             "twin": {"weights_of": "baseline", "eps_scale": "tau=0.99, skip=9", "seeds": [0, 1, 2]},
             "b": {"weights_of": "baseline", "sweep": ["const:0.995", 1.005, "0.9975"], "seeds": [0, 1, 2]}},
    "baseline": "baseline",
    "twins": {"s2dm": "twin"},
    "sum_baseline": "base-sum",
    "eval": {"samplers": ["ddim"], "steps": [10, 20, 50], "n": 5000, "cnn": {"n": 5000}, "noise_draw": "baseline"},
    "quick": {"runs": ["baseline", "b"], "seeds": [0], "n": 200},
}


def write(tmp_path, data, name="v2.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def changed(change):
    data = copy.deepcopy(V2)
    change(data)
    return data


# ---------------------------------------------------------------- the YAML

def test_a_sweep_is_one_control_per_scale_named_by_its_canonical_label(tmp_path):
    study = load_study(write(tmp_path, V2))
    sweep = ["b[const:0.995]", "b[const:1.005]", "b[const:0.9975]"]
    assert list(study.runs) == ["baseline", "s2dm", "base-sum", "twin"] + sweep  # in the YAML's order
    assert [study.runs[r].eps_scale for r in sweep] == ["const:0.995", "const:1.005", "const:0.9975"]
    assert all(study.runs[r].weights_of == "baseline" and study.runs[r].sweep == "b" and not study.runs[r].trained
               and study.runs[r].seeds == [0, 1, 2] for r in sweep)
    assert study.sweeps == {"b": sweep}
    assert study.runs["twin"].eps_scale == "skip:9,tau:0.99"  # an eps_scale control: its canonical label too
    assert study.v2 and study.cnn_n == 5000
    # on disk: no brackets (shell globs), no colons or commas
    assert path_name("b[const:0.995]") == "b_const=0.995" and path_name("x[linear:1e-5,1.0025]") == "x_linear=1e-5+1.0025"
    assert plan.model_name("b[const:0.995]", 2) == "b_const=0.995-s2" and plan.model_name("baseline", 0) == "baseline-s0"


def test_v1_configs_keep_their_labels_settings_and_report(tmp_path):
    """The v1 studies' controls are already canonical, so their cell records stay reusable, and
    their plan has no FD-cnn cell; they are not v2 studies."""
    for name in ("study_digits.yaml", "study_fashion_mnist.yaml"):
        study = load_study(name)
        assert study.runs["control"].eps_scale == "skip:9,tau:0.99" and not study.v2 and study.cnn_n == 0
        assert {c.metric for c in plan.plan_cells(study)} <= {"pixels", "inception"}
    study = load_study("study_digits.yaml")
    cell = plan.plan_cells(study)[0]

    model = {"checkpoint": "runs/baseline-s0/checkpoints/c.pt", "checkpoint_stamp": "1:2", "checkpoint_step": 1200}
    ref = {"ref": "ref_pixels.npz", "ref_n": 1797, "ref_sha256": "ab"}
    settings = runner._cell_settings(study, cell, study.runs["control"], model, ref)
    # the v1 record's keys and those an earlier s2dm did not record (records._earlier_record)
    assert sorted(settings) == sorted(["checkpoint", "checkpoint_step", "sampler", "steps", "order", "eps_scale", "n",
                                       "image_seeds", "metric", "ref", "ref_n"] + list(records.LATER_KEYS))
    assert settings["eps_scale"] == "skip:9,tau:0.99"
    text = Q.study_report(V1_ROWS, study, COST)
    assert "## Reading, cell by cell" in text and "## H1" not in text and "Answers" not in text


@pytest.mark.parametrize("change, words", [
    (lambda d: d["runs"]["b"].update(eps_scale="const:1.005"), "runs.b: eps_scale and sweep exclude each other"),
    (lambda d: d["runs"]["b"].update(sweep=["const:1.005", 1.005]), "runs.b.sweep repeats const:1.005 (items 0 and 1)"),
    (lambda d: d["runs"]["b"].update(sweep=["const:1.005", "bogus"]), "runs.b.sweep[1]: cannot parse 'bogus'"),
    (lambda d: d["runs"]["b"].update(sweep=["none"]), "runs.b.sweep[0]: none is baseline itself"),
    (lambda d: d["runs"]["b"].update(sweep=[]), "runs.b.sweep: expected a non-empty list"),
    (lambda d: d["runs"]["b"].pop("weights_of"), "runs.b.sweep: a sweep samples another run's weights"),
    (lambda d: d["runs"].update({"b[const:0.995]": {"weights_of": "baseline", "seeds": [0]}}),
     "runs.b.sweep makes a run named 'b[const:0.995]', which the study already has"),
    (lambda d: d["runs"]["twin"].update(eps_scale="skip:0"), "runs.twin.eps_scale: skip must be an integer"),
    (lambda d: d.update(twins={"s2dm": "base-sum"}), "twins.s2dm: 'base-sum' must name a control that samples baseline"),
    (lambda d: d.update(twins={"twin": "twin"}), "twins.twin: the key must name a trained run other than the baseline"),
    (lambda d: d.update(sum_baseline="nope"), "sum_baseline 'nope' must name a trained run other than the baseline"),
    (lambda d: d["eval"].update(cnn={"n": 1}), "eval.cnn.n must be 0 (off) or at least 2, not 1"),
    (lambda d: d["quick"].update(runs=["baseline", "c"]), "quick.runs names unknown run 'c'"),
])
def test_bad_v2_keys_fail_clearly(tmp_path, change, words):
    with pytest.raises(UserError, match=words.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_study(write(tmp_path, changed(change)), quick="quick" in words)


def test_quick_preset_and_plan_of_the_shipped_v2_study(tmp_path):
    full = load_study("study_digits_v2.yaml")
    assert [r for r in full.runs if full.runs[r].trained] == ["baseline", "s2dm", "shared", "baseline-sum"]
    assert full.twins == {"s2dm": "twin-indep", "shared": "twin-shared"} and full.sum_baseline == "baseline-sum"
    assert full.runs["twin-shared"].eps_scale == "skip:9,tau:0.99,variant:shared"
    assert full.sweeps["const-sweep"] == [f"const-sweep[const:{b}]" for b in ("0.995", "0.9975", "1.0025", "1.005")]
    assert full.samplers == ["ddim", "spndm"] and full.steps == [10, 20, 50] and full.n == full.cnn_n == 5000
    assert all(r.seeds == [0, 1, 2] for r in full.runs.values()) and full.overrides["model.ch"] == 16
    cells = plan.plan_cells(full)
    # 10 runs x 3 seeds + the noise re-draw = 31 passes per (sampler, steps), each scored in both metrics
    assert len({c.images for c in cells}) == 31 * 6 and len(cells) == 2 * 31 * 6
    assert [c.key for c in cells[:4]] == ["ddim-10", "ddim-10-cnn", "ddim-10-noise", "ddim-10-cnn-noise"]
    assert {c.key for c in cells if c.draw == "noise"} == {f"{s}-{n}{m}-noise" for s in ("ddim", "spndm")
                                                           for n in (10, 20, 50) for m in ("", "-cnn")}
    quick = load_study("study_digits_v2.yaml", quick=True)
    assert list(quick.runs) == ["baseline", "s2dm", "shared", "twin-indep", "twin-shared"]
    assert quick.twins == full.twins and quick.sum_baseline is None and quick.sweeps == {}
    assert quick.n == quick.cnn_n == 2000 and quick.samplers == ["ddim"] and quick.steps == [10, 20]
    assert quick.overrides["train.steps"] == 2000 and all(r.seeds == [0] for r in quick.runs.values())
    assert len(plan.plan_cells(quick)) == 2 * 6 * 2
    # a sweep's key in quick.runs keeps all its runs; a twin pair loses a dropped run's pair
    mine = load_study(write(tmp_path, V2), quick=True)
    assert list(mine.runs) == ["baseline", "b[const:0.995]", "b[const:1.005]", "b[const:0.9975]"]
    assert mine.twins == {} and mine.sum_baseline is None and mine.n == mine.cnn_n == 200


# ---------------------------------------------------------------- one sampling pass, both metrics

TINY = {
    "train_config": str(ROOT / "configs" / "digits.yaml"),
    "set": {"model.ch": 16, "train.steps": 12, "train.batch_size": 32, "train.checkpoint_every": 12,
            "train.sample_every": 1000, "train.log_every": 4, "optim.warmup": 0, "sample.mosaic_images": 4,
            "sample.steps": 3},
    "runs": {"baseline": {"set": {"loss.type": "l0"}, "seeds": [0]},
             "twin": {"weights_of": "baseline", "eps_scale": "skip:9,tau:0.99", "seeds": [0]},
             "b": {"weights_of": "baseline", "sweep": ["const:0.995", "const:1.005"], "seeds": [0]}},
    "baseline": "baseline",
    "eval": {"samplers": ["ddim"], "steps": [4], "n": 100, "batch_size": 50, "noise_draw": "baseline",
             "mosaic_steps": 3},
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("s2dm_cache")


@pytest.fixture
def counted(monkeypatch, cache):
    """Every sampling pass of the study's scoring, counted (in-process: one worker)."""
    monkeypatch.setenv(C.CACHE_ENV, str(cache))
    calls = []
    real = runner.sample_stats

    def counting(model, schedule, seeds, options, extractor, **kw):
        calls.append(kw["source"])
        return real(model, schedule, seeds, options, extractor, **kw)

    monkeypatch.setattr(runner, "sample_stats", counting)
    return calls


def _records(out):
    return {str(p.relative_to(out / "cells")): json.loads(p.read_text()) for p in sorted((out / "cells").rglob("*.json"))}


def test_both_metrics_come_from_one_sampling_pass_and_a_resume_scores_only_what_is_missing(tmp_path, counted):
    out = tmp_path / "out"
    # FD-pixels alone first: 4 models + the noise re-draw = 5 passes, 5 records
    runner.run_study(write(tmp_path, TINY), out, progress=False, workers=1)
    assert len(counted) == 5 and len(_records(out)) == 5
    pixels = _records(out)
    stamps = {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("*.json")}
    # eval.cnn added afterwards: only the 5 FD-cnn cells are scored (sampling again, one pass each)
    data = copy.deepcopy(TINY)
    data["eval"]["cnn"] = {"n": 100}
    cfg = write(tmp_path, data)
    runner.run_study(cfg, out, progress=False, workers=1)
    assert len(counted) == 10
    recs = _records(out)
    assert {k: v for k, v in recs.items() if k in pixels} == pixels and len(recs) == 10
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # FD-pixels records untouched
    models = ("baseline-s0", "twin-s0", "b_const=0.995-s0", "b_const=1.005-s0")
    assert set(recs) == {f"{m}/ddim-4{k}.json" for m in models for k in ("", "-cnn")} | {
        "baseline-s0/ddim-4-noise.json", "baseline-s0/ddim-4-cnn-noise.json"}
    cnn = {k: v for k, v in recs.items() if "-cnn" in k}
    assert len(cnn) == 5 and all(r["metric"] == "FD-cnn-100" and r["metric_kind"] == "cnn" and r["value"] > 0
                                 and 0.9 < r["classifier_accuracy"] <= 1 for r in cnn.values())
    assert all(r["settings"]["classifier_sha256"] and r["settings"]["ref"].endswith("ref_cnn.npz") for r in cnn.values())
    assert recs["b_const=0.995-s0/ddim-4-cnn.json"]["settings"]["eps_scale"] == "const:0.995"
    assert recs["twin-s0/ddim-4.json"]["settings"]["eps_scale"] == "skip:9,tau:0.99"
    assert (out / "mosaics" / "b_const=1.005.png").is_file()
    # a fresh folder with both metrics: ONE pass per (run, seed, sampler, steps, draw), same numbers
    fresh = tmp_path / "fresh"
    runner.run_study(cfg, fresh, progress=False, workers=1)
    assert len(counted) == 15
    again = _records(fresh)
    assert {k: v["value"] for k, v in again.items()} == {k: v["value"] for k, v in recs.items()}
    # both records of one model's cell deleted: one pass makes both; nothing else is redone
    for key in ("ddim-4", "ddim-4-cnn"):
        (fresh / "cells" / "b_const=0.995-s0" / f"{key}.json").unlink()
    runner.run_study(cfg, fresh, progress=False, workers=1)
    assert len(counted) == 16 and counted[-1] == "b[const:0.995] ddim-4"
    assert {k: v["value"] for k, v in _records(fresh).items()} == {k: v["value"] for k, v in recs.items()}
    runner.run_study(cfg, fresh, progress=False, workers=1)
    assert len(counted) == 16
    # results.csv: canonical labels, FD-cnn rows with the classifier's accuracy
    rows = list(csv.DictReader((fresh / "results.csv").read_text().splitlines()))
    assert len(rows) == 10 and "classifier_accuracy" in rows[0]
    assert {r["eps_scale"] for r in rows} == {"", "skip:9,tau:0.99", "const:0.995", "const:1.005"}
    assert all((r["classifier_accuracy"] != "") == r["metric"].startswith("FD-cnn") for r in rows)
    report = (fresh / "report.md").read_text()
    assert "**FD-pixels-100**" in report and "**FD-cnn-100**" in report and "held-out accuracy" in report
    assert (fresh / "fd_cnn_vs_nfe.png").is_file()


# ---------------------------------------------------------------- H1–H4 on synthetic records

def row(run, seed, value, metric="FD-pixels-5k", steps=10, draw="main", sampler="ddim"):
    r = {"run": run, "seed": seed, "sampler": sampler, "steps": steps, "nfe": steps, "draw": draw, "metric": metric,
         "value": value}
    if metric.startswith("FD-cnn"):
        r["classifier_accuracy"] = 0.9944
    return r


BASE = {10: [10.0, 12.0, 11.0], 20: [9.0, 11.0, 10.0], 50: [9.5, 11.6, 10.4]}  # 20 − 10 = −1; 50 − 20 = +0.5, +0.6, +0.4


def synthetic(metric="FD-pixels-5k", flip=()):
    """Every run's values, per seed, built from the baseline's with planted differences:
    s2dm − baseline = 1.0, 1.2, 0.8; twin − baseline = 0.5, 0.4, 0.6 (50 % of s2dm's mean);
    base-sum − baseline = 0.3, 0.35, 0.4; b[const:1.005] − baseline = −0.6, −0.7, −0.8 (the best
    scale); b[const:0.995] − baseline = +0.2 on every seed. ``flip``: effects whose sign is
    reversed in this metric ("sum")."""
    plant = {"s2dm": [1.0, 1.2, 0.8], "twin": [0.5, 0.4, 0.6],
             "base-sum": [-x for x in (0.3, 0.35, 0.4)] if "sum" in flip else [0.3, 0.35, 0.4],
             "b[const:0.995]": [0.2, 0.2, 0.2], "b[const:1.005]": [-0.6, -0.7, -0.8], "b[const:0.9975]": [0.1, 0.0, 0.05]}
    rows = []
    for steps, base in BASE.items():
        for s, v in enumerate(base):
            rows.append(row("baseline", s, v, metric, steps))
            rows += [row(run, s, v + d[s] - (1.5 if run == "s2dm" and steps > 10 else 0), metric, steps)
                     for run, d in plant.items()]
        rows.append(row("baseline", 0, base[0] + 0.1, metric, steps, draw="noise"))
    return rows


COST = {"train_seconds": 60.0, "eval_seconds": 120.0, "this_invocation_seconds": 200.0, "workers": 2}
CLIP = {"baseline": {"clip": 1.0, "windows": 72, "above": 3}, "base-sum": {"clip": 1.0, "windows": 72, "above": 72},
        "s2dm": {"clip": 1.0, "windows": 72, "above": 2}}
V1_ROWS = [row("baseline", s, v) for s, v in enumerate([10.0, 12.0, 11.0])] + \
    [row("s2dm", s, v) for s, v in enumerate([9.5, 11.0, 10.9])] + [row("control", s, v) for s, v in enumerate([9.8, 12.1, 10.9])]


def _stats(rows, metric="FD-pixels"):
    return ST.cell_statistics(rows, "baseline", metric=metric)


def test_h1_the_twin_reproduces_half_of_the_variant(tmp_path):
    cells = _stats(synthetic())
    (r10, r20, r50) = Q.h1_rows(cells, "baseline", "s2dm", "twin")
    assert r10.variant.values == pytest.approx([1.0, 1.2, 0.8]) and r10.twin.values == pytest.approx([0.5, 0.4, 0.6])
    assert r10.reproduced == pytest.approx(50.0)
    gap = [0.5, 0.8, 0.2]  # variant − twin, paired by seed: mean 0.5, sd 0.3
    assert r10.gap.values == pytest.approx(gap)
    assert r10.gap.ci95 == pytest.approx((0.5 - T2 * 0.3 / math.sqrt(3), 0.5 + T2 * 0.3 / math.sqrt(3)))
    # beyond 10 steps s2dm − baseline = −0.5, −0.3, −0.7: the twin (+0.5) goes the other way, −100 %
    assert r20.variant.mean == pytest.approx(-0.5) and r20.reproduced == pytest.approx(-100.0)
    study = load_study(write(tmp_path, V2))
    text = Q.study_report(synthetic(), study, COST, clip=CLIP)
    assert "| ddim | 10 | +1.000 [+0.503, +1.497] (+9.1 %) | +0.500 [+0.252, +0.748] (+4.5 %) | 50 % | " \
           "+0.500 [-0.245, +1.245] (+4.5 %) |" in text
    assert "the twin reproduces -100 % to 50 % of it in the 3 cells where it is measurable" in text


def test_h1_gives_no_share_of_an_unmeasurable_difference():
    rows = [r for r in synthetic() if r["steps"] == 10]
    for r in rows:
        if r["run"] == "s2dm":
            r["value"] += [-1.0, -0.2, -1.4][r["seed"]]  # s2dm − baseline = 0, 1.0, −0.6: the interval contains 0
    (r,) = Q.h1_rows(_stats(rows), "baseline", "s2dm", "twin")
    assert r.variant.mean == pytest.approx(0.4 / 3) and r.reproduced is None


def test_h2_finds_the_planted_best_scale_and_compares_the_variant_with_it(tmp_path):
    study = load_study(write(tmp_path, V2))
    assert Q.training_free(study) == ["baseline", "twin", "b[const:0.995]", "b[const:1.005]", "b[const:0.9975]"]
    assert Q.variants_of(study) == ["s2dm"]
    r10, r20, _ = Q.h2_rows(_stats(synthetic()), study)
    assert (r10.best, r10.scale) == ("b[const:1.005]", "const:1.005")
    assert r10.best_mean == pytest.approx(11.0 - 0.7) and r10.best_vs_base.values == pytest.approx([-0.6, -0.7, -0.8])
    assert r10.versus["s2dm"].values == pytest.approx([1.6, 1.9, 1.6])  # s2dm − best, seed by seed
    assert r20.versus["s2dm"].values == pytest.approx([0.1, 0.4, 0.1])
    # when every scale is worse than none, the best is the baseline itself
    rows = [r for r in synthetic() if r["run"] != "b[const:1.005]"]
    for r in rows:
        if r["run"] == "twin":
            r["value"] += 1
    (b10, *_) = Q.h2_rows(_stats(rows), study)
    assert (b10.best, b10.scale, b10.best_vs_base) == ("baseline", "none", None)
    assert b10.versus["s2dm"].values == pytest.approx([1.0, 1.2, 0.8])
    text = Q.study_report(synthetic(), study, COST, clip=CLIP)
    assert "| ddim | 10 | `const:1.005` | 10.300 | -0.700 [-0.948, -0.452] (-6.4 %) | +1.700 [+1.270, +2.130] (+15.5 %) |" \
        in text
    assert Q.H2_BIAS in text
    assert "best training-free scale per cell: `const:1.005` in 3" in text.split("\n## ")[0]


def test_h3_the_sum_baseline_shift_and_the_clip_note(tmp_path):
    study = load_study(write(tmp_path, V2))
    (c10, *_) = _stats(synthetic())
    d = ST.paired(c10, "base-sum", "baseline")
    sd = math.sqrt(((0.3 - 0.35) ** 2 + (0.4 - 0.35) ** 2) / 2)
    assert d.mean == pytest.approx(0.35) and d.ci95 == pytest.approx((0.35 - T2 * sd / math.sqrt(3),
                                                                      0.35 + T2 * sd / math.sqrt(3)))
    text = Q.study_report(synthetic(), study, COST, clip=CLIP)
    assert "| ddim | 10 | +0.350 [+0.226, +0.474] (+3.2 %) |" in text
    assert "for `base-sum` in 72 of 72 logged windows (100 %), and for `baseline` in 3 of 72 logged windows (4 %)" in text
    assert text.count("**Gradient clipping.**") == 1  # once, not once per metric


def test_grad_clip_windows_reads_the_training_logs(tmp_path):
    study = load_study(write(tmp_path, V2))
    folder = tmp_path / "runs" / "base-sum-s0"
    folder.mkdir(parents=True)
    lines = [{"step": 0, "event": "start"}, {"step": 50, "grad_norm": 30.0}, {"step": 100, "grad_norm": 0.5},
             {"step": 100, "grad_norm": 12.0},  # the same window logged again by a resumed run: counted once
             {"step": 120, "event": "nonfinite_skipped", "grad_norm": 99.0}, {"step": 150, "grad_norm": 1.0}]
    folder.joinpath("log.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n{\"step\": 2")
    found = runner.grad_clip_windows(study, tmp_path)
    assert found["base-sum"] == {"clip": 1.0, "windows": 3, "above": 2}  # 30 and 12 exceed 1.0; 1.0 does not
    assert found["baseline"] == {"clip": 1.0, "windows": 0, "above": 0} and "twin" not in found


def test_h4_verdicts_falls_does_not_fall_and_not_resolved(tmp_path):
    study = load_study(write(tmp_path, V2))
    rows = {(r.run, r.sampler): r for r in H4.h4_rows(_stats(synthetic()), study)}
    assert set(rows) == {("baseline", "ddim"), ("s2dm", "ddim"), ("base-sum", "ddim")}  # trained runs only
    base = rows[("baseline", "ddim")]  # −1 from 10 to 20, then up again from 20 to 50: non-monotone
    (a, b, d1), (_, _, d2) = base.changes
    assert (a, b) == (10, 20) and d1.values == pytest.approx([-1.0, -1.0, -1.0])
    assert d2.values == pytest.approx([0.5, 0.6, 0.4]) and base.verdict == "does not fall"
    assert base.means[10].mean == pytest.approx(11.0)
    assert base.means[10].ci95 == pytest.approx((11 - T2 / math.sqrt(3), 11 + T2 / math.sqrt(3)))
    assert rows[("s2dm", "ddim")].changes[0][2].values == pytest.approx([-2.5, -2.5, -2.5])
    assert H4.steps_verdict([(10, 20, ST.Summary([-1.0, -1.1, -0.9])), (20, 50, ST.Summary([-0.1, -0.2, -0.15]))]) == "falls"
    assert H4.steps_verdict([(10, 20, ST.Summary([-1.0, -1.1, -0.9])), (20, 50, ST.Summary([-0.1, 0.2, -0.15]))]) \
        == "not resolved"
    assert H4.steps_verdict([(10, 20, ST.Summary([-1.0])), (20, 50, ST.Summary([-0.5]))]) == "not resolved"  # 1 seed
    text = Q.study_report(synthetic(), study, COST, clip=CLIP)
    assert "| `baseline` | ddim | 11.000 [8.516, 13.484] | 10.000 [7.516, 12.484] | 10.500 [7.883, 13.117] | " \
           "-1.000 [-1.000, -1.000] | +0.500 [+0.252, +0.748] | **does not fall** |" in text
    assert "- **H4** (FD-pixels) baseline: ddim at 10 → 20 → 50 steps **does not fall**." in text
    scale = text.split("## What this scale can and cannot tell")[1].split("\n## ")[0]
    assert ("FD-pixels-5k rises as ddim takes more steps (ddim 10 → 20 → 50 steps: 11.000 → 10.000 → 10.500; "
            "resolved at 20 → 50). With the baseline it does not see what more sampling steps improve") in scale
    assert "No metric is shown to track sample quality here" in scale
    assert "Where the samplers meet" not in text  # one sampler: nothing to meet


def two_samplers(ddim_50=(9.0, 9.95, 8.05)):
    """The baseline alone: DDIM falls (−2 then −1 per seed, ±0.1); S-PNDM rises (+1.5, then
    +1.4 on average) from far below DDIM to ``ddim_50`` − (0.1, 0.05, 0.05) at 50 steps."""
    ddim = {10: [12.0, 13.0, 11.0], 20: [10.0, 10.9, 9.1], 50: list(ddim_50)}
    spndm = {10: [6.0, 7.0, 5.0], 20: [7.5, 8.4, 6.6], 50: [8.9, 9.9, 8.0]}
    return [row("baseline", s, v, steps=k, sampler=name) for name, by in (("ddim", ddim), ("spndm", spndm))
            for k, vs in by.items() for s, v in enumerate(vs)]


def test_h4_reads_every_sampler_and_where_the_samplers_meet(tmp_path):
    study = load_study(write(tmp_path, changed(lambda d: d["eval"].update(samplers=["ddim", "spndm"]))))
    (meet,) = H4.meet_rows(_stats(two_samplers()), study)
    assert (meet.run, meet.steps, meet.first, meet.other) == ("baseline", 50, "ddim", "spndm")
    assert meet.diff.values == pytest.approx([-0.1, -0.05, -0.05])
    assert meet.means == pytest.approx((9.0, 26.8 / 3))
    text = Q.study_report(two_samplers(), study, COST, clip=CLIP)
    assert ("- **H4** (FD-pixels) baseline: ddim at 10 → 20 → 50 steps **falls**; spndm at 10 → 20 → 50 steps "
            "**does not fall**.") in text
    assert "| `baseline` | 50 | ddim | 9.000 | spndm | 8.933 | spndm − ddim: -0.067 [" in text
    scale = text.split("## What this scale can and cannot tell")[1].split("\n## ")[0]
    assert ("FD-pixels-5k falls as ddim takes more steps (ddim 10 → 20 → 50 steps: 12.000 → 10.000 → 9.000; every "
            "change resolved); rises as spndm takes more steps (spndm 10 → 20 → 50 steps: 6.000 → 7.500 → 8.933; "
            "resolved at 10 → 20 and 20 → 50).") in scale
    assert "differences between runs in the ddim cells can be read as sample quality; in the spndm cells that is not " \
           "shown, and where spndm converges it rises" in scale
    assert "At 50 steps spndm − ddim is -0.067 [" in scale and "spndm's few-step error moves its samples" in scale
    assert "No metric is shown" not in scale  # DDIM's verdict is *falls*
    # DDIM far below S-PNDM at 50 steps: the samplers have not met, so no reading of the rise as solver error
    apart = Q.study_report(two_samplers(ddim_50=(5.0, 6.0, 4.0)), study, COST, clip=CLIP)
    assert "spndm − ddim: +3.933 [" in apart and "few-step error" not in apart
    # another trained run whose S-PNDM values fall: named with its own verdict; one that agrees is not
    fitted = [dict(r, run="s2dm", value=r["value"] * (10 / r["steps"] if r["sampler"] == "spndm" else 1.0))
              for r in two_samplers()]
    text = Q.study_report(two_samplers() + fitted, study, COST, clip=CLIP)
    scale = text.split("## What this scale can and cannot tell")[1].split("\n## ")[0]
    assert ("For `s2dm` it answers otherwise: falls with spndm 10 → 20 → 50 steps: 6.000 → 3.750 → 1.787.") in scale
    assert "with ddim" not in scale.split("For `s2dm`")[1]  # its DDIM verdict is the baseline's: not repeated


def test_the_disagreement_note_appears_exactly_when_planted(tmp_path):
    study = load_study(write(tmp_path, V2))
    same = synthetic() + synthetic("FD-cnn-5k")
    text = Q.study_report(same, study, COST, clip=CLIP)
    section = text.split("## Where FD-pixels-5k and FD-cnn-5k disagree")[1].split("\n## ")[0]
    assert Q.DISAGREEMENT in section
    assert "No effect of the 15 both measure is resolved with opposite signs." in section and "\n- " not in section
    assert "about 0 effects of 15" in text.split("\n## ")[0]
    assert "held-out accuracy 99.4 %" in text.split("\n## ")[0]
    # the sum baseline's shift reversed in FD-cnn: exactly those three effects (one per cell) are named
    flipped = synthetic() + synthetic("FD-cnn-5k", flip=("sum",))
    text = Q.study_report(flipped, study, COST, clip=CLIP)
    section = text.split("## Where FD-pixels-5k and FD-cnn-5k disagree")[1].split("\n## ")[0]
    bullets = [ln for ln in section.splitlines() if ln.startswith("- ")]
    assert bullets == [f"- ddim {s}, base-sum − baseline: FD-pixels-5k +0.350 [+0.226, +0.474], "
                       "FD-cnn-5k -0.350 [-0.474, -0.226]" for s in (10, 20, 50)]
    assert "about 3 effects of 15" in text.split("\n## ")[0]
    # one metric only: no disagreement section
    assert "disagree" not in Q.study_report(synthetic(), study, COST, clip=CLIP)


def test_metrics_are_kept_apart_and_the_csv_adds_accuracy_only_for_fd_cnn():
    rows = synthetic() + synthetic("FD-cnn-5k") + [row("baseline", 0, 3.0, "FID-10k")]
    assert [ST.metric_family(m) for m in ("FD-pixels-5k", "FD-cnn-48", "FID-10k", "FID", "FD-inception768-10k")] == \
        ["FD-pixels", "FD-cnn", "FID", "FID", "FD-inception768"]
    (px, *_) = _stats(rows)
    (cnn, *_) = _stats(rows, "FD-cnn")
    assert px.metric == "FD-pixels-5k" and cnn.metric == "FD-cnn-5k" and cnn.accuracy == 0.9944 and px.accuracy is None
    assert px.by_seed["baseline"] == {0: 10.0, 1: 12.0, 2: 11.0}  # not mixed with FD-cnn's equal-keyed rows
    assert len(_stats(rows, "FID")) == 1
    recs = [{**r, "seconds": 1.0, "settings": {"n": 5000, "image_seeds": "0-4999", "eps_scale": None,
                                               "checkpoint_step": 1200}} for r in rows[:1] + synthetic("FD-cnn-5k")[:1]]
    header = R.csv_text(R.rows_from_records(recs)).splitlines()[0]
    # the earlier columns keep their positions; grid, η, checkpoint and reference come after them
    assert header == ",".join(R.CSV_COLUMNS + ["classifier_accuracy"] + R.LATER_COLUMNS)
    assert R.csv_text(R.rows_from_records(recs[:1])).splitlines()[0] == ",".join(R.CSV_COLUMNS + R.LATER_COLUMNS)


def test_each_row_and_the_heading_name_the_deis_order(tmp_path):
    """A DEIS cell's order (``eval.order``) is in its CSV row and in the report's heading, so
    that order-1 and order-3 cells are not both plain "deis"; the other samplers leave it empty."""
    settings = {"n": 5000, "image_seeds": "0-4999", "eps_scale": None, "checkpoint_step": 1200,
                "grid": "uniform", "eta": 0.0, "order": 2}
    recs = [{**row("baseline", 0, 1.0, sampler=s), "seconds": 1.0, "settings": settings} for s in ("ddim", "deis")]
    rows = R.rows_from_records(recs)
    assert [r["order"] for r in rows] == ["", 2]
    assert list(csv.DictReader(io.StringIO(R.csv_text(rows))))[1]["order"] == "2"
    study = load_study(write(tmp_path, V2))
    assert "; DEIS takes order 2." in "\n".join(R.heading(study, {}, rows))
    assert "order" not in "\n".join(R.heading(study, {}, rows[:1]))


def test_the_plot_stars_the_best_training_free_scale_of_each_cell(tmp_path):
    from matplotlib.colors import to_hex

    study = load_study(write(tmp_path, V2))
    free = Q.training_free(study)
    assert free == ["baseline", "twin", "b[const:0.995]", "b[const:1.005]", "b[const:0.9975]"]
    fig = R.plot_fd_vs_nfe(synthetic(), study, tmp_path / "fd.png", best_of=free)
    ax = fig.axes[0]
    (stars,) = [ln for ln in ax.get_lines() if ln.get_marker() == "*"]
    (best,) = [ln for ln in ax.get_lines() if ln.get_label() == "b[const:1.005]"]  # planted: 0.7 below the baseline
    assert list(stars.get_ydata()) == pytest.approx([sum(BASE[k]) / 3 - 0.7 for k in (10, 20, 50)])
    assert list(stars.get_xdata()) == pytest.approx(list(best.get_xdata()))  # on the run's own (offset) points
    assert to_hex(stars.get_color()) == to_hex(best.get_color())
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == list(study.runs) + ["best training-free scale of the cell"]
    plain = R.plot_fd_vs_nfe(synthetic(), study, tmp_path / "plain.png")  # v1 behaviour: no best_of, no star
    assert not [ln for ln in plain.axes[0].get_lines() if ln.get_marker() == "*"]
    assert [t.get_text() for t in plain.legends[0].get_texts()] == list(study.runs)
