"""``s2dm train``: the training loop (Adam, grad clipping, EMA, JSONL log, checkpoints, grids).

Reproducibility: every random draw of step k comes from seeds derived from
(train.seed, stream, k) (see seeds.py), so resuming at step k continues exactly, and runs that
differ only in ``loss`` see the same x_t at every step.
"""
from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional

import torch
from tqdm.auto import tqdm

from . import seeds
from .checkpoint import read_checkpoint, resolve_checkpoint, save_run_checkpoint, load_state_strict
from .config import Config
from .data import load_dataset
from .ema import make_ema, update_ema
from .errors import UserError
from .losses import l0_loss, skip_step_loss
from .schedule import NoiseSchedule
from .unet import build_model, count_parameters

# Keys that may differ when a run is resumed (they change cadence or length, not the math).
RESUMABLE_CHANGES = {"train.steps", "train.log_every", "train.checkpoint_every",
                     "train.sample_every", "train.keep_last", "train.device", "data.num_workers",
                     "data.root", "train.max_nonfinite"}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"train.device: {name} requested but CUDA is not available")
    return torch.device(name)


# -- data order ----------------------------------------------------------------------------
class PlannedBatches(torch.utils.data.Sampler):
    """Batch k = positions [kB, (k+1)B) of an endless chain of per-epoch permutations,
    permutation e drawn from (seed, DATA_ORDER, e): the data order is a function of the step."""

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int, end_step: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start_step, self.end_step = start_step, end_step
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = torch.randperm(self.n, generator=seeds.generator(self.seed, seeds.DATA_ORDER, epoch))
        return self._perm

    def indices(self, step: int) -> List[int]:
        out = []
        for pos in range(step * self.batch_size, (step + 1) * self.batch_size):
            out.append(int(self._permutation(pos // self.n)[pos % self.n]))
        return out

    def __iter__(self) -> Iterator[List[int]]:
        for step in range(self.start_step, self.end_step):
            yield self.indices(step)

    def __len__(self) -> int:
        return self.end_step - self.start_step


@dataclass
class StepDraws:
    """Everything random in one training step, drawn on the CPU from the step's seeds."""

    flip: Optional[torch.Tensor]
    t: torch.Tensor
    noise: torch.Tensor
    skip_noise: Optional[torch.Tensor]


def draw_step(cfg: Config, step: int, shape) -> StepDraws:
    g = seeds.generator(cfg.train.seed, seeds.STEP, step)
    B, T = shape[0], cfg.diffusion.num_timesteps
    flip = torch.rand(B, generator=g) < 0.5 if cfg.data.random_flip else None
    if cfg.loss.t_sampling == "antithetic":
        half = torch.randint(0, T, ((B + 1) // 2,), generator=g)
        t = torch.cat([half, T - 1 - half])[:B]
    else:
        t = torch.randint(0, T, (B,), generator=g)
    noise = torch.randn(shape, generator=g)
    skip_noise = None
    if cfg.loss.type == "s2" and cfg.loss.variant == "independent":
        # Its own stream, so adding L_skip does not shift any draw the baseline makes.
        skip_noise = torch.randn(shape, generator=seeds.generator(cfg.train.seed, seeds.SKIP_NOISE, step))
    return StepDraws(flip, t, noise, skip_noise)


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


# -- logging ------------------------------------------------------------------------------
class Window:
    """Accumulates per-sample loss terms between two log lines, split by t quartile."""

    def __init__(self, T: int):
        self.T = T
        self.reset()

    def reset(self):
        self.sums, self.counts = defaultdict(float), defaultdict(int)
        self.steps, self.t0 = 0, time.perf_counter()

    def add(self, t: torch.Tensor, terms: dict, grad_norm: float):
        t = t.cpu()
        q = (t * 4 // self.T).clamp(max=3)
        for name in ("loss", "l0", "lskip"):
            v = terms[name].float().cpu()
            self.sums[name] += float(v.sum())
            self.counts[name] += len(v)
        for i in range(4):
            mask = q == i
            self.sums[f"loss_t_q{i + 1}"] += float(terms["loss"].float().cpu()[mask].sum())
            self.counts[f"loss_t_q{i + 1}"] += int(mask.sum())
        self.sums["grad_norm"] += grad_norm
        self.counts["grad_norm"] += 1
        self.steps += 1

    def summary(self, batch_size: int) -> dict:
        dt = time.perf_counter() - self.t0
        out = {k: self.sums[k] / self.counts[k] for k in self.sums if self.counts[k]}
        out["steps_per_s"] = self.steps / dt if dt > 0 else float("nan")
        out["images_per_s"] = out["steps_per_s"] * batch_size
        return out


def truncate_log(path: Path, last_step: int) -> None:
    """Drop log lines past the checkpoint being resumed, so the log has no duplicate steps."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if rec.get("step", 0) <= last_step:
            keep.append(line)
    path.write_text("".join(k + "\n" for k in keep))


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


def train(cfg: Config, out: Path, resume: str = "auto", force: bool = False) -> Path:
    """Train per ``cfg`` into the run folder ``out``; returns the final checkpoint path."""
    out = Path(out)
    ckpt_dir, grid_dir, log_path = out / "checkpoints", out / "samples", out / "log.jsonl"
    has_ckpt = ckpt_dir.is_dir() and any(ckpt_dir.glob("ckpt_*.pt"))
    if resume == "never" and has_ckpt and not force:
        raise UserError(f"{out} already holds checkpoints; pass --force to start over, or --resume auto")
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write_test").touch()
        (out / ".write_test").unlink()
    except OSError as exc:
        raise UserError(f"cannot write to output folder {out}: {exc.strerror}") from None

    device = pick_device(cfg.train.device)
    dataset = load_dataset(cfg.data)
    if len(dataset) < 1:
        raise UserError(f"data set {cfg.data.dataset} is empty")
    schedule = NoiseSchedule.from_config(cfg.diffusion)

    torch.manual_seed(seeds.derive_seed(cfg.train.seed, seeds.INIT))
    model = build_model(cfg).to(device)
    ema = make_ema(model)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                           eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
    start, last_ckpt = 0, None
    if resume == "auto" and has_ckpt:
        last_ckpt = resolve_checkpoint(ckpt_dir)
        state = read_checkpoint(last_ckpt, map_location=device)
        check_resumable(cfg, state["config"])
        load_state_strict(model, state["model"], "model", ckpt_dir)
        load_state_strict(ema, state["ema"], "EMA", ckpt_dir)
        opt.load_state_dict(state["optimizer"])
        start = int(state["step"])
        truncate_log(log_path, start)
        print(f"resuming {out} from step {start}")
    elif log_path.exists():
        log_path.unlink()
    cfg.dump(out / "config.yaml")
    if start >= cfg.train.steps:
        print(f"{out} is already trained to step {start} (train.steps={cfg.train.steps})")
        return resolve_checkpoint(ckpt_dir)

    n_params = count_parameters(model)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=PlannedBatches(len(dataset), cfg.train.batch_size, cfg.train.seed,
                                              start, cfg.train.steps),
        num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda",
    )
    window = Window(cfg.diffusion.num_timesteps)
    nonfinite_in_row, nonfinite_total = 0, 0
    bar = tqdm(total=cfg.train.steps, initial=start, desc=f"train {out.name}", unit="step", dynamic_ncols=True)
    with open(log_path, "a") as log:
        if start == 0:
            log.write(json.dumps({"step": 0, "event": "start", "parameters": n_params,
                                  "dataset_size": len(dataset), "device": str(device)}) + "\n")
        for step, x0 in enumerate(loader, start=start):
            model.train()
            draws = draw_step(cfg, step, x0.shape)
            if draws.flip is not None:
                x0 = torch.where(draws.flip[:, None, None, None], x0.flip(3), x0)
            x0 = x0.to(device, non_blocking=True)
            torch.manual_seed(seeds.derive_seed(cfg.train.seed, seeds.DROPOUT, step))
            for group in opt.param_groups:
                group["lr"] = cfg.optim.lr * min(1.0, (step + 1) / cfg.optim.warmup) if cfg.optim.warmup else cfg.optim.lr
            loss, terms = compute_loss(cfg, model, x0, draws, schedule)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
            loss_value = loss.item()
            if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
                nonfinite_in_row += 1
                nonfinite_total += 1
                log.write(json.dumps({"step": step + 1, "event": "nonfinite_skipped",
                                      "loss": loss_value, "grad_norm": grad_norm}) + "\n")
                log.flush()
                if nonfinite_in_row >= cfg.train.max_nonfinite:
                    bar.close()
                    raise UserError(
                        f"loss was non-finite for {nonfinite_in_row} steps in a row (step {step + 1}); "
                        f"stopped without saving. Last checkpoint: {last_ckpt or 'none'}"
                    )
                continue
            nonfinite_in_row = 0
            opt.step()
            update_ema(ema, model, cfg.train.ema_decay)
            window.add(draws.t, terms, grad_norm)
            done = step + 1
            bar.update(1)

            if done % cfg.train.log_every == 0 or done == cfg.train.steps:
                rec = {"step": done, **window.summary(cfg.train.batch_size),
                       "lr": opt.param_groups[0]["lr"], "nonfinite_skipped": nonfinite_total}
                log.write(json.dumps(rec) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{rec['loss']:.4f}", steps_s=f"{rec['steps_per_s']:.2f}")
                window.reset()
            if done % cfg.train.sample_every == 0 or done == cfg.train.steps:
                write_grid(ema, cfg, schedule, grid_dir / f"grid_{done:08d}.png", device)
            if done % cfg.train.checkpoint_every == 0 or done == cfg.train.steps:
                last_ckpt = save_run_checkpoint(ckpt_dir, {
                    "step": done, "config": cfg.to_dict(), "model": model.state_dict(),
                    "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                    "rng": {"torch": torch.get_rng_state()}, "versions": versions(),
                }, cfg.train.keep_last)
    bar.close()
    return last_ckpt or resolve_checkpoint(ckpt_dir)


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
