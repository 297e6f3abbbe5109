"""``s2dm study``: train every run × seed of a study YAML, evaluate every model in every
(sampler, steps) cell, and write ``results.csv``, ``report.md`` and ``fd_vs_nfe.png``.

The design is paired (docs/method.md §7): runs with the same training seed share initial weights,
data order, t and ε (``training/loop.py`` derives every draw from (train.seed, step)); every model is
sampled from the same x_T per image seed; a second, independent draw of one model per cell
measures the metric's own noise. A control run has no training of its own: it samples another
run's weights with an ε-scaling (``eps_scale``).

Resumable at both levels: a trained run is not retrained (``train`` resumes or returns at
once) and a cell whose record (``cells/<model>/<cell>.json``) matches its settings is not
re-sampled. Statistics and the report live in ``study/report.py``.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Union

from tqdm.auto import tqdm

from ..core.ema import describe_ema
from ..core.schedule import NoiseSchedule
from ..io.checkpoint import checkpoint_step, load_checkpoint, resolve_checkpoint
from ..io.config import load_config
from ..metrics.fid import FeatureExtractor, Stats, frechet_distance, metric_label, reference_stats
from ..samplers import expected_nfe
from ..metrics.sampled import sample_stats
from ..samplers.generate import generate
from ..samplers.options import SampleOptions
from ..training.loop import train
from ..util.dist import pick_device
from ..util.fileio import atomic_write_text
from ..util.images import save_mosaic
from ..util.records import read_record, reusable_record
from ..util.textfmt import plural
from ..util.workers import one_thread, run_jobs, worker_count
from . import report
from .spec import Run, Study, load_study

# ---------------------------------------------------------------- models and cells

def model_name(run: str, seed: int) -> str:
    return f"{run}-s{seed}"


def run_config(study: Study, run: Run, seed: int):
    sets = {**study.overrides, **run.overrides, "train.seed": seed}
    return load_config(study.train_config, [f"{k}={json.dumps(v)}" for k, v in sets.items()])


def train_all(study: Study, out: Path, train_missing: bool = True, workers: Union[int, str] = 1,
              progress: bool = True) -> Dict[str, float]:
    """Train (or resume) every run × seed, ``workers`` models at a time (util/workers.py);
    returns the seconds each model's training took. ``train_missing=False`` only reads the
    record of the runs already trained."""
    seconds, jobs = {}, []
    for run in study.runs.values():
        if not run.trained:
            continue
        for seed in run.seeds:
            name = model_name(run.name, seed)
            done = _training_record(study, out, run, seed)
            if done is not None:
                seconds[name] = done["seconds"]  # trained with this very config: not touched again
            elif train_missing:
                jobs.append((study, out, run.name, seed))
    count = worker_count(workers, len(jobs), pick_device("auto"))
    bar = tqdm(total=len(jobs), desc=f"study training ({plural(count, 'worker')})", unit="model",
               dynamic_ncols=True, disable=not (progress and jobs))

    def finished(i: int, result) -> None:
        name, took = result
        seconds[name] = took
        bar.update(1)
        bar.write(f"trained {name} in {took:.0f} s")

    with bar:
        # One model alone shows its own steps; several at once show one line per model.
        run_jobs(_train_job, [job + (progress and count == 1,) for job in jobs], count, finished)
    return seconds


def _training_record(study: Study, out: Path, run: Run, seed: int):
    """The run's study_done.json if it was trained with this very config (else None)."""
    folder = out / "runs" / model_name(run.name, seed)
    done = read_record(folder / "study_done.json") or {}  # cut short by a kill: train (resume) again
    if done.get("config") == run_config(study, run, seed).to_dict() and (folder / "checkpoints").is_dir():
        return done
    return None


def _train_job(study: Study, out: Path, run_name: str, seed: int, progress: bool):
    """Train (or resume) one model and record its cost; runs in a worker process."""
    name = model_name(run_name, seed)
    folder = out / "runs" / name
    cfg = run_config(study, study.runs[run_name], seed)
    earlier = (read_record(folder / "study_done.json") or {}).get("seconds", 0.0)
    t0 = time.time()
    train(cfg, folder, resume="auto", progress=progress)  # resumes a half-done run; refuses a changed config
    took = earlier + time.time() - t0
    atomic_write_text(folder / "study_done.json", json.dumps({"seconds": took, "config": cfg.to_dict()}))
    return name, took


@dataclass
class Cell:
    run: str
    seed: int  # training seed
    sampler: str
    steps: int
    draw: str = "main"  # "main" or "noise" (the metric-noise re-draw)
    metric: str = "pixels"  # "pixels" (FD-pixels) or "inception" (FID)
    n: int = 0

    @property
    def key(self) -> str:
        suffix = "" if self.draw == "main" else f"-{self.draw}"
        metric = "" if self.metric == "pixels" else f"-{self.metric}"
        return f"{self.sampler}-{self.steps}{metric}{suffix}"


def plan_cells(study: Study) -> List[Cell]:
    """Every cell to score, cheapest step count first (so an interrupted study has whole
    columns of the table, not whole models), runs in config order within a column."""
    cells = []
    for steps in sorted(study.steps):
        for sampler in study.samplers:
            for run in study.runs.values():
                if run.samplers is not None and sampler not in run.samplers:
                    continue
                for seed in run.seeds:
                    cells.append(Cell(run.name, seed, sampler, steps, n=study.n))
                    if run.name == study.noise_draw and seed == run.seeds[0]:
                        cells.append(Cell(run.name, seed, sampler, steps, draw="noise", n=study.n))
    if study.fid_n > 0:
        for steps in study.fid_steps:
            for sampler in study.fid_samplers or study.samplers:
                for run in study.runs.values():
                    for seed in run.seeds:
                        cells.append(Cell(run.name, seed, sampler, steps, metric="inception", n=study.fid_n))
    return cells


def image_seeds(study: Study, cell: Cell) -> range:
    start = 0 if cell.draw == "main" else study.noise_seed_offset
    return range(start, start + cell.n)


def _checkpoint_of(study: Study, out: Path, run: Run, seed: int) -> Path:
    source = run.weights_of or run.name
    return resolve_checkpoint(out / "runs" / model_name(source, seed))


def reference(study: Study, out: Path, features: str):
    """Statistics of the full training set (the study's data), made once per study folder."""
    path = out / f"ref_{features}.npz"
    if path.is_file():
        return Stats.load(path)
    sets = [f"{k}={json.dumps(v)}" for k, v in study.overrides.items()]
    stats = reference_stats(study.train_config, path, features=features, overrides=sets,
                            device="cpu" if features == "pixels" else "auto", progress=False)
    return Stats.load(stats.path)


def _cell_settings(study: Study, cell: Cell, ckpt: Path, step: int, run: Run, ref) -> dict:
    seeds = image_seeds(study, cell)
    return {"checkpoint": str(ckpt.resolve()), "checkpoint_step": step, "sampler": cell.sampler,
            "steps": cell.steps, "order": study.order, "eps_scale": run.eps_scale, "n": cell.n,
            "image_seeds": f"{seeds.start}-{seeds.stop - 1}", "metric": cell.metric,
            "ref": str(ref.path), "ref_n": ref.n}


def score_cell(model, schedule, study: Study, cell: Cell, run: Run, extractor, ref, shape, device) -> dict:
    """Sample the cell's image seeds in memory, quantise as a PNG would be, score against ref."""
    t0 = time.time()
    seeds = list(image_seeds(study, cell))
    options = SampleOptions(sampler=cell.sampler, steps=cell.steps, order=study.order,
                            eps_scale=run.eps_scale or None)

    stats = sample_stats(model, schedule, seeds, options, extractor, image_shape=shape, batch_size=study.batch_size,
                         device=device, source=f"{run.name} {cell.key}")
    return {"value": frechet_distance(stats, ref), "metric": metric_label(ref.metric, cell.n),
            "nfe": expected_nfe(cell.sampler, cell.steps), "seconds": time.time() - t0}


def evaluate_all(study: Study, out: Path, progress: bool = True, score: bool = True,
                 workers: Union[int, str] = 1) -> List[dict]:
    """Score every planned cell not already recorded, ``workers`` cells at a time; returns
    every cell's record in plan order. ``score=False`` only collects the records there are (a
    report of a study in progress)."""
    cells = plan_cells(study)
    paths = [out / "cells" / model_name(c.run, c.seed) / f"{c.key}.json" for c in cells]
    if not score:
        return [json.loads(p.read_text()) for p in paths if p.is_file()]
    refs = {metric: reference(study, out, metric) for metric in {c.metric for c in cells}}
    steps, records, jobs = {}, [None] * len(cells), []
    for i, (cell, path) in enumerate(zip(cells, paths)):
        ckpt = _checkpoint_of(study, out, study.runs[cell.run], cell.seed)
        if ckpt not in steps:  # the step alone, not the weights: scoring loads them where it runs
            steps[ckpt] = checkpoint_step(ckpt)
        settings = _cell_settings(study, cell, ckpt, steps[ckpt], study.runs[cell.run], refs[cell.metric])
        records[i] = reusable_record(path, "settings", settings)
        if records[i] is None:
            jobs.append((study, cell, ckpt, settings, path, i))
    count = worker_count(workers, len(jobs), pick_device("auto"))
    bar = tqdm(total=len(cells), initial=len(cells) - len(jobs), desc=f"study cells ({plural(count, 'worker')})",
               unit="cell", dynamic_ncols=True, disable=not progress)

    def finished(_, rec) -> None:
        records[rec.pop("index")] = rec
        bar.update(1)
        bar.set_postfix_str(f"{rec['run']} s{rec['seed']} {rec['sampler']}-{rec['steps']}")

    with bar:
        run_jobs(_score_job, jobs, count, finished)
    return records


# What a worker process keeps between its jobs: the study's reference statistics and feature
# extractors, and the models it has loaded (the last few: a study's are small, and its cells are
# planned step count by step count, so consecutive jobs often sample the same model).
_WORKER_CACHE: Dict[str, object] = {}
_MODELS_KEPT = 4


def _cached(key, make):
    if key not in _WORKER_CACHE:
        _WORKER_CACHE[key] = make()
    return _WORKER_CACHE[key]


def _file_key(path) -> tuple:
    """A file as it is now: a file rewritten at the same path (a retrained run) is another key."""
    stat = Path(path).stat()
    return str(path), stat.st_mtime_ns, stat.st_size


def _score_job(study: Study, cell: Cell, ckpt: Path, settings: dict, path: Path, index: int) -> dict:
    """Score one cell and write its record; runs in a worker process (or in-process)."""
    device = pick_device("auto")
    models, key = _cached("models", dict), _file_key(ckpt)
    if key not in models:
        while len(models) >= _MODELS_KEPT:
            models.pop(next(iter(models)))
        models[key] = load_checkpoint(ckpt, device=device)
    ck = models[key]
    ref = _cached(_file_key(settings["ref"]), lambda: Stats.load(settings["ref"]))
    extractor = _cached(f"extractor-{cell.metric}", lambda: FeatureExtractor(
        cell.metric, device="cpu" if cell.metric == "pixels" else device, progress=False))
    cfg = ck.config
    shape = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    scored = score_cell(ck.ema, NoiseSchedule.from_config(cfg.diffusion), study, cell, study.runs[cell.run],
                        extractor, ref, shape, device)
    rec = {"run": cell.run, "seed": cell.seed, "sampler": cell.sampler, "steps": cell.steps,
           "draw": cell.draw, "metric_kind": cell.metric, **scored, "settings": settings}
    atomic_write_text(path, json.dumps(rec, indent=2))
    return {**rec, "index": index}


def write_mosaics(study: Study, out: Path) -> None:
    """A 10×10 mosaic per run (its first seed's model, DDIM at ``mosaic_steps``, image seeds 0..99)."""
    for run in study.runs.values():
        path = out / "mosaics" / f"{run.name}.png"
        source = out / "runs" / model_name(run.weights_of or run.name, run.seeds[0])
        if path.is_file() or not (source / "study_done.json").is_file():
            continue
        device = pick_device("auto")
        ck = load_checkpoint(_checkpoint_of(study, out, run, run.seeds[0]), device=device)
        cfg = ck.config
        images, _ = generate(ck.ema, NoiseSchedule.from_config(cfg.diffusion), range(100),
                             image_shape=(cfg.data.channels, cfg.data.image_size, cfg.data.image_size),
                             batch_size=100, device=device,
                             **SampleOptions(sampler="ddim", steps=study.mosaic_steps,
                                            eps_scale=run.eps_scale or None).as_kwargs())
        save_mosaic(images, path)


def run_study(config, out=None, quick: bool = False, progress: bool = True, report_only: bool = False,
              workers: Union[int, str] = "auto") -> Path:
    """The whole study: train, evaluate, grids, results.csv, report.md, fd_vs_nfe.png.
    ``report_only``: no training or sampling, the report of the cells scored so far.
    ``workers``: jobs (models to train, cells to score) run at once on a CPU, each with one
    thread (util/workers.py); ``auto`` is one per CPU. The results do not depend on it."""
    study = load_study(config, quick=quick)
    out = Path(out) if out else Path("runs") / (Path(config).stem + ("-quick" if quick else ""))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with one_thread():  # what runs here (reference statistics, mosaics) as in the workers
        train_seconds = train_all(study, out, train_missing=not report_only, workers=workers, progress=progress)
        records = evaluate_all(study, out, progress=progress, score=not report_only, workers=workers)
        write_mosaics(study, out)
    rows = report.rows_from_records(records)
    atomic_write_text(out / "results.csv", report.csv_text(rows))
    report.plot_fd_vs_nfe(rows, study, out / "fd_vs_nfe.png")
    planned = len(plan_cells(study))
    cost = {"train_seconds": sum(train_seconds.values()), "eval_seconds": sum(r["seconds"] for r in records),
            "this_invocation_seconds": time.time() - t0, "cells_planned": planned,
            "workers": worker_count(workers, planned, pick_device("auto")),
            "cells_scored": len(records)}
    atomic_write_text(out / "report.md", report.report_markdown(rows, study, cost, out, ema=ema_settings(study)))
    return out


def ema_settings(study: Study) -> Dict[str, str]:
    """Each trained run's EMA setting in words (the weights every cell samples)."""
    settings = {}
    for run in study.runs.values():
        if run.trained:
            cfg = run_config(study, run, run.seeds[0])
            settings[run.name] = describe_ema(cfg.train.ema_decay, cfg.train.ema_warmup)
    return settings
