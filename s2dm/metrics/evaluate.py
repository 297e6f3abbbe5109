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

import json
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from tqdm.auto import tqdm

from ..core.ema import describe_ema
from ..errors import UserError
from ..io.checkpoint import read_checkpoint, resolve_checkpoint
from ..io.config import config_from_saved
from ..samplers import SAMPLERS
from ..sampling.folder import sample_to_folder
from ..util import dist
from ..util.fileio import atomic_write_text, csv_text, sha256_file
from ..util.plots import plot_vs_nfe
from ..util.textfmt import num
from .fid import FeatureExtractor, Stats, frechet_distance, metric_label, parse_kind

CSV_COLUMNS = ["checkpoint", "label", "checkpoint_step", "sampler", "grid", "steps", "nfe", "eta",
               "order", "eps_scale", "n", "seeds", "metric", "value", "features", "ref", "ref_n",
               "weights_sha256", "weights"]


# ---------------------------------------------------------------- small helpers

def _atomic_write(path: Path, text: str) -> None:
    atomic_write_text(path, text)


def parse_list(text: str, what: str, cast=str) -> list:
    """``"ddim,pndm"`` → ["ddim", "pndm"]; duplicates and empty items are errors."""
    items = [s.strip() for s in str(text).split(",")]
    if not items or any(s == "" for s in items):
        raise UserError(f"--{what} {text!r}: expected a comma-separated list, e.g. "
                        f"{'ddim,pndm,deis' if what == 'samplers' else '10,20,50,100'}")
    try:
        values = [cast(s) for s in items]
    except ValueError:
        raise UserError(f"--{what} {text!r}: {', '.join(items)} are not all integers") from None
    if len(set(values)) != len(values):
        raise UserError(f"--{what} {text!r} repeats an item")
    return values


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", name).strip("_") or "ckpt"


def checkpoint_labels(paths: Sequence[str]) -> List[str]:
    """One label per checkpoint argument: a run folder's name, else the file's stem; a
    collision gets the run folder's name in front, then a number."""
    resolved = [resolve_checkpoint(p).resolve() for p in paths]
    for i, r in enumerate(resolved):
        if r in resolved[:i]:
            raise UserError(f"checkpoint {r} is given twice (as {paths[resolved.index(r)]} and {paths[i]})")
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
             out: str, features: Optional[str] = None, grid: str = "uniform", eta: float = 0.0,
             order: int = 3, eps_scale: Optional[str] = None, use_ema: bool = True,
             batch_size: int = 256, fid_batch_size: int = 50, num_workers: int = 0,
             device: str = "auto", seeds_offset: int = 0, keep_samples: bool = True,
             inception_weights: Optional[str] = None, allow_download: bool = False,
             progress: bool = True) -> List[dict]:
    """Run (or resume) the grid of cells; returns one row (dict, ``CSV_COLUMNS``) per cell."""
    if not ckpts:
        raise UserError("give at least one --ckpt")
    for s in samplers:
        if s not in SAMPLERS:
            raise UserError(f"--samplers: unknown sampler {s!r}; choose from {', '.join(SAMPLERS)}")
    for s in steps:
        if s < 1:
            raise UserError(f"--steps must be positive integers, got {s}")
    if n < 2:
        raise UserError(f"--n must be at least 2 (a covariance needs 2 images), not {n}")
    if seeds_offset < 0:
        raise UserError(f"--seeds-offset must be >= 0, not {seeds_offset}")
    ref_path = Path(ref)
    if ref_path.is_dir() or ref_path.suffix != ".npz":
        raise UserError(f"--ref must be a .npz statistics file (make one with `s2dm fid ref --config "
                        f"X.yaml --out stats.npz`), not {ref}")
    ref_stats = Stats.load(ref_path)
    kind, dims = parse_kind(ref_stats.features)
    if features is not None and features != kind:
        raise UserError(f"--features {features} but {ref} holds {ref_stats.features} statistics "
                        f"({ref_stats.metric}); make a {features} reference with `s2dm fid ref --features {features}`")
    extractor = FeatureExtractor(kind, dims=dims or 2048, device=device, batch_size=fid_batch_size,
                                 num_workers=num_workers, weights=inception_weights,
                                 allow_download=allow_download, progress=progress)
    ref_sha = sha256_file(ref_path)
    labels = checkpoint_labels(ckpts)
    files = [resolve_checkpoint(c).resolve() for c in ckpts]
    configs = {f: config_from_saved(read_checkpoint(f)["config"]) for f in files}
    # which weights every cell of a checkpoint samples: reports state the EMA setting
    weights = {f: describe_ema(c.train.ema_decay, c.train.ema_warmup) if use_ema else "raw weights (no EMA)"
               for f, c in configs.items()}
    if kind == "pixels" and ref_stats.shape:
        for f in files:  # catch a size mismatch before sampling n images
            data = configs[f].data
            shape = (data.channels, data.image_size, data.image_size)
            if tuple(shape) != tuple(ref_stats.shape):
                raise UserError(f"{f} makes {'x'.join(map(str, shape))} images but {ref} holds pixel "
                                f"statistics of {'x'.join(map(str, ref_stats.shape))} images")
    out = Path(out)
    seeds = list(range(seeds_offset, seeds_offset + n))
    seeds_text = f"{seeds[0]}-{seeds[-1]}"
    metric = metric_label(ref_stats.metric, n)

    cells = [(ck, f, label, s, k) for ck, f, label in zip(ckpts, files, labels) for s in samplers for k in steps]
    rows: Dict[tuple, dict] = {}
    bar = tqdm(total=len(cells), desc="eval cells", unit="cell", dynamic_ncols=True,
               disable=not (progress and dist.is_main()))
    try:
        for ck, f, label, sampler, k in cells:
            key = {
                "checkpoint": str(f), "checkpoint_stamp": _stamp(f), "sampler": sampler, "steps": k,
                "grid": grid, "eta": eta, "order": order, "eps_scale": eps_scale, "ema": use_ema,
                "n": n, "seeds": seeds_text, "ref": str(ref_path.resolve()), "ref_sha256": ref_sha,
                "features": ref_stats.features,
            }
            record_path = out / "cells" / label / f"{sampler}-{k}.json"
            record = dist.run0(lambda: _read_record(record_path, key))  # every rank: the same choice
            if record is None:
                extractor.load()  # Inception weights: fail before sampling, not after
                folder = out / "samples" / label / f"{sampler}-{k}"
                meta = sample_to_folder(str(f), str(folder), seeds=seeds, sampler=sampler, steps=k, grid=grid,
                                        eta=eta, order=order, eps_scale=eps_scale, use_ema=use_ema,
                                        batch_size=batch_size, device=device)
                pngs = [folder / f"{s:06d}.png" for s in seeds]
                stats = extractor.stats_of_files(pngs, str(folder))
                value = dist.run0(lambda: frechet_distance(stats, ref_stats))
                row = {
                    "checkpoint": str(f), "label": label, "checkpoint_step": meta["settings"]["checkpoint_step"],
                    "sampler": sampler, "grid": grid, "steps": k, "nfe": meta["nfe"], "eta": eta,
                    "order": order if sampler.startswith("deis") else "", "eps_scale": eps_scale or "",
                    "n": n, "seeds": seeds_text, "metric": metric, "value": value,
                    "features": ref_stats.features, "ref": str(ref_path), "ref_n": ref_stats.n,
                    "weights_sha256": stats.weights_sha256 or "", "weights": weights[f],
                }
                record = {"key": key, "row": row}
                if dist.is_main():
                    _atomic_write(record_path, json.dumps(record, indent=2))
                    if not keep_samples:
                        for p in pngs:
                            p.unlink(missing_ok=True)
            rows[(label, sampler, k)] = record["row"]
            if dist.is_main():
                _atomic_write(out / "results.csv", csv_text(list(rows.values()), CSV_COLUMNS))
            bar.update(1)
    finally:
        bar.close()

    ordered = [rows[(label, s, k)] for label in labels for s in samplers for k in steps]

    def finish():
        _atomic_write(out / "results.md", results_markdown(ordered, labels, samplers, steps))
        plot_fid_vs_nfe(ordered, out / "fid_vs_nfe.png")

    dist.run0(finish)  # the other ranks return once the files exist
    return ordered


def _read_record(path: Path, key: dict) -> Optional[dict]:
    """A finished cell's record if it matches ``key``, else None (redo the cell)."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("key") != key:
        return None
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
