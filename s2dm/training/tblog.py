"""TensorBoard (``train.tensorboard: true``): every scalar of the log and each preview mosaic,
written by rank 0 to ``RUN/tb/``. ``log.jsonl`` stays the record; this is a view of it.

TensorBoard is an optional dependency (``pip install 's2dm[tensorboard]'``): asking for it
without the package is one error at start-up (``check_tensorboard``), not at the first log
line. A resumed run purges the events past its checkpoint's step, as ``log.jsonl`` is cut.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import ConfigError

# log.jsonl key → TensorBoard tag; grouped by what a researcher compares side by side.
SCALAR_TAGS = {
    "loss": "loss/total", "l0": "loss/L0", "lskip": "loss/L_skip",
    "loss_t_q1": "loss_by_t/q1_small_t", "loss_t_q2": "loss_by_t/q2", "loss_t_q3": "loss_by_t/q3",
    "loss_t_q4": "loss_by_t/q4_large_t",
    "grad_norm": "train/grad_norm", "lr": "train/lr", "steps_per_s": "train/steps_per_s",
    "images_per_s": "train/images_per_s", "nonfinite_skipped": "train/nonfinite_skipped",
    "loss_scale": "train/fp16_loss_scale", "fp16_overflow_skipped": "train/fp16_overflow_skipped",
}


def check_tensorboard() -> None:
    """One ConfigError when ``tensorboard`` cannot be imported."""
    if importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("train.tensorboard: true needs the tensorboard package: pip install 's2dm[tensorboard]' "
                          "(or set train.tensorboard: false; log.jsonl and `s2dm plot` need nothing)",
                          key="train.tensorboard")


TB_DIR = "tb"  # in the run folder


class TensorBoard:
    """A SummaryWriter on ``run_dir/tb``; ``start_step``: the step a resumed run continues from
    (the earlier process's events after it are purged, as log.jsonl's lines are)."""

    def __init__(self, run_dir: Path, start_step: int = 0):
        # optional dependency: imported only when asked for (check_tensorboard ran at start-up)
        from torch.utils.tensorboard import SummaryWriter

        # TensorBoard drops the events at purge_step and later: the checkpoint step's own stay.
        self.writer = SummaryWriter(str(Path(run_dir) / TB_DIR), purge_step=start_step + 1 if start_step else None)

    def scalars(self, record: dict) -> None:
        """A window record of log.jsonl: each known key as its tag."""
        step = record["step"]
        for key, tag in SCALAR_TAGS.items():
            if record.get(key) is not None:
                self.writer.add_scalar(tag, record[key], step)

    def evaluation(self, record: dict) -> None:
        """An eval record: its value under ``eval/<label>`` (FD-pixels-1k, FID-10k, ...)."""
        self.writer.add_scalar(f"eval/{record['metric']}", record["value"], record["step"])
        self.writer.flush()

    def image(self, tag: str, mosaic: np.ndarray, step: int) -> None:
        """A uint8 HWC mosaic (a preview)."""
        self.writer.add_image(tag, mosaic, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def open_tensorboard(enabled: bool, run_dir: Path, start_step: int) -> Optional[TensorBoard]:
    return TensorBoard(run_dir, start_step) if enabled else None
