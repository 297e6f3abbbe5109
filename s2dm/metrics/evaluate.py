"""``s2dm eval``: FID (or FD-pixels) of checkpoints x samplers x step counts, resumable.

Every (checkpoint, sampler, steps) cell samples seeds ``offset .. offset+n-1`` into
``OUT/samples/<label>/<sampler>-<steps>/`` with ``sample_to_folder`` (the same seeds, hence the
same initial noise, in every cell: a paired design), scores them against reference statistics
(``s2dm fid ref``) and records the cell in ``OUT/cells/<label>/<sampler>-<steps>.json``. A cell
whose record matches the requested settings is not recomputed; delete its json to redo it.
After every cell ``results.csv`` is rewritten; at the end ``results.md`` (a paper-style table
with the relative change of each checkpoint against the first) and ``fid_vs_nfe.png``.

Under torchrun every rank runs every cell: the seeds are split across ranks for sampling
(``sample_to_folder``) and the images for feature extraction (``FeatureExtractor``), the
statistics are summed across ranks in float64, and rank 0 alone decides which cells are
done and writes records, tables and the plot — the numbers equal one process's.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import numbers
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from tqdm.auto import tqdm

from ..core.ema import describe_ema
from ..core.schedule import NoiseSchedule
from ..errors import CheckpointError, MetricError, SamplerError
from ..io.checkpoint import checkpoint_stamp, pick_weights, read_checkpoint, resolve_checkpoint
from ..io.config import config_from_saved
from ..samplers import check_sampler, eps_scale_label, parse_eps_scale_list, takes_order
from ..samplers.options import SampleOptions
from ..sampling.folder import sample_to_folder
from ..util import dist
from ..util.fileio import atomic_write, atomic_write_text, csv_text, sha256_file
from ..util.folderlock import FolderLock
from ..util.listargs import listed
from ..util.plots import COLOURS, MARKERS, plot_vs_nfe
from ..util.records import reusable_record
from ..util.textfmt import num
from .features import FeatureExtractor
from .fid import Stats, extractor_for, frechet_distance, metric_label, parse_kind

CSV_COLUMNS = ["checkpoint", "label", "checkpoint_step", "sampler", "grid", "steps", "nfe", "eta",
               "order", "eps_scale", "legacy_pndm_index", "best_scale", "n", "seeds", "metric", "value", "features", "ref", "ref_n",
               "weights_sha256", "weights"]


# ---------------------------------------------------------------- small helpers

def parse_list(text: str, what: str, cast=str) -> list:
    """``"ddim,pndm"`` → ["ddim", "pndm"]; duplicates and empty items are errors."""
    items = [s.strip() for s in str(text).split(",")]
    if not items or any(s == "" for s in items):
        raise SamplerError(f"{what} {text!r}: expected a comma-separated list, e.g. "
                           f"{'10,20' if cast is int else 'ddim,deis'}", key=what)
    try:
        values = [cast(s) for s in items]
    except ValueError:
        raise SamplerError(f"{what} {text!r}: {', '.join(items)} are not all integers", key=what) from None
    if len(set(values)) != len(values):
        raise SamplerError(f"{what} {text!r} repeats an item", key=what)
    return values


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", name).strip("_") or "ckpt"


def checkpoint_labels(paths: Sequence[str]) -> List[str]:
    """One label per checkpoint argument: a run folder's name, else the file's stem, with its
    run folder's name in front when the checkpoints come from several runs or two stems
    collide; then a number if labels still collide."""
    resolved = [resolve_checkpoint(p).resolve() for p in paths]
    for i, r in enumerate(resolved):
        if r in resolved[:i]:
            raise CheckpointError(f"checkpoint {r} is given twice (as {paths[resolved.index(r)]} and {paths[i]})",
                                  key="ckpt")
    labels, prefixed, runs = [], [], set()
    for p in paths:
        p = Path(p)
        if p.is_dir():
            run = p.resolve().parent if p.resolve().name == "checkpoints" else p.resolve()
            labels.append(_safe(run.name))
            prefixed.append(_safe(run.name))
        else:
            parent = p.resolve().parent
            run = parent.parent if parent.name == "checkpoints" else parent
            labels.append(_safe(p.stem))
            prefixed.append(_safe(f"{run.name}-{p.stem}"))
        runs.add(run)
    # Checkpoints of several runs: every file is named with its run (ckpt_00000100 alone would
    # not say whose it is); of one run, its file names tell them apart.
    several = len(runs) > 1
    out: List[str] = []
    for i, label in enumerate(labels):
        if several or labels.count(label) > 1:
            label = prefixed[i]
        base, k = label, 2
        while label in out:
            label, k = f"{base}-{k}", k + 1
        out.append(label)
    return out


def _fmt(value: Optional[float]) -> str:
    return num(value, ".4f")


# ---------------------------------------------------------------- the evaluation

def evaluate(ckpts: Sequence[str], *, samplers: Sequence[str], steps: Sequence[int], n: int, ref: str,
             out: str, features: Optional[str] = None, options: Optional[SampleOptions] = None,
             use_ema: bool = True, batch_size: int = 256, fid_batch_size: int = 50, num_workers: int = 0,
             device: str = "auto", seeds_offset: int = 0, keep_samples: bool = True,
             inception_weights: Optional[str] = None, allow_download: bool = False,
             progress: bool = True, eps_scales: Optional[Sequence] = None) -> List[dict]:
    """Run (or resume) the grid of cells; returns one row (dict, ``CSV_COLUMNS``) per cell.
    ``options``: every cell's sampler options but its sampler and steps (those come from
    ``samplers`` x ``steps``); default ``SampleOptions()``. ``eps_scales``: a sweep, every
    ε-scale (None for none, any form of ``--eps-scale``) in every cell, from the same x_T; the
    rows then mark each cell's best scale (``best_scale``). Default: ``options.eps_scale``."""
    ckpts, samplers, steps = listed(ckpts), listed(samplers), listed(steps)
    options = SampleOptions() if options is None else SampleOptions.of(options)
    scales = _scales(options.eps_scale if eps_scales is None else eps_scales, eps_scales is not None)
    _check_grid(ckpts, samplers, steps, n, seeds_offset)
    ref_path, ref_stats = _reference(ref, features)
    inception = parse_kind(ref_stats.features)[0] == "inception"
    extractor = extractor_for(ref_stats, device=device, batch_size=fid_batch_size, num_workers=num_workers,
                              weights=inception_weights if inception else None, allow_download=allow_download,
                              progress=progress)
    files = [resolve_checkpoint(c).resolve() for c in ckpts]
    weights = _check_checkpoints(files, ref_stats, ref, options, samplers, steps, scales, use_ema)
    seeds = list(range(seeds_offset, seeds_offset + n))
    run = _Eval(Path(out), options, seeds, ref_path, ref_stats, sha256_file(ref_path), extractor,
                use_ema, batch_size, device, keep_samples, progress)
    labels = checkpoint_labels(ckpts)
    cells = [(f, label, s, k, e) for f, label in zip(files, labels) for s in samplers for k in steps for e in scales]
    with FolderLock(run.out, "s2dm eval") as lock:
        dist.run0(lock.take)
        return _run_cells(run, cells, labels, samplers, steps, scales, weights, progress)


def _run_cells(run: "_Eval", cells: list, labels: list, samplers: list, steps: list, scales: list, weights: dict,
               progress: bool) -> List[dict]:
    """Every cell (its record reused, or sampled and scored), then the tables and plots."""
    rows: Dict[tuple, dict] = {}
    with tqdm(total=len(cells), desc="eval cells", unit="cell", dynamic_ncols=True,
              disable=not (progress and dist.is_main())) as bar:
        for f, label, sampler, k, scale in cells:
            cell_options = dataclasses.replace(run.options, sampler=sampler, steps=k, eps_scale=scale)
            rows[(label, sampler, k, scale)] = run.cell(f, label, cell_options, weights[f])["row"]
            if dist.is_main():
                atomic_write_text(run.out / "results.csv", csv_text(mark_best_scales(list(rows.values()), len(scales)),
                                                                     CSV_COLUMNS))
            bar.update(1)
    ordered = mark_best_scales([rows[(label, *c)] for label in labels
                                for c in itertools.product(samplers, steps, scales)], len(scales))

    def finish():
        atomic_write_text(run.out / "results.md", results_markdown(ordered, labels, samplers, steps))
        plot_fid_vs_nfe(ordered, run.out / "fid_vs_nfe.png")
        if len(scales) > 1:
            plot_eps_sweep(ordered, run.out / "eps_sweep.png")

    dist.run0(finish)  # the other ranks return once the files exist
    return ordered


def _scales(given, sweep: bool) -> list:
    """The canonical labels of the ε-scales to score (None: no scaling)."""
    if not sweep:
        return [eps_scale_label(given)]
    if isinstance(given, str):
        return parse_eps_scale_list(given)
    labels = [eps_scale_label(g) for g in given]
    if not labels or len(set(labels)) != len(labels):
        raise SamplerError(f"eps_scales: expected a list of distinct ε-scales, got {list(given)!r}", key="eps_scale")
    return labels


def mark_best_scales(rows: List[dict], n_scales: int) -> List[dict]:
    """``best_scale``: true on the row with the lowest value among the scales of its cell
    (checkpoint, sampler, steps) — the first of equal ones —, false on the others; "" when
    nothing was swept or the cell is not complete yet."""
    cells: Dict[tuple, List[dict]] = {}
    for r in rows:
        cells.setdefault((r["label"], r["sampler"], int(r["steps"])), []).append(r)
    for group in cells.values():
        best = min(group, key=lambda r: r["value"]) if n_scales > 1 and len(group) == n_scales else None
        for r in group:
            r["best_scale"] = "" if best is None else r is best
    return rows


def _check_grid(ckpts, samplers, steps, n: int, seeds_offset: int) -> None:
    if not ckpts:
        raise CheckpointError("ckpt: give at least one checkpoint", key="ckpt")
    for s in samplers:
        check_sampler(s, key="samplers")
    for s in steps:
        if isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1:
            raise SamplerError(f"steps must be positive integers, got {s!r}", key="steps")
    if n < 2:
        raise MetricError(f"n must be at least 2 (a covariance needs 2 images), not {n}", key="n")
    if seeds_offset < 0:
        raise SamplerError(f"seeds_offset must be >= 0, not {seeds_offset}", key="seeds_offset")


def _reference(ref: str, features: Optional[str]):
    """The reference statistics file and its statistics, of the asked-for feature kind."""
    ref_path = Path(ref)
    if ref_path.is_dir() or ref_path.suffix != ".npz":
        raise MetricError(f"ref must be a .npz statistics file (make one with `s2dm fid ref`), not {ref}", key="ref")
    ref_stats = Stats.load(ref_path)
    kind, _ = parse_kind(ref_stats.features)
    if features is not None and features != kind:
        raise MetricError(f"features {features} but {ref} holds {ref_stats.features} statistics "
                          f"({ref_stats.metric}); make a reference of {features} features with `s2dm fid ref`",
                          key="features")
    return ref_path, ref_stats


def _check_checkpoints(files, ref_stats, ref, options: SampleOptions, samplers, steps, scales, use_ema: bool) -> dict:
    """Every checkpoint fits the reference and every cell's options are valid, before the first
    cell is sampled; returns each checkpoint's weights in words (reports state the EMA setting)."""
    configs = {}
    for f in files:  # one state dict at a time: a CIFAR10 checkpoint is half a GiB
        state = read_checkpoint(f)
        pick_weights(state, use_ema, f, "score")  # before any progress bar or folder
        configs[f] = config_from_saved(state["config"])
    for f, c in configs.items():
        shape = (c.data.channels, c.data.image_size, c.data.image_size)
        if ref_stats.features == "pixels" and ref_stats.shape and tuple(shape) != tuple(ref_stats.shape):
            raise MetricError(f"{f} makes {'x'.join(map(str, shape))} images but {ref} holds pixel "
                              f"statistics of {'x'.join(map(str, ref_stats.shape))} images", key="ref")
        schedule = NoiseSchedule.from_config(c.diffusion)
        for sampler, k, scale in itertools.product(samplers, steps, scales):
            dataclasses.replace(options, sampler=sampler, steps=k, eps_scale=scale).validate(schedule, quiet=True)
    return {f: describe_ema(c.train.ema_decay, c.train.ema_warmup) if use_ema else "raw weights (no EMA)"
            for f, c in configs.items()}


@dataclass
class _Eval:
    """What every cell of one ``evaluate`` call shares."""

    out: Path
    options: SampleOptions
    seeds: List[int]
    ref_path: Path
    ref_stats: Stats
    ref_sha: str
    extractor: FeatureExtractor
    use_ema: bool
    batch_size: int
    device: str
    keep_samples: bool
    progress: bool = True

    def key(self, f: Path, o: SampleOptions) -> dict:
        """What defines a cell's value: a record with another key is redone."""
        key = {"checkpoint": str(f), "checkpoint_stamp": checkpoint_stamp(f), "sampler": o.sampler, "steps": o.steps,
               "grid": o.grid, "eta": o.eta, "order": o.order, "eps_scale": o.eps_scale, "ema": self.use_ema,
               "n": len(self.seeds), "seeds": self.seeds_text, "ref": str(self.ref_path.resolve()),
               "ref_sha256": self.ref_sha, "features": self.ref_stats.features}
        if o.legacy_pndm_index:  # only when set: records made before the option still match
            key["legacy_pndm_index"] = True
        return key

    @property
    def seeds_text(self) -> str:
        return f"{self.seeds[0]}-{self.seeds[-1]}"

    def cell(self, f: Path, label: str, o: SampleOptions, weights: str) -> dict:
        """The cell's record (``o``: its sampler options, ``eps_scale`` a canonical label):
        reused when its key matches, else sampled, scored and written."""
        key = self.key(f, o)
        name = o.folder_name(self.use_ema)  # as s2dm sample names it: another η, grid or order is another cell
        path = self.out / "cells" / label / f"{name}.json"
        record = dist.run0(lambda: reusable_record(path, "key", key))  # every rank: the same choice
        if record is not None:
            return record
        self.extractor.load()  # Inception weights: fail before sampling, not after
        folder = self.out / "samples" / label / name
        meta = sample_to_folder(str(f), str(folder), o, seeds=self.seeds, use_ema=self.use_ema,
                                batch_size=self.batch_size, device=self.device, replace_stale=True,
                                progress=self.progress)
        pngs = [folder / f"{s:06d}.png" for s in self.seeds]
        stats = self.extractor.stats_of_files(pngs, str(folder))
        value = dist.run0(lambda: frechet_distance(stats, self.ref_stats))
        n = len(self.seeds)
        row = {"checkpoint": str(f), "label": label, "checkpoint_step": meta["settings"]["checkpoint_step"],
               "sampler": o.sampler, "grid": o.grid, "steps": o.steps, "nfe": meta["nfe"],
               "eta": "" if meta["eta"] is None else meta["eta"],  # the steps' η: 1 for DDPM, none for PNDM, DEIS
               "order": o.order if takes_order(o.sampler) else "", "eps_scale": o.eps_scale or "",
               "legacy_pndm_index": o.legacy_pndm_index,
               "n": n, "seeds": self.seeds_text, "metric": metric_label(self.ref_stats.metric, n), "value": value,
               "features": self.ref_stats.features, "ref": str(self.ref_path), "ref_n": self.ref_stats.n,
               "weights_sha256": stats.weights_sha256 or "", "weights": weights}
        record = {"key": key, "row": row}
        if dist.is_main():
            atomic_write_text(path, json.dumps(record, indent=2))
            if not self.keep_samples:
                for p in pngs:
                    p.unlink(missing_ok=True)
        return record


def results_markdown(rows: List[dict], labels: Sequence[str], samplers: Sequence[str],
                     steps: Sequence[int]) -> str:
    """Rows sampler x steps (with NFE), one column per checkpoint, then the relative change
    (%) of each further checkpoint against the first: 100 (x - first) / first. An ε-scale
    sweep gets one table per checkpoint instead, one column per scale (``sweep_markdown``)."""
    scales = list(dict.fromkeys(r["eps_scale"] for r in rows))
    if len(scales) > 1:
        return sweep_markdown(rows, labels, samplers, steps, scales)
    by = {(r["label"], r["sampler"], int(r["steps"])): r for r in rows}
    lines = _header(rows, labels, "Δ = relative change against the first checkpoint" if len(labels) > 1 else "")
    head = ["sampler", "steps", "NFE"] + [f"{lab}" for lab in labels] + [f"Δ {lab} (%)" for lab in labels[1:]]
    lines += _table_head(head)
    for s in samplers:
        for k in steps:
            cells = [by.get((lab, s, int(k))) for lab in labels]
            vals = [c["value"] if c else None for c in cells]
            nfe = next((c["nfe"] for c in cells if c), "—")
            rel = [_relative(v, vals[0]) for v in vals[1:]]
            lines.append("| " + " | ".join([s, str(k), str(nfe)] + [_fmt(v) for v in vals] + rel) + " |")
    return "\n".join(lines) + "\n"


def sweep_markdown(rows: List[dict], labels: Sequence[str], samplers: Sequence[str], steps: Sequence[int],
                   scales: Sequence[str]) -> str:
    """One table per checkpoint: rows sampler x steps, one column per ε-scale (the same x_T in
    each), the cell's best scale in bold with ★, and the best's change against the first scale."""
    by = {(r["label"], r["sampler"], int(r["steps"]), r["eps_scale"]): r for r in rows}
    names = [s or "none" for s in scales]
    lines = _header(rows, labels, f"★ = the best ε-scale of the cell; Δ = the best against {names[0]}")
    for lab in labels:
        lines += ["", f"## `{lab}`", ""]
        lines += _table_head(["sampler", "steps", "NFE", *names, "best", f"Δ best vs {names[0]} (%)"])
        for s in samplers:
            for k in steps:
                cells = [by.get((lab, s, int(k), e)) for e in scales]
                best = next((c for c in cells if c and c["best_scale"] is True), None)
                vals = [("**" + _fmt(c["value"]) + "** ★" if c is best else _fmt(c["value"])) if c else "—"
                        for c in cells]
                nfe = next((c["nfe"] for c in cells if c), "—")
                first = cells[0]["value"] if cells[0] else None
                tail = [best["eps_scale"] or "none", _relative(best["value"], first)] if best else ["—", "—"]
                lines.append("| " + " | ".join([s, str(k), str(nfe), *vals, *tail]) + " |")
    return "\n".join(lines) + "\n"


def _ref_n_text(n) -> str:
    """The reference's N, or that its statistics do not record one (a plain pytorch-fid file)."""
    return "N unknown" if n in (None, "") else f"N = {n}"


def _header(rows: List[dict], labels: Sequence[str], legend: str) -> List[str]:
    """The title, what was measured and the checkpoints (from the first row of each)."""
    first, metric = rows[0], rows[0]["metric"]
    firsts = {r["label"]: r for r in reversed(rows)}
    scales = {r["eps_scale"] for r in rows}
    return [
        f"# {metric} by sampler and steps" + (" and ε-scale" if len(scales) > 1 else ""),
        "",
        f"{metric}: {first['features']} features, n = {first['n']} samples per cell (seeds "
        f"{first['seeds']}, the same in every cell), reference `{first['ref']}` ({_ref_n_text(first['ref_n'])}); "
        f"grid {first['grid']}"
        + (f", DDIM η = {next(r['eta'] for r in rows if r['sampler'] == 'ddim')}"
           if any(r["sampler"] == "ddim" for r in rows) else "")
        + (", DDPM's ancestral steps (η = 1)" if any(r["sampler"] == "ddpm" for r in rows) else "")
        + (f", DEIS order {next(r['order'] for r in rows if r['order'] != '')}" if any(r["order"] != "" for r in rows) else "")
        + (f", ε-scale {first['eps_scale']}" if first["eps_scale"] and len(scales) == 1 else "")
        + (", PNDM's legacy index (t paired with ᾱ[t+1])" if any(r.get("legacy_pndm_index") for r in rows) else "")
        + ". Lower is better" + (f"; {legend}." if legend else "."),
        "",
        "Checkpoints: " + "; ".join(
            f"`{lab}` = {firsts[lab]['checkpoint']} (step {firsts[lab]['checkpoint_step']}, "
            f"{firsts[lab].get('weights') or 'EMA setting not recorded'})" for lab in labels),
        "",
    ]


def _table_head(head: List[str]) -> List[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (len(head) - 3)]


def _relative(value: Optional[float], reference: Optional[float]) -> str:
    """100 (value − reference) / reference, or — when either is missing or the reference is 0."""
    if value is None or reference is None or reference == 0:
        return "—"
    return num(100.0 * (value - reference) / reference, "+.2f")


def plot_fid_vs_nfe(rows: List[dict], path: Path):
    """Metric against NFE (log x): one panel per sampler, one line per checkpoint (and
    ε-scale, in a sweep) in the same colour and marker in every panel, one legend
    (``plots.plot_vs_nfe``). Returns the figure."""
    sweep = len({r["eps_scale"] for r in rows}) > 1

    def series(r: dict) -> str:  # the checkpoint, and its ε-scale when scales were swept
        return f"{r['label']} {r['eps_scale'] or 'none'}" if sweep else r["label"]

    points: dict = {}
    for r in rows:
        points.setdefault((r["sampler"], series(r)), []).append((int(r["nfe"]), float(r["value"]), None))
    first = rows[0]
    return plot_vs_nfe(points, list(dict.fromkeys(r["sampler"] for r in rows)),
                       list(dict.fromkeys(series(r) for r in rows)), path, ylabel=first["metric"],
                       title=f"{first['metric']} vs NFE (n = {first['n']}, grid {first['grid']})")


def plot_eps_sweep(rows: List[dict], path: Path):
    """Metric against ε-scale (in the order given): one panel per sampler, one line per
    (checkpoint, steps), each cell's best scale starred. Saved as a PNG; returns the figure."""
    from matplotlib.figure import Figure  # optional dependency: only plots need matplotlib

    samplers = list(dict.fromkeys(r["sampler"] for r in rows))
    scales = list(dict.fromkeys(r["eps_scale"] for r in rows))
    series = list(dict.fromkeys((r["label"], int(r["steps"])) for r in rows))
    fig = Figure(figsize=(0.6 + 4.2 * len(samplers), 3.6 + 0.25 * len(series)), layout="constrained")
    axes = fig.subplots(1, len(samplers), squeeze=False, sharey=True)[0]
    for ax, sampler in zip(axes, samplers):
        for i, (label, k) in enumerate(series):
            cell = {r["eps_scale"]: r for r in rows if (r["sampler"], r["label"], int(r["steps"])) == (sampler, label, k)}
            xs = [j for j, e in enumerate(scales) if e in cell]
            ys = [cell[scales[j]]["value"] for j in xs]
            colour = COLOURS[i % len(COLOURS)]
            # markers, no line: the scales are categories in the order given, not a continuum
            ax.plot(xs, ys, marker=MARKERS[i % len(MARKERS)], ms=5, color=colour, linestyle="none",
                    label=f"{label}, {k} steps" if ax is axes[0] else None)
            best = [(j, cell[scales[j]]["value"]) for j in xs if cell[scales[j]]["best_scale"] is True]
            if best:
                ax.plot(*zip(*best), marker="*", ms=14, color=colour, markeredgecolor="black", linestyle="none")
        ax.set_xticks(range(len(scales)), [e or "none" for e in scales], rotation=30, ha="right", fontsize=8)
        ax.set_xlabel("ε-scale")
        ax.set_title(sampler)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel(rows[0]["metric"])
    # two lines: one panel (one sampler) is 4.8 inches wide, and one line was clipped at both ends
    fig.suptitle(f"{rows[0]['metric']} by ε-scale\n(★ best of each cell; n = {rows[0]['n']}, the same x_T)")
    fig.legend(loc="outside lower center", ncol=min(4, len(series)), frameon=False)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    return fig
