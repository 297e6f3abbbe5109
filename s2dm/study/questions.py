"""The v2 report of ``s2dm study`` (a study that declares ``twins``, ``sum_baseline``, a sweep or
``eval.cnn``): the questions H1–H4 answered with the paired intervals of ``report.py`` for each
metric (FD-pixels, FD-cnn), where the two metrics disagree, and what this scale can tell.
``study_report`` picks this report or the v1 one of ``report.py``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..samplers import ODE_SAMPLERS
from ..util.textfmt import num, plural
from .report import (CellStats, Summary, _decimals, best_run, _every_run, _f, _fid_section, _measurable, _pct,
                     _runs_and_cost, _signed, _table, cell_statistics, diff_text, metric_family, noise_sd, paired,
                     report_markdown)

H2_BIAS = ("The best scale is picked on the same images and seeds it is then compared on, which flatters it "
           "(the winner's curse): a variant − best-scale difference leans against the variant.")
MEET = ("DDIM (η = 0) and the PNDM and DEIS samplers solve the same probability-flow ODE, so from the same x_T "
        "their samples converge to the same images as the steps grow, and a metric's values with them to one limit: "
        "the model's own distribution as that metric sees it.")
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


def _ci(d: Optional[Summary]) -> str:
    """``+0.012 [+0.003, +0.021]``, ``+0.012 (1 seed)`` or ``—``."""
    if d is None:
        return "—"
    ci = d.ci95
    return f"{_signed(d.mean)} [{_signed(ci[0])}, {_signed(ci[1])}]" if ci else f"{_signed(d.mean)} (1 seed)"


def _mean_ci(s: Optional[Summary]) -> str:
    if s is None:
        return "—"
    ci = s.ci95
    return f"{_f(s.mean)} [{_f(ci[0])}, {_f(ci[1])}]" if ci else f"{_f(s.mean)} (1 seed)"


def _side(d: Optional[Summary]) -> int:
    """+1 / −1 when the 95 % interval lies above / below 0, else 0 (includes 0, or no interval)."""
    ci = d.ci95 if d is not None else None
    return 0 if ci is None else (1 if ci[0] > 0 else -1 if ci[1] < 0 else 0)


def _dtext(d: Optional[Summary], base_mean: Optional[float]) -> str:
    if d is None:
        return "—"
    return diff_text(d, base_mean) if base_mean else _ci(d)


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
                 and _measurable(c, variant) else None)
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


@dataclass
class StepsRow:
    """H4 for one run and sampler: the mean at each step count, the paired change from each
    step count to the next (same model, same training seed), and the verdict."""
    run: str
    sampler: str
    means: Dict[int, Summary]
    changes: List[tuple]  # (steps a, steps b, Summary of value(b) − value(a) over seeds)
    verdict: str
    one_seed: Optional[str] = None  # one seed: "falls" / "rises" / "within" the metric's draw noise


def _against_noise(changes: Sequence[tuple], sds: Sequence[Optional[float]]) -> Optional[str]:
    """With one training seed (no interval): ``falls`` when every change is below −2 × the
    metric's draw-to-draw std, ``rises`` when one is above +2 ×, else ``within``; None without
    a noise draw or with more seeds."""
    if any(d.ci95 is not None for _, _, d in changes) or any(sd is None for sd in sds):
        return None
    if any(d.mean > 2 * sd for (_, _, d), sd in zip(changes, sds)):
        return "rises"
    if all(d.mean < -2 * sd for (_, _, d), sd in zip(changes, sds)):
        return "falls"
    return "within"


def steps_verdict(changes: Sequence[tuple]) -> str:
    """``falls``: every step-up's paired change has its 95 % interval below 0; ``does not
    fall``: some step-up's interval lies above 0; ``not resolved``: neither (an interval
    includes 0, one seed gives none, or one step count)."""
    sides = [_side(d) for _, _, d in changes]
    if any(s > 0 for s in sides):
        return "does not fall"
    if sides and all(s < 0 for s in sides):
        return "falls"
    return "not resolved"


def _across(a: CellStats, b: CellStats, run: str) -> Summary:
    """One run's value in cell b − in cell a, per training seed both have (the same model)."""
    va, vb = a.by_seed[run], b.by_seed[run]
    return Summary([vb[s] - va[s] for s in sorted(set(va) & set(vb))])


def h4_rows(cells: Sequence[CellStats], study) -> List[StepsRow]:
    """Every trained run × sampler with at least two step counts."""
    rows = []
    for run in [r.name for r in study.runs.values() if r.trained]:
        for sampler in dict.fromkeys(c.sampler for c in cells):
            mine = sorted((c for c in cells if c.sampler == sampler and run in c.runs), key=lambda c: c.steps)
            if len(mine) < 2:
                continue
            changes, sds = [], []
            for a, b in zip(mine, mine[1:]):
                changes.append((a.steps, b.steps, _across(a, b, run)))
                pair = [noise_sd(a.noise), noise_sd(b.noise)]
                sds.append(None if None in pair else max(pair))
            rows.append(StepsRow(run, sampler, {c.steps: c.runs[run] for c in mine}, changes, steps_verdict(changes),
                                 _against_noise(changes, sds)))
    return rows


@dataclass
class MeetRow:
    """Where two ODE samplers meet: one run's paired difference (other − first, per training
    seed) at the largest step count both were scored at. Both solve the same probability-flow
    ODE from the same x_T, so the difference shrinks towards 0 as the steps grow."""
    run: str
    steps: int
    first: str
    other: str
    means: tuple  # (first's mean, other's mean) over seeds
    diff: Summary


def meet_rows(cells: Sequence[CellStats], study) -> List[MeetRow]:
    """Every trained run × (first ODE sampler, each other ODE sampler) with a step count in common."""
    samplers = [s for s in dict.fromkeys(c.sampler for c in cells) if s in ODE_SAMPLERS]
    rows = []
    for run in [r.name for r in study.runs.values() if r.trained]:
        at = {(c.sampler, c.steps): c for c in cells if run in c.by_seed}
        for other in samplers[1:]:
            shared = [k for s, k in at if s == samplers[0] and (other, k) in at]
            if shared:
                a, b = at[(samplers[0], max(shared))], at[(other, max(shared))]
                rows.append(MeetRow(run, max(shared), samplers[0], other, (a.runs[run].mean, b.runs[run].mean),
                                    _across(a, b, run)))
    return rows


def effects(cells: Sequence[CellStats], study) -> Dict[tuple, Summary]:
    """Every H1–H3 effect of one metric: (name, sampler, steps) → its paired Summary."""
    found: Dict[tuple, Summary] = {}

    def put(name, c, d):
        if d is not None:
            found[(name, c.sampler, c.steps)] = d

    for variant, twin in study.twins.items():
        for r in h1_rows(cells, study.baseline, variant, twin):
            put(f"{variant} − {study.baseline}", r.cell, r.variant)
            put(f"{twin} − {study.baseline}", r.cell, r.twin)
            put(f"{variant} − {twin}", r.cell, r.gap)
    for r in h2_rows(cells, study):
        for v, d in r.versus.items():
            put(f"{v} − best training-free scale", r.cell, d)
    if study.sum_baseline:
        for c in cells:
            put(f"{study.sum_baseline} − {study.baseline}", c, paired(c, study.sum_baseline, study.baseline))
    return found


def disagreements(a: Dict[tuple, Summary], b: Dict[tuple, Summary]) -> tuple:
    """(resolved, opposite, compared): the effects both metrics resolve with opposite signs,
    the count of other effects with opposite point estimates, and how many effects both have."""
    resolved, opposite, common = [], 0, [k for k in a if k in b]
    for k in common:
        sa, sb = _side(a[k]), _side(b[k])
        if sa and sb and sa != sb:
            resolved.append(k)
        elif a[k].mean * b[k].mean < 0 and round(a[k].mean, 3) and round(b[k].mean, 3):
            opposite += 1
    return resolved, opposite, len(common)


def _metric_words(metric: str, cells: Sequence[CellStats]) -> str:
    label = cells[0].metric if cells else metric
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
    sides = [_side(d) for d in ds if d is not None]
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
    return f"mean {_pct(sum(pcts) / len(pcts))}" if pcts else "mean —"


def v2_report(rows: Sequence[dict], study, cost: dict, out: Path, ema: Dict[str, str],
              clip: Dict[str, dict]) -> str:
    metrics = study_metrics(rows)
    cells = {m: cell_statistics(rows, study.baseline, metric=m) for m in metrics}
    lines = [f"# Study: {Path(study.path).name}{' (quick preset)' if study.quick else ''}", ""]
    planned, scored = cost.get("cells_planned"), cost.get("cells_scored")
    if planned and scored is not None and scored < planned:
        lines += [f"**Incomplete: {scored} of {plural(planned, 'cell')} scored.** Run the same `s2dm study` "
                  "command again to finish; nothing done is redone.", ""]
    words = " and ".join(_metric_words(m, cells[m]) for m in metrics) or "no metric scored yet"
    seeds = sorted({len(r.seeds) for r in study.runs.values()})
    lines += [f"Metrics: {words}; each is scored against the full training set, image seeds 0..n−1 for every "
              "model" + (", both metrics on the same sampled images" if len(metrics) > 1 else "")
              + "; not FID. Lower is better. A difference `a − b` is paired by training seed (same initial "
              "weights, data order and x_T): the mean over seeds, its 95 % Student-t interval in brackets, and "
              f"in % of the baseline's mean. Training seeds per run: {', '.join(map(str, seeds))}.", ""]
    lines += _answers(cells, metrics, study, clip)
    for section in (_h1_section, _h2_section, _h3_section, _h4_section):
        for i, m in enumerate(metrics):
            with _decimals(cells[m], study.baseline):
                lines += (section(cells[m], m, study, clip, note=i == 0) if section is _h3_section
                          else section(cells[m], m, study))
    if len(metrics) > 1:
        lines += _disagreement_section(cells, metrics, study)
    lines += _scale_paragraph(cells, metrics, study)
    for m in metrics:
        with _decimals(cells[m], study.baseline):
            every = _every_run(cells[m], study)
            every[0] += f" ({cells[m][0].metric if cells[m] else m})"
            lines += [""] + every
            noise = [c for c in cells[m] if c.noise is not None]
            if noise:
                lines += ["", f"Metric noise ({noise[0].noise_run}, seed {study.runs[noise[0].noise_run].seeds[0]}: "
                          "|a − b| of two independent draws of images): "
                          + "; ".join(f"{_cell_name(c)} {_f(c.noise)}" for c in noise) + "."]
    lines += _fid_section(cell_statistics(rows, study.baseline, metric="FID"), study)
    lines += _runs_and_cost(study, cost, ema)
    return "\n".join(lines)


def _answers(cells: Dict[str, List[CellStats]], metrics: List[str], study, clip: Dict[str, dict]) -> List[str]:
    """The headline: one line per question and metric."""
    lines = ["**Answers** (details in the sections below):", ""]
    base = study.baseline
    for variant, twin in study.twins.items():
        for m in metrics:
            rs = h1_rows(cells[m], base, variant, twin)
            shares = [r.reproduced for r in rs if r.reproduced is not None]
            share = (f"the twin reproduces {_share_range(shares)} of it in the "
                     f"{plural(len(shares), 'cell')} where it is measurable" if shares
                     else "no share is given (the difference is not measurable in any cell)")
            lines.append(f"- **H1** ({m}) `{variant}` − {base}: {_count_sides([r.variant for r in rs])} "
                         f"({_mean_pct([(r.variant, r.base_mean) for r in rs])}); {share}; `{variant}` − `{twin}`: "
                         f"{_count_sides([r.gap for r in rs])}.")
    free = training_free(study)
    if len(free) > 1:
        for m in metrics:
            rs = h2_rows(cells[m], study)
            best = ", ".join(f"`{scale}` in {n}" for scale, n in _tally(r.scale for r in rs))
            gain = _count_sides([r.best_vs_base for r in rs if r.best != base])
            vs = "; ".join(f"`{v}` − best: {_count_sides([r.versus.get(v) for r in rs])}" for v in variants_of(study))
            lines.append(f"- **H2** ({m}) best training-free scale per cell: {best or '—'} (best − {base} where it is "
                         f"not none: {gain}). {vs}.")
    if study.sum_baseline:
        for m in metrics:
            ds = [(paired(c, study.sum_baseline, base), c.baseline_mean.get(study.sum_baseline)) for c in cells[m]]
            lines.append(f"- **H3** ({m}) `{study.sum_baseline}` − {base}: {_count_sides([d for d, _ in ds])} "
                         f"({_mean_pct(ds)}).")
    if not study.sum_baseline:
        lines.append("- **H3** is not asked: this study has no `sum_baseline`"
                     + (" (the quick preset leaves it out)." if study.quick else "."))
    for m in metrics:
        rows = _baseline_h4(cells[m], study)
        if rows:
            lines.append(f"- **H4** ({m}) {base}: " + "; ".join(
                f"{r.sampler} at {_path(r)} steps **{r.verdict}**"
                + (f" (1 seed; {_NOISE_WORDS[r.one_seed]})" if r.one_seed else "") for r in rows) + ".")
    if len(metrics) > 1:
        resolved, opposite, compared = disagreements(*(effects(cells[m], study) for m in metrics[:2]))
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


def _baseline_h4(cells: Sequence[CellStats], study) -> List[StepsRow]:
    """The baseline's H4 rows, one per sampler."""
    return [r for r in h4_rows(cells, study) if r.run == study.baseline]


def _path(row: StepsRow) -> str:
    return " → ".join(map(str, row.means))


def _course(row: StepsRow) -> str:
    """``ddim 10 → 20 → 50 steps: 0.134 → 0.108 → 0.103`` (means over seeds)."""
    return f"{row.sampler} {_path(row)} steps: {' → '.join(_f(m.mean) for m in row.means.values())}"


def _h1_section(cells: Sequence[CellStats], metric: str, study) -> List[str]:
    if not study.twins:
        return []
    label = cells[0].metric if cells else metric
    lines = ["", f"## H1 — does each training-free twin reproduce its variant's difference? ({label})", "",
             "The twin samples the baseline's own weights with ε scaled by the factor that the variant's loss "
             "predicts (docs/method.md §3–§4). *Reproduced* = (twin − baseline) / (variant − baseline) of the means, "
             "given only where the variant's difference is measurable (its interval excludes 0; with one seed, it "
             "exceeds twice the metric's draw-to-draw std). "
             "*variant − twin* is what the training did beyond the scaling.", ""]
    for variant, twin in study.twins.items():
        rs = h1_rows(cells, study.baseline, variant, twin)
        lines += [f"`{variant}` and its twin `{twin}` (eps_scale `{scale_of(study, twin)}`):", ""]
        lines += _table(["sampler", "steps", f"{variant} − {study.baseline}", f"{twin} − {study.baseline}",
                         "reproduced", f"{variant} − {twin}"],
                        [[r.cell.sampler, str(r.cell.steps), _dtext(r.variant, r.base_mean), _dtext(r.twin, r.base_mean),
                          "—" if r.reproduced is None else num(r.reproduced, ".0f") + " %",
                          _dtext(r.gap, r.base_mean)] for r in rs]) + [""]
    return lines


def _h2_section(cells: Sequence[CellStats], metric: str, study) -> List[str]:
    free = training_free(study)
    if len(free) < 2:
        return []
    label = cells[0].metric if cells else metric
    rs = h2_rows(cells, study)
    vs = variants_of(study)
    lines = ["", f"## H2 — the best training-free scale, and does a trained variant beat it? ({label})", "",
             f"Candidates: {study.baseline} itself (scale none) and every control on its weights ("
             + ", ".join(f"`{scale_of(study, r)}`" for r in free[1:]) + "). The best is the lowest mean over "
             f"seeds in the cell; *variant − best* is paired by seed. {H2_BIAS}", ""]
    lines += _table(["sampler", "steps", "best scale", "its mean", f"best − {study.baseline}"] + [f"{v} − best" for v in vs],
                    [[r.cell.sampler, str(r.cell.steps), f"`{r.scale}`", _f(r.best_mean),
                      "0 (the baseline)" if r.best == study.baseline else _dtext(r.best_vs_base, r.cell.runs[study.baseline].mean
                                                                             if study.baseline in r.cell.runs else None)]
                     + [_dtext(r.versus.get(v), r.cell.runs[study.baseline].mean if study.baseline in r.cell.runs else None)
                        for v in vs] for r in rs])
    return lines + [""]


def _h3_section(cells: Sequence[CellStats], metric: str, study, clip: Dict[str, dict], note: bool) -> List[str]:
    sb, base = study.sum_baseline, study.baseline
    if not sb:
        return []
    label = cells[0].metric if cells else metric
    lines = ["", f"## H3 — does the sum-reduction baseline differ from the mean one? ({label})", "",
             f"`{sb}` differs from {base} in " + (", ".join(f"`{k}={v}`" for k, v in study.runs[sb].overrides.items()
                                                        if study.runs[base].overrides.get(k) != v) or "its overrides")
             + "; same seeds, so the difference is paired.", ""]
    lines += _table(["sampler", "steps", f"{sb} − {base}"],
                    [[c.sampler, str(c.steps), _dtext(paired(c, sb, base), c.baseline_mean.get(sb))] for c in cells])
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


_NOISE_WORDS = {"falls": "falls by more than twice the baseline's draw noise at every step",
                "rises": "rises by more than twice the baseline's draw noise",
                "within": "within twice the baseline's draw noise"}


def _h4_section(cells: Sequence[CellStats], metric: str, study) -> List[str]:
    rs = h4_rows(cells, study)
    if not rs:
        return []
    label = cells[0].metric if cells else metric
    steps = sorted({s for r in rs for s in r.means})
    lines = ["", f"## H4 — does {label} fall as the sampler takes more steps?", "",
             "Each trained run's mean over seeds with its 95 % interval; then the paired change from one step count "
             "to the next (the same model at each seed). Verdict: *falls* when every change's interval lies below "
             "0, *does not fall* when one lies above 0, *not resolved* otherwise (an interval includes 0, or one "
             "seed gives none).", ""]
    changes = sorted({(a, b) for r in rs for a, b, _ in r.changes})
    lines += _table(["run", "sampler"] + [f"{s} steps" for s in steps] + [f"{b} − {a}" for a, b in changes] + ["verdict"],
                    [[f"`{r.run}`", r.sampler] + [_mean_ci(r.means.get(s)) for s in steps]
                     + [_ci(next((d for a, b, d in r.changes if (a, b) == ab), None)) for ab in changes]
                     + [f"**{r.verdict}**" + (f" (1 seed; {_NOISE_WORDS[r.one_seed]})" if r.one_seed else "")]
                     for r in rs])
    meets = meet_rows(cells, study)
    if meets:
        lines += ["", "Where the samplers meet: " + MEET + " Each run's paired difference at the largest step count "
                  "the samplers share:", ""]
        lines += _table(["run", "steps", "sampler", "mean", "sampler", "mean", "difference"],
                        [[f"`{r.run}`", str(r.steps), r.first, _f(r.means[0]), r.other, _f(r.means[1]),
                          f"{r.other} − {r.first}: {_dtext(r.diff, r.means[0])}"] for r in meets])
    return lines + [""]


def _disagreement_section(cells: Dict[str, List[CellStats]], metrics: List[str], study) -> List[str]:
    a, b = metrics[:2]
    ea, eb = effects(cells[a], study), effects(cells[b], study)
    resolved, opposite, compared = disagreements(ea, eb)
    la, lb = (cells[m][0].metric if cells[m] else m for m in (a, b))
    lines = ["", f"## Where {la} and {lb} disagree", "", DISAGREEMENT, ""]
    if resolved:
        lines += [f"They disagree about {plural(len(resolved), 'effect')} of the {compared} both measure:", ""]
        for name, s, st in resolved:
            with _decimals(cells[a], study.baseline):
                first = _ci(ea[(name, s, st)])
            with _decimals(cells[b], study.baseline):
                second = _ci(eb[(name, s, st)])
            lines.append(f"- {s} {st}, {name}: {la} {first}, {lb} {second}")
    else:
        lines.append(f"No effect of the {compared} both measure is resolved with opposite signs.")
    lines += ["", f"Opposite point estimates without a resolved disagreement: {opposite} of {compared}."
              + (" A metric with a *does not fall* or *not resolved* H4 verdict may rank runs by something other "
                 "than sample quality; where the two disagree, the one whose H4 verdict is *falls* is the one to read."
                 if resolved or opposite else "")]
    return lines + [""]


_ONE_SEED_HINT = {"falls": "for this one model it falls by more than twice its draw-to-draw std at every step, a hint "
                           "that it sees what more steps improve",
                  "rises": "for this one model it rises by more than twice its draw-to-draw std, a hint that it does "
                           "not see what more steps improve",
                  "within": "for this one model its changes stay within twice its draw-to-draw std"}


def _names(rows: Sequence[StepsRow]) -> str:
    return " and ".join(r.sampler for r in rows)


def _takes(rows: Sequence[StepsRow]) -> str:
    return f"{_names(rows)} {'takes' if len(rows) == 1 else 'take'} more steps"


def _metric_reading(label: str, rows: Sequence[StepsRow], meets: Sequence[MeetRow]) -> str:
    """One metric's H4 verdicts for the baseline with every sampler, and what they allow."""
    fall = [r for r in rows if r.verdict == "falls"]
    rise = [r for r in rows if r.verdict == "does not fall"]
    seed1 = [r for r in rows if r.verdict == "not resolved" and r.one_seed]
    unres = [r for r in rows if r.verdict == "not resolved" and not r.one_seed]
    said = []
    if fall:
        said.append(f"falls as {_takes(fall)} ({'; '.join(_course(r) for r in fall)}; every change resolved)")
    if rise:
        ups = ["{}{}".format(f"{r.sampler} " if len(rise) > 1 else "",
                             " and ".join(f"{a} → {b}" for a, b, d in r.changes if _side(d) > 0)) for r in rise]
        said.append(f"rises as {_takes(rise)} ({'; '.join(_course(r) for r in rise)}; resolved at {', '.join(ups)})")
    if unres:
        said.append(f"is not resolved as {_takes(unres)} ({'; '.join(_course(r) for r in unres)})")
    said += [f"has no interval with one training seed for {r.sampler} ({_path(r)}): {_ONE_SEED_HINT[r.one_seed]}"
             for r in seed1]
    text = f"{label} " + "; ".join(said) + "."
    if fall and len(fall) == len(rows):
        text += (" It sees what more sampling steps improve, so its differences between runs can be read as "
                 "differences in sample quality, to the precision of their intervals.")
    elif fall:
        others = [r for r in rows if r not in fall]
        text += (f" It sees what more {_names(fall)} steps improve, so its differences between runs in the "
                 f"{_names(fall)} cells can be read as sample quality; in the {_names(others)} cells that is not shown"
                 + (f", and where {_names(rise)} converges it rises: there a lower value is not evidence of better "
                    "samples, and its differences are differences in that statistic only" if rise else "") + ".")
    elif rise:
        text += (f" With the baseline it does not see what more sampling steps improve, so a run being better or "
                 f"worse in {label} is not evidence of better or worse samples; its differences are differences in "
                 "that statistic only.")
    elif unres:
        text += (f" This study cannot show that {label} measures sample quality at this scale, so its differences "
                 "between runs are not read as quality.")
    for r in rise:
        meet = next((m for m in meets if r.sampler in (m.first, m.other)), None)
        steps = sorted(r.means)
        climb = r.means[steps[-1]].mean - r.means[steps[0]].mean
        if meet is not None and climb > 0 and abs(meet.diff.mean) < climb / 2:
            text += (f" At {meet.steps} steps {meet.other} − {meet.first} is {_ci(meet.diff)}, less than half of "
                     f"{r.sampler}'s rise: the two samplers approach one limit, the ODE's solution (the model's own "
                     f"distribution), and {label} scores both above {r.sampler}'s {steps[0]}-step samples. So "
                     f"{r.sampler}'s few-step error moves its samples away from the model's distribution in a direction "
                     f"{label} rewards.")
    return text


def _other_runs(all_rows: Sequence[StepsRow], baseline: str) -> str:
    """The other trained runs whose H4 verdict with a sampler differs from the baseline's
    (``all_rows``: one metric's ``h4_rows``)."""
    base = {r.sampler: r.verdict for r in all_rows if r.run == baseline}
    differ: Dict[str, List[StepsRow]] = {}
    for r in all_rows:
        if r.run != baseline and r.sampler in base and r.verdict != base[r.sampler]:
            differ.setdefault(r.run, []).append(r)
    return "".join(f" For `{run}` it answers otherwise: " + "; ".join(f"{r.verdict} with {_course(r)}" for r in rs)
                   + "." for run, rs in differ.items())


def _scale_paragraph(cells: Dict[str, List[CellStats]], metrics: List[str], study) -> List[str]:
    """What this scale can and cannot tell, from H4's verdicts for the baseline with every sampler."""
    parts, verdicts, one_seed = [], {}, False  # verdicts: sampler → {metric label: verdict}
    for m in metrics:
        all_rows = h4_rows(cells[m], study)  # once per metric: the baseline's rows and the others'
        rows = [r for r in all_rows if r.run == study.baseline]
        if not rows:
            continue
        label = cells[m][0].metric
        for r in rows:
            verdicts.setdefault(r.sampler, {})[label] = r.verdict
        one_seed = one_seed or any(r.one_seed for r in rows)
        parts.append(_metric_reading(label, rows, meet_rows(cells[m], study)) + _other_runs(all_rows, study.baseline))
    if not parts:
        return []
    if one_seed:
        parts.append("Only the seeds of the full study can settle whether differences between runs read as sample "
                     "quality.")
    for sampler, by in verdicts.items():
        if len(set(by.values())) > 1:
            falls = [label for label, v in by.items() if v == "falls"]
            parts.append(f"With {sampler} the metrics answer H4 differently ("
                         + ", ".join(f"{label}: {v}" for label, v in by.items()) + ")"
                         + (f"; read H1–H3's {sampler} cells in {' and '.join(falls)}." if falls else "."))
    if not any(v == "falls" for by in verdicts.values() for v in by.values()) and not study.quick:
        parts.append("No metric is shown to track sample quality here: the study can say whether the runs differ, "
                     "and whether an ε-scaling reproduces a loss's difference (H1), but not whether any of it makes "
                     "better digits.")
    return ["", "## What this scale can and cannot tell", "", " ".join(parts), ""]


def study_report(rows: Sequence[dict], study, cost: dict, out: Path, ema: Optional[Dict[str, str]] = None,
                 clip: Optional[Dict[str, dict]] = None) -> str:
    """report.md: the v2 report for a v2 study (``study.v2``), else ``report.report_markdown``;
    ``clip``: ``runner.grad_clip_windows`` (H3's note)."""
    if getattr(study, "v2", False):
        return v2_report(rows, study, cost, out, ema or {}, clip or {})
    return report_markdown(rows, study, cost, out, ema=ema)
