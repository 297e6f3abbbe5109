"""The statistics, table, plot and report of ``s2dm study`` (see ``study.py``).

Per cell (sampler, steps): each run's mean ± sample std over training seeds; each run's
per-seed paired difference against the baseline (run − baseline at the same seed) with its
mean and a 95 % Student-t interval over seeds; the metric's own noise from two independent
sample draws of one model (|a − b|, and the implied std of one value |a − b|/√2).
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

CSV_COLUMNS = ["run", "seed", "sampler", "steps", "nfe", "draw", "metric", "value", "n", "image_seeds",
               "eps_scale", "checkpoint_step", "seconds"]


def rows_from_records(records: Sequence[dict]) -> List[dict]:
    """Cell records → ``CSV_COLUMNS`` rows, sorted by cell, run order kept, then seed."""
    rows = []
    for r in records:
        s = r["settings"]
        rows.append({"run": r["run"], "seed": r["seed"], "sampler": r["sampler"], "steps": r["steps"],
                     "nfe": r["nfe"], "draw": r["draw"], "metric": r["metric"], "value": r["value"],
                     "n": s["n"], "image_seeds": s["image_seeds"], "eps_scale": s["eps_scale"] or "",
                     "checkpoint_step": s["checkpoint_step"], "seconds": round(r["seconds"], 2)})
    return rows


def csv_text(rows: Sequence[dict]) -> str:
    from .fileio import csv_text as to_csv

    return to_csv([{**r, "value": f"{r['value']:.6f}"} for r in rows], CSV_COLUMNS)


def read_csv(path) -> List[dict]:
    """results.csv → rows with numbers parsed (the inverse of ``csv_text``)."""
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            for k in ("seed", "steps", "nfe", "n", "checkpoint_step"):
                row[k] = int(row[k])
            row["value"], row["seconds"] = float(row["value"]), float(row["seconds"])
            rows.append(row)
    return rows


# ---------------------------------------------------------------- statistics

def t_quantile(df: int) -> float:
    """The 97.5 % quantile of Student's t with ``df`` degrees of freedom (scipy)."""
    from scipy.stats import t

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


def cell_statistics(rows: Sequence[dict], baseline: str, metric: str = "FD-pixels") -> List[CellStats]:
    """One ``CellStats`` per (sampler, steps) of the main metric, in first-seen order."""
    cells: Dict[tuple, List[dict]] = {}
    for r in rows:
        if r["metric"].split("-")[0] == metric.split("-")[0]:
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
        out.append(CellStats(sampler, steps, int(rs[0]["nfe"]), main[0]["metric"] if main else metric,
                             runs, diffs, base_mean, noise, noise_run))
    return out


# ---------------------------------------------------------------- the report

def _f(x: Optional[float], digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _signed(x: Optional[float], digits: int = 3) -> str:
    return "—" if x is None else f"{x:+.{digits}f}"


def mean_std_text(s: Summary) -> str:
    return _f(s.mean) if s.std is None else f"{_f(s.mean)} ± {_f(s.std)}"


def diff_text(d: Summary, base_mean: float) -> str:
    """``+0.012 [−0.010, +0.034] (+1.2 %)``: mean paired difference, 95 % interval, relative."""
    rel = f"{100 * d.mean / base_mean:+.1f} %" if base_mean else "—"
    ci = d.ci95
    ci_text = f"[{_signed(ci[0])}, {_signed(ci[1])}]" if ci else "(1 seed: no interval)"
    return f"{_signed(d.mean)} {ci_text} ({rel})"


def noise_sd(noise: Optional[float]) -> Optional[float]:
    """The std of one metric value implied by two independent draws a, b: |a − b|/√2."""
    return None if noise is None else noise / math.sqrt(2)


def reading(c: CellStats, baseline: str, effect: Optional[str], control: Optional[str]) -> str:
    """The plain-language paragraph for one cell."""
    parts = []
    sd = noise_sd(c.noise)
    if effect in c.diffs:
        d = c.diffs[effect]
        ci = d.ci95
        if ci is None:
            verdict = "with one seed there is no interval"
        elif ci[0] > 0:
            verdict = f"{effect} is worse than {baseline} (the 95 % interval excludes 0)"
        elif ci[1] < 0:
            verdict = f"{effect} is better than {baseline} (the 95 % interval excludes 0)"
        else:
            verdict = f"the 95 % interval includes 0: no difference between {effect} and {baseline} is resolved"
        parts.append(f"{effect} − {baseline} = {_signed(d.mean)} ({100 * d.mean / c.baseline_mean[effect]:+.1f} %); {verdict}.")
        if sd is not None:
            size = "exceeds" if abs(d.mean) > 2 * sd else "does not exceed"
            parts.append(f"The mean difference {size} twice the metric's own draw-to-draw std ({_f(sd)}); "
                         "the paired runs share x_T, so most of that draw noise cancels in the difference.")
        if control in c.diffs:
            cd = c.diffs[control]
            share = cd.mean / d.mean if d.mean != 0 else None
            share_text = "—" if share is None else f"{100 * share:.0f} %"
            parts.append(f"The ε-scaling control moves the baseline by {_signed(cd.mean)}, "
                         f"{share_text} of the {effect} difference"
                         + ("" if (d.ci95 and (d.ci95[0] > 0 or d.ci95[1] < 0)) else
                            " (a share of an unresolved difference means little)") + ".")
    elif sd is not None:
        parts.append(f"Metric draw-to-draw std ≈ {_f(sd)}.")
    return " ".join(parts)


def report_markdown(rows: Sequence[dict], study, cost: dict, out: Path) -> str:
    """The whole report.md; its first section is the headline the CLI prints."""
    from . import __version__
    import torch

    cells = cell_statistics(rows, study.baseline)
    runs = list(study.runs)
    control = next((r.name for r in study.runs.values() if r.weights_of == study.baseline and r.eps_scale), None)
    effect = study.effect
    metric = cells[0].metric if cells else "FD-pixels"
    lines = [f"# Study: {Path(study.path).name}{' (quick preset)' if study.quick else ''}", ""]
    planned, scored = cost.get("cells_planned"), cost.get("cells_scored")
    if planned and scored is not None and scored < planned:
        lines += [f"**Incomplete: {scored} of {planned} cells scored.** Run the same `s2dm study` command "
                  "again to finish; nothing done is redone.", ""]
    lines += [f"Metric: **{metric}** (Fréchet distance on raw pixels in [0, 1] of {study.n:,} samples per cell, "
              "image seeds 0..n−1 for every model, against the full training set; not FID). "
              f"Lower is better. Paired differences are run − {study.baseline} at the same training seed, "
              "mean over seeds with a 95 % Student-t interval.", ""]
    # headline: the effect and the control per cell
    head = ["sampler", "steps", "NFE", f"{study.baseline}"]
    if effect:
        head += [f"{effect} − {study.baseline}"]
    if control:
        head += [f"{control} − {study.baseline}"]
    head += ["metric noise |a−b|"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cells:
        row = [c.sampler, str(c.steps), str(c.nfe), mean_std_text(c.runs[study.baseline])]
        for r in (effect, control):
            if r:
                row.append(diff_text(c.diffs[r], c.baseline_mean[r]) if r in c.diffs else "—")
        row.append(_f(c.noise))
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", overall_reading(cells, study.baseline, effect, control), ""]

    lines += ["## Every run, every cell", "",
              "mean ± std over training seeds (number of seeds in brackets); then the paired difference against "
              f"{study.baseline}.", ""]
    head = ["sampler", "steps", "NFE"] + [f"{r} ({len(study.runs[r].seeds)})" for r in runs]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cells:
        lines.append("| " + " | ".join([c.sampler, str(c.steps), str(c.nfe)] +
                                       [mean_std_text(c.runs[r]) if r in c.runs else "—" for r in runs]) + " |")
    lines += ["", "| sampler | steps | " + " | ".join(f"{r} − {study.baseline}" for r in runs if r != study.baseline) + " |",
              "|---|---|" + "---|" * (len(runs) - 1)]
    for c in cells:
        lines.append(f"| {c.sampler} | {c.steps} | " + " | ".join(
            diff_text(c.diffs[r], c.baseline_mean[r]) if r in c.diffs else "—"
            for r in runs if r != study.baseline) + " |")

    fid_cells = cell_statistics(rows, study.baseline, metric="FID")
    if fid_cells:
        lines += ["", "## Inception FID", "", "| sampler | steps | NFE | metric | " +
                  " | ".join(f"{r}" for r in runs) + " | " + " | ".join(f"{r} − {study.baseline}" for r in runs if r != study.baseline) + " |",
                  "|---|---|---|---|" + "---|" * (2 * len(runs) - 1)]
        for c in fid_cells:
            lines.append(f"| {c.sampler} | {c.steps} | {c.nfe} | {c.metric} | " +
                         " | ".join(mean_std_text(c.runs[r]) if r in c.runs else "—" for r in runs) + " | " +
                         " | ".join(diff_text(c.diffs[r], c.baseline_mean[r]) if r in c.diffs else "—"
                                    for r in runs if r != study.baseline) + " |")
    else:
        lines += ["", "Inception FID: not computed (`eval.fid.n` is 0 in this study; on a CPU the "
                  "Inception network scores about 11 images/s, METHOD §4)."]

    lines += ["", "## Reading, cell by cell", ""]
    for c in cells:
        lines.append(f"- **{c.sampler}, {c.steps} steps (NFE {c.nfe})**: {reading(c, study.baseline, effect, control)}")

    lines += ["", "## Runs", ""]
    for r in study.runs.values():
        what = (f"weights of `{r.weights_of}`, sampled with eps_scale `{r.eps_scale}`" if not r.trained
                else ", ".join(f"`{k}={v}`" for k, v in r.overrides.items()) or "the base config")
        lines.append(f"- `{r.name}` (training seeds {', '.join(map(str, r.seeds))}): {what}")
    common = ", ".join(f"`{k}={v}`" for k, v in study.overrides.items())
    lines += ["", f"Every run: `{Path(study.train_config).name}`" + (f" with {common}" if common else "") + ". Grids: `grids/<run>.png` "
              f"(DDIM, {study.grid_steps} steps, image seeds 0–99, first training seed).", ""]
    lines += ["## Cost and versions", "",
              f"- training: {cost['train_seconds'] / 60:.1f} min; sampling and scoring: "
              f"{cost['eval_seconds'] / 60:.1f} min (wall time of each model's training and each cell, summed over "
              "invocations; on a shared machine these include the time other jobs took)",
              f"- s2dm {__version__}, torch {torch.__version__}",
              "- `results.csv`: one row per model × cell (draw `noise` = the second, independent draw); "
              "`fd_vs_nfe.png`: mean ± std over seeds", ""]
    return "\n".join(lines)


def overall_reading(cells: Sequence[CellStats], baseline: str, effect: Optional[str],
                    control: Optional[str]) -> str:
    """A one-paragraph summary over all cells."""
    if not effect or not cells:
        return ""
    ds = [c for c in cells if effect in c.diffs]
    better = sum(1 for c in ds if c.diffs[effect].ci95 and c.diffs[effect].ci95[1] < 0)
    worse = sum(1 for c in ds if c.diffs[effect].ci95 and c.diffs[effect].ci95[0] > 0)
    rel = [100 * c.diffs[effect].mean / c.baseline_mean[effect] for c in ds]
    no_ci = sum(1 for c in ds if c.diffs[effect].ci95 is None)
    text = (f"**Reading.** Over {len(ds)} cells the paired {effect} − {baseline} difference ranges from "
            f"{min(rel):+.1f} % to {max(rel):+.1f} % (mean {sum(rel) / len(rel):+.1f} %); ")
    text += ("with one training seed there is no interval: run the full study for one." if no_ci == len(ds) else
             f"its 95 % interval lies below 0 ({effect} better) in {better} cells, above 0 in {worse}, and "
             f"includes 0 in {len(ds) - better - worse - no_ci}.")
    noises = [c.noise for c in cells if c.noise is not None]
    if noises:
        big = sum(1 for c in ds if c.noise is not None and abs(c.diffs[effect].mean) > 2 * noise_sd(c.noise))
        text += (f" The metric's own draw-to-draw std (|a−b|/√2, two independent sample draws of one model) is "
                 f"{min(noises) / math.sqrt(2):.3f}–{max(noises) / math.sqrt(2):.3f}; the mean difference exceeds "
                 f"twice it in {big} of {len(ds)} cells. Unpaired, with this many samples, the effect would be lost "
                 "in that noise; paired (same x_T per image seed), the draw noise largely cancels and the "
                 "interval over training seeds is the test.")
    if control:
        cs = [c for c in ds if control in c.diffs]
        if cs:
            crel = [100 * c.diffs[control].mean / c.baseline_mean[control] for c in cs]
            shares = [c.diffs[control].mean / c.diffs[effect].mean for c in cs if c.diffs[effect].mean != 0]
            text += (f" The ε-scaling control (the baseline's own weights, ε multiplied by the predicted shrink "
                     f"factor) changes FD by {min(crel):+.1f} % to {max(crel):+.1f} % (mean "
                     f"{sum(crel) / len(crel):+.1f} %)")
            text += (f", {100 * min(shares):.0f}–{100 * max(shares):.0f} % of the {effect} difference in the same "
                     "cell." if shares else ".")
    return text


def plot_fd_vs_nfe(rows: Sequence[dict], study, path: Path) -> None:
    """One panel per sampler: each run's mean over seeds vs NFE, ± std as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = cell_statistics(rows, study.baseline)
    samplers = list(dict.fromkeys(c.sampler for c in cells))
    if not samplers:
        return
    fig, axes = plt.subplots(1, len(samplers), figsize=(4 * len(samplers), 3.4), squeeze=False, sharey=True)
    for ax, sampler in zip(axes[0], samplers):
        cs = sorted((c for c in cells if c.sampler == sampler), key=lambda c: c.nfe)
        for run in study.runs:
            pts = [(c.nfe, c.runs[run]) for c in cs if run in c.runs]
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1].mean for p in pts],
                            yerr=[p[1].std or 0.0 for p in pts], marker="o", ms=3, capsize=2, label=run)
        ax.set_xscale("log")
        ax.set_title(sampler)
        ax.set_xlabel("NFE")
    axes[0][0].set_ylabel(cells[0].metric)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
