"""Typed run configuration: YAML ⇄ dataclasses, ``--set`` overrides, validation.

Every error names the offending key by its dotted name (``loss.tau``) so a user can find it.
"""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
import yaml

from ..core.losses import LOSS_TYPES, REDUCTIONS, T_SAMPLINGS
from ..core.schedule import BETA_SCHEDULES, VARIANTS, NoiseSchedule
from ..errors import ConfigError
from ..samplers.options import SampleOptions
from ..util.fileio import atomic_write_text
from ..util.listargs import listed
from ..util.textfmt import first_sentence
from ..util.yamlio import RepeatedKey, dump_yaml, load_yaml
from .data import DATASETS, check_labelled


@dataclass
class DataConfig:
    dataset: str = "digits"  # digits | fashion_mnist | cifar10 | celeba | folder
    root: Optional[str] = None  # where the files are (not needed for digits)
    image_size: int = 8
    channels: int = 1
    random_flip: bool = False  # the paper flips CIFAR10 and CelebA, not digits
    download: bool = False  # only torchvision-downloadable sets, and only when asked
    num_workers: Union[int, str] = 0  # loader processes; "auto": one per spare CPU, at most 8


@dataclass
class ModelConfig:
    ch: int = 128
    ch_mult: List[int] = field(default_factory=lambda: [1, 2, 2, 2])
    num_res_blocks: int = 2
    attn_resolutions: List[int] = field(default_factory=lambda: [16])
    dropout: float = 0.1
    resamp_with_conv: bool = True


@dataclass
class DiffusionConfig:
    num_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02


@dataclass
class LossConfig:
    type: str = "s2"  # l0 | s2
    skip: int = 9
    tau: float = 0.99
    variant: str = "independent"  # independent | shared (which ε′ L_skip uses)
    reduction: str = "mean"  # mean | sum over pixels, per sample
    t_sampling: str = "antithetic"  # antithetic | uniform


@dataclass
class OptimConfig:
    lr: float = 2e-4
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    warmup: int = 0  # linear lr warm-up steps (the DDIM configs use none)
    fused: bool = True  # Adam's fused kernel (one call for all parameters); false: its per-parameter loop


# Evaluation metrics during training → the features they compare (training/evaluation.py
# scores them with metrics/, whose FID and FD-pixels labels they get).
EVAL_METRICS = {"fd-pixels": "pixels", "fid": "inception", "fd-cnn": "cnn"}
# pytorch-fid's Inception blocks by their features' dimension (its --dims); the last, pool3, is
# FID's: the dimension a FID's covariance has.
INCEPTION_DIMS = (64, 192, 768, 2048)
INCEPTION_DIM = INCEPTION_DIMS[-1]


@dataclass
class EvalConfig(SampleOptions):
    """Evaluation during training (``train.eval_every``): the sampler options are
    ``SampleOptions``' fields (as in ``sample:``), then what is scored and how."""

    n: int = 1000  # images per evaluation, image seeds seed .. seed+n-1 (the same every time)
    metric: str = "fd-pixels"  # fd-pixels | fid (pytorch-fid's Inception: offline weights needed) | fd-cnn
    seed: int = 0
    batch_size: int = 256  # images per network call
    inception_weights: Optional[str] = None  # fid: pt_inception-2015-12-05-6726825d.pth (default: found offline)


@dataclass
class TrainConfig:
    steps: int = 800_000
    batch_size: int = 128
    seed: int = 0
    ema_decay: float = 0.9999
    ema_warmup: bool = True  # decay ramps up as min(ema_decay, (1+k)/(10+k)); false: fixed from step 0
    log_every: int = 50
    checkpoint_every: int = 10_000
    sample_every: int = 10_000
    keep_last: int = 2  # older checkpoints kept besides the newest
    max_nonfinite: int = 10  # stop after this many non-finite losses in a row (each is skipped)
    device: str = "auto"  # auto | cpu | cuda | cuda:N (under torchrun: each rank's own GPU)
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 adds a GradScaler)
    channels_last: bool = False  # NHWC weights and activations (faster convolutions on GPUs)
    compile: bool = False  # torch.compile the training forward (slow start, faster steps)
    eval_every: int = 0  # score the EMA model every N steps (a multiple of log_every; 0: never)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tensorboard: bool = False  # also write RUN/tb/ (pip install 's2dm[tensorboard]')


@dataclass
class SampleConfig(SampleOptions):
    """The preview mosaics written during training: the sampler options are ``SampleOptions``'
    fields (inherited, so the two cannot drift), then the mosaic's own keys."""

    mosaic_images: int = 64
    seed: int = 0
    batch_size: int = 256


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def dump(self, path: Union[str, Path]) -> None:
        atomic_write_text(path, dump_yaml(self.to_dict()))  # never half a file


_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


# -- building from plain data ---------------------------------------------------------------
def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    if origin is Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(value, inner[0], key)
        for option in inner:  # the first type that takes the value
            try:
                return _coerce(value, option, key)
            except ConfigError:
                pass
        names = " or ".join(getattr(a, "__name__", str(a)) for a in inner)
        raise ConfigError(f"{key}: expected {names}, got {type(value).__name__} {value!r}", key=key)
    if origin in (list, List):
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}", key=key)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Dict):  # a mapping of names (study runs, overrides) to values
        _, item_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}", key=key)
        return {str(k): _coerce(v, item_tp, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, key)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():  # 2e3 steps
            return int(value)
    elif tp is float:
        if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
            value = float(value)  # the Python API's "1e-3"
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # no setting takes an infinity: lr .inf would train on NaN
                raise ConfigError(f"{key}: expected a finite number, got {value!r}", key=key)
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a programming error, not a user error
        raise TypeError(f"unsupported config type {tp} at {key}")
    # YAML reads 2024, 1.10 or yes unquoted as a number or a bool; its text may not survive.
    hint = (f" (quote it as YAML text, '...'; an override needs the quotes to reach s2dm, e.g. \"{key}='...'\" "
            "in a shell)") if tp is str and isinstance(value, (int, float)) else ""
    raise ConfigError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}{hint}", key=key)


def build_dataclass(cls, data: Any, prefix: str = ""):
    """``cls(**data)``, every value checked against its annotation, recursively; unknown and
    missing keys are errors naming the dotted key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}", key=prefix or None)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"{key}: unknown key (valid keys here: {', '.join(sorted(names))})", key=key)
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in data]
    if missing:
        key = f"{prefix}.{missing[0]}" if prefix else missing[0]
        raise ConfigError(f"{key}: missing key", key=key)
    kwargs = {name: _coerce(value, hints[name], f"{prefix}.{name}" if prefix else name)
              for name, value in data.items()}
    return cls(**kwargs)


def config_from_dict(data: dict) -> Config:
    cfg = build_dataclass(Config, data)
    validate(cfg)
    return cfg


# Keys added after runs had been saved: a saved config without one was made with the value
# given here (the behaviour before the key existed), not with today's default.
LEGACY_VALUES = {"train.ema_warmup": False, "optim.fused": False,
                 # the sampler options the preview mosaics used before sample: had these keys
                 "sample.order": 3, "sample.eps_scale": None, "sample.legacy_pndm_index": False}


# Keys renamed since runs were saved: old name -> new name.
LEGACY_NAMES = {"sample.grid_images": "sample.mosaic_images"}


def renamed_as_current(data: dict) -> dict:
    """A config (plain dict) with the keys of LEGACY_NAMES in today's names (a copy)."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for old, new in LEGACY_NAMES.items():
        (section, name), (_, new_name) = old.split("."), new.split(".")
        # A section that is not a mapping (None, a list) is config_from_dict's to refuse or take.
        if isinstance(data.get(section), dict) and name in data[section]:
            data[section].setdefault(new_name, data[section].pop(name))
    return data


def saved_as_current(data: dict) -> dict:
    """A saved config (plain dict) in today's key names, with LEGACY_VALUES for keys it predates."""
    data = renamed_as_current(data)
    for dotted, value in LEGACY_VALUES.items():
        section, name = dotted.split(".")
        data.setdefault(section, {}).setdefault(name, value)
    return data


def config_from_saved(data: dict) -> Config:
    """The config of a saved run or checkpoint (older key names and missing keys included)."""
    return config_from_dict(saved_as_current(data))


# -- validation of values ------------------------------------------------------------------
# train.precision: each name with its autocast dtype (training/precision.py)
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Every choice is declared where it is implemented; the config checks against those lists.
_CHOICES = {
    "data.dataset": DATASETS,
    "diffusion.beta_schedule": BETA_SCHEDULES,
    "loss.type": LOSS_TYPES,
    "loss.variant": VARIANTS,
    "loss.reduction": REDUCTIONS,
    "loss.t_sampling": T_SAMPLINGS,
    "train.precision": tuple(PRECISIONS),
}


def _get(cfg: Config, dotted: str):
    section, name = dotted.split(".")
    return getattr(getattr(cfg, section), name)


def validate(cfg: Config) -> None:
    """Range and choice checks; raise ConfigError naming the dotted key (SamplerError for the
    ``sample.`` options, as everywhere else they are checked)."""
    for key, choices in _CHOICES.items():
        if _get(cfg, key) not in choices:
            raise ConfigError(f"{key}: {_get(cfg, key)!r} is not one of {', '.join(choices)}", key=key)

    def need(ok: bool, key: str, why: str):
        if not ok:
            raise ConfigError(f"{key}: {why}, got {_get(cfg, key)!r}", key=key)

    T = cfg.diffusion.num_timesteps
    need(T >= 2, "diffusion.num_timesteps", "must be at least 2")
    need(0 < cfg.diffusion.beta_start < 1, "diffusion.beta_start", "must lie in (0, 1)")
    need(cfg.diffusion.beta_start <= cfg.diffusion.beta_end < 1, "diffusion.beta_end", "must lie in [beta_start, 1)")
    need(0.0 <= cfg.loss.tau <= 1.0, "loss.tau", "must lie in [0, 1]")
    need(1 <= cfg.loss.skip < T, "loss.skip", f"must lie in [1, {T - 1}]")
    need(cfg.train.steps > 0, "train.steps", "must be positive")
    need(cfg.train.seed >= 0, "train.seed", "must be >= 0")
    need(cfg.train.batch_size > 0, "train.batch_size", "must be positive")
    need(cfg.train.batch_size % 2 == 0 or cfg.loss.t_sampling != "antithetic",
         "train.batch_size", "must be even for antithetic t sampling")
    need(0.0 <= cfg.train.ema_decay < 1.0, "train.ema_decay", "must lie in [0, 1)")
    for key in ("train.log_every", "train.checkpoint_every", "train.sample_every"):
        need(_get(cfg, key) > 0, key, "must be positive")
    need(cfg.train.keep_last >= 0, "train.keep_last", "must be >= 0")
    need(cfg.train.max_nonfinite >= 1, "train.max_nonfinite", "must be >= 1")
    need(cfg.optim.lr > 0, "optim.lr", "must be positive")
    for key in ("optim.beta1", "optim.beta2"):
        need(0.0 <= _get(cfg, key) < 1.0, key, "must lie in [0, 1)")
    need(cfg.optim.eps > 0, "optim.eps", "must be positive (Adam divides by sqrt(v) + eps)")
    need(cfg.optim.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    need(cfg.optim.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 disables clipping)")
    need(cfg.optim.warmup >= 0, "optim.warmup", "must be >= 0")
    need(cfg.data.channels in (1, 3), "data.channels", "must be 1 or 3")
    need(cfg.data.image_size >= 4, "data.image_size", "must be at least 4")
    need(cfg.data.num_workers == "auto" or (isinstance(cfg.data.num_workers, int) and cfg.data.num_workers >= 0),
         "data.num_workers", "must be auto or an int >= 0")
    need(cfg.model.ch > 0 and cfg.model.ch % 8 == 0, "model.ch",
         "must be a positive multiple of 8 (GroupNorm uses 32 groups, or 8 for toy widths)")
    need(len(cfg.model.ch_mult) >= 1 and all(m > 0 for m in cfg.model.ch_mult), "model.ch_mult",
         "must be a non-empty list of positive ints")
    levels = len(cfg.model.ch_mult)
    need(cfg.data.image_size % (2 ** (levels - 1)) == 0, "model.ch_mult",
         f"has {levels} levels, which needs data.image_size divisible by {2 ** (levels - 1)}")
    need(cfg.model.num_res_blocks >= 1, "model.num_res_blocks", "must be >= 1")
    need(0.0 <= cfg.model.dropout < 1.0, "model.dropout", "must lie in [0, 1)")
    need(cfg.sample.mosaic_images > 0, "sample.mosaic_images", "must be positive")
    need(cfg.sample.batch_size > 0, "sample.batch_size", "must be positive")
    need(cfg.sample.seed >= 0, "sample.seed", "must be >= 0")
    _validate_eval(cfg)
    # The preview mosaics' sampler options, with the one check ``s2dm sample`` makes: a typo
    # fails here, before step 1, not at the first mosaic.
    SampleOptions.of(cfg.sample).validate(NoiseSchedule.from_config(cfg.diffusion), prefix="sample.", quiet=True)


def _validate_eval(cfg: Config) -> None:
    """``train.eval_every`` and ``train.eval``: checked whether or not evaluation is on (a
    typo should not wait until it is switched on), except what only matters when it is."""
    ev, every = cfg.train.eval, cfg.train.eval_every
    if ev.metric not in EVAL_METRICS:
        raise ConfigError(f"train.eval.metric: {ev.metric!r} is not one of {', '.join(EVAL_METRICS)}",
                          key="train.eval.metric")
    if every < 0:
        raise ConfigError(f"train.eval_every: must be >= 0 (0: no evaluation), got {every}", key="train.eval_every")
    if ev.batch_size < 1:
        raise ConfigError(f"train.eval.batch_size: must be positive, got {ev.batch_size}", key="train.eval.batch_size")
    if ev.seed < 0:
        raise ConfigError(f"train.eval.seed: must be >= 0, got {ev.seed}", key="train.eval.seed")
    SampleOptions.of(ev).validate(NoiseSchedule.from_config(cfg.diffusion), prefix="train.eval.", quiet=True)
    if every == 0:
        return
    if ev.metric == "fd-cnn":
        check_labelled(cfg.data.dataset, key="train.eval.metric", use="fd-cnn")
    if every % cfg.train.log_every:
        raise ConfigError(f"train.eval_every: {every} is not a multiple of train.log_every ({cfg.train.log_every}); "
                          "each evaluation follows the log line of its step, so that the curves line up",
                          key="train.eval_every")
    d = cfg.data
    features = EVAL_METRICS[ev.metric]
    if features == "cnn":
        return  # its dimension is the classifier's: checked when the run starts (training/evaluation.py)
    if features == "pixels":
        check_eval_n(ev.n, d.channels * d.image_size ** 2, f"{d.channels}x{d.image_size}x{d.image_size} pixels")
    else:
        check_eval_n(ev.n, INCEPTION_DIM, "Inception pool3")


def check_eval_n(n: int, dim: int, features: str) -> None:
    """``train.eval.n`` must exceed the features' dimension ``dim``: fewer images make a singular
    covariance (training-time evaluation refuses it; ``s2dm eval``/``fid`` only note it)."""
    if n <= dim:
        raise ConfigError(f"train.eval.n: {n} images give a covariance of rank at most {max(n - 1, 0)} in "
                          f"{dim}-d features ({features}), so the Fréchet distance would be singular; use "
                          f"train.eval.n > {dim}", key="train.eval.n")


# -- files and overrides ------------------------------------------------------------------
def parse_override(text: str) -> tuple:
    """``a.b=value`` → (['a', 'b'], parsed value); the value is read as YAML (1e-4, [1,2], true)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. train.steps=200", key="overrides")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: bad key {key!r}", key="overrides")
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except RepeatedKey as exc:
        raise ConfigError(f"override {text!r}: {exc.problem}", key="overrides") from None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: List[str]) -> dict:
    for text in overrides or []:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            if node.get(part) is None:  # absent, or an empty YAML section (`train:` loads as None)
                node[part] = {}
            if not isinstance(node[part], dict):
                raise ConfigError(f"override {text!r}: {part} is not a section", key="overrides")
            node = node[part]
        node[path[-1]] = value
    return data


# The configs shipped inside the package (the repository's configs/ links here), so that a
# pip-installed s2dm finds `cifar10.yaml` too.
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"  # s2dm/configs


def shipped_configs() -> List[Path]:
    return sorted(CONFIG_DIR.glob("*.yaml"))


def config_summary(path: Union[str, Path]) -> str:
    """The first sentence of the comment paragraph that opens a config file (``s2dm configs``)."""
    lines = []
    for line in Path(path).read_text().splitlines():
        text = line[1:].strip() if line.startswith("#") else ""
        if not text:
            break  # the paragraph ends at a blank line, a bare "#" or the first key
        lines.append(text)
    return first_sentence(" ".join(lines))


def find_config(name: Union[str, Path], folder: Union[str, Path, None] = None) -> Path:
    """A YAML path as given (relative to ``folder``, default the current one), or a bare name
    (``cifar10.yaml``, ``cifar10``: the .yaml may be left out) in ``folder``, then among the
    shipped configs; otherwise one error naming what exists."""
    path, folder = Path(name), Path(folder or ".")
    if (folder / path).is_file():
        return folder / path
    if path.parent == Path("."):
        file = path if path.suffix in (".yaml", ".yml") else path.with_name(f"{path.name}.yaml")
        for found in (folder / file, CONFIG_DIR / file.name):  # a local file shadows the shipped one, as documented
            if found.is_file():
                return found
    names = ", ".join(p.name for p in shipped_configs())
    raise ConfigError(f"config file not found: {name} (shipped configs, usable by bare name: {names})", key="config")


def read_yaml(path: Union[str, Path]) -> dict:
    path = find_config(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = exc.object[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} on line {line}); save the "
                          "file as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        data = load_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        if isinstance(exc, RepeatedKey):
            raise ConfigError(f"{path}, line {mark.line + 1}, column {mark.column + 1}: {exc.problem}") from None
        raise ConfigError(f"{path}: YAML syntax error{where}: {getattr(exc, 'problem', exc)}") from None
    if data is None:  # nothing, or comments only: training on the defaults instead would hide the mistake
        raise ConfigError(f"{path} is empty", key="config")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


# The top-level keys that mark a study YAML (s2dm/study/spec.py) among config files.
STUDY_KEYS = ("train_config", "runs")


def read_config_yaml(path: Union[str, Path]) -> dict:
    """A training config YAML's sections, unvalidated; a study YAML is refused by name (else
    its first study key would read as an unknown config section)."""
    data = read_yaml(path)
    if set(STUDY_KEYS) <= set(data):
        raise ConfigError(f"{find_config(path)} is a study config (it has {' and '.join(STUDY_KEYS)}), not a "
                          "training config: run it with s2dm study", key="config")
    return data


def load_config(path: Union[str, Path, None] = None, overrides: Optional[List[str]] = None) -> Config:
    """Read a YAML file (or start from defaults), apply ``--set`` overrides, validate."""
    data = read_config_yaml(path) if path is not None else {}
    return config_from_dict(apply_overrides(data, listed(overrides or [])))


def as_config(cfg: Union[Config, dict, str, Path]) -> Config:
    """Accept a Config, a plain dict (e.g. from a checkpoint: older key names are read; a key
    the dict lacks takes today's default) or a YAML path."""
    if isinstance(cfg, Config):
        return cfg
    if isinstance(cfg, dict):
        return config_from_dict(renamed_as_current(cfg))
    return load_config(cfg)
