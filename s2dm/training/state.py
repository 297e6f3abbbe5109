"""A training run's state and folder: what a checkpoint holds and restores (model, EMA,
optimiser, GradScaler, step, the log window), which config changes a resume accepts, and the
run folder's checks. ``loop.py`` drives the steps; this module knows the files."""
from __future__ import annotations

import dataclasses
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .._version import __version__
from ..core import seeds
from ..core.ema import make_ema
from ..core.unet import build_model
from ..errors import CheckpointError, RunError
from ..io.checkpoint import load_state_strict, read_checkpoint, save_run_checkpoint
from ..io.config import Config, EvalConfig, saved_as_current
from ..util import dist
from ..util.fileio import remove_stale_temps
from ..util.records import first_difference
from .curves import CURVES_FILE
from .precision import check_supported, ieee_float32, make_scaler, to_channels_last
from .tblog import TB_DIR


# How a refused resume is mended with ``train``: those errors' remedy, which a caller with other
# means (``s2dm study``) replaces with its own.
START_OVER = "start a new run folder, or start over with resume='never', force=True"


# Keys that may differ when a run is resumed (they change cadence, length, speed or what is
# watched, not the model or the loss). precision and optim.fused (the same Adam, other
# rounding) may change too (e.g. back to fp32 after fp16 trouble); the run then no longer
# continues bit-exactly, which is the user's explicit choice. Evaluation draws nothing from
# the training's random streams, so its settings may change (``best`` then restarts).
RESUMABLE_CHANGES = {"train.steps", "train.log_every", "train.checkpoint_every",
                     "train.sample_every", "train.keep_last", "train.device", "data.num_workers",
                     "data.root", "train.max_nonfinite", "train.precision", "train.channels_last",
                     "train.compile", "optim.fused", "train.eval_every", "train.tensorboard",
                     *(f"train.eval.{f.name}" for f in dataclasses.fields(EvalConfig))}


# -- the run ---------------------------------------------------------------------------------
def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        out.update(_flatten(v, key) if isinstance(v, dict) else {key: v})
    return out


def check_resumable(cfg: Config, saved: dict) -> None:
    differ = first_difference(_flatten(saved_as_current(saved)), _flatten(cfg.to_dict()), ignore=RESUMABLE_CHANGES)
    if differ:
        key, was, now = differ
        raise RunError(f"{key}: the run folder was trained with {was!r}, the config asks for {now!r}",
                       key=key, remedy=START_OVER)


@dataclass
class Skipped:
    """Steps skipped so far: non-finite losses (``in_row`` is what ``train.max_nonfinite``
    counts) and fp16 overflows the GradScaler skipped. Saved, so a resumed run counts on."""

    nonfinite_in_row: int = 0
    nonfinite_total: int = 0
    overflow_total: int = 0


@dataclass
class RunState:
    """What a checkpoint restores: the modules, the optimiser (and fp16 GradScaler) and the
    step counter. ``net`` is what the training forward calls: ``model`` itself, or ``model``
    wrapped in DDP and/or torch.compile (``wrap_for_training``)."""

    model: torch.nn.Module
    ema: torch.nn.Module
    opt: torch.optim.Optimizer
    step: int = 0
    scaler: Optional[torch.amp.GradScaler] = None
    net: Optional[torch.nn.Module] = None
    # The log window's sums since the last log line (global over ranks, on rank 0), so that a
    # run stopped between two log lines logs the same numbers after resuming.
    log_window: Optional[dict] = None
    skipped: Skipped = dataclasses.field(default_factory=Skipped)

    def to_checkpoint(self, cfg: Config) -> dict:
        return {
            "step": self.step, "config": cfg.to_dict(), "model": self.model.state_dict(),
            "ema": self.ema.state_dict(), "optimizer": self.opt.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "log_window": self.log_window, "skipped": dataclasses.asdict(self.skipped),
            # Every draw is derived from (seed, step), so these are not needed to resume;
            # they are kept so that a run's full RNG state at the checkpoint is on record.
            "rng": rng_states(), "data_position": self.step * cfg.train.batch_size,
            "versions": versions(),
        }


def rng_states() -> dict:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def new_state(cfg: Config, device: torch.device) -> RunState:
    """Fresh weights from (train.seed, INIT), whatever loss.type is (the same on every rank)."""
    device = torch.device(device)
    check_supported(cfg.train.precision, device)
    ieee_float32(cfg.train.precision, device)
    torch.manual_seed(seeds.derive_seed(cfg.train.seed, seeds.INIT))
    seeds.seed_host_rngs(cfg.train.seed)  # restore() puts back a checkpoint's own states
    model = build_model(cfg).to(device)
    if cfg.train.channels_last:
        model = to_channels_last(model)
    # fused=False is Adam's per-parameter loop, the implementation of runs saved before the key.
    opt = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                           eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay, fused=cfg.optim.fused)
    return RunState(model, make_ema(model), opt, scaler=make_scaler(cfg.train.precision, device))


def restore(state: RunState, cfg: Config, ckpt_dir: Path, device) -> Optional[Path]:
    """Load the newest readable checkpoint of ``ckpt_dir`` into ``state``; a corrupt newest
    file is reported and the previous one used. Returns the checkpoint used."""
    candidates = sorted(ckpt_dir.glob("ckpt_*.pt"), reverse=True)
    for path in candidates:
        try:
            saved = read_checkpoint(path, map_location=device)
        except CheckpointError as exc:
            if dist.is_main():
                print(f"warning: {exc}; trying the previous checkpoint", file=sys.stderr)
            continue
        check_resumable(cfg, saved["config"])
        load_state_strict(state.model, saved["model"], "model", path)
        load_state_strict(state.ema, saved["ema"], "EMA", path)
        load_optimizer(state.opt, saved["optimizer"])
        if state.scaler is not None and saved.get("scaler"):
            state.scaler.load_state_dict(saved["scaler"])  # fp16: the loss scale continues
        state.step = int(saved["step"])
        state.log_window = saved.get("log_window")
        state.skipped = Skipped(**(saved.get("skipped") or {}))  # none in checkpoints saved before it
        rng = saved.get("rng") or {}
        if "python" in rng and "numpy" in rng:  # as they were at the checkpoint (s2dm itself draws none)
            random.setstate(rng["python"])
            np.random.set_state(rng["numpy"])
        if path != candidates[0] and dist.is_main():
            print(f"resuming from {path.name} instead", file=sys.stderr)
        return path
    raise CheckpointError(f"no readable checkpoint in {ckpt_dir}", remedy=START_OVER)


# Flags that choose how Adam computes, not what: the config's (optim.fused may change on resume).
_IMPLEMENTATION = ("fused", "foreach", "capturable", "differentiable")


def load_optimizer(opt: torch.optim.Optimizer, saved: dict) -> None:
    """The saved moments, step counts and hyperparameters, under ``opt``'s own implementation
    flags: ``Optimizer.load_state_dict`` alone would bring back the saved ``fused``."""
    groups = [{**g, **{k: now[k] for k in _IMPLEMENTATION if k in now}}
              for g, now in zip(saved["param_groups"], opt.param_groups)]
    opt.load_state_dict({**saved, "param_groups": groups + saved["param_groups"][len(groups):]})


RESUME_MODES = ("auto", "never")  # continue the run in the folder, or start it over


def check_resume(resume: str, force: bool) -> None:
    """``resume`` is one of RESUME_MODES, and ``force`` (start over, deleting the old run's
    checkpoints) goes with ``resume='never'``: a misspelt mode, or ``force`` alone, would
    otherwise resume, or start over, where the caller meant the other."""
    if not (isinstance(resume, str) and resume in RESUME_MODES):
        raise RunError(f"resume {resume!r}: expected one of {', '.join(map(repr, RESUME_MODES))}", key="resume")
    if force is not True and force is not False:
        raise RunError(f"force {force!r}: expected True or False", key="force")
    if force and resume != "never":
        raise RunError("force=True starts the run over and goes with resume='never'; resume='auto' (the "
                       "default) continues the run, keeping its checkpoints", key="force")


def check_folder(out: Path, resume: str, force: bool) -> bool:
    """Check the run folder, creating nothing; returns whether there is a checkpoint to resume."""
    has_ckpt = (out / "checkpoints").is_dir() and any((out / "checkpoints").glob("ckpt_*.pt"))
    if resume == "never" and has_ckpt and not force:
        raise RunError(f"{out} already holds checkpoints; start over with force=True, or resume it with "
                       "resume='auto'", key="force")
    return has_ckpt and resume == "auto"


def preview_path(out: Path, step: int) -> Path:
    """The EMA model's preview mosaic of ``step`` in the run folder ``out``."""
    return out / "samples" / f"mosaic_{step:08d}.png"


def prepare_folder(out: Path, resume: str) -> None:
    """Create the run folder (once everything that can fail before step 1 has been checked).
    A fresh run (``--resume never --force``) drops what the old run's training wrote: its
    checkpoints, preview mosaics, curves and TensorBoard events (the log goes when the new one
    starts). Folders of ``s2dm sample`` stay: they record the checkpoint they were made from."""
    if resume == "never":
        for folder in (out / "checkpoints", out / TB_DIR):
            if folder.is_dir():
                shutil.rmtree(folder)
        for old in [out / CURVES_FILE, *preview_path(out, 0).parent.glob("mosaic_*.png")]:
            old.unlink(missing_ok=True)
    # Half-written files of a run killed mid-write (config.yaml, curves.png, a mosaic, best):
    # rank 0 is their one writer, and it has not started.
    for folder, names in ((out, "*"), (out / "checkpoints", "*"), (preview_path(out, 0).parent, "mosaic_*")):
        if folder.is_dir():
            remove_stale_temps(folder, names)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise RunError(f"cannot write to output folder {out}: {exc.strerror or exc}", key="out") from None


def save(state: RunState, cfg: Config, ckpt_dir: Path) -> Path:
    try:
        return save_run_checkpoint(ckpt_dir, state.to_checkpoint(cfg), cfg.train.keep_last)
    except OSError as exc:
        raise RunError(f"could not save the checkpoint of step {state.step} in {ckpt_dir}: "
                       f"{exc.strerror or exc}; earlier checkpoints are intact") from None


def versions() -> dict:
    return {"s2dm": __version__, "torch": torch.__version__}
