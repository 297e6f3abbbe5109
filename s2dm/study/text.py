"""How the study's reports print numbers: decimals scoped per metric, signed differences with
their 95 % intervals and percentages, Markdown tables."""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import List, Optional, Sequence

from ..util.textfmt import num
from .stats import CellStats, Summary


# Decimals of every number a report prints, set per metric (``decimals``) by both reports;
# a context variable scopes the setting to the ``with`` block without passing it through every
# formatter (as ``decimal.localcontext`` does), and is safe across threads.
_DECIMALS: contextvars.ContextVar[int] = contextvars.ContextVar("s2dm_report_decimals", default=3)


def fmt(x: Optional[float], digits: Optional[int] = None) -> str:
    return num(x, f".{_DECIMALS.get() if digits is None else digits}f")


def signed(x: Optional[float], digits: Optional[int] = None) -> str:
    return num(x, f"+.{_DECIMALS.get() if digits is None else digits}f")


@contextlib.contextmanager
def decimals(cells: Sequence["CellStats"], baseline: str):
    """Print the numbers of these cells with enough decimals for 3 significant digits of the
    baseline's smallest mean (at least 3: FD-pixels-5k of 0.068 gets 4, FD-cnn of 6.8 gets 3)."""
    means = [c.runs[baseline].mean for c in cells if baseline in c.runs and c.runs[baseline].mean > 0]
    token = _DECIMALS.set(max(3, 2 - math.floor(math.log10(min(means)))) if means else 3)
    try:
        yield
    finally:
        _DECIMALS.reset(token)


def pct(x: float) -> str:
    return num(x, "+.1f") + " %"


def ranges(values: Sequence[float]) -> str:
    """Percentages over cells: "ranges from +1.0 % to +2.0 % (mean +1.4 %)", or "is +0.8 % (in
    every cell)" when the two ends print the same."""
    if not values:
        return "is —"
    lo, hi = pct(min(values)), pct(max(values))
    if lo == hi:
        return f"is {lo}" + (" in every cell" if len(values) > 1 else "")
    return f"ranges from {lo} to {hi} (mean {pct(sum(values) / len(values))})"


def mean_std_text(s: Summary) -> str:
    return fmt(s.mean) if s.std is None else f"{fmt(s.mean)} ± {fmt(s.std)}"


def rel_text(d: Summary, base_mean: float) -> str:
    return pct(100 * d.mean / base_mean) if base_mean else "—"


def diff_text(d: Summary, base_mean: float) -> str:
    """``+0.012 [−0.010, +0.034] (+1.2 %)``: mean paired difference, 95 % interval, relative."""
    ci = d.ci95
    ci_text = f"[{signed(ci[0])}, {signed(ci[1])}]" if ci else "(1 seed: no interval)"
    return f"{signed(d.mean)} {ci_text} ({rel_text(d, base_mean)})"


def ci_text(d: Optional[Summary]) -> str:
    """``+0.012 [+0.003, +0.021]``, ``+0.012 (1 seed)`` or ``—``."""
    if d is None:
        return "—"
    ci = d.ci95
    return f"{signed(d.mean)} [{signed(ci[0])}, {signed(ci[1])}]" if ci else f"{signed(d.mean)} (1 seed)"


def mean_ci_text(s: Optional[Summary]) -> str:
    if s is None:
        return "—"
    ci = s.ci95
    return f"{fmt(s.mean)} [{fmt(ci[0])}, {fmt(ci[1])}]" if ci else f"{fmt(s.mean)} (1 seed)"


def paired_text(d: Optional[Summary], base_mean: Optional[float]) -> str:
    if d is None:
        return "—"
    return diff_text(d, base_mean) if base_mean else ci_text(d)


def table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    """A Markdown table; a ``|`` inside a cell (``|a−b|``) is escaped, or it would split the cell."""
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
    return [line(head), "|" + "---|" * len(head)] + [line(r) for r in rows]
