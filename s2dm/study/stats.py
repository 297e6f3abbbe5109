"""The statistics of ``s2dm study``: numbers only, no text (``study/text.py`` prints them).

Per cell (sampler, steps) and metric: each run's mean ± sample std over training seeds; each
run's per-seed paired difference against the baseline (run − baseline at the same training
seed) with its mean and a 95 % Student-t interval over seeds; the metric's own noise from two
independent sample draws of one model (|a − b|, and the implied std of one value |a − b|/√2).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence


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


def label_of(cells: Sequence[CellStats], metric: str) -> str:
    """These cells' metric label with its sample count (``FD-pixels-5k``), or ``metric`` when no
    cell was scored."""
    return cells[0].metric if cells else metric


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


def across(a: CellStats, b: CellStats, run: str) -> Summary:
    """One run's value in cell b − in cell a, per training seed both have (the same model)."""
    va, vb = a.by_seed[run], b.by_seed[run]
    return Summary([vb[s] - va[s] for s in sorted(set(va) & set(vb))])


def noise_sd(noise: Optional[float]) -> Optional[float]:
    """The std of one metric value implied by two independent draws a, b: |a − b|/√2."""
    return None if noise is None else noise / math.sqrt(2)


def side(d: Optional[Summary]) -> int:
    """+1 / −1 when the 95 % interval lies above / below 0, else 0 (includes 0, or no interval)."""
    ci = d.ci95 if d is not None else None
    return 0 if ci is None else (1 if ci[0] > 0 else -1 if ci[1] < 0 else 0)


def resolved(d: Summary) -> bool:
    """The 95 % interval excludes 0."""
    return side(d) != 0


def measurable(c: CellStats, run: str) -> bool:
    """The run's paired difference is told apart from zero: its interval excludes 0, or (one
    seed, no interval) it exceeds twice the metric's draw-to-draw std."""
    d = c.diffs[run]
    if d.ci95 is not None:
        return resolved(d)
    sd = noise_sd(c.noise)
    return d.mean != 0 and sd is not None and abs(d.mean) > 2 * sd


def relative_diffs(cells: Sequence[CellStats], run: str) -> List[float]:
    """The run's mean paired difference in % of the baseline mean, per cell (cells whose baseline
    mean is 0 left out)."""
    return [100 * c.diffs[run].mean / c.baseline_mean[run] for c in cells if c.baseline_mean[run]]


def best_run(c: CellStats, candidates: Sequence[str]) -> Optional[str]:
    """The candidate with the lowest mean over seeds in this cell (the first of equals, in the
    order given); None when none was scored in it."""
    there = [r for r in candidates if r in c.runs]
    return min(there, key=lambda r: c.runs[r].mean) if there else None
