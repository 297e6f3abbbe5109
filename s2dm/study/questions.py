"""The v2 report of ``s2dm study`` (a study that declares ``twins``, ``sum_baseline``, a sweep or
``eval.cnn``): the questions H1–H3 answered with the paired intervals of ``stats.py`` for each
metric (FD-pixels, FD-cnn), H4 from ``steps.py``, where the two metrics disagree, and what this
scale can tell. ``study_report`` picks this report or the v1 one of ``report.py``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from ..util.textfmt import num, plural
from .report import every_run_section, heading, fid_section, report_markdown, runs_and_cost_section
from .stats import CellStats, Summary, best_run, cell_statistics, label_of, measurable, metric_family, paired, side
from .steps import StepsAnswer, h4_answer, h4_section, scale_paragraph, steps_answer
from .text import ci_text, decimals, fmt, paired_text, pct, table


H2_BIAS = ("The best scale is picked on the same images and seeds it is then compared on, which flatters it "
           "(the winner's curse): a variant − best-scale difference leans against the variant.")


DISAGREEMENT = ("The two metrics **disagree** about an effect in a cell when the effect's 95 % interval excludes 0 in "
                "both metrics and lies on opposite sides of 0; opposite point estimates where an interval includes 0 "
                "(or one seed gives none) are counted below but are not called a disagreement.")


def study_metrics(rows: Sequence[dict]) -> List[str]:
    """The metric families with main-draw cells, FD-pixels first, then FD-cnn, then the rest
    (FID goes to its own section)."""
    found = list(dict.fromkeys(metric_family(r["metric"]) for r in rows if r["draw"] == "main"))
    order = ["FD-pixels", "FD-cnn"]
    return [m for m in order if m in found] + [m for m in found if m not in order and m != "FID"]


def variants_of(study) -> List[str]:
    """The trained variants: trained runs other than the baseline and the sum baseline."""
    return [r.name for r in study.runs.values() if r.trained and r.name not in (study.baseline, study.sum_baseline)]


def training_free(study) -> List[str]:
    """The baseline and every control that samples its weights with an eps_scale (sweeps, twins)."""
    return [study.baseline] + [r.name for r in study.runs.values()
                               if r.weights_of == study.baseline and r.eps_scale]


def scale_of(study, run: str) -> str:
    return study.runs[run].eps_scale or "none"


@dataclass
class TwinRow:
    """H1 in one cell: variant − baseline, twin − baseline, the share reproduced, variant − twin."""
    cell: CellStats
    variant: Optional[Summary]
    twin: Optional[Summary]
    reproduced: Optional[float]  # % of the variant's difference; None where it is not measurable
    gap: Optional[Summary]  # variant − twin
    base_mean: Optional[float]


def h1_rows(cells: Sequence[CellStats], baseline: str, variant: str, twin: str) -> List[TwinRow]:
    rows = []
    for c in cells:
        dv, dt = paired(c, variant, baseline), paired(c, twin, baseline)
        share = (100 * dt.mean / dv.mean if dv is not None and dt is not None and variant in c.diffs
                 and measurable(c, variant) else None)
        rows.append(TwinRow(c, dv, dt, share, paired(c, variant, twin), c.baseline_mean.get(variant)))
    return rows


@dataclass
class BestRow:
    """H2 in one cell: the best training-free run (by mean over seeds), its scale, its
    difference against the baseline and each trained variant's against it."""
    cell: CellStats
    best: str
    scale: str
    best_mean: float
    best_vs_base: Optional[Summary]
    versus: Dict[str, Optional[Summary]]  # variant → variant − best


def h2_rows(cells: Sequence[CellStats], study) -> List[BestRow]:
    rows, free = [], training_free(study)
    for c in cells:
        best = best_run(c, free)
        if best is None:
            continue
        rows.append(BestRow(c, best, scale_of(study, best), c.runs[best].mean,
                            None if best == study.baseline else paired(c, best, study.baseline),
                            {v: paired(c, v, best) for v in variants_of(study) if v in c.runs}))
    return rows


def effects(cells: Sequence[CellStats], h1: Dict[str, List[TwinRow]], h2: Sequence[BestRow],
            study) -> Dict[tuple, Summary]:
    """Every H1–H3 effect of one metric: (name, sampler, steps) → its paired Summary."""
    found: Dict[tuple, Summary] = {}

    def put(name, c, d):
        if d is not None:
            found[(name, c.sampler, c.steps)] = d

    for variant, twin in study.twins.items():
        for r in h1[variant]:
            put(f"{variant} − {study.baseline}", r.cell, r.variant)
            put(f"{twin} − {study.baseline}", r.cell, r.twin)
            put(f"{variant} − {twin}", r.cell, r.gap)
    for r in h2:
        for v, d in r.versus.items():
            put(f"{v} − best training-free scale", r.cell, d)
    if study.sum_baseline:
        for c in cells:
            put(f"{study.sum_baseline} − {study.baseline}", c, paired(c, study.sum_baseline, study.baseline))
    return found


@dataclass
class MetricRows:
    """One metric's cells and its rows for every question, computed once: the answers, the
    sections and the list of disagreements all read them."""
    metric: str
    cells: List[CellStats]
    h1: Dict[str, List[TwinRow]]  # variant → its rows against its twin
    h2: List[BestRow]
    h4: StepsAnswer
    effects: Dict[tuple, Summary]


def metric_rows(rows: Sequence[dict], metric: str, study) -> MetricRows:
    cells = cell_statistics(rows, study.baseline, metric=metric)
    h1 = {variant: h1_rows(cells, study.baseline, variant, twin) for variant, twin in study.twins.items()}
    h2 = h2_rows(cells, study)
    return MetricRows(metric, cells, h1, h2, steps_answer(cells, study), effects(cells, h1, h2, study))


def disagreements(a: Dict[tuple, Summary], b: Dict[tuple, Summary]) -> tuple:
    """(resolved, opposite, compared): the effects both metrics resolve with opposite signs,
    the count of other effects with opposite point estimates, and how many effects both have."""
    resolved, opposite, common = [], 0, [k for k in a if k in b]
    for k in common:
        sa, sb = side(a[k]), side(b[k])
        if sa and sb and sa != sb:
            resolved.append(k)
        elif a[k].mean * b[k].mean < 0:  # opposite signs, neither mean 0: no cut-off in one metric's units
            opposite += 1
    return resolved, opposite, len(common)


def _metric_words(metric: str, cells: Sequence[CellStats]) -> str:
    label = label_of(cells, metric)
    if metric == "FD-pixels":
        return f"**{label}** (Fréchet distance on raw pixels in [0, 1])"
    if metric == "FD-cnn":
        acc = next((c.accuracy for c in cells if c.accuracy is not None), None)
        acc_text = f", held-out accuracy {100 * acc:.1f} %" if acc is not None else ""
        return (f"**{label}** (Fréchet distance in the penultimate features of s2dm's small CNN classifier of the "
                f"data set{acc_text})")
    return f"**{label}**"


def _cell_name(c: CellStats) -> str:
    return f"{c.sampler} {c.steps}"


def _count_sides(ds: Sequence[Optional[Summary]]) -> str:
    sides = [side(d) for d in ds if d is not None]
    if not sides:
        return "no cell"
    if all(d.ci95 is None for d in ds if d is not None):
        return f"{plural(len(sides), 'cell')}, one seed each: no interval"
    below, above = sides.count(-1), sides.count(1)
    return (f"interval below 0 in {below}, above 0 in {above}, contains 0 in {len(sides) - below - above} of "
            f"{plural(len(sides), 'cell')}")


def _mean_pct(ds: Sequence[tuple]) -> str:
    """Mean over cells of d.mean as % of the baseline mean: ``mean +4.2 %``."""
    pcts = [100 * d.mean / b for d, b in ds if d is not None and b]
    return f"mean {pct(sum(pcts) / len(pcts))}" if pcts else "mean —"


def v2_report(rows: Sequence[dict], study, cost: dict, ema: Dict[str, str], clip: Dict[str, dict]) -> str:
    metrics = study_metrics(rows)
    by_metric = {m: metric_rows(rows, m, study) for m in metrics}
    cells = {m: by_metric[m].cells for m in metrics}
    lines = heading(study, cost, rows)
    words = " and ".join(_metric_words(m, cells[m]) for m in metrics) or "no metric scored yet"
    seeds = sorted({len(r.seeds) for r in study.runs.values()})
    lines += [f"Metrics: {words}; each is scored against the full training set, image seeds 0..n−1 for every "
              "model" + (", both metrics on the same sampled images" if len(metrics) > 1 else "")
              + "; not FID. Lower is better. A difference `a − b` is paired by training seed (same initial "
              "weights, data order and x_T): the mean over seeds, its 95 % Student-t interval in brackets, and "
              f"in % of the baseline's mean. Training seeds per run: {', '.join(map(str, seeds))}.", ""]
    lines += _answers([by_metric[m] for m in metrics], study)
    sections = (lambda q, first: _h1_section(q, study),
                lambda q, first: _h2_section(q, study),
                lambda q, first: _h3_section(q, study, clip, note=first),  # the clip note once
                lambda q, first: h4_section(q.h4, q.cells, q.metric))
    for section in sections:
        for i, m in enumerate(metrics):
            with decimals(cells[m], study.baseline):
                lines += section(by_metric[m], i == 0)
    if len(metrics) > 1:
        lines += _disagreement_section(by_metric[metrics[0]], by_metric[metrics[1]], study)
    lines += scale_paragraph(cells, {m: by_metric[m].h4 for m in metrics}, metrics, study)
    for m in metrics:
        with decimals(cells[m], study.baseline):
            every = every_run_section(cells[m], study)
            every[0] += f" ({label_of(cells[m], m)})"
            lines += [""] + every
            noise = [c for c in cells[m] if c.noise is not None]
            if noise:
                lines += ["", f"Metric noise ({noise[0].noise_run}, seed {study.runs[noise[0].noise_run].seeds[0]}: "
                          "|a − b| of two independent draws of images): "
                          + "; ".join(f"{_cell_name(c)} {fmt(c.noise)}" for c in noise) + "."]
    lines += fid_section(cell_statistics(rows, study.baseline, metric="FID"), study)
    lines += runs_and_cost_section(study, cost, ema)
    return "\n".join(lines)


def _answers(qs: Sequence[MetricRows], study) -> List[str]:
    """The headline: one line per question and metric."""
    lines = ["**Answers** (details in the sections below):", ""]
    base = study.baseline
    for variant, twin in study.twins.items():
        for q in qs:
            m, rs = q.metric, q.h1[variant]
            shares = [r.reproduced for r in rs if r.reproduced is not None]
            share = (f"the twin reproduces {_share_range(shares)} of it in the "
                     f"{plural(len(shares), 'cell')} where it is measurable" if shares
                     else "no share is given (the difference is not measurable in any cell)")
            lines.append(f"- **H1** ({m}) `{variant}` − {base}: {_count_sides([r.variant for r in rs])} "
                         f"({_mean_pct([(r.variant, r.base_mean) for r in rs])}); {share}; `{variant}` − `{twin}`: "
                         f"{_count_sides([r.gap for r in rs])}.")
    free = training_free(study)
    if len(free) > 1:
        for q in qs:
            m, rs = q.metric, q.h2
            best = ", ".join(f"`{scale}` in {n}" for scale, n in _tally(r.scale for r in rs))
            gain = _count_sides([r.best_vs_base for r in rs if r.best != base])
            vs = "; ".join(f"`{v}` − best: {_count_sides([r.versus.get(v) for r in rs])}" for v in variants_of(study))
            lines.append(f"- **H2** ({m}) best training-free scale per cell: {best or '—'} (best − {base} where it is "
                         f"not none: {gain}). {vs}.")
    if study.sum_baseline:
        for q in qs:
            m = q.metric
            ds = [(paired(c, study.sum_baseline, base), c.baseline_mean.get(study.sum_baseline)) for c in q.cells]
            lines.append(f"- **H3** ({m}) `{study.sum_baseline}` − {base}: {_count_sides([d for d, _ in ds])} "
                         f"({_mean_pct(ds)}).")
    if not study.sum_baseline:
        lines.append("- **H3** is not asked: this study has no `sum_baseline`"
                     + (" (the quick preset leaves it out)." if study.quick else "."))
    lines += [a for a in (h4_answer(q.h4, q.metric, study) for q in qs) if a]
    if len(qs) > 1:
        resolved, opposite, compared = disagreements(qs[0].effects, qs[1].effects)
        lines.append(f"- **The metrics disagree** (both intervals exclude 0, opposite signs) about "
                     f"{plural(len(resolved), 'effect')} of {compared}; opposite point estimates otherwise: "
                     f"{opposite}.")
    return lines + [""]


def _share_range(shares: Sequence[float]) -> str:
    """``50 %``, or ``-100 % to 50 %``."""
    lo, hi = num(min(shares), ".0f") + " %", num(max(shares), ".0f") + " %"
    return lo if lo == hi else f"{lo} to {hi}"


def _tally(items) -> List[tuple]:
    counts: Dict[str, int] = {}
    for x in items:
        counts[x] = counts.get(x, 0) + 1
    return list(counts.items())


def _h1_section(q: MetricRows, study) -> List[str]:
    if not study.twins:
        return []
    label = label_of(q.cells, q.metric)
    lines = ["", f"## H1 — does each training-free twin reproduce its variant's difference? ({label})", "",
             "The twin samples the baseline's own weights with ε scaled by the factor that the variant's loss "
             "predicts (docs/method.md §3–§4). *Reproduced* = (twin − baseline) / (variant − baseline) of the means, "
             "given only where the variant's difference is measurable (its interval excludes 0; with one seed, it "
             "exceeds twice the metric's draw-to-draw std). "
             "*variant − twin* is what the training did beyond the scaling.", ""]
    for variant, twin in study.twins.items():
        rs = q.h1[variant]
        lines += [f"`{variant}` and its twin `{twin}` (eps_scale `{scale_of(study, twin)}`):", ""]
        lines += table(["sampler", "steps", f"{variant} − {study.baseline}", f"{twin} − {study.baseline}",
                         "reproduced", f"{variant} − {twin}"],
                        [[r.cell.sampler, str(r.cell.steps), paired_text(r.variant, r.base_mean), paired_text(r.twin, r.base_mean),
                          "—" if r.reproduced is None else num(r.reproduced, ".0f") + " %",
                          paired_text(r.gap, r.base_mean)] for r in rs]) + [""]
    return lines


def _h2_section(q: MetricRows, study) -> List[str]:
    free = training_free(study)
    if len(free) < 2:
        return []
    label = label_of(q.cells, q.metric)
    rs = q.h2
    vs = variants_of(study)
    lines = ["", f"## H2 — the best training-free scale, and does a trained variant beat it? ({label})", "",
             f"Candidates: {study.baseline} itself (scale none) and every control on its weights ("
             + ", ".join(f"`{scale_of(study, r)}`" for r in free[1:]) + "). The best is the lowest mean over "
             f"seeds in the cell; *variant − best* is paired by seed. {H2_BIAS}", ""]
    lines += table(["sampler", "steps", "best scale", "its mean", f"best − {study.baseline}"] + [f"{v} − best" for v in vs],
                    [[r.cell.sampler, str(r.cell.steps), f"`{r.scale}`", fmt(r.best_mean),
                      "0 (the baseline)" if r.best == study.baseline else paired_text(r.best_vs_base, r.cell.runs[study.baseline].mean
                                                                             if study.baseline in r.cell.runs else None)]
                     + [paired_text(r.versus.get(v), r.cell.runs[study.baseline].mean if study.baseline in r.cell.runs else None)
                        for v in vs] for r in rs])
    return lines + [""]


def _h3_section(q: MetricRows, study, clip: Dict[str, dict], note: bool) -> List[str]:
    sb, base = study.sum_baseline, study.baseline
    if not sb:
        return []
    label = label_of(q.cells, q.metric)
    lines = ["", f"## H3 — does the sum-reduction baseline differ from the mean one? ({label})", "",
             f"`{sb}` differs from {base} in " + (", ".join(f"`{k}={v}`" for k, v in study.runs[sb].overrides.items()
                                                        if study.runs[base].overrides.get(k) != v) or "its overrides")
             + "; same seeds, so the difference is paired.", ""]
    lines += table(["sampler", "steps", f"{sb} − {base}"],
                    [[c.sampler, str(c.steps), paired_text(paired(c, sb, base), c.baseline_mean.get(sb))] for c in q.cells])
    if note:  # once, under the first metric
        lines += ["", _clip_note(clip, sb, base)]
    return lines + [""]


def _clip_note(clip: Dict[str, dict], sb: str, base: str) -> str:
    def part(run):
        c = clip.get(run)
        if not c or not c["windows"]:
            return f"`{run}`: no gradient norms logged in this study folder"
        return (f"`{run}` in {c['above']} of {plural(c['windows'], 'logged window')} "
                f"({100 * c['above'] / c['windows']:.0f} %)")
    limit = (clip.get(sb) or clip.get(base) or {}).get("clip")
    return (f"**Gradient clipping.** The training log records each window's mean global gradient norm before "
            f"clipping; it exceeds the clip ({'—' if limit is None else float(limit)}) for {part(sb)}, and for "
            f"{part(base)}. A sum over the pixels makes the loss, and so the gradient, larger by the number of "
            "pixels per image: with a clip of 1.0 the sum baseline is clipped nearly every step, so it trains "
            "with a normalised gradient direction and differs from the mean baseline by more than a constant "
            "factor in the loss.")


def _disagreement_section(a: MetricRows, b: MetricRows, study) -> List[str]:
    ea, eb = a.effects, b.effects
    resolved, opposite, compared = disagreements(ea, eb)
    la, lb = (label_of(q.cells, q.metric) for q in (a, b))
    lines = ["", f"## Where {la} and {lb} disagree", "", DISAGREEMENT, ""]
    if resolved:
        lines += [f"They disagree about {plural(len(resolved), 'effect')} of the {compared} both measure:", ""]
        for name, s, st in resolved:
            with decimals(a.cells, study.baseline):
                first = ci_text(ea[(name, s, st)])
            with decimals(b.cells, study.baseline):
                second = ci_text(eb[(name, s, st)])
            lines.append(f"- {s} {st}, {name}: {la} {first}, {lb} {second}")
    else:
        lines.append(f"No effect of the {compared} both measure is resolved with opposite signs.")
    lines += ["", f"Opposite point estimates without a resolved disagreement: {opposite} of {compared}."
              + (" A metric with a *does not fall* or *not resolved* H4 verdict may rank runs by something other "
                 "than sample quality; where the two disagree, the one whose H4 verdict is *falls* is the one to read."
                 if resolved or opposite else "")]
    return lines + [""]


def study_report(rows: Sequence[dict], study, cost: dict, ema: Optional[Dict[str, str]] = None,
                 clip: Optional[Dict[str, dict]] = None) -> str:
    """report.md: the v2 report for a v2 study (``study.v2``), else ``report.report_markdown``;
    ``clip``: ``runner.grad_clip_windows`` (H3's note)."""
    if getattr(study, "v2", False):
        return v2_report(rows, study, cost, ema or {}, clip or {})
    return report_markdown(rows, study, cost, ema=ema)
