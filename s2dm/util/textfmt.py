"""How s2dm prints numbers, counts and text: "1 cell", no "-0.000", one value for an empty range,
a first sentence."""
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


def first_sentence(text: str) -> str:
    """``text`` up to the end of its first sentence (a ``.``, ``?`` or ``!`` before a space or
    the end, outside parentheses), whitespace collapsed; all of it if no sentence ends."""
    text = " ".join(text.split())
    depth = 0
    for i, ch in enumerate(text):
        depth += (ch == "(") - (ch == ")")
        if ch in ".?!" and depth <= 0 and (i + 1 == len(text) or text[i + 1] == " "):
            return text[:i + 1]
    return text
