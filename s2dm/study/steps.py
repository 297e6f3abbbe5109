"""H4 of the v2 study report: does a metric fall as the sampler takes more steps? Per trained
run and sampler, the paired change from one step count to the next; where the ODE samplers
meet; and what the baseline's verdicts say about reading each metric as sample quality."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from ..samplers import ODE_SAMPLERS
from .stats import CellStats, Summary, across, label_of, noise_sd, side
from .text import ci_text, fmt, mean_ci_text, paired_text, table


MEET = ("DDIM (η = 0) and the PNDM and DEIS samplers solve the same probability-flow ODE, so from the same x_T "
        "their samples converge to the same images as the steps grow, and a metric's values with them to one limit: "
        "the model's own distribution as that metric sees it.")


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
    sides = [side(d) for _, _, d in changes]
    if any(s > 0 for s in sides):
        return "does not fall"
    if sides and all(s < 0 for s in sides):
        return "falls"
    return "not resolved"


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
                changes.append((a.steps, b.steps, across(a, b, run)))
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
                                    across(a, b, run)))
    return rows


@dataclass
class StepsAnswer:
    """One metric's H4, computed once for the report's answer, section and reading: every
    trained run × sampler's rows, and where the ODE samplers meet."""
    rows: List[StepsRow]
    meets: List[MeetRow]

    def of(self, run: str) -> List[StepsRow]:
        return [r for r in self.rows if r.run == run]


def steps_answer(cells: Sequence[CellStats], study) -> StepsAnswer:
    return StepsAnswer(h4_rows(cells, study), meet_rows(cells, study))


def h4_answer(h4: StepsAnswer, metric: str, study) -> Optional[str]:
    """The report's H4 answer line for one metric: the baseline's verdict with each sampler
    (None: no sampler was scored at two step counts)."""
    rows = h4.of(study.baseline)
    if not rows:
        return None
    return f"- **H4** ({metric}) {study.baseline}: " + "; ".join(
        f"{r.sampler} at {_path(r)} steps **{r.verdict}**"
        + (f" (1 seed; {_NOISE_WORDS[r.one_seed]})" if r.one_seed else "") for r in rows) + "."


def _path(row: StepsRow) -> str:
    return " → ".join(map(str, row.means))


def _course(row: StepsRow) -> str:
    """``ddim 10 → 20 → 50 steps: 0.134 → 0.108 → 0.103`` (means over seeds)."""
    return f"{row.sampler} {_path(row)} steps: {' → '.join(fmt(m.mean) for m in row.means.values())}"


_NOISE_WORDS = {"falls": "falls by more than twice the baseline's draw noise at every step",
                "rises": "rises by more than twice the baseline's draw noise",
                "within": "within twice the baseline's draw noise"}


def h4_section(h4: StepsAnswer, cells: Sequence[CellStats], metric: str) -> List[str]:
    rs = h4.rows
    if not rs:
        return []
    label = label_of(cells, metric)
    steps = sorted({s for r in rs for s in r.means})
    lines = ["", f"## H4 — does {label} fall as the sampler takes more steps?", "",
             "Each trained run's mean over seeds with its 95 % interval; then the paired change from one step count "
             "to the next (the same model at each seed). Verdict: *falls* when every change's interval lies below "
             "0, *does not fall* when one lies above 0, *not resolved* otherwise (an interval includes 0, or one "
             "seed gives none).", ""]
    changes = sorted({(a, b) for r in rs for a, b, _ in r.changes})
    lines += table(["run", "sampler"] + [f"{s} steps" for s in steps] + [f"{b} − {a}" for a, b in changes] + ["verdict"],
                    [[f"`{r.run}`", r.sampler] + [mean_ci_text(r.means.get(s)) for s in steps]
                     + [ci_text(next((d for a, b, d in r.changes if (a, b) == ab), None)) for ab in changes]
                     + [f"**{r.verdict}**" + (f" (1 seed; {_NOISE_WORDS[r.one_seed]})" if r.one_seed else "")]
                     for r in rs])
    meets = h4.meets
    if meets:
        lines += ["", "Where the samplers meet: " + MEET + " Each run's paired difference at the largest step count "
                  "the samplers share:", ""]
        lines += table(["run", "steps", "sampler", "mean", "sampler", "mean", "difference"],
                        [[f"`{r.run}`", str(r.steps), r.first, fmt(r.means[0]), r.other, fmt(r.means[1]),
                          f"{r.other} − {r.first}: {paired_text(r.diff, r.means[0])}"] for r in meets])
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
                             " and ".join(f"{a} → {b}" for a, b, d in r.changes if side(d) > 0)) for r in rise]
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
            text += (f" At {meet.steps} steps {meet.other} − {meet.first} is {ci_text(meet.diff)}, less than half of "
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


def scale_paragraph(cells: Dict[str, List[CellStats]], h4: Dict[str, StepsAnswer], metrics: List[str],
                    study) -> List[str]:
    """What this scale can and cannot tell, from H4's verdicts for the baseline with every sampler."""
    parts, verdicts, one_seed = [], {}, False  # verdicts: sampler → {metric label: verdict}
    for m in metrics:
        rows = h4[m].of(study.baseline)
        if not rows:
            continue
        label = label_of(cells[m], m)
        for r in rows:
            verdicts.setdefault(r.sampler, {})[label] = r.verdict
        one_seed = one_seed or any(r.one_seed for r in rows)
        parts.append(_metric_reading(label, rows, h4[m].meets) + _other_runs(h4[m].rows, study.baseline))
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
