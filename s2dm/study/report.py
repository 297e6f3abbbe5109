"""The v1 report of ``s2dm study`` (see ``study/runner.py``), its table and plot: the effect
and the ε-scaling control per cell against the metric's noise, with the paired statistics of
``study/stats.py``; and ``results.csv``, which every study writes.

A study that declares ``twins``, ``sum_baseline``, a sweep or ``eval.cnn`` (``Study.v2``) gets
the v2 report instead (``study/questions.py``), which reuses this module's sections.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from .._version import __version__
from ..samplers import takes_order
from ..util.fileio import csv_text as to_csv
from ..util.plots import plot_vs_nfe
from ..util.textfmt import noun, num, plural, span
from .spec import MOSAIC_SEEDS, path_name
from .stats import CellStats, Summary, best_run, cell_statistics, label_of, measurable, noise_sd, relative_diffs
from .text import decimals, diff_text, fmt, mean_std_text, ranges, rel_text, signed, table


CSV_COLUMNS = ["run", "seed", "sampler", "steps", "nfe", "draw", "metric", "value", "n", "image_seeds",
               "eps_scale", "checkpoint_step", "seconds"]
# Columns added later, after every earlier one (classifier_accuracy too): readers by position keep working.
LATER_COLUMNS = ["grid", "eta", "checkpoint", "ref", "order"]  # order: DEIS's, empty for the others


def rows_from_records(records: Sequence[dict]) -> List[dict]:
    """Cell records → ``CSV_COLUMNS`` rows (and an FD-cnn record's ``classifier_accuracy``), in
    the records' order."""
    rows = []
    for r in records:
        s = r["settings"]
        rows.append({"run": r["run"], "seed": r["seed"], "sampler": r["sampler"], "steps": r["steps"],
                     "nfe": r["nfe"], "draw": r["draw"], "metric": r["metric"], "value": r["value"],
                     "n": s["n"], "image_seeds": s["image_seeds"], "eps_scale": s["eps_scale"] or "",
                     "checkpoint_step": s["checkpoint_step"], "seconds": round(r["seconds"], 2),
                     "grid": s.get("grid", ""), "eta": s.get("eta", ""), "checkpoint": s.get("checkpoint", ""),
                     "ref": s.get("ref", ""), "order": s.get("order", "") if takes_order(r["sampler"]) else ""})
        if r.get("classifier_accuracy") is not None:
            rows[-1]["classifier_accuracy"] = r["classifier_accuracy"]
    return rows


def csv_text(rows: Sequence[dict]) -> str:
    """``CSV_COLUMNS``, ``classifier_accuracy`` when a row has FD-cnn (empty in the others), then
    ``LATER_COLUMNS``: the grid, η, checkpoint, reference and DEIS order of each number."""
    extra = ["classifier_accuracy"] if any(r.get("classifier_accuracy") is not None for r in rows) else []
    return to_csv([{**r, "value": num(r["value"], ".6f")} for r in rows], CSV_COLUMNS + extra + LATER_COLUMNS)


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
        return f"Metric draw-to-draw std ≈ {fmt(sd)}." if sd is not None else ""
    d = c.diffs[main]
    parts = [f"{main} − {baseline} = {signed(d.mean)} ({rel_text(d, c.baseline_mean[main])}); "
             f"{_verdict(main, baseline, d)}."]
    if sd is not None:
        size = "exceeds" if abs(d.mean) > 2 * sd else "does not exceed"
        parts.append(f"The mean difference {size} twice the metric's own draw-to-draw std ({fmt(sd)}); "
                     "the paired runs share x_T, so most of that draw noise cancels in the difference.")
    if main == effect and control in c.diffs:
        cd = c.diffs[control]
        share = (num(100 * cd.mean / d.mean, ".0f") + f" % of the {effect} difference" if measurable(c, effect)
                 else f"no share is given: the {effect} difference is within the metric's noise")
        parts.append(f"The ε-scaling control moves the baseline by {signed(cd.mean)}; {share}.")
    return " ".join(parts)


def control_of(study) -> Optional[str]:
    """The ε-scaling control: a run sampling the baseline's weights with an eps_scale."""
    return next((r.name for r in study.runs.values() if r.weights_of == study.baseline and r.eps_scale), None)


def report_markdown(rows: Sequence[dict], study, cost: dict, ema: Optional[Dict[str, str]] = None) -> str:
    """The whole report.md; its first section is the headline the CLI prints. A v2 study
    (``study.v2``) gets ``questions.v2_report`` instead (``questions.study_report`` chooses);
    ``clip`` is that report's."""
    cells = cell_statistics(rows, study.baseline)
    with decimals(cells, study.baseline):  # FD-pixels-5k of ~0.05 needs 4 decimals for its differences
        tables = _headline(cells, study) + every_run_section(cells, study)
        readings = ["", "## Reading, cell by cell", ""] + [
            f"- **{c.sampler}, {c.steps} steps (NFE {c.nfe})**: "
            f"{reading(c, study.baseline, study.effect, control_of(study))}" for c in cells]
    lines = heading(study, cost, rows) + tables + fid_section(cell_statistics(rows, study.baseline, metric="FID"), study)
    return "\n".join(lines + readings + runs_and_cost_section(study, cost, ema or {}))


def _deis_order_text(rows: Sequence[dict]) -> str:
    """The DEIS cells' order (``eval.order``), where the study has DEIS cells."""
    orders = sorted({str(r["order"]) for r in rows if r.get("order", "") != ""})  # empty but for DEIS
    return f"; DEIS takes order {' or '.join(orders)}" if orders else ""


def heading(study, cost: dict, rows: Sequence[dict] = ()) -> List[str]:
    """The report's title, the timestep grid and η every cell sampled with, and a warning when
    not every planned cell was scored with the study's current settings."""
    lines = [f"# Study: {Path(study.path).name}{' (quick preset)' if study.quick else ''}", ""]
    grids = sorted({(str(r["grid"]), f"{float(r['eta']):g}") for r in rows if r.get("grid", "") != ""})
    if grids:
        ddpm = any(r["sampler"] == "ddpm" for r in rows)  # its posterior steps are DDIM's with η = 1, whatever η says
        lines += ["Every cell samples on the " + " or the ".join(f"`{g}` timestep grid with η = {e}" for g, e in grids)
                  + " (η: DDIM's" + ("; DDPM's ancestral steps take η = 1" if ddpm else "")
                  + "; PNDM and DEIS are deterministic)" + _deis_order_text(rows) + ".", ""]
    planned, scored = cost.get("cells_planned"), cost.get("cells_scored")
    stale, earlier = cost.get("cells_stale", 0), cost.get("cells_earlier", 0)
    if planned and scored is not None and scored < planned:
        verb = "was" if stale == 1 else "were"
        left_out = (f" {plural(stale, 'record')} on disk {verb} made with other settings (another model, n, "
                    f"reference, ...) and {verb} left out." if stale else "")
        lines += [f"**Incomplete: {scored} of {plural(planned, 'cell')} scored.**{left_out} Run the same "
                  "`s2dm study` command again to finish; nothing done is redone.", ""]
    if earlier:
        lines += [f"{earlier} of the {plural(scored, 'record')} used {'was' if earlier == 1 else 'were'} made by an "
                  "earlier s2dm, which recorded neither the checkpoint's stamp, the reference's hash, the grid nor η: "
                  "they are used because everything they record matches and neither the checkpoint nor the reference "
                  "was written after them.", ""]
    return lines


def run_cell(c: CellStats, study, run: str) -> str:
    """A run's mean ± std in a cell, with its number of seeds where a partial study has fewer
    than the run's (the table's heading gives the run's)."""
    if run not in c.runs:
        return "—"
    s, planned = c.runs[run], len(study.runs[run].seeds)
    return mean_std_text(s) if s.n == planned else f"{mean_std_text(s)} ({plural(s.n, 'seed')} of {planned})"


def diff_cell(c: CellStats, run: str) -> str:
    return diff_text(c.diffs[run], c.baseline_mean[run]) if run in c.diffs else "—"


def _headline(cells: Sequence[CellStats], study) -> List[str]:
    """The metric, the table of the effect and the control per cell, the overall reading. A
    study without ``effect:`` has no effect column (and its reading is the control's)."""
    base, effect, control = study.baseline, study.effect, control_of(study)
    metric = label_of(cells, "FD-pixels")
    lines = [f"Metric: **{metric}** (Fréchet distance on raw pixels in [0, 1] of {plural(study.n, 'sample')} "
             "per cell, image seeds 0..n−1 for every model, against the full training set; not FID). "
             f"Lower is better. Paired differences are run − {base} at the same training seed, "
             "mean over seeds with a 95 % Student-t interval.", ""]
    compared = [r for r in (effect, control) if r]
    head = ["sampler", "steps", "NFE", base] + [f"{r} − {base}" for r in compared] + ["metric noise |a−b|"]
    rows = [[c.sampler, str(c.steps), str(c.nfe), run_cell(c, study, base)]
            + [diff_cell(c, r) for r in compared] + [fmt(c.noise)] for c in cells]
    return lines + table(head, rows) + ["", overall_reading(cells, base, effect, control), ""]


def every_run_section(cells: Sequence[CellStats], study) -> List[str]:
    runs, base = list(study.runs), study.baseline
    others = [r for r in runs if r != base]
    lines = ["## Every run, every cell", "",
             "mean ± std over training seeds (number of seeds in brackets); then the paired difference against "
             f"{base}.", ""]
    lines += table(["sampler", "steps", "NFE"] + [f"{r} ({len(study.runs[r].seeds)})" for r in runs],
                    [[c.sampler, str(c.steps), str(c.nfe)] + [run_cell(c, study, r) for r in runs] for c in cells])
    lines += [""] + table(["sampler", "steps"] + [f"{r} − {base}" for r in others],
                           [[c.sampler, str(c.steps)] + [diff_cell(c, r) for r in others] for c in cells])
    return lines


def fid_section(fid_cells: Sequence[CellStats], study) -> List[str]:
    if not fid_cells:
        return ["", "Inception FID: not computed (`eval.fid.n` is 0 in this study; on a CPU the "
                "Inception network scores about 11 images/s)."]
    runs, base = list(study.runs), study.baseline
    others = [r for r in runs if r != base]
    head = ["sampler", "steps", "NFE", "metric"] + runs + [f"{r} − {base}" for r in others]
    rows = [[c.sampler, str(c.steps), str(c.nfe), c.metric]
            + [run_cell(c, study, r) for r in runs]
            + [diff_cell(c, r) for r in others] for c in fid_cells]
    return ["", "## Inception FID", ""] + table(head, rows)


def runs_and_cost_section(study, cost: dict, ema: Dict[str, str]) -> List[str]:
    lines = ["", "## Runs", ""]
    for r in study.runs.values():
        what = (f"weights of `{r.weights_of}`, sampled with eps_scale `{r.eps_scale}`"
                + (f" (sweep `{r.sweep}`)" if getattr(r, "sweep", None) else "") if not r.trained
                else ", ".join(f"`{k}={v}`" for k, v in r.overrides.items()) or "the base config")
        lines.append(f"- `{r.name}` (training {noun(len(r.seeds), 'seed')} {', '.join(map(str, r.seeds))}): {what}")
    common = ", ".join(f"`{k}={v}`" for k, v in study.overrides.items())
    renamed = [r for r in study.runs if path_name(r) != r]
    lines += ["", f"Every run: `{Path(study.train_config).name}`" + (f" with {common}" if common else "")
              + f". Mosaics: `mosaics/<run>.png` (DDIM, {study.mosaic_steps} steps, image seeds "
                f"{MOSAIC_SEEDS.start}–{MOSAIC_SEEDS.stop - 1}, first training seed)"
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
    text += f"Over {plural(len(ds), 'cell')} the paired {main} − {baseline} difference {ranges(relative_diffs(ds, main))}; "
    text += _interval_counts(ds, main)
    sds = [noise_sd(c.noise) for c in cells if c.noise is not None]
    if sds:
        big = sum(1 for c in ds if c.noise is not None and abs(c.diffs[main].mean) > 2 * noise_sd(c.noise))
        text += (f" The metric's own draw-to-draw std (|a−b|/√2, two independent sample draws of one model) is "
                 f"{span(fmt(min(sds)), fmt(max(sds)))}; the mean difference exceeds "
                 f"twice it in {big} of {plural(len(ds), 'cell')}. Unpaired, with this many samples, the difference "
                 "would be lost in that noise; paired (same x_T per image seed), the draw noise largely cancels and "
                 "the interval over training seeds is the test.")
    cs = [c for c in ds if control in c.diffs] if effect and control else []
    if cs:
        shared = [c for c in cs if measurable(c, effect)]
        shares = [100 * c.diffs[control].mean / c.diffs[effect].mean for c in shared]
        text += (f" The change the ε-scaling control makes (the baseline's own weights, ε multiplied by the "
                 f"predicted shrink factor) {ranges(relative_diffs(cs, control))}")
        if shares:
            text += (f", {span(num(min(shares), '.0f'), num(max(shares), '.0f'))} % of the {effect} difference in "
                     f"the same cell ({plural(len(shared), 'cell')} where that difference is measurable).")
        else:
            text += (f"; its share of the {effect} difference is not given: that difference is within the "
                     "metric's noise in every cell, and a ratio of noise means nothing.")
    return text


def _interval_counts(ds: Sequence[CellStats], run: str) -> str:
    cis = [c.diffs[run].ci95 for c in ds]
    if all(ci is None for ci in cis):
        return "with one training seed there is no interval: run the full study for one."
    better = sum(1 for ci in cis if ci and ci[1] < 0)
    worse = sum(1 for ci in cis if ci and ci[0] > 0)
    unresolved = sum(1 for ci in cis if ci and ci[0] <= 0 <= ci[1])
    return (f"its 95 % interval lies below 0 ({run} better) in {plural(better, 'cell')}, above 0 in {worse}, "
            f"and includes 0 in {unresolved}.")


def plot_fd_vs_nfe(rows: Sequence[dict], study, path: Path, metric: str = "FD-pixels",
                   best_of: Sequence[str] = ()):
    """One panel per sampler: each run's mean over seeds vs NFE, ± std as error bars; one
    colour and marker per run in every panel, controls dashed; with two or more ``best_of``
    runs (the training-free scales of a v2 study), the best of them in each cell starred.
    Returns the figure (None: no cells, and no file at ``path``)."""
    cells = cell_statistics(rows, study.baseline, metric=metric)
    if not cells:
        Path(path).unlink(missing_ok=True)  # a plot of another study's cells would outlive them
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
