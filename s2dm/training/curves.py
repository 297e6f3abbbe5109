"""A training run's curves as one PNG, read from its ``log.jsonl``: ``s2dm plot RUN ...`` and the
``RUN/curves.png`` the training loop rewrites at each checkpoint.

Four panels: the loss (raw windows faint, smoothed solid), L0 and L_skip, the loss by t quartile,
and the evaluation metric. Each run keeps ONE colour in every panel and the figure has ONE legend
naming the runs, so a baseline and an S²-DM run overlaid compare at a glance. Line styles, not
colours, tell apart the curves of one run (L0/L_skip, quartiles); a small legend in the panel
says which style is which.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

from ..errors import RunError
from ..util.fileio import atomic_write
from ..util.plots import COLOURS, MARKERS
from ..util.textfmt import plural

# The smoothing window is 4 % of the curve's points, so it spans the same width of the x axis,
# and reads the same, for 200 or 2,000 log windows; a log of fewer than 50 windows is drawn as it is.
SMOOTH_FRACTION = 0.04
CURVES_FILE = "curves.png"  # in the run folder
RAW_ALPHA = 0.25  # raw window values: visible behind the smoothed curve, never mistaken for it
QUARTILE_STYLES = ["-", "--", "-.", ":"]  # q1 (smallest t) … q4 (largest t)
EVAL_STYLES = ["-", "--", ":"]  # evaluation settings past the markers' number
NO_EVAL_TEXT = "no evaluation in these runs (train.eval_every: 0)"
LOG_NAME = "log.jsonl"

RunLike = Union[str, "os.PathLike[str]", "RunLog"]
Series = Tuple[List[float], List[float]]  # (steps, values)
Drawn = Sequence[Tuple[str, "RunLog", str]]  # (label, log, colour) of each run plotted


@dataclass
class RunLog:
    """What the curves need from one run's log: the window summaries and the evaluations, each
    sorted by step. ``folder``: the run folder (None when built by hand); ``num_timesteps``:
    the diffusion T if the start record gives it (labels the quartiles), else None."""

    name: str
    windows: List[dict] = field(default_factory=list)
    evals: List[dict] = field(default_factory=list)
    folder: Optional[Path] = None
    num_timesteps: Optional[int] = None


# ---------------------------------------------------------------------------------------------
# Reading


def read_log(run: Union[str, os.PathLike]) -> RunLog:
    """The log of a run folder (or of a ``log.jsonl`` path). Lines that are not JSON (the last
    one, cut by a kill) are skipped; a step logged twice keeps its last record."""
    folder, path = _log_path(Path(run))
    windows: Dict[int, dict] = {}
    evals: Dict[Tuple[int, str], dict] = {}  # one step may evaluate several metrics
    start: dict = {}
    for rec in _records(path):
        event = rec.get("event")
        if event is None:
            windows[rec["step"]] = rec
        elif event == "eval" and "value" in rec:
            evals[(rec["step"], eval_series(rec))] = rec
        elif event == "start":
            start = rec
    if not windows and not evals:
        raise RunError(f"{path}: no loss or evaluation records in the log (nothing to plot yet)")
    T = start.get("num_timesteps")
    return RunLog(name=folder.resolve().name, windows=[windows[k] for k in sorted(windows)],
                  evals=[evals[k] for k in sorted(evals)], folder=folder,
                  num_timesteps=T if isinstance(T, int) else None)


def _log_path(run: Path) -> Tuple[Path, Path]:
    """(run folder, its log), or a RunError saying what was expected there."""
    if run.is_dir():
        folder, path = run, run / LOG_NAME
    elif run.is_file():
        folder, path = run.parent, run
    else:
        raise RunError(f"{run}: no such run folder (expected a run folder of s2dm train, holding {LOG_NAME})")
    if not path.is_file():
        raise RunError(f"{folder}: no {LOG_NAME} (not a run folder of s2dm train)")
    return folder, path


def _records(path: Path) -> List[dict]:
    """The log's records with an integer step, in file order."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
            out.append(rec)
    return out


def series(records: Sequence[dict], key: str) -> Series:
    """(steps, values) of ``key`` over the records that hold a finite number for it (a window
    whose steps were all skipped has no loss)."""
    xs, ys = [], []
    for rec in records:
        v = rec.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(rec["step"])
            ys.append(float(v))
    return xs, ys


# ---------------------------------------------------------------------------------------------
# Smoothing


def smooth(values: Sequence[Optional[float]], fraction: float = SMOOTH_FRACTION) -> List[float]:
    """A centred moving average over ``fraction`` of the points. Centred, not exponential
    (TensorBoard's): an exponential average lags behind a loss that falls fast early on and
    draws it above every raw value, whereas a centred one follows any straight stretch exactly.
    Near the ends the window shrinks symmetrically, so the first and last values are the raw
    ones. A None or NaN stays NaN and is left out of its neighbours' averages."""
    vals = [math.nan if v is None or not math.isfinite(v) else float(v) for v in values]
    half = int(fraction * len(vals)) // 2
    out = []
    for i, v in enumerate(vals):
        k = min(half, i, len(vals) - 1 - i)
        window = [x for x in vals[i - k:i + k + 1] if not math.isnan(x)]
        out.append(math.nan if math.isnan(v) else sum(window) / len(window))
    return out


# ---------------------------------------------------------------------------------------------
# Plotting


def plot_runs(runs: Sequence[RunLike], out: Optional[Union[str, os.PathLike]] = None,
              labels: Optional[Sequence[str]] = None):
    """The 2×2 figure of the runs (folders, ``log.jsonl`` paths or ``RunLog``s), overlaid; saved
    as a PNG at ``out`` if given (atomically: a reader never sees half a file). Returns the
    ``matplotlib.figure.Figure``."""
    from matplotlib.figure import Figure  # deferred: matplotlib costs ~0.3 s to import; only plots need it

    logs = [r if isinstance(r, RunLog) else read_log(r) for r in runs]
    if not logs:
        raise RunError("no runs to plot")
    if labels is not None and len(labels) != len(logs):
        raise RunError(f"{len(labels)} labels for {len(logs)} runs")
    names = list(labels) if labels is not None else unique_names(logs)
    drawn = [(name, log, COLOURS[i % len(COLOURS)]) for i, (name, log) in enumerate(zip(names, logs))]
    ncol = _legend_columns(names, width=11.0)
    fig = Figure(figsize=(11.0, 7.4 + 0.25 * -(-len(names) // ncol)), layout="constrained")
    (ax_loss, ax_terms), (ax_quart, ax_eval) = fig.subplots(2, 2)
    _loss_panel(ax_loss, drawn)
    _terms_panel(ax_terms, drawn)
    _quartile_panel(ax_quart, drawn)
    has_evals = _eval_panel(ax_eval, drawn)
    _step_axes([ax_loss, ax_terms, ax_quart] + ([ax_eval] if has_evals else []), logs)
    _figure_legend(fig, drawn, ncol)
    fig.suptitle(_title(names))
    if out is not None:
        atomic_write(Path(out), lambda f: fig.savefig(f, format="png", dpi=110))
    return fig


def write_run_curves(run: Union[str, os.PathLike]) -> Path:
    """Draw ``RUN/curves.png`` for one run (the training loop, at each checkpoint) and return
    its path. Raises RunError while the log has nothing to plot yet."""
    path = Path(run) / CURVES_FILE
    fig = plot_runs([run], path)
    fig.clear()  # drop the artists now: the loop calls this all run long
    return path


def unique_names(logs: Sequence[RunLog]) -> List[str]:
    """The runs' names (their folder names), with colliding ones prefixed by their parent
    folder, then numbered if they still collide (``a/run``, ``b/run``)."""
    plain = [log.name for log in logs]
    names = [f"{log.folder.resolve().parent.name}/{log.name}"
             if plain.count(log.name) > 1 and log.folder is not None else log.name for log in logs]
    seen: Dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(f"{name} ({seen[name]})" if names.count(name) > 1 else name)
    return out


def _loss_panel(ax, drawn: Drawn) -> None:
    for name, log, colour in drawn:
        _raw_and_smooth(ax, series(log.windows, "loss"), colour, "-", f"{name}: loss")
    _log_y(ax)
    ax.set_title("loss (faint: each log window)")
    ax.set_ylabel("loss")


def _terms_panel(ax, drawn: Drawn) -> None:
    """L0 solid and L_skip dashed; a baseline run (L_skip exactly 0 throughout) draws only L0."""
    any_skip = False
    for name, log, colour in drawn:
        _raw_and_smooth(ax, series(log.windows, "l0"), colour, "-", f"{name}: L0")
        xs, ys = series(log.windows, "lskip")
        if any(y != 0.0 for y in ys):
            any_skip = True
            _raw_and_smooth(ax, (xs, ys), colour, "--", f"{name}: L_skip")
    _log_y(ax)
    ax.set_title("L0 and L_skip" if any_skip else "L0 (no run has L_skip)")
    ax.set_ylabel("loss term")
    _style_legend(ax, ["-", "--"] if any_skip else ["-"], ["L0", "L_skip"])


def _quartile_panel(ax, drawn: Drawn) -> None:
    """The smoothed loss per t quartile: the style says the quartile, the colour the run."""
    for name, log, colour in drawn:
        for q, style in enumerate(QUARTILE_STYLES, start=1):
            xs, ys = series(log.windows, f"loss_t_q{q}")
            if xs:
                ax.plot(xs, smooth(ys), color=colour, linestyle=style, lw=1.4, label=f"{name}: q{q}")
    _log_y(ax)
    ax.set_title("loss by t quartile (smoothed)")
    ax.set_ylabel("loss")
    Ts = {log.num_timesteps for _, log, _ in drawn}
    _style_legend(ax, QUARTILE_STYLES, quartile_labels(Ts.pop() if len(Ts) == 1 else None))


def quartile_labels(T: Optional[int]) -> List[str]:
    """What each quartile covers: its t range when T is known (the log's windows split t at
    T/4, T/2, 3T/4), else its rank."""
    if T is None:
        return ["q1 (small t)", "q2", "q3", "q4 (large t)"]
    b = [T * i // 4 for i in range(1, 4)]
    return [f"t < {b[0]}", f"{b[0]} ≤ t < {b[1]}", f"{b[1]} ≤ t < {b[2]}", f"t ≥ {b[2]}"]


def _eval_panel(ax, drawn: Drawn) -> bool:
    """Each run's metric values, markers and lines, its lowest (best) value starred. One
    series per evaluation setting (metric, sampler, steps, ...: a resume may change them, and
    ``best`` compares one setting's values only), one marker each. Without evaluations: a note,
    no ticks. Returns whether anything was drawn."""
    # in the order they were first evaluated; past the markers, the line style tells them apart
    keys = list(dict.fromkeys(eval_series(e) for _, log, _ in drawn for e in log.evals))
    styles = [dict(marker=MARKERS[i % len(MARKERS)], linestyle=EVAL_STYLES[i // len(MARKERS) % len(EVAL_STYLES)])
              for i in range(len(keys))]
    if not keys:
        ax.set_title("evaluation")
        ax.text(0.5, 0.5, NO_EVAL_TEXT, ha="center", va="center", transform=ax.transAxes, color="0.4")
        ax.set_xticks([])
        ax.set_yticks([])
        return False
    for i, (name, log, colour) in enumerate(drawn):
        star = 17 - 5 * (i % 2)  # runs whose bests coincide show nested stars, not one hiding another
        by_series: Dict[str, List[dict]] = {}
        for e in log.evals:
            by_series.setdefault(eval_series(e), []).append(e)
        for key, style in zip(keys, styles):
            _eval_line(ax, series(by_series.get(key, []), "value"), colour, style, star, f"{name}: {key}")
    _log_y_if_wide(ax)
    metrics = sorted({str(e.get("metric", "metric")) for _, log, _ in drawn for e in log.evals})
    ax.set_ylabel(" / ".join(metrics) + " (lower is better)")
    if len(keys) > 1:
        ax.set_title("evaluation (★ best of each setting)")
        _marker_legend(ax, styles, keys)
    else:
        ax.set_title(f"evaluation: {keys[0]} (★ best)", fontsize="medium")
    return True


def eval_series(record: dict) -> str:
    """What an evaluation's value measures, in words: ``FD-pixels-100, ddim 5 steps (NFE 5)``,
    with the grid, η, order, ε-scale and seeds where they are not the defaults; records of one
    series compare. (A record of an earlier s2dm without these fields: its metric.)"""
    parts = [str(record.get("metric", "metric"))]
    if "sampler" in record and "steps" in record:
        nfe = f" (NFE {record['nfe']})" if record.get("nfe") is not None else ""
        parts.append(f"{record['sampler']} {plural(record['steps'], 'step')}{nfe}")
    if record.get("grid") not in (None, "uniform"):
        parts.append(f"grid {record['grid']}")
    if record.get("eta") and record.get("sampler") == "ddim":
        parts.append(f"η {record['eta']:g}")
    if record.get("order") is not None:
        parts.append(f"order {record['order']}")
    if record.get("eps_scale"):
        parts.append(f"ε-scale {record['eps_scale']}")
    if record.get("legacy_pndm_index"):
        parts.append("legacy PNDM index")
    if record.get("seeds") and not str(record["seeds"]).startswith("0-"):
        parts.append(f"seeds {record['seeds']}")
    return ", ".join(parts)


def _eval_line(ax, data: Series, colour: str, style: dict, star: float, label: str) -> None:
    xs, ys = data
    if not xs:
        return
    ax.plot(xs, ys, color=colour, ms=4, lw=1.3, label=label, **style)
    best = min(range(len(ys)), key=ys.__getitem__)  # the first of equal lows: when it was reached
    ax.plot([xs[best]], [ys[best]], color=colour, marker="*", ms=star, markeredgecolor="black",
            markeredgewidth=0.6, linestyle="none", zorder=5, clip_on=False, label=f"{label} best")


def _raw_and_smooth(ax, data: Series, colour: str, style: str, label: str) -> None:
    """The raw values thin and faint, the smoothed curve solid over them, in the run's colour."""
    xs, ys = data
    if not xs:
        return
    ax.plot(xs, ys, color=colour, linestyle=style, lw=0.8, alpha=RAW_ALPHA, label=f"{label} raw")
    ax.plot(xs, smooth(ys), color=colour, linestyle=style, lw=1.6, label=label)


def _log_y_if_wide(ax) -> None:
    """A log y axis when the values span more than a factor 5 (FID from hundreds to units: a
    linear axis would flatten the end of the run, where runs differ)."""
    ys = [y for line in ax.get_lines() for y in line.get_ydata() if math.isfinite(y)]
    if ys and min(ys) > 0 and max(ys) / min(ys) > 5:
        _plain_log_scale(ax)


def _log_y(ax) -> None:
    """A log y axis when the panel holds positive data (losses span decades during training)."""
    ys = [y for line in ax.get_lines() for y in line.get_ydata() if math.isfinite(y)]
    if ys and min(ys) > 0:
        _plain_log_scale(ax)


def _plain_log_scale(ax) -> None:
    """A log y axis with ticks at 1, 2 and 5 times each power of ten, labelled 0.2, 0.5, 1
    rather than 2×10⁻¹; unlabelled minor ticks between them."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # deferred as in plot_runs

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _style_legend(ax, styles: Sequence[str], labels: Sequence[str]) -> None:
    """A small legend in the panel saying which line style is which curve (colour: the run)."""
    _marker_legend(ax, [dict(linestyle=s) for s in styles], labels)


def _marker_legend(ax, styles: Sequence[dict], labels: Sequence[str]) -> None:
    """A small grey legend of line styles or markers (the colours belong to the runs)."""
    from matplotlib.lines import Line2D  # deferred with the rest of matplotlib (see plot_runs)

    handles = [Line2D([], [], color="0.25", lw=1.4, **s) for s in styles]
    # lower left: the corner that falling curves leave empty (they start high, end low)
    ax.legend(handles, list(labels)[:len(handles)], loc="lower left", fontsize=8, framealpha=0.8,
              handlelength=2.6)


def _step_axes(axes, logs: Sequence[RunLog]) -> None:
    """'step' on every x axis, one x range for all panels so
    that a step lines up across them, and short tick labels (250k, not 250000)."""
    from matplotlib.ticker import FuncFormatter  # deferred with the rest of matplotlib (see plot_runs)

    last = max([r["step"] for log in logs for r in log.windows + log.evals] + [1])
    for ax in axes:
        ax.set_xlim(0, last * 1.02)
        ax.xaxis.set_major_formatter(FuncFormatter(_step_label))
        ax.set_xlabel("step")
        ax.grid(True, which="major", alpha=0.3)


def _step_label(x: float, _pos=None) -> str:
    if abs(x) >= 10_000:
        return f"{x / 1000:g}k"
    return f"{x:g}"


def _legend_columns(names: Sequence[str], width: float) -> int:
    entry = 0.7 + 0.08 * max(len(n) for n in names)  # inches: line sample + label at 10 pt
    return max(1, min(len(names), int(width / entry)))


def _figure_legend(fig, drawn: Drawn, ncol: int) -> None:
    """One legend for the figure naming the runs by colour, below the panels (as util/plots.py)."""
    from matplotlib.lines import Line2D  # deferred with the rest of matplotlib (see plot_runs)

    handles = [Line2D([], [], color=colour, lw=2.2, label=name) for name, _, colour in drawn]
    fig.legend(handles=handles, loc="outside lower center", ncol=ncol, frameon=False)


def _title(names: Sequence[str]) -> str:
    title = "training curves: " + ", ".join(names)
    return title if len(title) <= 110 else f"training curves: {len(names)} runs"
