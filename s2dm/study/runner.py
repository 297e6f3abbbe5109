"""``s2dm study``: train every run × seed of a study YAML, evaluate every model in every
(sampler, steps) cell, and write ``results.csv``, ``report.md`` and ``fd_vs_nfe.png``.

The design is paired (docs/method.md §7): runs with the same training seed share initial weights,
data order, t and ε (``training/draws.py`` derives every draw from (train.seed, step)); every model is
sampled from the same x_T per image seed; a second, independent draw of one model per cell
measures the metric's own noise. A control run has no training of its own: it samples another
run's weights with an ε-scaling (``eps_scale``); a sweep is one control per scale.

Every metric of a cell (FD-pixels, FD-cnn with ``eval.cnn``, FID) that samples the same images
(same model, sampler, steps, draw and n) is scored from ONE sampling pass: its cells are one job.
Each metric keeps a record of its own (``<cell>.json``, ``<cell>-cnn.json``, ...), so adding a
metric to a finished study samples again only for the cells it lacks.

Resumable at both levels: a trained run is not retrained (``train`` resumes or returns at
once) and a cell whose record (``cells/<model>/<cell>.json``) matches its settings is not
re-sampled. What the study does (configs, cells) and the checks before its folder exists live
in ``study/plan.py``, statistics in ``study/stats.py``, the reports in ``study/report.py`` (v1)
and ``study/questions.py`` (v2).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

from tqdm.auto import tqdm

from ..core.ema import describe_ema
from ..core.schedule import NoiseSchedule
from ..errors import S2dmError, StudyError
from ..io.checkpoint import checkpoint_step, load_checkpoint, resolve_checkpoint
from ..io.config import load_config
from ..metrics.features import FeatureExtractor
from ..metrics.fid import (Stats, extractor_for, frechet_distance, metric_label, reference_stats,
                           training_images_label, training_images_record)
from ..metrics.sampled import sample_stats
from ..samplers.generate import generate
from ..samplers.options import SampleOptions
from ..training.loop import train
from ..training.state import START_OVER
from ..util.dist import pick_device
from ..util.fileio import atomic_write_text
from ..util.folderlock import FolderLock
from ..util.images import save_mosaic
from ..util.records import read_record
from ..util.textfmt import plural
from ..util.workers import one_thread, run_jobs, worker_count
from . import questions, report
from .plan import (Cell, cell_options, check_cells, check_configs, check_data, image_seeds, model_name,
                   plan_cells, run_config)
from .records import matching_record, model_key, reference_key
from .spec import MOSAIC_SEEDS, Run, Study, load_study, path_name


# ---------------------------------------------------------------- training

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
    spent = folder / "study_time.json"  # training time so far, over invocations stopped by Ctrl-C or an error
    earlier = (read_record(spent) or read_record(folder / "study_done.json") or {}).get("seconds", 0.0)
    t0 = time.time()
    try:
        train(cfg, folder, resume="auto", progress=progress)  # resumes a half-done run; refuses a changed config
    except S2dmError as exc:  # the study has no resume='never' nor force=True: its own remedy
        if exc.remedy != START_OVER:
            raise
        raise exc.remedied(f"choose another study folder, or delete {folder} to retrain it") from None
    finally:
        if (folder / "checkpoints").is_dir():
            atomic_write_text(spent, json.dumps({"seconds": earlier + time.time() - t0}))
    step = checkpoint_step(folder)  # what the cells will sample
    if step != cfg.train.steps:  # train() leaves a run trained past train.steps as it is
        raise StudyError(f"{folder} is trained to step {step} but the study asks train.steps={cfg.train.steps} "
                         f"for it; choose another study folder, or delete {folder} to retrain it")
    took = earlier + time.time() - t0
    atomic_write_text(folder / "study_done.json", json.dumps({"seconds": took, "config": cfg.to_dict()}))
    return name, took


# ---------------------------------------------------------------- references and cells

def _checkpoint_of(out: Path, run: Run, seed: int) -> Path:
    source = run.weights_of or run.name
    return resolve_checkpoint(out / "runs" / model_name(source, seed))


def reference(study: Study, out: Path, features: str, make: bool = True) -> Optional[Stats]:
    """Statistics of the full training set (the study's data), made once per study folder and
    data: ``ref_<features>.json`` records the data they were made from (``training_images_record``), and other data
    makes them again. A file made by an earlier s2dm (no such record) is kept when the data set
    and size in its label are the study's. ``make=False``: None instead of making them."""
    path, made_from = out / f"ref_{features}.npz", out / f"ref_{features}.json"
    sets = [f"{k}={json.dumps(v)}" for k, v in study.overrides.items()]
    data = load_config(study.train_config, sets).data
    if path.is_file():
        recorded = read_record(made_from)
        if isinstance((recorded or {}).get("data"), dict) and \
                training_images_record(recorded["data"]) == training_images_record(data):
            return Stats.load(path)
        if not made_from.exists():
            stats = Stats.load(path)
            if stats.source.startswith(training_images_label(data) + " ("):
                return stats
    if not make:
        return None
    made_from.unlink(missing_ok=True)  # no record of stale statistics while they are remade
    stats = reference_stats(study.train_config, path, features=features, overrides=sets, force=True,
                            device="cpu" if features in ("pixels", "cnn") else "auto", progress=False)
    atomic_write_text(made_from, json.dumps({"data": training_images_record(data)}, indent=2))
    return Stats.load(stats.path)


def _cell_settings(study: Study, cell: Cell, run: Run, model: dict, ref: dict) -> dict:
    """A cell's key (``model_key``, ``reference_key``): a record with another is not reused."""
    seeds, o = image_seeds(study, cell), cell_options(study, cell, run)
    return {**model, "sampler": cell.sampler, "steps": cell.steps, "grid": o.grid, "eta": o.eta, "order": o.order,
            "eps_scale": run.eps_scale, "n": cell.n, "image_seeds": f"{seeds.start}-{seeds.stop - 1}",
            "metric": cell.metric, **ref}


class OnePass:
    """Several feature extractors fed the same images: ``sample_stats`` samples once and each
    extractor makes its statistics of those very batches (kept in memory: uint8, small)."""

    def __init__(self, extractors: Sequence[FeatureExtractor]):
        self.extractors = list(extractors)
        self.stats: List[Stats] = []

    def stats_of_uint8(self, batches, total: int, source: str) -> Stats:
        kept = list(batches)
        self.stats = [ext.stats_of_uint8(iter(kept), total, source) for ext in self.extractors]
        return self.stats[0]


def score_cells(model, schedule, study: Study, cells: Sequence[Cell], run: Run, extractors, refs, shape,
                device) -> List[dict]:
    """Sample the image seeds the ``cells`` share (one pass, in memory, quantised as a PNG would
    be) and score each cell's metric against its reference; one result per cell. The pass's
    wall time is split evenly between the cells."""
    t0, cell = time.time(), cells[0]
    assert all(c.images == cell.images for c in cells), "cells of one pass sample the same images"
    options = cell_options(study, cell, run)
    both = extractors[0] if len(extractors) == 1 else OnePass(extractors)
    first = sample_stats(model, schedule, list(image_seeds(study, cell)), options, both, image_shape=shape,
                         batch_size=study.batch_size, device=device,
                         source=f"{run.name} {cell.sampler}-{cell.steps}{'' if cell.draw == 'main' else '-' + cell.draw}")
    stats = [first] if len(extractors) == 1 else both.stats
    nfe = options.validate(schedule, quiet=True)["nfe"]  # of the steps walked (a quad grid may collapse some)
    results = []
    for c, st, ref in zip(cells, stats, refs):
        rec = {"value": frechet_distance(st, ref), "metric": metric_label(ref.metric, c.n),
               "nfe": nfe}
        if c.metric == "cnn":
            rec["classifier_accuracy"] = st.classifier_accuracy  # held out from its training
        results.append(rec)
    took = (time.time() - t0) / len(cells)
    return [{**rec, "seconds": took} for rec in results]


def evaluate_all(study: Study, out: Path, progress: bool = True, score: bool = True,
                 workers: Union[int, str] = 1) -> Tuple[List[dict], int]:
    """Score every planned cell whose record does not match its key (``_cell_settings``),
    ``workers`` sampling passes at a time (the cells of one model, sampler, steps and draw that
    are missing share a pass); returns the records in plan order and how many records on disk
    were made otherwise (0 once scored). ``score=False`` only collects the records that match
    (a report of a study in progress): the others are left out, and counted."""
    cells = plan_cells(study)
    paths = [out / "cells" / model_name(c.run, c.seed) / f"{c.key}.json" for c in cells]
    refs = {metric: reference(study, out, metric, make=score) for metric in {c.metric for c in cells}}
    ref_keys = {metric: reference_key(ref, out) for metric, ref in refs.items() if ref is not None}
    models, records, passes, trained = {}, [None] * len(cells), {}, {}
    for i, (cell, path) in enumerate(zip(cells, paths)):
        run = study.runs[cell.run]
        source = study.runs[run.weights_of or run.name]
        model = (source.name, cell.seed)
        if not score and model not in trained:  # once per model: it builds the run's config
            trained[model] = _training_record(study, out, source, cell.seed)
        if not score and trained[model] is None:
            continue  # not trained with the study's settings: the runner would train it, or refuse
        try:
            ckpt = _checkpoint_of(out, run, cell.seed)
        except S2dmError:
            if score:
                raise
            continue  # not trained yet: nothing of it to report
        if ckpt not in models:  # the stamp and step alone, not the weights: scoring loads them where it runs
            models[ckpt] = model_key(ckpt, out)
        if cell.metric not in ref_keys:
            continue  # no reference of the study's data (report only): no record of this metric matches
        settings = _cell_settings(study, cell, run, models[ckpt], ref_keys[cell.metric])
        records[i] = matching_record(path, settings, out)
        if records[i] is None and score:  # missing cells that sample the same images: one job
            _, _, group, _, group_settings, group_paths, group_indices = passes.setdefault(
                cell.images, (study, out, [], ckpt, [], [], []))
            group.append(cell)
            group_settings.append(settings)
            group_paths.append(path)
            group_indices.append(i)
    if not score:
        found = [r for r in records if r is not None]
        return found, sum(1 for r, p in zip(records, paths) if r is None and p.is_file())
    jobs = list(passes.values())
    count = worker_count(workers, len(jobs), pick_device("auto"))
    bar = tqdm(total=len(cells), initial=sum(r is not None for r in records), desc=f"study cells ({plural(count, 'worker')})",
               unit="cell", dynamic_ncols=True, disable=not progress)

    def finished(_, recs) -> None:
        for rec in recs:
            records[rec.pop("index")] = rec
        bar.update(len(recs))
        bar.set_postfix_str(f"{rec['run']} s{rec['seed']} {rec['sampler']}-{rec['steps']}")

    with bar:
        run_jobs(_score_job, jobs, count, finished)
    return records, 0


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


def _extractor(metric: str, ref: Stats, device) -> FeatureExtractor:
    """The features of a metric; FD-cnn's from the very classifier its reference was made with."""
    if metric == "cnn":
        return extractor_for(ref, device="cpu", progress=False)
    return FeatureExtractor(metric, device="cpu" if metric == "pixels" else device, progress=False)


def _score_job(study: Study, out: Path, cells: List[Cell], ckpt: Path, settings: List[dict], paths: List[Path],
               indices: List[int]) -> List[dict]:
    """Score the cells of one sampling pass and write their records; runs in a worker process
    (or in-process)."""
    device = pick_device("auto")
    models, key = _cached("models", dict), _file_key(ckpt)
    if key not in models:
        while len(models) >= _MODELS_KEPT:
            models.pop(next(iter(models)))
        models[key] = load_checkpoint(ckpt, device=device)
    ck = models[key]
    refs = [_cached(_file_key(out / s["ref"]), lambda s=s: Stats.load(out / s["ref"])) for s in settings]
    extractors = [_cached(("extractor", c.metric, r.weights_sha256), lambda c=c, r=r: _extractor(c.metric, r, device))
                  for c, r in zip(cells, refs)]
    cfg = ck.config
    shape = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    scored = score_cells(ck.ema, NoiseSchedule.from_config(cfg.diffusion), study, cells, study.runs[cells[0].run],
                         extractors, refs, shape, device)
    out = []
    for cell, result, s, path, index in zip(cells, scored, settings, paths, indices):
        rec = {"run": cell.run, "seed": cell.seed, "sampler": cell.sampler, "steps": cell.steps,
               "draw": cell.draw, "metric_kind": cell.metric, **result, "settings": s}
        atomic_write_text(path, json.dumps(rec, indent=2))
        out.append({**rec, "index": index})
    return out


def write_mosaics(study: Study, out: Path) -> None:
    """A mosaic per run (its first seed's model, DDIM at ``mosaic_steps``, image seeds
    ``MOSAIC_SEEDS``); ``mosaics/<run>.json`` records what it was made from, and a mosaic made otherwise
    (another checkpoint, a retrained one, other steps) is made again."""
    for run in study.runs.values():
        path = out / "mosaics" / f"{path_name(run.name)}.png"
        source = out / "runs" / model_name(run.weights_of or run.name, run.seeds[0])
        if not (source / "study_done.json").is_file():
            continue
        ckpt = _checkpoint_of(out, run, run.seeds[0])
        options = SampleOptions(sampler="ddim", steps=study.mosaic_steps, eps_scale=run.eps_scale or None)
        made_from = {**model_key(ckpt, out), **options.as_dict(), "image_seeds": f"{MOSAIC_SEEDS.start}-{MOSAIC_SEEDS.stop - 1}"}
        if path.is_file() and read_record(path.with_suffix(".json")) == made_from:
            continue
        device = pick_device("auto")
        ck = load_checkpoint(ckpt, device=device)
        cfg = ck.config
        images, _ = generate(ck.ema, NoiseSchedule.from_config(cfg.diffusion), MOSAIC_SEEDS,
                             image_shape=(cfg.data.channels, cfg.data.image_size, cfg.data.image_size),
                             batch_size=len(MOSAIC_SEEDS), device=device, **options.as_kwargs())
        save_mosaic(images, path)
        atomic_write_text(path.with_suffix(".json"), json.dumps(made_from, indent=2))


def run_study(config, out=None, quick: bool = False, progress: bool = True, report_only: bool = False,
              workers: Union[int, str] = "auto") -> Path:
    """The whole study: train, evaluate, mosaics, results.csv, report.md, fd_vs_nfe.png.
    ``report_only``: no training or sampling (no mosaics either), the report of the cells scored
    so far with the study's current settings. ``workers``: jobs (models to train, cells to
    score) run at once on a CPU, each with one thread (util/workers.py); ``auto`` is one per
    CPU. The results do not depend on it."""
    study = load_study(config, quick=quick)
    check_configs(study)
    if not report_only:
        check_cells(study)
        check_data(study)
    out = Path(out) if out else Path("runs") / (Path(config).stem + ("-quick" if quick else ""))
    if report_only and not out.is_dir():
        raise StudyError(f"{out} does not exist, so there is nothing to report; run the study into it first",
                         key="report_only")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    # A report of the cells so far may be asked for while the study runs: only that one is not refused.
    with FolderLock(out, "s2dm study") as lock, one_thread():  # one_thread: as in the workers
        if not report_only:
            lock.take()
        train_seconds = train_all(study, out, train_missing=not report_only, workers=workers, progress=progress)
        records, stale = evaluate_all(study, out, progress=progress, score=not report_only, workers=workers)
        if not report_only:
            write_mosaics(study, out)
        elif not records and not stale:  # stale records alone still make a report: it says why they are left out
            raise StudyError(f"{out} holds no scored cell of this study; run the study into it first",
                             key="report_only")
        return _report(study, out, records, stale, train_seconds, t0, workers, report_only)


def _report(study: Study, out: Path, records: List[dict], stale: int, train_seconds: dict, t0: float,
            workers: Union[int, str], report_only: bool) -> Path:
    """results.csv, the metric-vs-NFE plots and report.md of the cells scored."""
    rows = report.rows_from_records(records)
    atomic_write_text(out / "results.csv", report.csv_text(rows))
    best_of = questions.training_free(study) if study.v2 else ()
    report.plot_fd_vs_nfe(rows, study, out / "fd_vs_nfe.png", best_of=best_of)
    if study.cnn_n:
        report.plot_fd_vs_nfe(rows, study, out / "fd_cnn_vs_nfe.png", metric="FD-cnn", best_of=best_of)
    else:  # not this study's metric (any more)
        (out / "fd_cnn_vs_nfe.png").unlink(missing_ok=True)
    planned = len(plan_cells(study))
    cost = {"train_seconds": sum(train_seconds.values()), "eval_seconds": sum(r["seconds"] for r in records),
            "this_invocation_seconds": time.time() - t0, "cells_planned": planned,
            "workers": worker_count(workers, planned, pick_device("auto")),
            "cells_scored": len(records), "cells_stale": stale,
            "cells_earlier": sum(1 for r in records if r.get("earlier")), "report_only": report_only}
    atomic_write_text(out / "report.md", questions.study_report(rows, study, cost, ema=ema_settings(study),
                                                                clip=grad_clip_windows(study, out)))
    return out


def ema_settings(study: Study) -> Dict[str, str]:
    """Each trained run's EMA setting in words (the weights every cell samples)."""
    settings = {}
    for run in study.runs.values():
        if run.trained:
            cfg = run_config(study, run, run.seeds[0])
            settings[run.name] = describe_ema(cfg.train.ema_decay, cfg.train.ema_warmup)
    return settings


def grad_clip_windows(study: Study, out: Path) -> Dict[str, dict]:
    """Each trained run's grad clip and its logged windows (all seeds) whose mean gradient norm
    exceeds it: ``{run: {"clip", "windows", "above"}}``. The log records the global norm
    before clipping (``clip_grad_norm_``'s return value), averaged over the window's steps; a
    window logged twice (a resumed run) counts once."""
    found = {}
    for run in study.runs.values():
        if not run.trained:
            continue
        clip = run_config(study, run, run.seeds[0]).optim.grad_clip
        windows = above = 0
        for seed in run.seeds:
            norms = {}
            log = out / "runs" / model_name(run.name, seed) / "log.jsonl"
            for line in (log.read_text().splitlines() if log.is_file() else []):
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a line cut short by a kill
                if isinstance(rec, dict) and "event" not in rec and isinstance(rec.get("grad_norm"), (int, float)):
                    norms[rec.get("step")] = rec["grad_norm"]
            windows += len(norms)
            above += sum(1 for g in norms.values() if clip > 0 and g > clip)
        found[run.name] = {"clip": clip, "windows": windows, "above": above}
    return found
