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
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from tqdm.auto import tqdm

from ..core.ema import describe_ema
from ..core.schedule import NoiseSchedule
from ..errors import CheckpointError, MetricError, SamplerError
from ..io.checkpoint import read_checkpoint, resolve_checkpoint
from ..io.config import config_from_saved
from ..samplers import SAMPLERS
from ..samplers.options import SampleOptions
from ..sampling.folder import sample_to_folder
from ..util import dist
from ..util.fileio import atomic_write_text, csv_text, sha256_file
from ..util.plots import plot_vs_nfe
from ..util.records import reusable_record
from ..util.textfmt import num
from .fid import FeatureExtractor, Stats, frechet_distance, metric_label, parse_kind

CSV_COLUMNS = ["checkpoint", "label", "checkpoint_step", "sampler", "grid", "steps", "nfe", "eta",
               "order", "eps_scale", "n", "seeds", "metric", "value", "features", "ref", "ref_n",
               "weights_sha256", "weights"]


# ---------------------------------------------------------------- small helpers

def parse_list(text: str, what: str, cast=str) -> list:
    """``"ddim,pndm"`` → ["ddim", "pndm"]; duplicates and empty items are errors."""
    items = [s.strip() for s in str(text).split(",")]
    if not items or any(s == "" for s in items):
        raise SamplerError(f"{what} {text!r}: expected a comma-separated list, e.g. "
                           f"{'ddim,pndm,deis' if what == 'samplers' else '10,20,50,100'}", key=what)
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
    """One label per checkpoint argument: a run folder's name, else the file's stem; a
    collision gets the run folder's name in front, then a number."""
    resolved = [resolve_checkpoint(p).resolve() for p in paths]
    for i, r in enumerate(resolved):
        if r in resolved[:i]:
            raise CheckpointError(f"checkpoint {r} is given twice (as {paths[resolved.index(r)]} and {paths[i]})",
                                  key="ckpt")
    labels, prefixed = [], []
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
    out: List[str] = []
    for i, label in enumerate(labels):
        if labels.count(label) > 1:
            label = prefixed[i]
        base, k = label, 2
        while label in out:
            label, k = f"{base}-{k}", k + 1
        out.append(label)
    return out


def _stamp(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def _fmt(value: Optional[float]) -> str:
    return num(value, ".4f")


# ---------------------------------------------------------------- the evaluation

def evaluate(ckpts: Sequence[str], *, samplers: Sequence[str], steps: Sequence[int], n: int, ref: str,
             out: str, features: Optional[str] = None, options: Optional[SampleOptions] = None,
             use_ema: bool = True, batch_size: int = 256, fid_batch_size: int = 50, num_workers: int = 0,
             device: str = "auto", seeds_offset: int = 0, keep_samples: bool = True,
             inception_weights: Optional[str] = None, allow_download: bool = False,
             progress: bool = True) -> List[dict]:
    """Run (or resume) the grid of cells; returns one row (dict, ``CSV_COLUMNS``) per cell.
    ``options``: every cell's sampler options but its sampler and steps (those come from
    ``samplers`` x ``steps``); default ``SampleOptions()``."""
    options = SampleOptions() if options is None else SampleOptions.of(options)
    _check_grid(ckpts, samplers, steps, n, seeds_offset)
    ref_path, ref_stats = _reference(ref, features)
    kind, dims = parse_kind(ref_stats.features)
    extractor = FeatureExtractor(kind, dims=dims or 2048, device=device, batch_size=fid_batch_size,
                                 num_workers=num_workers, weights=inception_weights,
                                 allow_download=allow_download, progress=progress)
    files = [resolve_checkpoint(c).resolve() for c in ckpts]
    weights = _check_checkpoints(files, ref_stats, ref, options, samplers, steps, use_ema)
    seeds = list(range(seeds_offset, seeds_offset + n))
    run = _Eval(Path(out), options, seeds, ref_path, ref_stats, sha256_file(ref_path), extractor,
                use_ema, batch_size, device, keep_samples)
    labels = checkpoint_labels(ckpts)
    cells = [(f, label, s, k) for f, label in zip(files, labels) for s in samplers for k in steps]
    rows: Dict[tuple, dict] = {}
    with tqdm(total=len(cells), desc="eval cells", unit="cell", dynamic_ncols=True,
              disable=not (progress and dist.is_main())) as bar:
        for f, label, sampler, k in cells:
            rows[(label, sampler, k)] = run.cell(f, label, sampler, k, weights[f])["row"]
            if dist.is_main():
                atomic_write_text(run.out / "results.csv", csv_text(list(rows.values()), CSV_COLUMNS))
            bar.update(1)
    ordered = [rows[(label, s, k)] for label in labels for s in samplers for k in steps]

    def finish():
        atomic_write_text(run.out / "results.md", results_markdown(ordered, labels, samplers, steps))
        plot_fid_vs_nfe(ordered, run.out / "fid_vs_nfe.png")

    dist.run0(finish)  # the other ranks return once the files exist
    return ordered


def _check_grid(ckpts, samplers, steps, n: int, seeds_offset: int) -> None:
    if not ckpts:
        raise CheckpointError("ckpt: give at least one checkpoint", key="ckpt")
    for s in samplers:
        if s not in SAMPLERS:
            raise SamplerError(f"samplers: unknown sampler {s!r}; choose from {', '.join(SAMPLERS)}", key="samplers")
    for s in steps:
        if s < 1:
            raise SamplerError(f"steps must be positive integers, got {s}", key="steps")
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


def _check_checkpoints(files, ref_stats, ref, options: SampleOptions, samplers, steps, use_ema: bool) -> dict:
    """Every checkpoint fits the reference and every cell's options are valid, before the first
    cell is sampled; returns each checkpoint's weights in words (reports state the EMA setting)."""
    configs = {f: config_from_saved(read_checkpoint(f)["config"]) for f in files}
    for f, c in configs.items():
        shape = (c.data.channels, c.data.image_size, c.data.image_size)
        if ref_stats.features == "pixels" and ref_stats.shape and tuple(shape) != tuple(ref_stats.shape):
            raise MetricError(f"{f} makes {'x'.join(map(str, shape))} images but {ref} holds pixel "
                              f"statistics of {'x'.join(map(str, ref_stats.shape))} images", key="ref")
        schedule = NoiseSchedule.from_config(c.diffusion)
        for sampler, k in itertools.product(samplers, steps):
            dataclasses.replace(options, sampler=sampler, steps=k).validate(schedule, quiet=True)
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

    def key(self, f: Path, sampler: str, k: int) -> dict:
        """What defines a cell's value: a record with another key is redone."""
        o = self.options
        key = {"checkpoint": str(f), "checkpoint_stamp": _stamp(f), "sampler": sampler, "steps": k,
               "grid": o.grid, "eta": o.eta, "order": o.order, "eps_scale": o.eps_scale, "ema": self.use_ema,
               "n": len(self.seeds), "seeds": self.seeds_text, "ref": str(self.ref_path.resolve()),
               "ref_sha256": self.ref_sha, "features": self.ref_stats.features}
        if o.legacy_pndm_index:  # only when set: records made before the option still match
            key["legacy_pndm_index"] = True
        return key

    @property
    def seeds_text(self) -> str:
        return f"{self.seeds[0]}-{self.seeds[-1]}"

    def cell(self, f: Path, label: str, sampler: str, k: int, weights: str) -> dict:
        """The cell's record: reused when its key matches, else sampled, scored and written."""
        key = self.key(f, sampler, k)
        path = self.out / "cells" / label / f"{sampler}-{k}.json"
        record = dist.run0(lambda: reusable_record(path, "key", key))  # every rank: the same choice
        if record is not None:
            return record
        self.extractor.load()  # Inception weights: fail before sampling, not after
        folder = self.out / "samples" / label / f"{sampler}-{k}"
        options = dataclasses.replace(self.options, sampler=sampler, steps=k)
        meta = sample_to_folder(str(f), str(folder), options, seeds=self.seeds, use_ema=self.use_ema,
                                batch_size=self.batch_size, device=self.device)
        pngs = [folder / f"{s:06d}.png" for s in self.seeds]
        stats = self.extractor.stats_of_files(pngs, str(folder))
        value = dist.run0(lambda: frechet_distance(stats, self.ref_stats))
        o, n = self.options, len(self.seeds)
        row = {"checkpoint": str(f), "label": label, "checkpoint_step": meta["settings"]["checkpoint_step"],
               "sampler": sampler, "grid": o.grid, "steps": k, "nfe": meta["nfe"], "eta": o.eta,
               "order": o.order if sampler.startswith("deis") else "", "eps_scale": o.eps_scale or "",
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
    (%) of each further checkpoint against the first: 100 (x - first) / first."""
    by = {(r["label"], r["sampler"], int(r["steps"])): r for r in rows}
    first = rows[0]
    metric = first["metric"]
    lines = [
        f"# {metric} by sampler and steps",
        "",
        f"{metric}: {first['features']} features, n = {first['n']} samples per cell (seeds "
        f"{first['seeds']}, the same in every cell), reference `{first['ref']}` (N = {first['ref_n']}); "
        f"grid {first['grid']}, η = {first['eta']}"
        + (f", DEIS order {next(r['order'] for r in rows if r['order'] != '')}" if any(r["order"] != "" for r in rows) else "")
        + (f", ε-scale {first['eps_scale']}" if first["eps_scale"] else "")
        + ". Lower is better; Δ = relative change against the first checkpoint.",
        "",
        "Checkpoints: " + "; ".join(
            f"`{lab}` = {by[(lab, samplers[0], int(steps[0]))]['checkpoint']} (step "
            f"{by[(lab, samplers[0], int(steps[0]))]['checkpoint_step']}, "
            f"{by[(lab, samplers[0], int(steps[0]))].get('weights') or 'EMA setting not recorded'})" for lab in labels),
        "",
    ]
    head = ["sampler", "steps", "NFE"] + [f"{lab}" for lab in labels] + [f"Δ {lab} (%)" for lab in labels[1:]]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * 3 + "---:|" * (len(head) - 3))
    for s in samplers:
        for k in steps:
            cells = [by.get((lab, s, int(k))) for lab in labels]
            vals = [c["value"] if c else None for c in cells]
            nfe = next((c["nfe"] for c in cells if c), "—")
            rel = []
            for v in vals[1:]:
                if v is None or vals[0] is None or vals[0] == 0:
                    rel.append("—")
                else:
                    rel.append(num(100.0 * (v - vals[0]) / vals[0], "+.2f"))
            lines.append("| " + " | ".join([s, str(k), str(nfe)] + [_fmt(v) for v in vals] + rel) + " |")
    return "\n".join(lines) + "\n"


def plot_fid_vs_nfe(rows: List[dict], path: Path):
    """Metric against NFE (log x): one panel per sampler, one line per checkpoint in the same
    colour and marker in every panel, one legend (``plots.plot_vs_nfe``). Returns the figure."""
    points: dict = {}
    for r in rows:
        points.setdefault((r["sampler"], r["label"]), []).append((int(r["nfe"]), float(r["value"]), None))
    first = rows[0]
    return plot_vs_nfe(points, list(dict.fromkeys(r["sampler"] for r in rows)),
                       list(dict.fromkeys(r["label"] for r in rows)), path, ylabel=first["metric"],
                       title=f"{first['metric']} vs NFE (n = {first['n']}, grid {first['grid']})")
