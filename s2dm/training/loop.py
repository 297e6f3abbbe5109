"""``s2dm train``: the loop around ``step.py``'s training step (set-up and resume, the JSONL
log, checkpoints, preview mosaics, evaluations, stop signals).

Reproducibility: every random draw of step k comes from (train.seed, stream, k) — see
draws.py — so resuming at step k continues exactly, and runs that differ only in ``loss`` see
the same x_t at every step.

Several GPUs: under ``torchrun --nproc_per_node W`` the model is wrapped in
DistributedDataParallel. ``train.batch_size`` is the GLOBAL batch; each rank takes its
contiguous B/W rows of the global batch of step k (data indices, flips, t, ε, ε′ are drawn
for the whole batch on every rank, then sliced). DDP averages the per-rank mean gradients,
which with equal per-rank batches is the gradient of the global mean loss: W ranks reproduce
one process with the same global batch up to float reduction order (tests/test_dist.py). The
one per-rank random stream is dropout, seeded from (train.seed, DROPOUT, step, rank) (a mask
over the global batch cannot be sliced). Weights start equal on all ranks (the same INIT
seed; DDP also broadcasts rank 0's), gradients are all-reduced, so the EMA stays identical on
every rank. A non-finite loss on any rank, and a stop signal on any rank, are agreed on by
all ranks (one all-reduce per step). Only rank 0 writes the log, mosaics and checkpoints.

What a researcher watches while it runs (rank 0): the progress bar (loss, steps/s, the last
evaluation), ``log.jsonl``, the preview mosaics, ``curves.png`` at each checkpoint
(``curves.py``), TensorBoard if asked (``tblog.py``), and every ``train.eval_every`` steps an
evaluation of the EMA model (``evaluation.py``; every rank takes part) whose step is always
checkpointed, so that ``checkpoints/best`` can point at it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, TextIO, Union

import torch
from tqdm.auto import tqdm

from ..core.schedule import NoiseSchedule
from ..core.seeds import global_rngs_kept
from ..core.unet import count_parameters
from ..errors import Interrupted, RunError, S2dmError
from ..io.checkpoint import LATEST, init_weights_from, point, pointer_target
from ..io.config import Config, as_config
from ..io.data import load_dataset, loader_batches
from ..samplers.generate import generate
from ..samplers.options import SampleOptions
from ..util import dist
from ..util.dist import pick_device
from ..util.folderlock import FolderLock
from ..util.images import save_mosaic
from ..util.workers import stop_requested
from .curves import CURVES_FILE, write_run_curves
from .draws import PlannedBatches
from .evaluation import Evaluator, check_eval_setup, describe, set_up_evaluation
from .precision import tf32_flags_kept
from .runlog import Window, truncate_log
from .state import RunState, check_folder, check_resume, new_state, prepare_folder, preview_path, restore, save
from .step import StepResult, rank_rows, train_step, wrap_for_training
from .tblog import TensorBoard, check_tensorboard, open_tensorboard


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

    @property
    def requested(self) -> bool:
        """A signal came, or (in ``s2dm study``'s worker processes) the parent's Ctrl-C, which
        a job still setting up missed (util.workers)."""
        if self.signal is None and stop_requested():
            self.signal = signal.SIGINT
        return self.signal is not None

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


@dataclass
class _Run:
    """What one ``train`` call works with between its steps: the run's pieces, its counters
    and (rank 0) the open log file."""

    cfg: Config
    out: Path
    device: torch.device
    dataset: torch.utils.data.Dataset
    schedule: NoiseSchedule
    state: RunState
    last_ckpt: Optional[Path]
    init: Optional[dict]
    evaluator: Optional[Evaluator] = None
    evaluated: frozenset = frozenset()  # steps of a resumed run already evaluated
    window: Optional[Window] = None
    log: Optional[TextIO] = None
    tb: Optional[TensorBoard] = None
    progress: bool = True
    postfix: dict = dataclasses.field(default_factory=dict)  # the progress bar's figures

    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoints"

    def write(self, record: dict) -> None:
        """One line of the JSONL log (rank 0)."""
        if dist.is_main():
            self.log.write(json.dumps(record) + "\n")
            self.log.flush()


def train(cfg: Union[Config, dict, str, Path], out: Union[str, Path], resume: str = "auto", force: bool = False,
          init_from=None, progress: bool = True) -> Path:
    """Train per ``cfg`` (a Config, a plain dict or a YAML path) into the run folder ``out``;
    returns the newest checkpoint's path.
    Under torchrun every rank calls it; rank 0 alone writes into ``out``. ``progress``: the
    progress bar (off for a study's worker processes, whose bars would interleave). The
    caller's global random generators and TF32 flags are as they were when it returns."""
    check_resume(resume, force)
    cfg = as_config(cfg)
    with global_rngs_kept(), tf32_flags_kept():
        return _train(cfg, Path(out), resume, force, init_from, progress)


def _train(cfg: Config, out: Path, resume: str, force: bool, init_from, progress: bool) -> Path:
    with FolderLock(out, "training") as lock:  # rank 0's, held to the end
        run = _set_up(cfg, out, resume, force, init_from, lock)
        run.progress = progress
        state = run.state
        if state.step >= cfg.train.steps:
            dist.print0(f"{run.out} is already trained to step {state.step} (train.steps={cfg.train.steps})")
            if not (state.step == cfg.train.steps and (_missed_evaluation(run) or _missed_mosaic(run))):
                return run.last_ckpt
        if dist.world_size() > 1:
            dist.print0(f"DistributedDataParallel on {dist.describe()}: global batch {cfg.train.batch_size} "
                        f"= {dist.world_size()} ranks x {dist.per_rank_batch(cfg.train.batch_size)} per rank")
        state.net = wrap_for_training(cfg, state.model, run.device)
        return _loop(run)


def _set_up(cfg: Config, out: Path, resume: str, force: bool, init_from, lock: FolderLock) -> _Run:
    """Everything before step 1: folder state, device, data, weights, the run folder."""
    log_path = out / "log.jsonl"
    dist.per_rank_batch(cfg.train.batch_size)  # a clear error before any work
    if cfg.train.tensorboard:
        check_tensorboard()
    check_eval_setup(cfg)
    # Everything that can fail before step 1 (folder state, device, data, checkpoints, weights
    # to start from, the evaluation's weights and reference) is checked before the run folder
    # is created or changed: no empty run folders, no old run's files lost to a failed start.
    dist.run0(lambda: lock.take(create=False))  # a run folder in use: refused before it is read
    resuming = dist.run0(lambda: check_folder(out, resume, force))
    try:
        device = pick_device(cfg.train.device)
    except S2dmError as exc:  # "device cuda: ..." names the config key it came from
        raise exc.retold(f"train.{exc}", key="train.device") from None
    dataset = load_dataset(cfg.data)
    schedule = NoiseSchedule.from_config(cfg.diffusion)
    state = new_state(cfg, device)
    last_ckpt = restore(state, cfg, out / "checkpoints", device) if resuming else None
    init = init_weights_from(init_from, state.model, state.ema, cfg, resumed=bool(last_ckpt))  # new runs only
    evaluator = set_up_evaluation(cfg, out, dataset, schedule, device)  # loads weights, may read every image
    def take_and_prepare() -> None:  # the folder now created, the lock with it
        lock.take()
        prepare_folder(out, resume)
    dist.run0(take_and_prepare)
    if dist.is_main():
        if last_ckpt:
            truncate_log(log_path, state.step)
            if pointer_target(last_ckpt.parent, LATEST) != last_ckpt:  # a kill between save and pointer
                point(last_ckpt.parent, LATEST, last_ckpt)
            print(f"resuming {out} from step {state.step}")
        else:
            log_path.unlink(missing_ok=True)
        if not (last_ckpt and state.step >= cfg.train.steps):  # nothing to train: the file says what trained
            cfg.dump(out / "config.yaml")
    run = _Run(cfg, out, device, dataset, schedule, state, last_ckpt, init, evaluator)
    if run.evaluator is not None:
        run.evaluator.keep_reference()
        run.evaluated = frozenset(dist.run0(lambda: run.evaluator.resume(log_path)))
        dist.print0(describe(run.evaluator))
    return run


def _loader(run: _Run) -> torch.utils.data.DataLoader:
    """The batches of the steps still to do (this rank's rows of each under torchrun)."""
    cfg, dataset = run.cfg, run.dataset
    rows = rank_rows(cfg) if dist.world_size() > 1 else None
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=PlannedBatches(len(dataset), cfg.train.batch_size, cfg.train.seed,
                                              run.state.step, cfg.train.steps, rows=rows),
        num_workers=dist.loader_workers(cfg.data.num_workers), pin_memory=run.device.type == "cuda",
    )


def _loop(run: _Run) -> Path:
    """The steps from ``run.state.step`` to ``train.steps``; returns the newest checkpoint."""
    cfg, state, main_rank = run.cfg, run.state, dist.is_main()
    loader = _loader(run)
    run.window = Window(cfg.diffusion.num_timesteps)
    if state.log_window and main_rank:
        run.window.load_state_dict(state.log_window)
    bar = tqdm(total=cfg.train.steps, initial=state.step, desc=f"train {run.out.name}", unit="step",
               dynamic_ncols=True, disable=not (main_rank and run.progress))
    log_file = open(run.out / "log.jsonl", "a") if main_rank else contextlib.nullcontext()
    run.tb = open_tensorboard(cfg.train.tensorboard and main_rank, run.out, state.step)
    # The bar closes before any error line is printed, so that line stays the last one.
    tb = contextlib.closing(run.tb) if run.tb is not None else contextlib.nullcontext()
    with bar, log_file as log, StopRequest() as stop, tb:
        run.log = log
        if state.step == 0:
            run.write(_start_record(run))
        if _missed_evaluation(run):  # a run stopped between its checkpoint and its evaluation
            _evaluate(run, bar)
        if _missed_mosaic(run):  # ... or its mosaic (the same images: the EMA and seeds are saved)
            _preview(run, state.step)
        for x0 in loader_batches(loader):
            res = train_step(cfg, state, x0, run.schedule, run.device, stop_requested=stop.requested)
            _count_step(run, res)
            bar.update(1)
            if state.step % cfg.train.log_every == 0 or state.step == cfg.train.steps:
                _log_window(run, bar)
            _save_and_preview(run, res, stop, bar)
    return dist.broadcast_object(run.last_ckpt)


def _start_record(run: _Run) -> dict:
    cfg = run.cfg
    return {"step": 0, "event": "start", "parameters": count_parameters(run.state.model),
            "num_timesteps": cfg.diffusion.num_timesteps,
            "dataset_size": len(run.dataset), "device": str(run.device), "batch_size": cfg.train.batch_size,
            "world_size": dist.world_size(), "batch_per_rank": dist.per_rank_batch(cfg.train.batch_size),
            "backend": dist.backend(), "precision": cfg.train.precision, "channels_last": cfg.train.channels_last,
            "compile": cfg.train.compile, "init_from": run.init}


def _count_step(run: _Run, res: StepResult) -> None:
    """The step's bookkeeping: counters, the log window, a stop after too many non-finite
    losses in a row. Every step is spent, taken or skipped: its batch and draws are not reused."""
    skipped = run.state.skipped
    if res.overflow:  # fp16: the GradScaler skipped the step and lowered its scale
        skipped.overflow_total += 1
    elif not res.finite:
        skipped.nonfinite_in_row += 1
        skipped.nonfinite_total += 1
        run.write({"step": run.state.step + 1, "event": "nonfinite_skipped", "loss": res.loss,
                   "grad_norm": res.grad_norm})
        if skipped.nonfinite_in_row >= run.cfg.train.max_nonfinite:
            raise RunError(  # every rank agreed on every skip and raises this
                f"loss was non-finite for {skipped.nonfinite_in_row} steps in a row (step {run.state.step + 1}); "
                f"stopped without saving. Last checkpoint: {run.last_ckpt or 'none'}", all_ranks=True
            )
    else:
        skipped.nonfinite_in_row = 0
        run.window.add(res.t, res.terms, res.grad_norm)
    run.state.step += 1


def _log_window(run: _Run, bar) -> None:
    """One log line: the window's means since the last one (over the global batch)."""
    cfg, state, window = run.cfg, run.state, run.window
    if dist.world_size() > 1:  # the window's means over the global batch
        window.all_reduce(dist.all_reduce_sum, main=dist.is_main())
    rec = {"step": state.step, **window.summary(cfg.train.batch_size),
           "lr": state.opt.param_groups[0]["lr"], "nonfinite_skipped": state.skipped.nonfinite_total}
    if state.scaler is not None:
        rec.update(loss_scale=state.scaler.get_scale(), fp16_overflow_skipped=state.skipped.overflow_total)
    run.write(rec)
    if run.tb is not None:
        run.tb.scalars(rec)
    if "loss" in rec:
        run.postfix.update(loss=f"{rec['loss']:.4f}", steps_s=f"{rec['steps_per_s']:.2f}")
        bar.set_postfix(run.postfix)
    window.reset()


def _evaluate(run: _Run, bar) -> None:
    """Score the EMA model at this step (every rank); rank 0 logs it, moves ``best``, shows it."""
    with dist.same_outcome():  # a failure on any rank stops every rank with its message
        rec = run.evaluator.run(run.state.ema, run.state.step)
    if dist.is_main():
        run.write(rec)
        if rec["best"]:
            run.evaluator.point_best()
        if run.tb is not None:
            run.tb.evaluation(rec)
        run.postfix[rec["metric"]] = f"{rec['value']:.4g}"
        bar.set_postfix(run.postfix)
    run.window.exclude(rec["seconds"])  # steps/s stays the training's own rate


def _save_and_preview(run: _Run, res: StepResult, stop: StopRequest, bar) -> None:
    """The step's checkpoint (when due, stopping or evaluating), THEN its preview mosaic, its
    evaluation and ``curves.png``: none of them, failing whatever way, can cost the
    checkpoint; the run stops with its error."""
    cfg, state, window = run.cfg, run.state, run.window
    done, world, main_rank = state.step, dist.world_size(), dist.is_main()
    # Ranks stop at the step they agreed on in train_step's all-reduce; one process
    # also honours a signal that arrived during this step's bookkeeping.
    evaluate = run.evaluator is not None and run.evaluator.due(done)
    due = done % cfg.train.checkpoint_every == 0 or done == cfg.train.steps or evaluate
    stopping = res.stop or (world == 1 and stop.requested)
    if due or stopping:  # every rank agrees on both
        if world > 1:  # rank 0 keeps the global partial sums, the others start afresh
            window.all_reduce(dist.all_reduce_sum, main=dist.is_main())
            if not main_rank:
                window.clear()
        state.log_window = window.state_dict()
    with dist.same_outcome():  # a failed save on rank 0 stops every rank
        if main_rank and (due or stopping):
            run.last_ckpt = save(state, cfg, run.ckpt_dir)
    if _mosaic_due(cfg, done):
        _preview(run, done)
    if evaluate and not stopping:  # a stopped run evaluates this step when it resumes
        _evaluate(run, bar)
    if due and done >= min(cfg.train.log_every, cfg.train.steps):  # after the first log line: something to draw
        with dist.same_outcome():
            if main_rank:
                _not_os_error(write_run_curves, f"could not draw {run.out / CURVES_FILE}", run.out)
    if world == 1 and due and stop.requested:
        stopping = True  # it arrived while this step's checkpoint or mosaic was written: stop here
    if stopping:
        signum = int(stop.signal or signal.SIGTERM)
        run.write({"step": done, "event": "stopped", "signal": signum})
        run.last_ckpt = dist.broadcast_object(run.last_ckpt)
        exc = Interrupted(f"stopped by signal {signum} at step {done}; saved {run.last_ckpt}", 128 + signum)
        exc.all_ranks = True
        raise exc


def _missed_evaluation(run: _Run) -> bool:
    """Whether the step a run resumes from lacks its evaluation (a kill after its checkpoint)."""
    ev, step = run.evaluator, run.state.step
    return ev is not None and ev.due(step) and step not in run.evaluated


def _missed_mosaic(run: _Run) -> bool:
    """Whether the step a run resumes from lacks its preview mosaic (a kill after its
    checkpoint); every rank gets rank 0's answer."""
    step = run.state.step
    return step > 0 and _mosaic_due(run.cfg, step) and dist.run0(lambda: not preview_path(run.out, step).is_file())


def _mosaic_due(cfg: Config, step: int) -> bool:
    return step % cfg.train.sample_every == 0 or step == cfg.train.steps


def _preview(run: _Run, step: int) -> None:
    """The EMA model's preview mosaic of ``step`` (rank 0; a failure stops every rank)."""
    with dist.same_outcome():
        if dist.is_main():
            path = preview_path(run.out, step)
            mosaic = _not_os_error(write_mosaic, f"could not write the preview mosaic {path}", run.state.ema,
                                   run.cfg, run.schedule, path, run.device)
            if run.tb is not None:
                run.tb.image("samples/ema_mosaic", mosaic, step)


def _not_os_error(write, what: str, *args):
    """``write(*args)``, an OSError (a read-only folder, a full disk) told as a RunError: one
    line, after the step's checkpoint, which is saved."""
    try:
        return write(*args)
    except OSError as exc:
        raise RunError(f"{what}: {exc.strerror or exc}; the checkpoints saved so far are intact") from None


def write_mosaic(ema, cfg: Config, schedule: NoiseSchedule, path: Path, device):
    """A PNG mosaic from the EMA model with the config's sampler options and fixed seeds;
    returns it (uint8 HWC)."""
    n = cfg.sample.mosaic_images
    images, _ = generate(ema, schedule, range(cfg.sample.seed, cfg.sample.seed + n),
                         image_shape=(cfg.data.channels, cfg.data.image_size, cfg.data.image_size),
                         batch_size=cfg.sample.batch_size, device=device,
                         **SampleOptions.of(cfg.sample).as_kwargs())
    return save_mosaic(images, path)


