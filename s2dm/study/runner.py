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
from typing import Dict, List, Optional

import yaml
from tqdm.auto import tqdm

from ..core.ema import describe_ema
from ..core.schedule import NoiseSchedule
from ..errors import UserError
from ..io.checkpoint import load_checkpoint, resolve_checkpoint
from ..io.config import Config, find_config, load_config, shipped_configs
from ..metrics.fid import FeatureExtractor, Stats, frechet_distance, metric_label, reference_stats
from ..samplers import SAMPLERS, expected_nfe, parse_eps_scale
from ..samplers.generate import generate
from ..training.loop import train
from ..util.dist import pick_device
from ..util.fileio import atomic_write_text
from ..util.images import make_grid_png, to_uint8
from . import report

STUDY_KEYS = {"train_config", "set", "runs", "baseline", "effect", "eval", "quick"}
RUN_KEYS = {"set", "seeds", "weights_of", "eps_scale", "samplers"}
EVAL_KEYS = {"samplers", "steps", "n", "features", "order", "batch_size", "noise_draw", "noise_seed_offset",
             "fid", "grid_steps"}
FID_KEYS = {"n", "steps", "samplers"}
QUICK_KEYS = {"runs", "seeds", "samplers", "steps", "n", "set"}
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
    grid_steps: int = 20
    quick: bool = False


def _check_keys(d: dict, allowed: set, where: str) -> None:
    if not isinstance(d, dict):
        raise UserError(f"{where}: expected a mapping, got {type(d).__name__}")
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")


def _int_list(value, where: str) -> List[int]:
    if not isinstance(value, list) or not value or not all(isinstance(v, int) and not isinstance(v, bool)
                                                           for v in value):
        raise UserError(f"{where}: expected a non-empty list of integers, got {value!r}")
    if len(set(value)) != len(value):
        raise UserError(f"{where}: repeats an item: {value!r}")
    return list(value)


def load_study(path, quick: bool = False) -> Study:
    """Read and validate a study YAML; ``quick`` applies its ``quick:`` preset."""
    given, path = path, find_config(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({exc})") from None
    _not_a_training_config(raw, path, given)
    _check_keys(raw, STUDY_KEYS, str(path))
    for key in ("train_config", "runs", "baseline", "eval"):
        if key not in raw:
            raise UserError(f"{path}: missing key {key!r}")
    train_config = (path.parent / raw["train_config"]).resolve()
    if not train_config.is_file():
        raise UserError(f"{path}: train_config {raw['train_config']} not found at {train_config}")
    runs = {}
    _check_keys(raw["runs"], set(raw["runs"]) if isinstance(raw["runs"], dict) else set(), f"{path}: runs")
    for name, spec in raw["runs"].items():
        where = f"{path}: runs.{name}"
        _check_keys(spec, RUN_KEYS, where)
        if "seeds" not in spec:
            raise UserError(f"{where}: missing key 'seeds'")
        run = Run(name, _int_list(spec["seeds"], f"{where}.seeds"), dict(spec.get("set") or {}),
                  spec.get("weights_of"), spec.get("eps_scale"), spec.get("samplers"))
        if run.eps_scale is not None:
            parse_eps_scale(str(run.eps_scale))
        runs[name] = run
    for run in runs.values():
        if run.weights_of is not None:
            src = runs.get(run.weights_of)
            if src is None or not src.trained:
                raise UserError(f"{path}: runs.{run.name}.weights_of names {run.weights_of!r}, not a trained run")
            if not set(run.seeds) <= set(src.seeds):
                raise UserError(f"{path}: runs.{run.name}.seeds must be seeds of {run.weights_of}")
            if run.overrides:
                raise UserError(f"{path}: runs.{run.name} samples {run.weights_of}'s weights; it cannot `set` training keys")
    effect = raw.get("effect")
    if effect is not None and (not isinstance(effect, str) or effect not in runs or effect == raw["baseline"]):
        raise UserError(f"{path}: effect {effect!r} must name a run other than the baseline "
                        f"(runs: {', '.join(runs)}), or be left out")
    ev = raw["eval"]
    _check_keys(ev, EVAL_KEYS, f"{path}: eval")
    fid = ev.get("fid") or {}
    _check_keys(fid, FID_KEYS, f"{path}: eval.fid")
    study = Study(
        path=path, train_config=train_config, overrides=dict(raw.get("set") or {}), runs=runs,
        baseline=raw["baseline"], effect=effect,
        samplers=list(ev.get("samplers", ["ddim"])), steps=_int_list(ev.get("steps", [10]), "eval.steps"),
        n=int(ev.get("n", 5000)), features=ev.get("features", "pixels"), order=int(ev.get("order", 3)),
        batch_size=int(ev.get("batch_size", 2500)), noise_draw=ev.get("noise_draw"),
        noise_seed_offset=int(ev.get("noise_seed_offset", 1_000_000)), fid_n=int(fid.get("n", 0)),
        fid_steps=_int_list(fid.get("steps", [10]), "eval.fid.steps"), fid_samplers=fid.get("samplers"),
        grid_steps=int(ev.get("grid_steps", 20)),
    )
    if quick:
        _apply_quick(study, raw.get("quick"), path)
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
        raise UserError(f"{given} is a training config (it has sections {', '.join(sections)}), not a study; "
                        f"study configs: {', '.join(studies)} (s2dm study --config {studies[0]})")


def _apply_quick(study: Study, q, path: Path) -> None:
    if not q:
        raise UserError(f"{path} has no `quick:` preset")
    _check_keys(q, QUICK_KEYS, f"{path}: quick")
    if "runs" in q:
        missing = [r for r in q["runs"] if r not in study.runs]
        if missing:
            raise UserError(f"{path}: quick.runs names unknown run {missing[0]!r}")
        study.runs = {k: v for k, v in study.runs.items() if k in q["runs"]}
    if "seeds" in q:
        seeds = _int_list(q["seeds"], "quick.seeds")
        for run in study.runs.values():
            run.seeds = [s for s in run.seeds if s in seeds] or seeds[:1]
    for key in ("samplers", "steps", "n"):
        if key in q:
            setattr(study, key, q[key] if key != "steps" else _int_list(q[key], "quick.steps"))
    study.overrides.update(q.get("set") or {})
    study.quick = True


def _validate(study: Study, samplers) -> None:
    where = str(study.path)
    if study.baseline not in study.runs or not study.runs[study.baseline].trained:
        raise UserError(f"{where}: baseline {study.baseline!r} is not a trained run of the study")
    if study.effect is not None and study.effect not in study.runs:
        study.effect = None  # e.g. dropped by a quick preset
    if study.noise_draw is not None and study.noise_draw not in study.runs:
        raise UserError(f"{where}: eval.noise_draw names unknown run {study.noise_draw!r}")
    for run in study.runs.values():
        if run.samplers is not None:
            bad = [s for s in run.samplers if s not in samplers]
            if bad:
                raise UserError(f"{where}: runs.{run.name}.samplers: unknown sampler {bad[0]!r}")
            run.samplers = [s for s in run.samplers if s in study.samplers]  # a quick preset may drop some
    for s in list(study.samplers) + list(study.fid_samplers or []):
        if s not in samplers:
            raise UserError(f"{where}: unknown sampler {s!r}; choose from {', '.join(samplers)}")
    if study.n < 2:
        raise UserError(f"{where}: eval.n must be at least 2, not {study.n}")
    if study.features != "pixels":
        raise UserError(f"{where}: eval.features must be pixels (Inception FID goes under eval.fid)")


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
            done = json.loads(cost.read_text()) if cost.is_file() else {}
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
    eps_scale = parse_eps_scale(run.eps_scale) if run.eps_scale else None

    def batches():
        for i in range(0, len(seeds), study.batch_size):
            images, _ = generate(model, schedule, seeds[i:i + study.batch_size], image_shape=shape,
                                 batch_size=study.batch_size, device=device, sampler=cell.sampler,
                                 steps=cell.steps, order=study.order, eps_scale=eps_scale)
            yield to_uint8(images)

    stats = extractor.stats_of_uint8(batches(), len(seeds), f"{run.name} {cell.key}")
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
        if path.is_file():
            rec = json.loads(path.read_text())
            if rec.get("settings") == settings:
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


def write_grids(study: Study, out: Path) -> None:
    """A 10×10 grid per run (its first seed's model, DDIM at ``grid_steps``, image seeds 0..99)."""
    for run in study.runs.values():
        path = out / "grids" / f"{run.name}.png"
        source = out / "runs" / model_name(run.weights_of or run.name, run.seeds[0])
        if path.is_file() or not (source / "study_done.json").is_file():
            continue
        device = pick_device("auto")
        ck = load_checkpoint(_checkpoint_of(study, out, run, run.seeds[0]), device=device)
        cfg = ck.config
        images, _ = generate(ck.ema, NoiseSchedule.from_config(cfg.diffusion), range(100),
                             image_shape=(cfg.data.channels, cfg.data.image_size, cfg.data.image_size),
                             batch_size=100, device=device, sampler="ddim", steps=study.grid_steps,
                             eps_scale=parse_eps_scale(run.eps_scale) if run.eps_scale else None)
        make_grid_png(images, path)


def run_study(config, out=None, quick: bool = False, progress: bool = True, report_only: bool = False) -> Path:
    """The whole study: train, evaluate, grids, results.csv, report.md, fd_vs_nfe.png.
    ``report_only``: no training or sampling, the report of the cells scored so far."""
    study = load_study(config, quick=quick)
    out = Path(out) if out else Path("runs") / (Path(config).stem + ("-quick" if quick else ""))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    train_seconds = train_all(study, out, train_missing=not report_only)
    records = evaluate_all(study, out, progress=progress, score=not report_only)
    write_grids(study, out)
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
