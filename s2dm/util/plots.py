"""The metric-vs-NFE figure shared by ``s2dm study`` (``fd_vs_nfe.png``) and ``s2dm eval``
(``fid_vs_nfe.png``): one panel per sampler, one line per series (a study run or a checkpoint).

Each series keeps ONE colour, marker and line style in every panel (a per-axes colour cycle
would give the same run different colours in different panels), and the figure has ONE legend
built from all series, so a series absent from the first panel is still named. Series that lie
on top of each other stay visible: distinct markers, dashed lines for controls, and a small
horizontal offset per series in log-NFE.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .fileio import atomic_write

# tab10 without grey (C7), which reads as "disabled" next to the others, then eight darker
# hues of their own (Dark2 without its grey, and black): a 10th series must not take the 1st's
# colour, since a star (a best point) names its series by colour.
COLOURS = ["C0", "C1", "C2", "C3", "C4", "C5", "C6", "C8", "C9",
           "#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "black"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "p"]  # no "*": a star marks a best point
OFFSET_DECADES = 0.008  # horizontal shift between neighbouring series (log10 NFE): ~2 % of x
MAX_SPREAD_DECADES = 0.035  # ... shrunk so that all series together stay within ±4 % of their NFE

# (panel, series) → [(x, y, error bar or None)]
Points = Dict[Tuple[str, str], List[Tuple[float, float, Optional[float]]]]


@dataclass(frozen=True)
class Style:
    colour: str
    marker: str
    linestyle: str
    offset: float  # multiplies x: the series' horizontal shift


def series_styles(names: Sequence[str], dashed: Sequence[str] = ()) -> Dict[str, Style]:
    """name → its style, fixed by the name's position in ``names`` (the study's run order)."""
    mid = (len(names) - 1) / 2
    step = min(OFFSET_DECADES, MAX_SPREAD_DECADES / max(1, len(names) - 1))
    return {name: Style(COLOURS[i % len(COLOURS)], MARKERS[i % len(MARKERS)],
                        "--" if name in dashed else "-", 10 ** (step * (i - mid)))
            for i, name in enumerate(names)}


def plot_vs_nfe(points: Points, panels: Sequence[str], names: Sequence[str], path: Path, *,
                ylabel: str, title: Optional[str] = None, dashed: Sequence[str] = (),
                stars: Optional[Dict[Tuple[str, str], List[Tuple[float, float]]]] = None, star_label: str = ""):
    """Draw the figure, save it as a PNG at ``path`` and return it. ``stars``: (panel, series)
    → points marked with a star in the series' colour (named ``star_label`` in the legend)."""
    from matplotlib.figure import Figure  # optional dependency: only plots need matplotlib
    from matplotlib.lines import Line2D  # optional dependency

    styles = series_styles(names, dashed)
    starred = any(stars.values()) if stars else False
    labels = list(names) + ([star_label or "starred"] if starred else [])
    width = 0.6 + 3.6 * len(panels)
    entry = 0.7 + 0.08 * max(len(n) for n in labels)  # legend entry, inches: line sample + label at 10 pt
    ncol = max(1, min(len(labels), int(width / entry)))
    legend_rows = -(-len(labels) // ncol)
    fig = Figure(figsize=(width, 3.2 + 0.3 * legend_rows), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    for ax, panel in zip(axes, panels):
        for name in names:
            pts = sorted(points.get((panel, name), []))
            if pts:
                _draw(ax, name, styles[name], pts)
            marked = (stars or {}).get((panel, name), [])
            if marked:
                ax.plot([x * styles[name].offset for x, _ in marked], [y for _, y in marked], marker="*", ms=15,
                        color=styles[name].colour, markeredgecolor="black", linestyle="none", zorder=5)
        _nfe_axis(ax, sorted({x for (p, _), pts in points.items() if p == panel for x, _, _ in pts}))
        ax.set_title(panel)
    axes[0].set_ylabel(ylabel)
    if title:
        fig.suptitle(title)
    handles = [Line2D([], [], color=s.colour, marker=s.marker, linestyle=s.linestyle, ms=5, label=n)
               for n, s in styles.items()]
    if starred:
        handles.append(Line2D([], [], color="white", marker="*", ms=12, markeredgecolor="black", linestyle="none",
                              label=labels[-1]))
    fig.legend(handles=handles, loc="outside lower center", ncol=ncol, frameon=False)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    return fig


def _draw(ax, name: str, style: Style, pts) -> None:
    xs = [x * style.offset for x, _, _ in pts]
    ys = [y for _, y, _ in pts]
    ax.plot(xs, ys, color=style.colour, marker=style.marker, linestyle=style.linestyle, ms=5,
            lw=1.3, alpha=0.9, label=name)
    errs = [e for _, _, e in pts]
    if any(e is not None for e in errs):
        ax.errorbar(xs, ys, yerr=[e or 0.0 for e in errs], fmt="none", ecolor=style.colour,
                    elinewidth=1, capsize=2, alpha=0.7)


def _nfe_axis(ax, nfes: List[float]) -> None:
    """Log x with ticks at the NFEs drawn, printed as plain integers; the limits come from the
    NFEs, not the offset points (one NFE would otherwise zoom in on the offsets)."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter  # optional dependency

    ax.set_xscale("log")
    pad = 0.05 * math.log10(max(nfes) / min(nfes)) + 0.05  # decades
    ax.set_xlim(min(nfes) / 10 ** pad, max(nfes) * 10 ** pad)
    ax.set_xticks(nfes)
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("NFE")
    ax.grid(True, which="major", alpha=0.3)
