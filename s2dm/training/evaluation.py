"""Evaluation while training (``train.eval_every``): the EMA model's FD-pixels, FD-cnn or FID every N
steps, one ``log.jsonl`` record each, and the ``checkpoints/best`` pointer.

- Every evaluation samples the same image seeds (``train.eval.seed`` .. +n−1) with the
  ``train.eval`` sampler options, so the values of one run form a curve of the weights alone.
- It draws nothing from the training's random streams: x_T and the samplers' noise come from
  per-seed generators, and every training draw is derived from (train.seed, step) anyway
  (``draws.py``), so a run ends with the same weights with or without evaluation.
- The reference statistics are the training images', made once and kept beside the run
  (``RUN/ref_<features>.npz``, with ``ref_<features>.json``: the data settings it was made
  from); a file made from other data (another ``data.root`` too) or features is made again.
- Under torchrun every rank samples its part of the seeds and extracts its part of the
  reference (``metrics/sampled.py``); rank 0 writes the files.
- Labels follow ``s2dm fid``: FD-pixels is never called FID, and a FID of fewer than 50,000
  images carries its size (``FID-10k``).
- ``best`` compares evaluations made with the same settings only; changing ``train.eval`` on
  resume starts it afresh.
"""
from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Optional

import torch

from ..core.schedule import NoiseSchedule
from ..errors import MetricError, MetricWarning, RunError, S2dmError
from ..io.checkpoint import BEST, checkpoint_name, point, prune
from ..io.config import EVAL_METRICS, Config, check_eval_n, read_config_yaml
from ..metrics.features import FeatureExtractor
from ..metrics.fid import Stats, dataset_stats, frechet_distance, training_images_label, training_images_record
from ..metrics.classifier import architecture
from ..metrics.inception import resolve_inception_weights
from ..metrics.sampled import sample_stats
from ..metrics.statistics import metric_label, metric_name
from ..samplers import takes_order
from ..samplers.options import SampleOptions
from ..util import dist
from ..util.fileio import atomic_write_text
from ..util.records import reusable_record

# The fields of an eval record that define what was measured: ``best`` compares records that agree on them.
SETTINGS = ("metric", "n", "seeds", "sampler", "steps", "grid", "eta", "order", "eps_scale", "legacy_pndm_index")


def check_eval_setup(cfg: Config) -> None:
    """What evaluation needs, checked before the run folder is touched: the Inception weights
    of a FID (found offline, as ``s2dm fid`` finds them); more images than an FD-cnn's
    classifier has features."""
    ev = cfg.train.eval
    if cfg.train.eval_every and EVAL_METRICS[ev.metric] == "cnn":
        check_eval_n(ev.n, architecture(cfg.data.channels, cfg.data.image_size)["dim"], "the FD-cnn classifier's")
    if cfg.train.eval_every and EVAL_METRICS[ev.metric] == "inception":
        try:
            dist.run0(lambda: resolve_inception_weights(ev.inception_weights, allow_download=None,
                                                        key="train.eval.inception_weights"))
        except MetricError as exc:
            raise MetricError(f"train.eval.metric: fid needs the FID Inception weights: {exc} (or evaluate "
                              "with train.eval.metric: fd-pixels)", key="train.eval.metric") from None


def _seeds_text(ev) -> str:
    return f"{ev.seed}-{ev.seed + ev.n - 1}"


@dataclass
class Evaluator:
    """The run's evaluation: its extractor and reference, its settings, the best so far."""

    cfg: Config
    ckpt_dir: Path
    schedule: NoiseSchedule
    device: torch.device
    extractor: FeatureExtractor
    ref: Stats
    best: Optional[dict] = None  # the best record so far with these settings
    unsaved_reference: Optional[Path] = None  # where a reference made by this run goes

    def keep_reference(self) -> None:
        """Write a reference made by this run (rank 0; the run folder exists), with the record of
        the data it was made from. A full disk is one RunError; no checkpoint is touched."""
        path = self.unsaved_reference
        if path is None:
            return

        def write():
            try:
                # A kill at any point leaves no old file that a record, or its absence, would let pass.
                path.unlink(missing_ok=True)
                path.with_suffix(".json").unlink(missing_ok=True)
                self.ref.save(path)
                atomic_write_text(path.with_suffix(".json"),
                                  json.dumps({"data": training_images_record(self.cfg.data)}, indent=2))
            except OSError as exc:
                raise RunError(f"could not write the reference statistics {path}: {exc.strerror or exc}; no "
                               "checkpoint was touched") from None

        dist.run0(write)
        self.ref.path, self.unsaved_reference = str(path), None

    @property
    def every(self) -> int:
        return self.cfg.train.eval_every

    def due(self, step: int) -> bool:
        return self.every > 0 and step > 0 and step % self.every == 0

    @cached_property
    def sampling(self) -> dict:
        """The sampler's info for ``train.eval`` (its walked steps, NFE and effective η: 1 for
        DDPM's posterior steps), checked when the run started."""
        return SampleOptions.of(self.cfg.train.eval).validate(self.schedule, quiet=True)

    def settings(self) -> dict:
        """What defines this run's values (the record's ``SETTINGS`` fields)."""
        ev = self.cfg.train.eval
        return {"metric": metric_label(self.ref.metric, ev.n), "n": ev.n, "seeds": _seeds_text(ev),
                "sampler": ev.sampler, "steps": ev.steps, "grid": ev.grid, "eta": self.sampling.get("eta", ev.eta),
                "order": ev.order if takes_order(ev.sampler) else None, "eps_scale": ev.eps_scale,
                "legacy_pndm_index": ev.legacy_pndm_index}

    def matches(self, record: dict) -> bool:
        mine = self.settings()
        return record.get("event") == "eval" and all(record.get(k) == mine[k] for k in SETTINGS)

    def run(self, ema: torch.nn.Module, step: int) -> dict:
        """Score ``ema`` (every rank calls it); returns the log record, ``best`` set. A disk or
        memory failure is one RunError naming the step."""
        ev, data = self.cfg.train.eval, self.cfg.data
        t0 = time.perf_counter()
        try:
            stats = sample_stats(ema, self.schedule, range(ev.seed, ev.seed + ev.n), SampleOptions.of(ev),
                                 self.extractor, image_shape=(data.channels, data.image_size, data.image_size),
                                 batch_size=ev.batch_size, device=self.device, source=f"step {step}")
        except (OSError, torch.cuda.OutOfMemoryError) as exc:
            raise RunError(f"the evaluation of step {step} failed: {exc}; its checkpoint is saved, rerun the "
                           "same command to resume") from None
        value = dist.run0(lambda: frechet_distance(stats, self.ref))
        record = {"step": step, "event": "eval", **self.settings(), "value": value,
                  "nfe": self.sampling["nfe"], "seconds": round(time.perf_counter() - t0, 3),
                  "features": self.ref.features, "ref": self.ref.path}
        record["best"] = math.isfinite(value) and (self.best is None or value < self.best["value"])
        if record["best"]:
            self.best = record
        return record

    def point_best(self) -> None:
        """``checkpoints/best`` → the best record's checkpoint (rank 0; that step's checkpoint
        is always written before its evaluation)."""
        if self.best is not None:
            path = self.ckpt_dir / checkpoint_name(self.best["step"])
            if path.is_file():
                point(self.ckpt_dir, BEST, path)
                prune(self.ckpt_dir, self.cfg.train.keep_last)  # the checkpoint best held before, unless kept

    def resume(self, log_path: Path) -> set:
        """The best so far among the log's records (already cut at the resumed step) with
        these settings, the pointer put back on it; returns the steps already evaluated
        (with any settings: a resumed step is not scored twice)."""
        done = set()
        if log_path.is_file():
            for line in log_path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if rec.get("event") == "eval":
                    done.add(rec["step"])
                if self.matches(rec):
                    if math.isfinite(rec["value"]) and (self.best is None or rec["value"] < self.best["value"]):
                        self.best = rec
        self.point_best()
        return done


def set_up_evaluation(cfg: Config, run_dir: Path, dataset, schedule: NoiseSchedule,
                      device: torch.device) -> Optional[Evaluator]:
    """The run's Evaluator (None when ``train.eval_every`` is 0) with its reference statistics,
    read from ``RUN/ref_<features>.npz`` or made in memory. Every rank calls it BEFORE the run
    folder is prepared, so that what can fail here (the weights, the training images) fails
    with the folder as it was; ``Evaluator.keep_reference`` writes a newly made reference."""
    if not cfg.train.eval_every:
        return None
    ev = cfg.train.eval
    features = EVAL_METRICS[ev.metric]
    extractor = FeatureExtractor(features, device=str(device), batch_size=ev.batch_size,
                                 weights=ev.inception_weights if features == "inception" else None,
                                 data=cfg.data if features == "cnn" else None, progress=False)
    extractor.load()
    path = run_dir / f"ref_{extractor.kind}.npz"
    label, made_from = training_images_label(cfg.data), training_images_record(cfg.data)
    ref = dist.run0(lambda: _cached_reference(path, extractor.kind, label, made_from, len(dataset),
                                              extractor.weights_sha256))
    unsaved = None
    if ref is None:
        ref, unsaved = dataset_stats(dataset, extractor, label, batch_size=extractor.batch_size), path
    _warn_if_singular(ref)
    return Evaluator(cfg, run_dir / "checkpoints", schedule, device, extractor, ref, unsaved_reference=unsaved)


def _warn_if_singular(ref: Stats) -> None:
    """Fewer training images than features: the reference's covariance is singular, and
    every value is less accurate (the generated side's ``train.eval.n`` is checked at load)."""
    if ref.n is not None and ref.n <= ref.dim:
        warnings.warn(MetricWarning(
            f"the reference has {ref.n} training images for {ref.dim}-d features: its covariance is singular "
            f"and the {metric_name(ref.features)} values are less accurate (more training images, or another "
            "train.eval.metric, avoid it)"))


def _cached_reference(path: Path, kind: str, label: str, made_from: dict, n: int,
                      weights_sha256: Optional[str]) -> Optional[Stats]:
    """The statistics at ``path`` if made from this data (``ref_<features>.json`` records its
    data settings) with these features and weights; else None (made again). A file without
    the record (an earlier s2dm's; or one a kill cut off before its record) is reused when the
    run folder's ``config.yaml``, which the run last trained with, names this data: remaking a
    CIFAR10 FID reference costs 50,000 Inception passes."""
    if not path.is_file():
        return None
    record = path.with_suffix(".json")
    if record.exists():
        if reusable_record(record, "data", made_from) is None:
            return None
    elif _trained_on(path.parent) != made_from:
        return None
    try:
        stats = Stats.load(path)
    except MetricError:
        return None  # unreadable (e.g. cut by a kill): made again
    if (stats.features, stats.source, stats.n) != (kind, label, n):
        return None
    if weights_sha256 and stats.weights_sha256 != weights_sha256:
        return None
    stats.path = str(path)
    return stats


def _trained_on(run_dir: Path) -> Optional[dict]:
    """The data record of the config a run folder last trained with (None if unreadable)."""
    try:
        data = read_config_yaml(run_dir / "config.yaml").get("data")
    except S2dmError:
        return None
    return training_images_record(data) if isinstance(data, dict) else None


def describe(evaluator: Evaluator) -> str:
    """The evaluation in words, for the start of a run."""
    s = evaluator.settings()
    name = metric_name(evaluator.ref.features)
    return (f"evaluating every {evaluator.every} steps: {s['metric']} ({name} of {s['n']} images, {s['sampler']} "
            f"{s['steps']} steps, against {evaluator.ref.n} training images in {evaluator.ref.path})")
