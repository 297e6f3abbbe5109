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

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from tqdm.auto import tqdm

from ..core.ema import describe_ema
from ..core.schedule import NoiseSchedule
from ..errors import S2dmError, StudyError
from ..io.checkpoint import load_checkpoint, resolve_checkpoint
from ..io.config import Config, build_dataclass, find_config, load_config, read_yaml, shipped_configs
from ..metrics.fid import FeatureExtractor, Stats, frechet_distance, metric_label, reference_stats
from ..samplers import SAMPLERS, expected_nfe, parse_eps_scale
from ..samplers.generate import generate, generate_batches
from ..samplers.options import SampleOptions
from ..training.loop import train
from ..util.dist import pick_device
from ..util.fileio import atomic_write_text
from ..util.images import save_mosaic, to_uint8
from ..util.records import read_record, reusable_record
from . import report

# -- the study YAML, as typed sections (built and checked like a run config) ---------------
@dataclass
class RunSpec:
    seeds: List[int]
    set: Dict[str, Any] = field(default_factory=dict)  # training-config overrides of this run
    weights_of: Optional[str] = None  # a control: sample this run's weights ...
    eps_scale: Optional[str] = None  # ... with this ε-scaling
    samplers: Optional[List[str]] = None  # a subset of the study's samplers (None: all)


@dataclass
class FidSpec:
    n: int = 0  # Inception FID on n samples per cell (0: off)
    steps: List[int] = field(default_factory=lambda: [10])
    samplers: Optional[List[str]] = None


@dataclass
class EvalSpec:
    samplers: List[str] = field(default_factory=lambda: ["ddim"])
    steps: List[int] = field(default_factory=lambda: [10])
    n: int = 5000
    features: str = "pixels"
    order: int = 3
    batch_size: int = 2500
    noise_draw: Optional[str] = None
    noise_seed_offset: int = 1_000_000
    fid: FidSpec = field(default_factory=FidSpec)
    mosaic_steps: int = 20


@dataclass
class QuickSpec:
    runs: Optional[List[str]] = None
    seeds: Optional[List[int]] = None
    samplers: Optional[List[str]] = None
    steps: Optional[List[int]] = None
    n: Optional[int] = None
    set: Dict[str, Any] = field(default_factory=dict)


@dataclass
class StudyFile:
    train_config: str
    runs: Dict[str, RunSpec]
    baseline: str
    eval: EvalSpec
    set: Dict[str, Any] = field(default_factory=dict)  # overrides for every run
    effect: Optional[str] = None
    quick: Optional[QuickSpec] = None


STUDY_KEYS = {f.name for f in dataclasses.fields(StudyFile)}
TRAINING_SECTIONS = [f.name for f in dataclasses.fields(Config)]


@dataclass
class Run:
    name: str
    seeds: List[int]
    overrides: Dict[str, object] = field(default_factory=dict)
    weights_of: Optional[str] = None  # a control: sample this run's weights
    eps_scale: Optional[str] = None
    samplers: Optional[List[str]] = None  # a subset of the study's samplers (None: all)

    @property
    def trained(self) -> bool:
        return self.weights_of is None


@dataclass
class Study:
    path: Path
    train_config: Path
    overrides: Dict[str, object]
    runs: Dict[str, Run]
    baseline: str
    effect: Optional[str]
    samplers: List[str]
    steps: List[int]
    n: int
    features: str = "pixels"
    order: int = 3
    batch_size: int = 2500
    noise_draw: Optional[str] = None
    noise_seed_offset: int = 1_000_000
    fid_n: int = 0
    fid_steps: List[int] = field(default_factory=lambda: [10])
    fid_samplers: Optional[List[str]] = None
    mosaic_steps: int = 20
    quick: bool = False


def _int_list(value, where: str) -> List[int]:
    if not isinstance(value, list) or not value or not all(isinstance(v, int) and not isinstance(v, bool)
                                                           for v in value):
        raise StudyError(f"{where}: expected a non-empty list of integers, got {value!r}")
    if len(set(value)) != len(value):
        raise StudyError(f"{where}: repeats an item: {value!r}")
    return list(value)


def load_study(path, quick: bool = False) -> Study:
    """Read and validate a study YAML; ``quick`` applies its ``quick:`` preset."""
    given, path = path, find_config(path)
    raw = read_yaml(path)
    _not_a_training_config(raw, path, given)
    try:
        spec = build_dataclass(StudyFile, raw)
    except S2dmError as exc:  # a key or value of the study YAML: a StudyError naming the file and key
        raise StudyError(f"{path}: {exc}") from None
    train_config = (path.parent / spec.train_config).resolve()
    if not train_config.is_file():
        raise StudyError(f"{path}: train_config {spec.train_config} not found at {train_config}")
    runs = {name: Run(name, _int_list(r.seeds, f"{path}: runs.{name}.seeds"), dict(r.set), r.weights_of,
                      r.eps_scale, r.samplers) for name, r in spec.runs.items()}
    for run in runs.values():
        if run.eps_scale is not None:
            parse_eps_scale(str(run.eps_scale))
        if run.weights_of is not None:
            src = runs.get(run.weights_of)
            if src is None or not src.trained:
                raise StudyError(f"{path}: runs.{run.name}.weights_of names {run.weights_of!r}, not a trained run")
            if not set(run.seeds) <= set(src.seeds):
                raise StudyError(f"{path}: runs.{run.name}.seeds must be seeds of {run.weights_of}")
            if run.overrides:
                raise StudyError(f"{path}: runs.{run.name} samples {run.weights_of}'s weights; it cannot `set` training keys")
    if spec.effect is not None and (spec.effect not in runs or spec.effect == spec.baseline):
        raise StudyError(f"{path}: effect {spec.effect!r} must name a run other than the baseline "
                         f"(runs: {', '.join(runs)}), or be left out")
    ev = spec.eval
    study = Study(
        path=path, train_config=train_config, overrides=dict(spec.set), runs=runs,
        baseline=spec.baseline, effect=spec.effect, samplers=list(ev.samplers),
        steps=_int_list(ev.steps, "eval.steps"), n=ev.n, features=ev.features, order=ev.order,
        batch_size=ev.batch_size, noise_draw=ev.noise_draw, noise_seed_offset=ev.noise_seed_offset,
        fid_n=ev.fid.n, fid_steps=_int_list(ev.fid.steps, "eval.fid.steps"), fid_samplers=ev.fid.samplers,
        mosaic_steps=ev.mosaic_steps,
    )
    if quick:
        _apply_quick(study, spec.quick, path)
    _validate(study, SAMPLERS)
    return study


def shipped_study_configs() -> List[Path]:
    return [p for p in shipped_configs() if p.name.startswith("study_")]


def _not_a_training_config(raw, path: Path, given) -> None:
    """A training config given to ``s2dm study`` (an easy slip): say so, and name the study configs."""
    if not isinstance(raw, dict) or set(raw) & STUDY_KEYS:
        return
    sections = [k for k in TRAINING_SECTIONS if k in raw]
    if sections:
        studies = [p.name for p in shipped_study_configs()]  # bare names find them from anywhere
        raise StudyError(f"{given} is a training config (it has sections {', '.join(sections)}), not a study; "
                         f"study configs: {', '.join(studies)} (by bare name, e.g. {studies[0]})", key="config")


def _apply_quick(study: Study, q: Optional[QuickSpec], path: Path) -> None:
    if q is None:
        raise StudyError(f"{path} has no `quick:` preset")
    if q.runs is not None:
        missing = [r for r in q.runs if r not in study.runs]
        if missing:
            raise StudyError(f"{path}: quick.runs names unknown run {missing[0]!r}")
        study.runs = {k: v for k, v in study.runs.items() if k in q.runs}
    if q.seeds is not None:
        seeds = _int_list(q.seeds, "quick.seeds")
        for run in study.runs.values():
            run.seeds = [s for s in run.seeds if s in seeds] or seeds[:1]
    if q.samplers is not None:
        study.samplers = list(q.samplers)
    if q.steps is not None:
        study.steps = _int_list(q.steps, "quick.steps")
    if q.n is not None:
        study.n = q.n
    study.overrides.update(q.set)
    study.quick = True


def _validate(study: Study, samplers) -> None:
    where = str(study.path)
    if study.baseline not in study.runs or not study.runs[study.baseline].trained:
        raise StudyError(f"{where}: baseline {study.baseline!r} is not a trained run of the study")
    if study.effect is not None and study.effect not in study.runs:
        study.effect = None  # e.g. dropped by a quick preset
    if study.noise_draw is not None and study.noise_draw not in study.runs:
        raise StudyError(f"{where}: eval.noise_draw names unknown run {study.noise_draw!r}")
    for run in study.runs.values():
        if run.samplers is not None:
            bad = [s for s in run.samplers if s not in samplers]
            if bad:
                raise StudyError(f"{where}: runs.{run.name}.samplers: unknown sampler {bad[0]!r}")
            run.samplers = [s for s in run.samplers if s in study.samplers]  # a quick preset may drop some
    for s in list(study.samplers) + list(study.fid_samplers or []):
        if s not in samplers:
            raise StudyError(f"{where}: unknown sampler {s!r}; choose from {', '.join(samplers)}")
    if study.n < 2:
        raise StudyError(f"{where}: eval.n must be at least 2, not {study.n}")
    if study.features != "pixels":
        raise StudyError(f"{where}: eval.features must be pixels (Inception FID goes under eval.fid)")


# ---------------------------------------------------------------- models and cells

def model_name(run: str, seed: int) -> str:
    return f"{run}-s{seed}"


def run_config(study: Study, run: Run, seed: int):
    sets = {**study.overrides, **run.overrides, "train.seed": seed}
    return load_config(study.train_config, [f"{k}={json.dumps(v)}" for k, v in sets.items()])


def train_all(study: Study, out: Path, train_missing: bool = True) -> Dict[str, float]:
    """Train (or resume) every run × seed; returns the seconds each model's training took.
    ``train_missing=False`` only reads the record of the runs already trained."""
    seconds = {}
    for run in study.runs.values():
        if not run.trained:
            continue
        for seed in run.seeds:
            name = model_name(run.name, seed)
            folder = out / "runs" / name
            cost = folder / "study_done.json"
            cfg = run_config(study, run, seed)
            done = read_record(cost) or {}  # a study_done.json cut short by a kill: train (resume) again
            if done.get("config") == cfg.to_dict() and (folder / "checkpoints").is_dir():
                seconds[name] = done["seconds"]  # trained with this very config: not touched again
                continue
            if not train_missing:
                continue
            t0 = time.time()
            train(cfg, folder, resume="auto")  # resumes a half-done run; refuses a changed config
            seconds[name] = done.get("seconds", 0.0) + time.time() - t0
            atomic_write_text(cost, json.dumps({"seconds": seconds[name], "config": cfg.to_dict()}))
    return seconds


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

    batches = generate_batches(model, schedule, seeds, image_shape=shape, batch_size=study.batch_size,
                               device=device, **options.as_kwargs())
    stats = extractor.stats_of_uint8((to_uint8(images) for _, images, _ in batches), len(seeds),
                                     f"{run.name} {cell.key}")
    return {"value": frechet_distance(stats, ref), "metric": metric_label(ref.metric, cell.n),
            "nfe": expected_nfe(cell.sampler, cell.steps), "seconds": time.time() - t0}


def evaluate_all(study: Study, out: Path, progress: bool = True, score: bool = True) -> List[dict]:
    """Score every planned cell not already recorded; returns every cell's record.
    ``score=False`` only collects the records there are (a report of a study in progress)."""
    device = pick_device("auto")
    cells = plan_cells(study)
    refs = {"pixels": reference(study, out, "pixels")}
    extractors = {"pixels": FeatureExtractor("pixels", device="cpu", progress=False)}
    if any(c.metric == "inception" for c in cells):
        refs["inception"] = reference(study, out, "inception")
        extractors["inception"] = FeatureExtractor("inception", progress=False)
    records, loaded = [], {}
    bar = tqdm(cells, desc="study cells", unit="cell", dynamic_ncols=True, disable=not progress)
    for cell in bar:
        run = study.runs[cell.run]
        path = out / "cells" / model_name(cell.run, cell.seed) / f"{cell.key}.json"
        if not score:
            if path.is_file():
                records.append(json.loads(path.read_text()))
            continue
        ckpt = _checkpoint_of(study, out, run, cell.seed)
        key = str(ckpt)
        if key not in loaded:
            loaded[key] = load_checkpoint(ckpt, device=device)  # every model once (a study's are small)
        ck = loaded[key]
        settings = _cell_settings(study, cell, ckpt, ck.step, run, refs[cell.metric])
        rec = reusable_record(path, "settings", settings)
        if rec is not None:
            records.append(rec)
            continue
        bar.set_postfix_str(f"{cell.run} s{cell.seed} {cell.key}")
        cfg = ck.config
        shape = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
        scored = score_cell(ck.ema, NoiseSchedule.from_config(cfg.diffusion), study, cell, run,
                            extractors[cell.metric], refs[cell.metric], shape, device)
        rec = {"run": cell.run, "seed": cell.seed, "sampler": cell.sampler, "steps": cell.steps,
               "draw": cell.draw, "metric_kind": cell.metric, **scored, "settings": settings}
        atomic_write_text(path, json.dumps(rec, indent=2))
        records.append(rec)
    return records


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


def run_study(config, out=None, quick: bool = False, progress: bool = True, report_only: bool = False) -> Path:
    """The whole study: train, evaluate, grids, results.csv, report.md, fd_vs_nfe.png.
    ``report_only``: no training or sampling, the report of the cells scored so far."""
    study = load_study(config, quick=quick)
    out = Path(out) if out else Path("runs") / (Path(config).stem + ("-quick" if quick else ""))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    train_seconds = train_all(study, out, train_missing=not report_only)
    records = evaluate_all(study, out, progress=progress, score=not report_only)
    write_mosaics(study, out)
    rows = report.rows_from_records(records)
    atomic_write_text(out / "results.csv", report.csv_text(rows))
    report.plot_fd_vs_nfe(rows, study, out / "fd_vs_nfe.png")
    cost = {"train_seconds": sum(train_seconds.values()), "eval_seconds": sum(r["seconds"] for r in records),
            "this_invocation_seconds": time.time() - t0, "cells_planned": len(plan_cells(study)),
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
