"""The training log: per-window loss summaries (split by t quartile) and JSONL hygiene."""
from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

from ..util.fileio import atomic_write_text, remove_stale_temps


class Window:
    """Accumulates per-sample loss terms between two log lines, split by t quartile.

    A step's sums stay where its terms are (the GPU) until a log line, a checkpoint or an
    all-reduce needs them: a step copies nothing back to the host, whose one sync a step is
    the loss and gradient norm the skip logic reads. ``t`` is on the CPU, so are the counts."""

    TERMS = ("loss", "l0", "lskip")
    QUARTILES = ("loss_t_q1", "loss_t_q2", "loss_t_q3", "loss_t_q4")

    def __init__(self, T: int):
        self.T = T
        self.reset()

    def reset(self):
        self.clear()
        self.steps, self.t0 = 0, time.perf_counter()

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` (an evaluation) out of the window's steps/s."""
        self.t0 += seconds

    def add(self, t: torch.Tensor, terms: dict, grad_norm: float):
        loss = terms["loss"].detach().float()
        q = (t.cpu() * 4 // self.T).clamp(max=3)  # t is drawn on the CPU: no copy
        one_hot = F.one_hot(q.to(loss.device, non_blocking=True), 4).to(loss.dtype)
        # one float32 (7,) tensor a step: the three terms' sums, then the loss's per quartile
        self._pending.append(torch.cat([torch.stack([loss.sum()] + [terms[k].detach().float().sum()
                                                                   for k in self.TERMS[1:]]), loss @ one_hot]))
        for name in self.TERMS:
            self.counts[name] += loss.numel()
        for name, n in zip(self.QUARTILES, torch.bincount(q, minlength=4).tolist()):
            self.counts[name] += n
        self.sums["grad_norm"] += grad_norm
        self.counts["grad_norm"] += 1
        self.steps += 1

    def _flush(self) -> None:
        """Add the pending steps' sums to ``sums``: one copy to the host, step by step in float64."""
        if self._pending:
            for row in torch.stack(self._pending).cpu().tolist():
                for name, v in zip(self.TERMS + self.QUARTILES, row):
                    self.sums[name] += v
            self._pending = []

    KEYS = TERMS + QUARTILES + ("grad_norm",)

    def all_reduce(self, reduce_sum, main: bool) -> None:
        """Sum the window over ranks (``reduce_sum``: a float64 array → its sum over ranks), so
        that the summary is over the global batch. Every rank calls it at the same step. The
        grad norm is equal on all ranks (the gradients are all-reduced): only the main rank's
        counts, so that a window saved mid-way and resumed on another number of ranks weighs
        each step once (summed over W ranks, its steps before the checkpoint weighed W)."""
        self._flush()
        if not main:
            self.sums.pop("grad_norm", None)
            self.counts.pop("grad_norm", None)
        keys = self.KEYS
        total = reduce_sum([self.sums.get(k, 0.0) for k in keys] + [self.counts.get(k, 0) for k in keys])
        for i, k in enumerate(keys):
            if total[len(keys) + i] > 0:
                self.sums[k], self.counts[k] = float(total[i]), int(total[len(keys) + i])

    def clear(self) -> None:
        """Drop the sums and counts (keep the timing)."""
        self.sums, self.counts = defaultdict(float), defaultdict(int)
        self._pending: list = []  # the steps' sums not yet in ``sums``, on the terms' device

    def state_dict(self) -> dict:
        self._flush()
        return {"sums": dict(self.sums), "counts": dict(self.counts)}

    def load_state_dict(self, d: dict) -> None:
        self.sums.update(d["sums"])
        self.counts.update(d["counts"])

    def summary(self, batch_size: int) -> dict:
        self._flush()
        dt = time.perf_counter() - self.t0
        out = {k: self.sums[k] / self.counts[k] for k in self.sums if self.counts[k]}
        out["steps_per_s"] = self.steps / dt if dt > 0 else float("nan")
        out["images_per_s"] = out["steps_per_s"] * batch_size
        return out


def truncate_log(path: Path, last_step: int) -> None:
    """Drop log lines past the checkpoint being resumed, so the log has no duplicate steps;
    atomically (a kill leaves the old log or the new one), and lines cut by a kill go too."""
    remove_stale_temps(path.parent, path.name)  # a rewrite killed before its rename
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
    atomic_write_text(path, "".join(k + "\n" for k in keep))


