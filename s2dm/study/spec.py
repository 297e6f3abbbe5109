"""A study YAML as typed sections: runs (training-config overrides x seeds; controls sample
another run's weights with an eps_scale, or a sweep of them), the baseline, the effect, the
evaluation cells and the quick preset; for a v2 study also the twins (trained variant →
training-free control), the sum-reduction baseline and FD-cnn. Built and checked like a run
config (``io.config.build_dataclass``).

Every ε-scale is stored as its canonical label (``samplers.eps_scale_label``): the records,
results.csv and the report carry that one text. A sweep ``key: {weights_of: R, sweep: [a, b]}``
becomes one control run per scale, named ``key[label]`` (``const-sweep[const:0.995]``); on disk
a run's folders use ``path_name`` of its name (``const-sweep_const=0.995``)."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from ..errors import ConfigError, S2dmError, SamplerError, StudyError
from ..io.config import Config, build_dataclass, find_config, read_config_yaml, read_yaml, shipped_configs
from ..samplers import check_sampler, eps_scale_label, parse_eps_scale

# -- the study YAML, as typed sections (built and checked like a run config) ---------------
@dataclass
class RunSpec:
    seeds: List[int]
    set: Dict[str, Any] = field(default_factory=dict)  # training-config overrides of this run
    weights_of: Optional[str] = None  # a control: sample this run's weights ...
    eps_scale: Optional[str] = None  # ... with this ε-scaling
    sweep: Optional[List[Union[float, str]]] = None  # ... or one control run per ε-scaling
    samplers: Optional[List[str]] = None  # a subset of the study's samplers (None: all)


@dataclass
class CnnSpec:
    n: int = 0  # FD-cnn on n samples per cell (0: off); n == eval.n shares FD-pixels' images


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
    order: int = 3
    batch_size: int = 500
    noise_draw: Optional[str] = None
    noise_seed_offset: int = 1_000_000
    fid: FidSpec = field(default_factory=FidSpec)
    cnn: CnnSpec = field(default_factory=CnnSpec)
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
    twins: Dict[str, str] = field(default_factory=dict)  # trained variant → its training-free twin
    sum_baseline: Optional[str] = None  # the baseline trained with loss.reduction: sum
    quick: Optional[QuickSpec] = None


STUDY_KEYS = {f.name for f in dataclasses.fields(StudyFile)}
MOSAIC_SEEDS = range(100)  # each run's mosaic: 10×10 images of these seeds
TRAINING_SECTIONS = [f.name for f in dataclasses.fields(Config)]


@dataclass
class Run:
    name: str
    seeds: List[int]
    overrides: Dict[str, object] = field(default_factory=dict)
    weights_of: Optional[str] = None  # a control: sample this run's weights
    eps_scale: Optional[str] = None  # the canonical label (eps_scale_label)
    samplers: Optional[List[str]] = None  # a subset of the study's samplers (None: all)
    sweep: Optional[str] = None  # the YAML key of the sweep this control was expanded from

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
    order: int
    batch_size: int
    noise_draw: Optional[str]
    noise_seed_offset: int
    fid_n: int
    fid_steps: List[int]
    fid_samplers: Optional[List[str]]
    mosaic_steps: int
    cnn_n: int  # FD-cnn per cell (0: off)
    twins: Dict[str, str]  # trained variant → training-free twin
    sum_baseline: Optional[str]
    sweeps: Dict[str, List[str]]  # sweep key → its runs' names
    quick: bool = False  # set by the quick preset (_apply_quick)

    @property
    def v2(self) -> bool:
        """The study asks the v2 questions (questions.py's H1–H4 sections)."""
        return bool(self.twins or self.sum_baseline or self.sweeps or self.cnn_n)


def sweep_run_name(key: str, label: str) -> str:
    """The run a sweep expands to for one scale: ``const-sweep[const:0.995]``."""
    return f"{key}[{label}]"


_PATH_CHARS = {"[": "_", "]": "", ":": "=", ",": "+"}


def path_name(name: str) -> str:
    """A run's name as a file or folder name: ``const-sweep[const:0.995]`` →
    ``const-sweep_const=0.995`` (no brackets for shell globs, no colons); a plain name (letters,
    digits, ``.``, ``_``, ``-``) is kept as it is."""
    return "".join(_PATH_CHARS.get(ch, ch if re.fullmatch(r"[A-Za-z0-9._+=-]", ch) else "_") for ch in name)


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
    _not_a_training_config(raw, given)
    try:
        spec = build_dataclass(StudyFile, raw)
    except S2dmError as exc:  # a key or value of the study YAML: a StudyError naming the file and key
        raise StudyError(f"{path}: {exc}") from None
    train_config = _train_config(spec.train_config, path)
    runs: Dict[str, Run] = {}
    sweeps: Dict[str, List[str]] = {}
    for name, r in spec.runs.items():
        seeds = _int_list(r.seeds, f"{path}: runs.{name}.seeds")
        if r.sweep is None:
            label = _label(r.eps_scale, f"{path}: runs.{name}.eps_scale")
            if r.weights_of is not None and label is None:
                raise StudyError(f"{path}: runs.{name} samples {r.weights_of}'s weights: give it an eps_scale or a "
                                 f"sweep (without one it is {r.weights_of} itself, which the study samples already)")
            runs[name] = Run(name, seeds, dict(r.set), r.weights_of, label, r.samplers)
            continue
        for label in _sweep_labels(r, f"{path}: runs.{name}"):
            run = Run(sweep_run_name(name, label), seeds, dict(r.set), r.weights_of, label, r.samplers, sweep=name)
            if run.name in spec.runs or run.name in runs:
                raise StudyError(f"{path}: runs.{name}.sweep makes a run named {run.name!r}, which the study already has")
            runs[run.name] = run
            sweeps.setdefault(name, []).append(run.name)
    for run in runs.values():
        if run.weights_of is not None:
            src = runs.get(run.weights_of)
            if src is None or not src.trained:
                raise StudyError(f"{path}: runs.{run.name}.weights_of names {run.weights_of!r}, not a trained run")
            if not set(run.seeds) <= set(src.seeds):
                raise StudyError(f"{path}: runs.{run.name}.seeds must be seeds of {run.weights_of}")
            if run.overrides:
                raise StudyError(f"{path}: runs.{run.name} samples {run.weights_of}'s weights; it cannot `set` training keys")
    if not runs:
        raise StudyError(f"{path}: runs: the study has no runs; give at least the baseline")
    if spec.effect is not None and (spec.effect not in runs or spec.effect == spec.baseline):
        raise StudyError(f"{path}: effect {spec.effect!r} must name a run other than the baseline "
                         f"(runs: {', '.join(runs)}), or be left out")
    ev = spec.eval
    study = Study(
        path=path, train_config=train_config, overrides=dict(spec.set), runs=runs,
        baseline=spec.baseline, effect=spec.effect, samplers=_check_samplers(ev.samplers, "eval.samplers", str(path)),
        steps=_int_list(ev.steps, f"{path}: eval.steps"), n=ev.n, order=ev.order,
        batch_size=ev.batch_size, noise_draw=ev.noise_draw, noise_seed_offset=ev.noise_seed_offset,
        fid_n=ev.fid.n, fid_steps=_int_list(ev.fid.steps, f"{path}: eval.fid.steps"), fid_samplers=ev.fid.samplers,
        mosaic_steps=ev.mosaic_steps, cnn_n=ev.cnn.n, twins=dict(spec.twins), sum_baseline=spec.sum_baseline,
        sweeps=sweeps,
    )
    _check_v2_keys(study, path)
    if quick:
        _apply_quick(study, spec.quick, path)
    _validate(study)
    return study


def _train_config(name: str, path: Path) -> Path:
    """``train_config`` next to the study file, else a shipped config of that bare name (a study
    YAML copied elsewhere still finds ``digits.yaml``)."""
    try:
        found = find_config(name, folder=path.parent).resolve()
    except ConfigError:
        bare = Path(name).parent == Path(".")
        raise StudyError(f"{path}: train_config {name} not found at {(path.parent / name).resolve()}"
                         + (" nor among the shipped configs" if bare else "")) from None
    try:
        read_config_yaml(found)  # the file itself: YAML, and a training config, not a study
    except S2dmError as exc:
        raise StudyError(f"{path}: train_config: {exc}") from None
    return found


def _label(text, where: str) -> Optional[str]:
    """An eps_scale as its canonical label (None for none); a bad one is a StudyError at ``where``."""
    if text is None:
        return None
    try:
        return eps_scale_label(parse_eps_scale(str(text)))
    except S2dmError as exc:
        raise StudyError(f"{where}: {str(exc).removeprefix('eps_scale: ')}") from None


def _sweep_labels(r: RunSpec, where: str) -> List[str]:
    """A sweep's scales as canonical labels: a control's, non-empty, none and repeats refused."""
    if r.eps_scale is not None:
        raise StudyError(f"{where}: eps_scale and sweep exclude each other; a sweep lists every scale")
    if r.weights_of is None:
        raise StudyError(f"{where}.sweep: a sweep samples another run's weights; give weights_of")
    if not r.sweep:
        raise StudyError(f"{where}.sweep: expected a non-empty list of eps-scales, e.g. [\"const:0.995\", \"const:1.005\"]")
    labels = []
    for i, item in enumerate(r.sweep):
        label = _label(item, f"{where}.sweep[{i}]")
        if label is None:
            raise StudyError(f"{where}.sweep[{i}]: none is {r.weights_of} itself, which the study samples already")
        if label in labels:
            raise StudyError(f"{where}.sweep repeats {label} (items {labels.index(label)} and {i})")
        labels.append(label)
    return labels


def _check_v2_keys(study: Study, path: Path) -> None:
    """twins: a trained variant → a control sampling the baseline's weights with an eps_scale;
    sum_baseline: a trained run other than the baseline; eval.cnn.n: 0 or at least 2."""
    runs, base = study.runs, study.baseline
    for variant, twin in study.twins.items():
        if variant not in runs or not runs[variant].trained or variant == base:
            raise StudyError(f"{path}: twins.{variant}: the key must name a trained run other than the baseline")
        if twin not in runs or runs[twin].weights_of != base or runs[twin].eps_scale is None:
            raise StudyError(f"{path}: twins.{variant}: {twin!r} must name a control that samples {base}'s weights "
                             "with an eps_scale")
    if study.sum_baseline is not None and (study.sum_baseline not in runs or not runs[study.sum_baseline].trained
                                           or study.sum_baseline == base):
        raise StudyError(f"{path}: sum_baseline {study.sum_baseline!r} must name a trained run other than the baseline")
    if study.cnn_n == 1 or study.cnn_n < 0:
        raise StudyError(f"{path}: eval.cnn.n must be 0 (off) or at least 2, not {study.cnn_n}")
    folders: Dict[str, str] = {}
    for name in runs:
        other = folders.setdefault(path_name(name), name)
        if other != name:
            raise StudyError(f"{path}: runs {other!r} and {name!r} would share the folder name {path_name(name)!r}")


def shipped_study_configs() -> List[Path]:
    return [p for p in shipped_configs() if p.name.startswith("study_")]


def _not_a_training_config(raw, given) -> None:
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
    if q.runs is not None:  # a sweep's key names all its runs
        missing = [r for r in q.runs if r not in study.runs and r not in study.sweeps]
        if missing:
            raise StudyError(f"{path}: quick.runs names unknown run {missing[0]!r}")
        keep = {name for r in q.runs for name in study.sweeps.get(r, [r])}
        if study.baseline not in keep:
            raise StudyError(f"{path}: quick.runs must keep the baseline, {study.baseline}")
        for name in sorted(keep):
            source = study.runs[name].weights_of
            if source is not None and source not in keep:
                raise StudyError(f"{path}: quick.runs keeps {name} but not {source}, whose weights it samples")
        study.runs = {k: v for k, v in study.runs.items() if k in keep}
        study.sweeps = {k: [n for n in v if n in keep] for k, v in study.sweeps.items()}
        study.sweeps = {k: v for k, v in study.sweeps.items() if v}
        study.twins = {v: t for v, t in study.twins.items() if v in keep and t in keep}
        if study.sum_baseline not in keep:
            study.sum_baseline = None
    if q.seeds is not None:
        seeds = _int_list(q.seeds, f"{path}: quick.seeds")
        for run in study.runs.values():
            run.seeds = [s for s in run.seeds if s in seeds] or seeds[:1]
    if q.samplers is not None:
        study.samplers = _check_samplers(q.samplers, "quick.samplers", str(path))
    if q.steps is not None:
        study.steps = _int_list(q.steps, f"{path}: quick.steps")
    if q.n is not None:  # FD-cnn follows when it shares FD-pixels' images
        if study.cnn_n == study.n:
            study.cnn_n = q.n
        study.n = q.n
    study.overrides.update(q.set)
    study.quick = True


def _check_samplers(names, key: str, where: str) -> List[str]:
    """``names`` as a list if each is a sampler's, at least one, none twice (SamplerError or
    StudyError ``{where}: {key}: ...`` otherwise)."""
    try:
        checked = [check_sampler(name, key=key) for name in names]
    except SamplerError as exc:
        raise exc.retold(f"{where}: {exc}") from None
    if not checked:
        raise StudyError(f"{where}: {key}: expected a non-empty list of samplers")
    if len(set(checked)) != len(checked):
        raise StudyError(f"{where}: {key}: repeats an item: {checked!r}")
    return checked


def _validate(study: Study) -> None:
    where = str(study.path)
    if study.baseline not in study.runs or not study.runs[study.baseline].trained:
        raise StudyError(f"{where}: baseline {study.baseline!r} is not a trained run of the study")
    if study.effect is not None and study.effect not in study.runs:
        study.effect = None  # e.g. dropped by a quick preset
    if study.noise_draw is not None and study.noise_draw not in study.runs:
        raise StudyError(f"{where}: eval.noise_draw names unknown run {study.noise_draw!r}")
    used = set(study.samplers) | set(study.fid_samplers or ())
    for run in study.runs.values():
        if run.samplers is not None:
            key = f"runs.{run.name}.samplers" if run.sweep is None else f"runs.{run.sweep}.samplers"
            _check_samplers(run.samplers, key, where)
            others = [s for s in run.samplers if s not in used]
            if others and not study.quick:
                raise StudyError(f"{where}: {key}: {others[0]} is not among the study's samplers "
                                 f"({', '.join(sorted(used))})")
            run.samplers = [s for s in run.samplers if s in used]  # a quick preset may drop some
            if not run.samplers:
                raise StudyError(f"{where}: {key}: none of them is among the quick preset's samplers "
                                 f"({', '.join(sorted(used))}); the run would have no cells")
    if study.fid_samplers is not None:
        _check_samplers(study.fid_samplers, "eval.fid.samplers", where)
    if study.n < 2:
        raise StudyError(f"{where}: eval.n must be at least 2, not {study.n}")
    largest = max(study.n, study.cnn_n)  # the metrics with a noise draw (FID cells have none)
    if study.noise_draw is not None and study.noise_seed_offset < largest:
        raise StudyError(f"{where}: eval.noise_seed_offset {study.noise_seed_offset} must be at least the largest "
                         f"image count ({largest}): the independent draw's image seeds would repeat the main "
                         f"draw's 0-{largest - 1}, and the metric's noise would read as 0")
    if study.batch_size < 1:
        raise StudyError(f"{where}: eval.batch_size must be at least 1, not {study.batch_size}")
    if study.mosaic_steps < 1:
        raise StudyError(f"{where}: eval.mosaic_steps must be at least 1, not {study.mosaic_steps}")
