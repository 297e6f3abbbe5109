"""A study YAML as typed sections: runs (training-config overrides x seeds; controls sample
another run's weights with an eps_scale), the baseline, the effect, the evaluation cells and the
quick preset. Built and checked like a run config (``io.config.build_dataclass``)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..errors import S2dmError, StudyError
from ..io.config import Config, build_dataclass, find_config, read_yaml, shipped_configs
from ..samplers import SAMPLERS, parse_eps_scale

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
    batch_size: int = 500
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
    batch_size: int = 500
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
