"""The statistics, table, plot and report of ``s2dm study`` (see ``study/runner.py``).

Per cell (sampler, steps): each run's mean ± sample std over training seeds; each run's
per-seed paired difference against the baseline (run − baseline at the same seed) with its
mean and a 95 % Student-t interval over seeds; the metric's own noise from two independent
sample draws of one model (|a − b|, and the implied std of one value |a − b|/√2).

A study that declares ``twins``, ``sum_baseline``, a sweep or ``eval.cnn`` (``Study.v2``) gets
the v2 report instead (``study/questions.py``), built on this module's statistics.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from .._version import __version__
from ..util.fileio import csv_text as to_csv
from ..util.plots import plot_vs_nfe
from ..util.textfmt import noun, num, plural, span
from .spec import path_name

CSV_COLUMNS = ["run", "seed", "sampler", "steps", "nfe", "draw", "metric", "value", "n", "image_seeds",
               "eps_scale", "checkpoint_step", "seconds"]


def rows_from_records(records: Sequence[dict]) -> List[dict]:
    """Cell records → ``CSV_COLUMNS`` rows (and an FD-cnn record's ``classifier_accuracy``), in
    the records' order."""
    rows = []
    for r in records:
        s = r["settings"]
        rows.append({"run": r["run"], "seed": r["seed"], "sampler": r["sampler"], "steps": r["steps"],
                     "nfe": r["nfe"], "draw": r["draw"], "metric": r["metric"], "value": r["value"],
                     "n": s["n"], "image_seeds": s["image_seeds"], "eps_scale": s["eps_scale"] or "",
                     "checkpoint_step": s["checkpoint_step"], "seconds": round(r["seconds"], 2)})
        if r.get("classifier_accuracy") is not None:
            rows[-1]["classifier_accuracy"] = r["classifier_accuracy"]
    return rows


def csv_text(rows: Sequence[dict]) -> str:
    """``CSV_COLUMNS``, plus ``classifier_accuracy`` when a row has FD-cnn (empty in the others)."""
    extra = ["classifier_accuracy"] if any(r.get("classifier_accuracy") is not None for r in rows) else []
    return to_csv([{**r, "value": num(r["value"], ".6f")} for r in rows], CSV_COLUMNS + extra)


# ---------------------------------------------------------------- statistics

def t_quantile(df: int) -> float:
    """The 97.5 % quantile of Student's t with ``df`` degrees of freedom (scipy)."""
    from scipy.stats import t  # CLI start-up time: scipy.stats takes ~1 s; only the intervals need it

    return float(t.ppf(0.975, df))


@dataclass
class Summary:
    """mean ± sample std (ddof 1; None for one value) of values over seeds."""

    values: List[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return sum(self.values) / len(self.values)

    @property
    def std(self) -> Optional[float]:
        if self.n < 2:
            return None
        m = self.mean
        return math.sqrt(sum((v - m) ** 2 for v in self.values) / (self.n - 1))

    @property
    def ci95(self) -> Optional[tuple]:
        """The 95 % t interval of the mean; None below two values."""
        if self.n < 2:
            return None
        half = t_quantile(self.n - 1) * self.std / math.sqrt(self.n)
        return (self.mean - half, self.mean + half)


@dataclass
class CellStats:
    sampler: str
    steps: int
    nfe: int
    metric: str
    runs: Dict[str, Summary]  # run → its main-draw values over seeds
    diffs: Dict[str, Summary]  # run → paired (run − baseline) over common seeds
    baseline_mean: Dict[str, float]  # run → baseline mean over the seeds it is paired on
    noise: Optional[float]  # |draw A − draw B| of the noise model
    noise_run: Optional[str]
    by_seed: Dict[str, Dict[int, float]] = field(default_factory=dict)  # run → {training seed: value}
    accuracy: Optional[float] = None  # FD-cnn: the classifier's held-out accuracy


def metric_family(label: str) -> str:
    """A metric's label without its sample count: ``FD-pixels-5k`` → ``FD-pixels``,
    ``FID-10k`` → ``FID``, ``FD-cnn-48`` → ``FD-cnn``."""
    return re.sub(r"-\d+k?$", "", label)


def cell_statistics(rows: Sequence[dict], baseline: str, metric: str = "FD-pixels") -> List[CellStats]:
    """One ``CellStats`` per (sampler, steps) of ``metric`` (a label, with or without its
    count: FD-pixels, FD-cnn, FID), in first-seen order."""
    cells: Dict[tuple, List[dict]] = {}
    for r in rows:
        if metric_family(r["metric"]) == metric_family(metric):
            cells.setdefault((r["sampler"], int(r["steps"])), []).append(r)
    out = []
    for (sampler, steps), rs in cells.items():
        main = [r for r in rs if r["draw"] == "main"]
        by_run: Dict[str, Dict[int, float]] = {}
        for r in main:
            by_run.setdefault(r["run"], {})[int(r["seed"])] = float(r["value"])
        base = by_run.get(baseline, {})
        runs = {run: Summary([v[s] for s in sorted(v)]) for run, v in by_run.items()}
        diffs, base_mean = {}, {}
        for run, v in by_run.items():
            common = sorted(set(v) & set(base))
            if run == baseline or not common:
                continue
            diffs[run] = Summary([v[s] - base[s] for s in common])
            base_mean[run] = sum(base[s] for s in common) / len(common)
        noise, noise_run = None, None
        for r in rs:
            if r["draw"] == "noise":
                twin = by_run.get(r["run"], {}).get(int(r["seed"]))
                if twin is not None:
                    noise, noise_run = abs(float(r["value"]) - twin), r["run"]
        accuracy = next((float(r["classifier_accuracy"]) for r in rs if r.get("classifier_accuracy") not in (None, "")),
                        None)
        out.append(CellStats(sampler, steps, int(rs[0]["nfe"]), main[0]["metric"] if main else metric,
                             runs, diffs, base_mean, noise, noise_run, by_run, accuracy))
    return out


def paired(c: CellStats, a: str, b: str) -> Optional[Summary]:
    """a − b per training seed both have in this cell (None: no common seed)."""
    va, vb = c.by_seed.get(a, {}), c.by_seed.get(b, {})
    common = sorted(set(va) & set(vb))
    return Summary([va[s] - vb[s] for s in common]) if common else None


# ---------------------------------------------------------------- the report

# Decimals of every number the report prints. The v2 report sets them per metric (``_decimals``);
# a context variable scopes the setting to the ``with`` block without passing it through every
# formatter (as ``decimal.localcontext`` does), and is safe across threads.
_DECIMALS: contextvars.ContextVar[int] = contextvars.ContextVar("s2dm_report_decimals", default=3)


def _f(x: Optional[float], digits: Optional[int] = None) -> str:
    return num(x, f".{_DECIMALS.get() if digits is None else digits}f")


def _signed(x: Optional[float], digits: Optional[int] = None) -> str:
    return num(x, f"+.{_DECIMALS.get() if digits is None else digits}f")


@contextlib.contextmanager
def _decimals(cells: Sequence["CellStats"], baseline: str):
    """Print the numbers of these cells with enough decimals for 3 significant digits of the
    baseline's smallest mean (at least 3: FD-pixels-5k of 0.068 gets 4, FD-cnn of 6.8 gets 3)."""
    means = [c.runs[baseline].mean for c in cells if baseline in c.runs and c.runs[baseline].mean > 0]
    token = _DECIMALS.set(max(3, 2 - math.floor(math.log10(min(means)))) if means else 3)
    try:
        yield
    finally:
        _DECIMALS.reset(token)


def _pct(x: float) -> str:
    return num(x, "+.1f") + " %"


def _ranges(values: Sequence[float]) -> str:
    """Percentages over cells: "ranges from +1.0 % to +2.0 % (mean +1.4 %)", or "is +0.8 % (in
    every cell)" when the two ends print the same."""
    if not values:
        return "is —"
    lo, hi = _pct(min(values)), _pct(max(values))
    if lo == hi:
        return f"is {lo}" + (" in every cell" if len(values) > 1 else "")
    return f"ranges from {lo} to {hi} (mean {_pct(sum(values) / len(values))})"


def mean_std_text(s: Summary) -> str:
    return _f(s.mean) if s.std is None else f"{_f(s.mean)} ± {_f(s.std)}"


def _rel(d: Summary, base_mean: float) -> str:
    return _pct(100 * d.mean / base_mean) if base_mean else "—"


def diff_text(d: Summary, base_mean: float) -> str:
    """``+0.012 [−0.010, +0.034] (+1.2 %)``: mean paired difference, 95 % interval, relative."""
    ci = d.ci95
    ci_text = f"[{_signed(ci[0])}, {_signed(ci[1])}]" if ci else "(1 seed: no interval)"
    return f"{_signed(d.mean)} {ci_text} ({_rel(d, base_mean)})"


def noise_sd(noise: Optional[float]) -> Optional[float]:
    """The std of one metric value implied by two independent draws a, b: |a − b|/√2."""
    return None if noise is None else noise / math.sqrt(2)


def _resolved(d: Summary) -> bool:
    return bool(d.ci95 and (d.ci95[0] > 0 or d.ci95[1] < 0))


def _verdict(run: str, baseline: str, d: Summary) -> str:
    ci = d.ci95
    if ci is None:
        return "with one seed there is no interval"
    if ci[0] > 0:
        return f"{run} is worse than {baseline} (the 95 % interval excludes 0)"
    if ci[1] < 0:
        return f"{run} is better than {baseline} (the 95 % interval excludes 0)"
    return f"the 95 % interval includes 0: no difference between {run} and {baseline} is resolved"


def reading(c: CellStats, baseline: str, effect: Optional[str], control: Optional[str]) -> str:
    """The plain-language paragraph for one cell: the effect's difference (the control's when
    the study names no effect), against the metric's noise, and the control's share of it."""
    sd = noise_sd(c.noise)
    main = effect or control
    if main not in c.diffs:
        return f"Metric draw-to-draw std ≈ {_f(sd)}." if sd is not None else ""
    d = c.diffs[main]
    parts = [f"{main} − {baseline} = {_signed(d.mean)} ({_rel(d, c.baseline_mean[main])}); "
             f"{_verdict(main, baseline, d)}."]
    if sd is not None:
        size = "exceeds" if abs(d.mean) > 2 * sd else "does not exceed"
        parts.append(f"The mean difference {size} twice the metric's own draw-to-draw std ({_f(sd)}); "
                     "the paired runs share x_T, so most of that draw noise cancels in the difference.")
    if main == effect and control in c.diffs:
        cd = c.diffs[control]
        share = (num(100 * cd.mean / d.mean, ".0f") + f" % of the {effect} difference" if _measurable(c, effect)
                 else f"no share is given: the {effect} difference is within the metric's noise")
        parts.append(f"The ε-scaling control moves the baseline by {_signed(cd.mean)}; {share}.")
    return " ".join(parts)


def control_of(study) -> Optional[str]:
    """The ε-scaling control: a run sampling the baseline's weights with an eps_scale."""
    return next((r.name for r in study.runs.values() if r.weights_of == study.baseline and r.eps_scale), None)


def report_markdown(rows: Sequence[dict], study, cost: dict, out: Path, ema: Optional[Dict[str, str]] = None,
                    clip: Optional[Dict[str, dict]] = None) -> str:
    """The whole report.md; its first section is the headline the CLI prints. A v2 study
    (``study.v2``) gets ``questions.v2_report`` instead (``questions.study_report`` chooses);
    ``clip`` is that report's."""
    cells = cell_statistics(rows, study.baseline)
    lines = [f"# Study: {Path(study.path).name}{' (quick preset)' if study.quick else ''}", ""]
    planned, scored = cost.get("cells_planned"), cost.get("cells_scored")
    if planned and scored is not None and scored < planned:
        lines += [f"**Incomplete: {scored} of {plural(planned, 'cell')} scored.** Run the same `s2dm study` "
                  "command again to finish; nothing done is redone.", ""]
    lines += _headline(cells, study)
    lines += _every_run(cells, study)
    lines += _fid_section(cell_statistics(rows, study.baseline, metric="FID"), study)
    lines += ["", "## Reading, cell by cell", ""]
    for c in cells:
        lines.append(f"- **{c.sampler}, {c.steps} steps (NFE {c.nfe})**: "
                     f"{reading(c, study.baseline, study.effect, control_of(study))}")
    lines += _runs_and_cost(study, cost, ema or {})
    return "\n".join(lines)


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def _diff_cell(c: CellStats, run: str) -> str:
    return diff_text(c.diffs[run], c.baseline_mean[run]) if run in c.diffs else "—"


def _headline(cells: Sequence[CellStats], study) -> List[str]:
    """The metric, the table of the effect and the control per cell, the overall reading. A
    study without ``effect:`` has no effect column (and its reading is the control's)."""
    base, effect, control = study.baseline, study.effect, control_of(study)
    metric = cells[0].metric if cells else "FD-pixels"
    lines = [f"Metric: **{metric}** (Fréchet distance on raw pixels in [0, 1] of {plural(study.n, 'sample')} "
             "per cell, image seeds 0..n−1 for every model, against the full training set; not FID). "
             f"Lower is better. Paired differences are run − {base} at the same training seed, "
             "mean over seeds with a 95 % Student-t interval.", ""]
    compared = [r for r in (effect, control) if r]
    head = ["sampler", "steps", "NFE", base] + [f"{r} − {base}" for r in compared] + ["metric noise |a−b|"]
    rows = [[c.sampler, str(c.steps), str(c.nfe), mean_std_text(c.runs[base]) if base in c.runs else "—"]
            + [_diff_cell(c, r) for r in compared] + [_f(c.noise)] for c in cells]
    return lines + _table(head, rows) + ["", overall_reading(cells, base, effect, control), ""]


def _every_run(cells: Sequence[CellStats], study) -> List[str]:
    runs, base = list(study.runs), study.baseline
    others = [r for r in runs if r != base]
    lines = ["## Every run, every cell", "",
             "mean ± std over training seeds (number of seeds in brackets); then the paired difference against "
             f"{base}.", ""]
    lines += _table(["sampler", "steps", "NFE"] + [f"{r} ({len(study.runs[r].seeds)})" for r in runs],
                    [[c.sampler, str(c.steps), str(c.nfe)] +
                     [mean_std_text(c.runs[r]) if r in c.runs else "—" for r in runs] for c in cells])
    lines += [""] + _table(["sampler", "steps"] + [f"{r} − {base}" for r in others],
                           [[c.sampler, str(c.steps)] + [_diff_cell(c, r) for r in others] for c in cells])
    return lines


def _fid_section(fid_cells: Sequence[CellStats], study) -> List[str]:
    if not fid_cells:
        return ["", "Inception FID: not computed (`eval.fid.n` is 0 in this study; on a CPU the "
                "Inception network scores about 11 images/s)."]
    runs, base = list(study.runs), study.baseline
    others = [r for r in runs if r != base]
    head = ["sampler", "steps", "NFE", "metric"] + runs + [f"{r} − {base}" for r in others]
    rows = [[c.sampler, str(c.steps), str(c.nfe), c.metric]
            + [mean_std_text(c.runs[r]) if r in c.runs else "—" for r in runs]
            + [_diff_cell(c, r) for r in others] for c in fid_cells]
    return ["", "## Inception FID", ""] + _table(head, rows)


def _runs_and_cost(study, cost: dict, ema: Dict[str, str]) -> List[str]:
    lines = ["", "## Runs", ""]
    for r in study.runs.values():
        what = (f"weights of `{r.weights_of}`, sampled with eps_scale `{r.eps_scale}`"
                + (f" (sweep `{r.sweep}`)" if getattr(r, "sweep", None) else "") if not r.trained
                else ", ".join(f"`{k}={v}`" for k, v in r.overrides.items()) or "the base config")
        lines.append(f"- `{r.name}` (training {noun(len(r.seeds), 'seed')} {', '.join(map(str, r.seeds))}): {what}")
    common = ", ".join(f"`{k}={v}`" for k, v in study.overrides.items())
    renamed = [r for r in study.runs if path_name(r) != r]
    lines += ["", f"Every run: `{Path(study.train_config).name}`" + (f" with {common}" if common else "")
              + f". Mosaics: `mosaics/<run>.png` (DDIM, {study.mosaic_steps} steps, image seeds 0–99, first training seed)"
              + (f"; on disk a sweep's run drops its brackets, colons and commas (`{renamed[0]}` → "
                 f"`{path_name(renamed[0])}`)" if renamed else "") + ".", ""]
    if len(set(ema.values())) == 1:
        lines += [f"Every cell samples the EMA weights: {next(iter(ema.values()))}.", ""]
    elif ema:
        lines += ["Every cell samples the EMA weights: " + "; ".join(f"`{r}` {e}" for r, e in ema.items()) + ".", ""]
    lines += ["The method behind these numbers is in s2dm's docs/method.md: the losses (§2), the shrink factor and "
              "the ε-scaling control (§3, §4), the paired design (§7) and the metric's label (§8).", ""]
    invocation = ("the report only, from the records on disk (no training or sampling)" if cost.get("report_only")
                  else f"{cost['this_invocation_seconds'] / 60:.1f} min of wall time, up to {cost.get('workers', 1)} "
                       "jobs at once (one thread each)")
    lines += ["## Cost and versions", "",
              f"- this invocation: {invocation}",
              f"- training: {cost['train_seconds'] / 60:.1f} min; sampling and scoring: "
              f"{cost['eval_seconds'] / 60:.1f} min (wall time of each model's training and each cell, summed over "
              "models, cells and invocations: jobs that ran at once add up to more than the wall time; on a shared "
              "machine these include the time other jobs took)",
              f"- s2dm {__version__}, torch {torch.__version__}",
              "- `results.csv`: one row per model × cell (draw `noise` = the second, independent draw); "
              "`fd_vs_nfe.png`: mean ± std over seeds, one colour and marker per run in every panel, "
              "each run shifted slightly along NFE so that overlapping runs stay visible", ""]
    return lines


def overall_reading(cells: Sequence[CellStats], baseline: str, effect: Optional[str],
                    control: Optional[str]) -> str:
    """A one-paragraph summary over all cells of the effect (the control's when the study names
    no effect)."""
    main = effect or control
    ds = [c for c in cells if main in c.diffs]
    if not ds:
        return ("" if effect else "**Reading.** No `effect:` run and no ε-scaling control are in this study: "
                f"every run's paired difference against {baseline} is in the tables below.")
    text = "**Reading.** " + ("" if effect else
                              "No `effect:` run is in this study, so this reads the ε-scaling control. ")
    text += f"Over {plural(len(ds), 'cell')} the paired {main} − {baseline} difference {_ranges(_rels(ds, main))}; "
    text += _interval_counts(ds, main)
    sds = [noise_sd(c.noise) for c in cells if c.noise is not None]
    if sds:
        big = sum(1 for c in ds if c.noise is not None and abs(c.diffs[main].mean) > 2 * noise_sd(c.noise))
        text += (f" The metric's own draw-to-draw std (|a−b|/√2, two independent sample draws of one model) is "
                 f"{span(_f(min(sds)), _f(max(sds)))}; the mean difference exceeds "
                 f"twice it in {big} of {plural(len(ds), 'cell')}. Unpaired, with this many samples, the difference "
                 "would be lost in that noise; paired (same x_T per image seed), the draw noise largely cancels and "
                 "the interval over training seeds is the test.")
    cs = [c for c in ds if control in c.diffs] if effect and control else []
    if cs:
        shared = [c for c in cs if _measurable(c, effect)]
        shares = [100 * c.diffs[control].mean / c.diffs[effect].mean for c in shared]
        text += (f" The change the ε-scaling control makes (the baseline's own weights, ε multiplied by the "
                 f"predicted shrink factor) {_ranges(_rels(cs, control))}")
        if shares:
            text += (f", {span(num(min(shares), '.0f'), num(max(shares), '.0f'))} % of the {effect} difference in "
                     f"the same cell ({plural(len(shared), 'cell')} where that difference is measurable).")
        else:
            text += (f"; its share of the {effect} difference is not given: that difference is within the "
                     "metric's noise in every cell, and a ratio of noise means nothing.")
    return text


def _measurable(c: CellStats, run: str) -> bool:
    """The run's paired difference is told apart from zero: its interval excludes 0, or (one
    seed, no interval) it exceeds twice the metric's draw-to-draw std."""
    d = c.diffs[run]
    if d.ci95 is not None:
        return _resolved(d)
    sd = noise_sd(c.noise)
    return d.mean != 0 and sd is not None and abs(d.mean) > 2 * sd


def _rels(cells: Sequence[CellStats], run: str) -> List[float]:
    """The run's mean paired difference in % of the baseline mean, per cell (cells whose baseline
    mean is 0 left out)."""
    return [100 * c.diffs[run].mean / c.baseline_mean[run] for c in cells if c.baseline_mean[run]]


def _interval_counts(ds: Sequence[CellStats], run: str) -> str:
    cis = [c.diffs[run].ci95 for c in ds]
    if all(ci is None for ci in cis):
        return "with one training seed there is no interval: run the full study for one."
    better = sum(1 for ci in cis if ci and ci[1] < 0)
    worse = sum(1 for ci in cis if ci and ci[0] > 0)
    unresolved = sum(1 for ci in cis if ci and ci[0] <= 0 <= ci[1])
    return (f"its 95 % interval lies below 0 ({run} better) in {plural(better, 'cell')}, above 0 in {worse}, "
            f"and includes 0 in {unresolved}.")


def best_run(c: CellStats, candidates: Sequence[str]) -> Optional[str]:
    """The candidate with the lowest mean over seeds in this cell (the first of equals, in the
    order given); None when none was scored in it."""
    there = [r for r in candidates if r in c.runs]
    return min(there, key=lambda r: c.runs[r].mean) if there else None


def plot_fd_vs_nfe(rows: Sequence[dict], study, path: Path, metric: str = "FD-pixels",
                   best_of: Sequence[str] = ()):
    """One panel per sampler: each run's mean over seeds vs NFE, ± std as error bars; one
    colour and marker per run in every panel, controls dashed; with two or more ``best_of``
    runs (the training-free scales of a v2 study), the best of them in each cell starred.
    Returns the figure (None: no cells)."""
    cells = cell_statistics(rows, study.baseline, metric=metric)
    if not cells:
        return None
    points, stars = {}, {}
    for c in cells:
        for run, s in c.runs.items():
            points.setdefault((c.sampler, run), []).append((c.nfe, s.mean, s.std))
        best = best_run(c, best_of) if len(best_of) > 1 else None
        if best is not None:
            stars.setdefault((c.sampler, best), []).append((c.nfe, c.runs[best].mean))
    controls = [r.name for r in study.runs.values() if not r.trained]
    return plot_vs_nfe(points, list(dict.fromkeys(c.sampler for c in cells)), list(study.runs), path,
                       ylabel=f"{cells[0].metric} (mean ± std over seeds)", dashed=controls,
                       stars=stars, star_label="best training-free scale of the cell")
