"""The training curves (s2dm/training/curves.py): reading log.jsonl, smoothing, the 2×2 figure."""
import json
import math

import pytest
from matplotlib.colors import to_rgba
from PIL import Image

from s2dm.errors import RunError
from s2dm.training.curves import (NO_EVAL_TEXT, plot_runs, quartile_labels, read_log, smooth,
                                  write_run_curves)

START = {"step": 0, "event": "start", "parameters": 1000, "dataset_size": 1797}


def write_log(folder, records, tail=""):
    """A run folder whose log.jsonl holds ``records`` (one JSON object a line), then ``tail``."""
    folder.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in records) + tail
    (folder / "log.jsonl").write_text(text)
    return folder


def window(step, loss, lskip=0.0):
    """A window record as the training loop writes it; the quartiles fall with t."""
    return {"step": step, "loss": loss, "l0": loss * 0.9, "lskip": lskip,
            "loss_t_q1": loss * 3, "loss_t_q2": loss, "loss_t_q3": loss / 2, "loss_t_q4": loss / 3,
            "grad_norm": 1.0, "steps_per_s": 5.0, "images_per_s": 640.0, "lr": 2e-3, "nonfinite_skipped": 0}


def evaluation(step, value, metric="FD-pixels-1k"):
    return {"step": step, "event": "eval", "metric": metric, "value": value, "n": 1000, "sampler": "ddim",
            "steps": 20, "nfe": 20, "seconds": 1.0}


def run_with(tmp_path, name, losses, lskip=0.0, evals=(), every=50):
    records = [START] + [window(every * (i + 1), v, lskip) for i, v in enumerate(losses)]
    return write_log(tmp_path / name, records + [evaluation(s, v) for s, v in evals])


def lines_of(ax):
    return {line.get_label(): line for line in ax.get_lines()}


# ---------------------------------------------------------------------------------------------
# read_log


def test_reads_windows_and_evals_sorted_and_ignores_other_events(tmp_path):
    run = write_log(tmp_path / "r", [START, window(100, 0.5), {"step": 37, "event": "nonfinite_skipped"},
                                     window(50, 0.8), evaluation(100, 0.2),
                                     {"step": 120, "event": "stopped", "signal": 15}])
    log = read_log(run)
    assert log.name == "r"
    assert [w["step"] for w in log.windows] == [50, 100]
    assert [(e["step"], e["value"]) for e in log.evals] == [(100, 0.2)]
    assert read_log(run / "log.jsonl").windows == log.windows  # the log's path works too


def test_duplicate_step_keeps_the_last_record(tmp_path):
    run = write_log(tmp_path / "r", [START, window(50, 0.9), window(100, 0.7), window(50, 0.4),
                                     evaluation(100, 0.3), evaluation(100, 0.25)])
    log = read_log(run)
    assert [(w["step"], w["loss"]) for w in log.windows] == [(50, 0.4), (100, 0.7)]
    assert [e["value"] for e in log.evals] == [0.25]


def test_cut_last_line_is_skipped(tmp_path):
    run = write_log(tmp_path / "r", [START, window(50, 0.9), window(100, 0.7)], tail='{"step": 150, "loss": 0.')
    assert [w["step"] for w in read_log(run).windows] == [50, 100]
    plot_runs([run])  # and the figure draws


def test_missing_log_names_the_path(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match=r"empty: no log\.jsonl"):
        read_log(tmp_path / "empty")
    with pytest.raises(RunError, match="nowhere"):
        plot_runs([tmp_path / "nowhere"])


def test_log_without_windows_or_evals_has_nothing_to_plot(tmp_path):
    run = write_log(tmp_path / "r", [START, {"step": 3, "event": "nonfinite_skipped"}], tail="{cut")
    with pytest.raises(RunError, match="nothing to plot"):
        read_log(run)


# ---------------------------------------------------------------------------------------------
# smooth


def test_smooth_keeps_a_constant_and_starts_at_the_first_value():
    for n in (1, 20, 2000):
        out = smooth([0.37] * n)
        assert len(out) == n
        assert out == pytest.approx([0.37] * n, rel=1e-12)
    noisy = [1.0, 5.0, 2.0, 8.0, 3.0] * 10
    out = smooth(noisy)
    assert len(out) == len(noisy) and out[0] == noisy[0]


def test_smooth_reduces_noise_and_leaves_gaps():
    noisy = [1.0 + (0.5 if i % 2 else -0.5) for i in range(200)]
    out = smooth(noisy)
    assert max(out[20:-20]) - min(out[20:-20]) < 0.3 * (max(noisy) - min(noisy))
    assert out[-1] == noisy[-1]
    gappy = smooth([1.0, None, float("nan"), 1.0])
    assert math.isnan(gappy[1]) and math.isnan(gappy[2]) and gappy[3] == pytest.approx(1.0)


def test_smooth_span_is_a_fraction_of_the_points():
    """A step from 0 to 1 halfway: the smoothed ramp spans the same fraction of the x axis for
    200 and for 2,000 points (it reads the same), centred on the step (no lag)."""
    def ramp(n):
        out = smooth([0.0] * (n // 2) + [1.0] * (n // 2))
        inside = [i for i, v in enumerate(out) if 0 < v < 1]
        return inside[0] / n, inside[-1] / n

    (a1, b1), (a2, b2) = ramp(200), ramp(2000)
    assert b1 - a1 > 0.02 and abs((b1 - a1) - (b2 - a2)) < 0.01
    assert abs((a1 + b1) / 2 - 0.5) < 0.01 and abs((a2 + b2) / 2 - 0.5) < 0.01


def test_smooth_follows_a_straight_stretch_without_lag():
    line = [3.0 - 0.01 * i for i in range(300)]
    assert smooth(line) == pytest.approx(line, rel=1e-12)
    assert smooth([1.0, 2.0, 3.0]) == [1.0, 2.0, 3.0]  # fewer than 50 points: drawn as they are


# ---------------------------------------------------------------------------------------------
# plot_runs


def test_loss_panel_draws_the_logged_values_raw_and_smoothed(tmp_path):
    losses = [1.0, 0.6, 0.5, 0.3, 0.35, 0.2]
    records = [START] + [window(50 * (i + 1), v) for i, v in enumerate(losses)]
    records.insert(3, {k: v for k, v in window(125, 0).items() if not k.startswith(("loss", "l0", "lskip"))})
    fig = plot_runs([write_log(tmp_path / "run", records)])
    ax = fig.axes[0]
    raw, smoothed = lines_of(ax)["run: loss raw"], lines_of(ax)["run: loss"]
    steps = [50 * (i + 1) for i in range(len(losses))]  # the window without a loss (all skipped) is left out
    assert list(raw.get_xdata()) == steps and list(raw.get_ydata()) == losses
    assert list(smoothed.get_xdata()) == steps
    assert list(smoothed.get_ydata()) == pytest.approx(smooth(losses))
    assert raw.get_alpha() < 0.5 and raw.get_linewidth() < smoothed.get_linewidth()
    assert ax.get_yscale() == "log"


def test_baseline_draws_no_lskip_and_s2_run_does(tmp_path):
    base = run_with(tmp_path, "base", [1.0, 0.5, 0.3], lskip=0.0)
    s2 = run_with(tmp_path, "s2", [1.0, 0.5, 0.3], lskip=1.1)
    terms = lines_of(plot_runs([base, s2]).axes[1])
    assert "base: L0" in terms and "s2: L0" in terms
    assert not any(label.startswith("base: L_skip") for label in terms)
    assert terms["s2: L_skip"].get_linestyle() == "--" and terms["s2: L0"].get_linestyle() == "-"
    assert list(terms["s2: L_skip raw"].get_ydata()) == [1.1] * 3
    only_base = plot_runs([base]).axes[1]
    assert not any("L_skip" in line.get_label() for line in only_base.get_lines())
    assert [t.get_text() for t in only_base.get_legend().get_texts()] == ["L0"]


def test_two_runs_keep_one_colour_each_and_one_legend(tmp_path):
    runs = [run_with(tmp_path, "runA", [1.0, 0.5, 0.3], evals=[(100, 0.4)]),
            run_with(tmp_path, "runB", [0.9, 0.4, 0.2], lskip=1.0, evals=[(100, 0.3)])]
    fig = plot_runs(runs)
    colours = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            name = line.get_label().split(":")[0]
            colours.setdefault(name, set()).add(to_rgba(line.get_color()))
    assert set(colours) == {"runA", "runB"}
    assert all(len(c) == 1 for c in colours.values())  # one colour per run, in all four panels
    assert colours["runA"] != colours["runB"]
    assert len({label for ax in fig.axes for label in lines_of(ax) if label.startswith("runA")}) >= 8
    legend, = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["runA", "runB"]
    assert [{to_rgba(h.get_color())} for h in legend.legend_handles] == [colours["runA"], colours["runB"]]
    assert fig.get_suptitle() == "training curves: runA, runB"
    assert all(ax.get_title() and ax.get_xlabel() == "step" for ax in fig.axes)


def test_same_folder_names_get_their_parent_as_prefix(tmp_path):
    runs = [run_with(tmp_path / "a", "run", [1.0, 0.5]), run_with(tmp_path / "b", "run", [1.0, 0.4])]
    fig = plot_runs(runs)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["a/run", "b/run"]
    assert "b/run: loss" in lines_of(fig.axes[0])
    labelled = plot_runs(runs, labels=["old", "new"])
    assert [t.get_text() for t in labelled.legends[0].get_texts()] == ["old", "new"]


def test_quartiles_differ_by_line_style_and_are_named(tmp_path):
    run = run_with(tmp_path, "r", [1.0, 0.5, 0.3])
    ax = plot_runs([run]).axes[2]
    lines = lines_of(ax)
    assert {lines[f"r: q{q}"].get_linestyle() for q in range(1, 5)} == {"-", "--", "-.", ":"}
    assert list(lines["r: q1"].get_ydata()) == pytest.approx(smooth([3.0, 1.5, 0.9]))
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert texts[0] == "q1 (small t)" and texts[-1] == "q4 (large t)"
    assert quartile_labels(1000) == ["t < 250", "250 ≤ t < 500", "500 ≤ t < 750", "t ≥ 750"]
    with_T = write_log(tmp_path / "T", [dict(START, num_timesteps=1000), window(50, 1.0), window(100, 0.5)])
    assert plot_runs([with_T]).axes[2].get_legend().get_texts()[0].get_text() == "t < 250"


def test_eval_panel_stars_each_runs_lowest_value(tmp_path):
    evals = [(200, 0.5), (400, 0.2), (600, 0.25), (800, 0.3)]
    runs = [run_with(tmp_path, "a", [1.0] * 16, evals=evals),
            run_with(tmp_path, "b", [1.0] * 16, evals=[(200, 0.4), (400, 0.35), (600, 0.3), (800, 0.1)])]
    ax = plot_runs(runs).axes[3]
    lines, key = lines_of(ax), "FD-pixels-1k, ddim 20 steps (NFE 20)"
    assert list(lines[f"a: {key}"].get_xdata()) == [200, 400, 600, 800]
    assert list(lines[f"a: {key}"].get_ydata()) == [0.5, 0.2, 0.25, 0.3]
    assert (list(lines[f"a: {key} best"].get_xdata()), list(lines[f"a: {key} best"].get_ydata())) == ([400], [0.2])
    assert list(lines[f"b: {key} best"].get_xdata()) == [800]
    assert lines[f"a: {key} best"].get_marker() == "*"
    assert "FD-pixels-1k" in ax.get_ylabel() and ax.get_title() == f"evaluation: {key} (★ best)"
    assert not any(t.get_text() == NO_EVAL_TEXT for t in ax.texts)


def test_eval_settings_changed_on_resume_draw_two_series(tmp_path):
    """A run resumed with other train.eval settings: each setting its own series and star (as
    ``checkpoints/best`` compares one setting's values), named with its sampler, steps, NFE."""
    five = [evaluation(s, v, metric="FD-pixels-100") | {"steps": 5, "nfe": 5} for s, v in
            [(50, 10.9), (100, 6.4), (150, 4.3), (200, 2.9)]]
    one = [evaluation(s, v, metric="FD-pixels-100") | {"steps": 1, "nfe": 1, "grid": "trailing"} for s, v in
           [(250, 11.6), (300, 11.5)]]
    run = write_log(tmp_path / "r", [START] + [window(50 * i, 1.0) for i in range(1, 7)] + five + one)
    assert len(read_log(run).evals) == 6
    ax = plot_runs([run]).axes[3]
    lines = lines_of(ax)
    five_key, one_key = "FD-pixels-100, ddim 5 steps (NFE 5)", "FD-pixels-100, ddim 1 step (NFE 1), grid trailing"
    assert list(lines[f"r: {five_key}"].get_xdata()) == [50, 100, 150, 200]
    assert list(lines[f"r: {one_key}"].get_xdata()) == [250, 300]
    assert list(lines[f"r: {five_key} best"].get_xdata()) == [200] and list(lines[f"r: {one_key} best"].get_xdata()) == [300]
    assert lines[f"r: {five_key}"].get_marker() != lines[f"r: {one_key}"].get_marker()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [five_key, one_key]  # as first evaluated
    assert ax.get_title() == "evaluation (★ best of each setting)"


def test_more_evaluation_settings_than_markers_are_all_drawn(tmp_path):
    """Eleven settings (resumed ten times): the eleventh takes the first marker dashed."""
    evals = [evaluation(100 * (i + 1), 1.0 / (i + 1)) | {"steps": i + 1, "nfe": i + 1} for i in range(11)]
    run = write_log(tmp_path / "r", [START] + [window(100 * i, 1.0) for i in range(1, 12)] + evals)
    ax = plot_runs([run]).axes[3]
    series_lines = [line for line in ax.get_lines() if not line.get_label().endswith(" best")]
    assert len(series_lines) == 11 and len({(ln.get_marker(), ln.get_linestyle()) for ln in series_lines}) == 11
    assert [t.get_text() for t in ax.get_legend().get_texts()][-1] == "FD-pixels-1k, ddim 11 steps (NFE 11)"


def test_eval_panel_without_evaluations_says_so(tmp_path):
    ax = plot_runs([run_with(tmp_path, "r", [1.0, 0.5])]).axes[3]
    assert [t.get_text() for t in ax.texts] == [NO_EVAL_TEXT]
    assert not ax.get_lines() and len(ax.get_xticks()) == 0 and len(ax.get_yticks()) == 0


# ---------------------------------------------------------------------------------------------
# Files


def test_png_is_written_atomically_and_opens(tmp_path):
    run = run_with(tmp_path, "r", [1.0, 0.5, 0.3], evals=[(100, 0.4)])
    out = tmp_path / "plots" / "curves.png"
    plot_runs([run], out)
    with Image.open(out) as im:
        assert im.format == "PNG"
        assert 800 <= im.width <= 2000 and 600 <= im.height <= 1500
    assert sorted(p.name for p in out.parent.iterdir()) == ["curves.png"]  # no temporary file left


def test_write_run_curves_on_a_long_log(tmp_path):
    """A 100k-step run's log (2,000 windows, 20 evaluations), redrawn as at each checkpoint; its
    time beside a checkpoint write is a figure of scripts/bench_checkpoint.py, not a test."""
    run = run_with(tmp_path, "long", [1.0 / (1 + i / 100) for i in range(2000)], lskip=1.0,
                   evals=[(s, 1.0 / s) for s in range(5000, 100_001, 5000)])
    first = write_run_curves(run).read_bytes()
    path = write_run_curves(run)
    assert path == run / "curves.png" and path.read_bytes() == first  # a redraw draws the same figure
    with Image.open(path) as im:
        assert im.format == "PNG"
