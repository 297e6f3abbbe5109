"""How s2dm prints numbers and counts: "1 cell", no "-0.000", one value for an empty range."""
from __future__ import annotations

from typing import Optional


def plural(n: int, word: str, many: Optional[str] = None) -> str:
    """``1 cell``, ``2 cells``, ``5,000 samples``."""
    return f"{n:,} {noun(n, word, many)}"


def noun(n: int, word: str, many: Optional[str] = None) -> str:
    return word if n == 1 else (many or word + "s")


def num(x: Optional[float], spec: str = ".3f") -> str:
    """``format(x, spec)``, "—" for None; a value that prints as zero prints without a sign
    (no ``-0.000`` from a tiny negative distance or difference)."""
    if x is None:
        return "—"
    text = format(x + 0.0, spec)
    return text.lstrip("+-") if float(text) == 0 else text


def span(lo: str, hi: str, sep: str = "–") -> str:
    """``lo–hi``, or one value when both ends print the same."""
    return lo if lo == hi else f"{lo}{sep}{hi}"
