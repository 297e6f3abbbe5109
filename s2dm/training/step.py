"""One training step: the loss on this rank's rows of the global batch, the optimiser step
(skipped on a non-finite loss or gradient), the EMA update. Its random draws come from
(train.seed, stream, step) alone (draws.py); ``loop.py`` says how ranks share a batch.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..core import seeds
from ..core.ema import ema_decay_at, update_ema
from ..core.losses import l0_loss, skip_step_loss
from ..core.schedule import NoiseSchedule
from ..io.config import Config
from ..util import dist
from .draws import StepDraws, draw_step
from .precision import autocast
from .state import RunState


def compute_loss(cfg: Config, model, x0, draws: StepDraws, schedule: NoiseSchedule):
    """The config's loss (L0 or the skip-step loss) on ``x0`` with the step's draws: the
    batch mean and the per-sample terms (``return_terms``) that the log's window takes."""
    dev = x0.device
    t, noise = draws.t, draws.noise.to(dev)  # t stays on the CPU: the losses' coefficients are made there
    if cfg.loss.type == "l0":
        return l0_loss(model, x0, t, schedule, noise=noise, reduction=cfg.loss.reduction, return_terms=True)
    return skip_step_loss(
        model, x0, t, schedule, skip=cfg.loss.skip, tau=cfg.loss.tau, noise=noise,
        skip_noise=None if draws.skip_noise is None else draws.skip_noise.to(dev),
        variant=cfg.loss.variant, reduction=cfg.loss.reduction, return_terms=True,
    )


def wrap_for_training(cfg: Config, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The module the training forward calls: DDP under torchrun, then torch.compile if asked."""
    net = model
    if dist.world_size() > 1:
        from torch.nn.parallel import DistributedDataParallel  # torch.distributed bits: only under torchrun

        # Every parameter gets a gradient every step (no find_unused_parameters); the UNet
        # has no buffers, so DDP's buffer sync costs nothing.
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.train.compile:
        net = torch.compile(net)
    return net


class StepResult(NamedTuple):
    """What one training step reports. ``finite``: the loss (on every rank) and, without a
    GradScaler, the gradient norm were finite, and the step was taken. ``overflow``: fp16
    only, the loss was finite but the scaled gradients overflowed, so the GradScaler skipped
    the step and lowered its scale (its normal way of finding a scale; not counted as a
    non-finite loss). ``stop``: some rank received SIGTERM/SIGINT. ``loss``: the mean over the
    global batch; ``t`` and ``terms``: this rank's rows."""

    finite: bool
    loss: float
    grad_norm: float
    t: torch.Tensor
    terms: dict
    overflow: bool = False
    stop: bool = False


def rank_rows(cfg: Config) -> tuple:
    """[a, b): this rank's rows of the global batch (all rows in a plain process)."""
    per_rank = dist.per_rank_batch(cfg.train.batch_size)
    return dist.rank() * per_rank, (dist.rank() + 1) * per_rank


def dropout_seed(cfg: Config, step: int) -> int:
    """Dropout masks are drawn by the layers over the batch a rank holds, so they cannot be
    sliced from a global draw: each rank has its own stream (seed, DROPOUT, step, rank). One
    process keeps (seed, DROPOUT, step), the stream runs made before torchrun support used."""
    if dist.world_size() == 1:
        return seeds.derive_seed(cfg.train.seed, seeds.DROPOUT, step)
    return seeds.derive_seed(cfg.train.seed, seeds.DROPOUT, step, dist.rank())


def train_step(cfg: Config, state: RunState, x0: torch.Tensor, schedule: NoiseSchedule, device,
               stop_requested: bool = False) -> StepResult:
    """One optimiser step on this rank's rows ``x0`` of the global batch (skipped if the
    loss or gradient is non-finite). Under torchrun every rank must call it (it all-reduces)."""
    device = torch.device(device)
    step = state.step
    net = state.net if state.net is not None else state.model
    state.model.train()
    a, b = rank_rows(cfg)
    if x0.shape[0] != b - a:
        raise ValueError(f"batch of {x0.shape[0]} rows, expected {b - a} (train.batch_size / ranks)")
    draws = draw_step(cfg, step, (cfg.train.batch_size, *x0.shape[1:]))
    if (a, b) != (0, cfg.train.batch_size):
        draws = draws.rows(a, b)
    x0 = x0.to(device, non_blocking=True)  # the loader's pinned batch itself: a flip first would copy it unpinned
    if draws.flip is not None:
        x0 = torch.where(draws.flip.to(device)[:, None, None, None], x0.flip(3), x0)
    if cfg.train.channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    torch.manual_seed(dropout_seed(cfg, step))
    lr = cfg.optim.lr * min(1.0, (step + 1) / cfg.optim.warmup) if cfg.optim.warmup else cfg.optim.lr
    for group in state.opt.param_groups:
        group["lr"] = lr
    with autocast(cfg.train.precision, device):
        loss, terms = compute_loss(cfg, net, x0, draws, schedule)
    state.opt.zero_grad(set_to_none=True)
    scaler = state.scaler
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(state.opt)  # clip the true gradients
    else:
        loss.backward()
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
    # After DDP's all-reduce the gradients, hence this norm, are the same on every rank.
    norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), clip)
    # the step's one copy to the host (a GPU sync): the skip logic needs both
    loss_value, grad_norm = torch.stack([loss.detach().float(), norm.float()]).tolist()
    loss_bad, stop = not math.isfinite(loss_value), bool(stop_requested)
    if dist.world_size() > 1:  # every rank must take (or skip) the step, and stop, together
        bad_count, loss_sum, stops = dist.all_reduce_sum([float(loss_bad), 0.0 if loss_bad else loss_value,
                                                          float(stop)])
        loss_bad, stop = bad_count > 0, stops > 0
        loss_value = float("nan") if loss_bad else float(loss_sum) / dist.world_size()
    grad_bad = not math.isfinite(grad_norm)
    overflow = scaler is not None and grad_bad and not loss_bad
    finite = not loss_bad and not grad_bad
    if scaler is not None:
        if finite:
            scaler.step(state.opt)  # unscaled already; it steps because the gradients are finite
        scaler.update()  # a skipped (overflowed) step lowers the scale
    elif finite:
        state.opt.step()
    if finite:
        update_ema(state.ema, state.model, ema_decay_at(step, cfg.train.ema_decay, cfg.train.ema_warmup))
    return StepResult(finite, loss_value, grad_norm, draws.t, terms, overflow, stop)
