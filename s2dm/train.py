"""``s2dm train``: the training loop (Adam, grad clipping, EMA, JSONL log, checkpoints, grids).

Reproducibility: every random draw of step k comes from (train.seed, stream, k) — see
draws.py — so resuming at step k continues exactly, and runs that differ only in ``loss`` see
the same x_t at every step.
"""
from __future__ import annotations

import json
import math
import random
import shutil
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from . import seeds
from .checkpoint import load_state_strict, read_checkpoint, save_run_checkpoint
from .config import Config
from .data import load_dataset
from .dist import pick_device
from .draws import PlannedBatches, StepDraws, draw_step
from .ema import make_ema, update_ema
from .errors import Interrupted, UserError
from .losses import l0_loss, skip_step_loss
from .runlog import Window, truncate_log
from .schedule import NoiseSchedule
from .unet import build_model, count_parameters

# Keys that may differ when a run is resumed (they change cadence or length, not the math).
RESUMABLE_CHANGES = {"train.steps", "train.log_every", "train.checkpoint_every",
                     "train.sample_every", "train.keep_last", "train.device", "data.num_workers",
                     "data.root", "train.max_nonfinite"}


def compute_loss(cfg: Config, model, x0, draws: StepDraws, schedule: NoiseSchedule):
    dev = x0.device
    t, noise = draws.t.to(dev), draws.noise.to(dev)
    if cfg.loss.type == "l0":
        return l0_loss(model, x0, t, schedule, noise=noise, reduction=cfg.loss.reduction, return_terms=True)
    return skip_step_loss(
        model, x0, t, schedule, skip=cfg.loss.skip, tau=cfg.loss.tau, noise=noise,
        skip_noise=None if draws.skip_noise is None else draws.skip_noise.to(dev),
        variant=cfg.loss.variant, reduction=cfg.loss.reduction, return_terms=True,
    )


# -- the run ---------------------------------------------------------------------------------
def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        out.update(_flatten(v, key) if isinstance(v, dict) else {key: v})
    return out


def check_resumable(cfg: Config, saved: dict) -> None:
    now, before = _flatten(cfg.to_dict()), _flatten(saved)
    for key in sorted(set(now) | set(before)):
        if key not in RESUMABLE_CHANGES and now.get(key) != before.get(key):
            raise UserError(
                f"{key}: the run folder was trained with {before.get(key)!r}, the command asks for "
                f"{now.get(key)!r}; use a new --out, or --resume never --force to start over"
            )


@dataclass
class RunState:
    """What a checkpoint restores: the modules, the optimiser and the step counter."""

    model: torch.nn.Module
    ema: torch.nn.Module
    opt: torch.optim.Optimizer
    step: int = 0

    def to_checkpoint(self, cfg: Config) -> dict:
        return {
            "step": self.step, "config": cfg.to_dict(), "model": self.model.state_dict(),
            "ema": self.ema.state_dict(), "optimizer": self.opt.state_dict(),
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
    """Fresh weights from (train.seed, INIT), whatever loss.type is."""
    torch.manual_seed(seeds.derive_seed(cfg.train.seed, seeds.INIT))
    model = build_model(cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                           eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
    return RunState(model, make_ema(model), opt)


def restore(state: RunState, cfg: Config, ckpt_dir: Path, device) -> Optional[Path]:
    """Load the newest readable checkpoint of ``ckpt_dir`` into ``state``; a corrupt newest
    file is reported and the previous one used. Returns the checkpoint used."""
    candidates = sorted(ckpt_dir.glob("ckpt_*.pt"), reverse=True)
    for path in candidates:
        try:
            saved = read_checkpoint(path, map_location=device)
        except UserError as exc:
            print(f"warning: {exc}; trying the previous checkpoint", file=sys.stderr)
            continue
        check_resumable(cfg, saved["config"])
        load_state_strict(state.model, saved["model"], "model", path)
        load_state_strict(state.ema, saved["ema"], "EMA", path)
        state.opt.load_state_dict(saved["optimizer"])
        state.step = int(saved["step"])
        if path != candidates[0]:
            print(f"resuming from {path.name} instead", file=sys.stderr)
        return path
    raise UserError(f"no readable checkpoint in {ckpt_dir}; use --resume never --force to start over")


def prepare_folder(out: Path, resume: str, force: bool) -> bool:
    """Create/check the run folder; returns whether there is a checkpoint to resume."""
    ckpt_dir = out / "checkpoints"
    has_ckpt = ckpt_dir.is_dir() and any(ckpt_dir.glob("ckpt_*.pt"))
    if resume == "never" and has_ckpt:
        if not force:
            raise UserError(f"{out} already holds checkpoints; pass --force to start over, or --resume auto")
        shutil.rmtree(ckpt_dir)  # a fresh run must not mix with the old run's checkpoints
        has_ckpt = False
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write to output folder {out}: {exc.strerror or exc}") from None
    return has_ckpt and resume == "auto"


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint after the current step and exits."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def train_step(cfg: Config, state: RunState, x0: torch.Tensor, schedule: NoiseSchedule, device):
    """One optimiser step (skipped if the loss or gradient is non-finite).
    Returns (finite, loss value, grad norm, t, per-sample terms)."""
    step = state.step
    state.model.train()
    draws = draw_step(cfg, step, x0.shape)
    if draws.flip is not None:
        x0 = torch.where(draws.flip[:, None, None, None], x0.flip(3), x0)
    x0 = x0.to(device, non_blocking=True)
    torch.manual_seed(seeds.derive_seed(cfg.train.seed, seeds.DROPOUT, step))
    lr = cfg.optim.lr * min(1.0, (step + 1) / cfg.optim.warmup) if cfg.optim.warmup else cfg.optim.lr
    for group in state.opt.param_groups:
        group["lr"] = lr
    loss, terms = compute_loss(cfg, state.model, x0, draws, schedule)
    state.opt.zero_grad(set_to_none=True)
    loss.backward()
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
    grad_norm = float(torch.nn.utils.clip_grad_norm_(state.model.parameters(), clip))
    loss_value = loss.item()
    finite = math.isfinite(loss_value) and math.isfinite(grad_norm)
    if finite:
        state.opt.step()
        update_ema(state.ema, state.model, cfg.train.ema_decay)
    return finite, loss_value, grad_norm, draws.t, terms


def save(state: RunState, cfg: Config, ckpt_dir: Path) -> Path:
    try:
        return save_run_checkpoint(ckpt_dir, state.to_checkpoint(cfg), cfg.train.keep_last)
    except OSError as exc:
        raise UserError(f"could not save the checkpoint of step {state.step} in {ckpt_dir}: "
                        f"{exc.strerror or exc}; earlier checkpoints are intact") from None


def train(cfg: Config, out: Path, resume: str = "auto", force: bool = False) -> Path:
    """Train per ``cfg`` into the run folder ``out``; returns the newest checkpoint's path."""
    out = Path(out)
    ckpt_dir, grid_dir, log_path = out / "checkpoints", out / "samples", out / "log.jsonl"
    resuming = prepare_folder(out, resume, force)
    device = pick_device(cfg.train.device)
    dataset = load_dataset(cfg.data)
    schedule = NoiseSchedule.from_config(cfg.diffusion)
    state = new_state(cfg, device)
    last_ckpt = restore(state, cfg, ckpt_dir, device) if resuming else None
    if last_ckpt:
        truncate_log(log_path, state.step)
        print(f"resuming {out} from step {state.step}")
    else:
        log_path.unlink(missing_ok=True)
    cfg.dump(out / "config.yaml")
    if state.step >= cfg.train.steps:
        print(f"{out} is already trained to step {state.step} (train.steps={cfg.train.steps})")
        return last_ckpt

    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=PlannedBatches(len(dataset), cfg.train.batch_size, cfg.train.seed,
                                              state.step, cfg.train.steps),
        num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda",
    )
    window = Window(cfg.diffusion.num_timesteps)
    nonfinite_in_row = nonfinite_total = 0
    bar = tqdm(total=cfg.train.steps, initial=state.step, desc=f"train {out.name}", unit="step",
               dynamic_ncols=True)
    # The bar closes before any error line is printed, so that line stays the last one.
    with bar, open(log_path, "a") as log, StopRequest() as stop:
        def write(record: dict) -> None:
            log.write(json.dumps(record) + "\n")
            log.flush()

        if state.step == 0:
            write({"step": 0, "event": "start", "parameters": count_parameters(state.model),
                   "dataset_size": len(dataset), "device": str(device), "batch_size": cfg.train.batch_size})
        for x0 in loader:
            finite, loss_value, grad_norm, t, terms = train_step(cfg, state, x0, schedule, device)
            if not finite:
                nonfinite_in_row += 1
                nonfinite_total += 1
                write({"step": state.step + 1, "event": "nonfinite_skipped", "loss": loss_value,
                       "grad_norm": grad_norm})
                if nonfinite_in_row >= cfg.train.max_nonfinite:
                    raise UserError(
                        f"loss was non-finite for {nonfinite_in_row} steps in a row (step {state.step + 1}); "
                        f"stopped without saving. Last checkpoint: {last_ckpt or 'none'}"
                    )
                state.step += 1  # the step is spent: its batch and draws are not reused
                bar.update(1)
                continue
            nonfinite_in_row = 0
            state.step += 1
            window.add(t, terms, grad_norm)
            bar.update(1)
            done = state.step
            if done % cfg.train.log_every == 0 or done == cfg.train.steps:
                rec = {"step": done, **window.summary(cfg.train.batch_size),
                       "lr": state.opt.param_groups[0]["lr"], "nonfinite_skipped": nonfinite_total}
                write(rec)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", steps_s=f"{rec['steps_per_s']:.2f}")
                window.reset()
            if done % cfg.train.sample_every == 0 or done == cfg.train.steps:
                write_grid(state.ema, cfg, schedule, grid_dir / f"grid_{done:08d}.png", device)
            if done % cfg.train.checkpoint_every == 0 or done == cfg.train.steps or stop.signal:
                last_ckpt = save(state, cfg, ckpt_dir)
            if stop.signal:
                write({"step": done, "event": "stopped", "signal": int(stop.signal)})
                raise Interrupted(f"stopped by signal {int(stop.signal)} at step {done}; saved {last_ckpt}",
                                  128 + int(stop.signal))
    return last_ckpt


def write_grid(ema, cfg: Config, schedule: NoiseSchedule, path: Path, device) -> None:
    """A PNG grid from the EMA model with the config's sampler and fixed seeds."""
    from .sample import generate
    from .images import make_grid_png

    n = cfg.sample.grid_images
    images, _ = generate(ema, schedule, range(cfg.sample.seed, cfg.sample.seed + n),
                         image_shape=(cfg.data.channels, cfg.data.image_size, cfg.data.image_size),
                         sampler=cfg.sample.sampler, steps=cfg.sample.steps, grid=cfg.sample.grid,
                         eta=cfg.sample.eta, batch_size=cfg.sample.batch_size, device=device)
    make_grid_png(images, path)


def versions() -> dict:
    from . import __version__

    return {"s2dm": __version__, "torch": torch.__version__}
