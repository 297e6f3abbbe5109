"""What a study does, derived from its YAML (``spec.py``): each run's training config, the
folder of each model, the cells to score and their sampler options, and what is checked
before the study folder is made (configs, sampler options, the Inception weights of FID cells,
data sets), so that a mistake is one error line that leaves nothing behind. ``runner.py`` does
the work.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import List

from ..core.schedule import NoiseSchedule
from ..errors import S2dmError, StudyError
from ..io.config import load_config
from ..io.data import load_dataset
from ..metrics.inception import resolve_inception_weights
from ..samplers.options import SampleOptions
from .spec import Run, Study, path_name


# ---------------------------------------------------------------- models

def model_name(run: str, seed: int) -> str:
    """The folder of a run's model of one seed (``runs/``, ``cells/``): ``baseline-s0``,
    ``const-sweep_const=0.995-s0`` (``spec.path_name``)."""
    return f"{path_name(run)}-s{seed}"


def run_config(study: Study, run: Run, seed: int):
    """The training config of a run's model of one seed; a bad key or value of its ``set`` is a
    StudyError naming the run."""
    sets = {**study.overrides, **run.overrides, "train.seed": seed}
    try:
        return load_config(study.train_config, [f"{k}={json.dumps(v)}" for k, v in sets.items()])
    except S2dmError as exc:
        raise StudyError(f"{study.path}: runs.{run.name}.set: {exc}") from None


# ---------------------------------------------------------------- cells

@dataclass
class Cell:
    run: str
    seed: int  # training seed
    sampler: str
    steps: int
    draw: str = "main"  # "main" or "noise" (the metric-noise re-draw)
    metric: str = "pixels"  # "pixels" (FD-pixels), "cnn" (FD-cnn) or "inception" (FID)
    n: int = 0

    @property
    def images(self) -> tuple:
        """What the cell samples: cells with the same images share one sampling pass."""
        return self.run, self.seed, self.sampler, self.steps, self.draw, self.n

    @property
    def key(self) -> str:
        suffix = "" if self.draw == "main" else f"-{self.draw}"
        metric = "" if self.metric == "pixels" else f"-{self.metric}"
        return f"{self.sampler}-{self.steps}{metric}{suffix}"


def plan_cells(study: Study) -> List[Cell]:
    """Every cell to score, cheapest step count first (so an interrupted study has whole
    columns of the table, not whole models), runs in config order within a column."""
    cells = []

    def add(cell: Cell) -> None:  # FD-pixels, and its FD-cnn twin (same images when the n agree)
        cells.append(cell)
        if study.cnn_n > 0:
            cells.append(replace(cell, metric="cnn", n=study.cnn_n))

    for steps in sorted(study.steps):
        for sampler in study.samplers:
            for run in study.runs.values():
                if run.samplers is not None and sampler not in run.samplers:
                    continue
                for seed in run.seeds:
                    add(Cell(run.name, seed, sampler, steps, n=study.n))
                    if run.name == study.noise_draw and seed == run.seeds[0]:
                        add(Cell(run.name, seed, sampler, steps, draw="noise", n=study.n))
    if study.fid_n > 0:
        for steps in study.fid_steps:
            for sampler in study.fid_samplers or study.samplers:
                for run in study.runs.values():
                    if run.samplers is not None and sampler not in run.samplers:
                        continue
                    for seed in run.seeds:
                        cells.append(Cell(run.name, seed, sampler, steps, metric="inception", n=study.fid_n))
    return cells


def image_seeds(study: Study, cell: Cell) -> range:
    start = 0 if cell.draw == "main" else study.noise_seed_offset
    return range(start, start + cell.n)


def cell_options(study: Study, cell: Cell, run: Run) -> SampleOptions:
    """The sampler options of a cell: the study sets the sampler, steps, DEIS order and
    ε-scale; grid and η are SampleOptions' defaults (uniform, 0)."""
    return SampleOptions(sampler=cell.sampler, steps=cell.steps, order=study.order, eps_scale=run.eps_scale or None)


# ---------------------------------------------------------------- checks before the study folder

def check_configs(study: Study) -> None:
    """Every trained run's config builds (the study's ``set``, then each run's): checked before
    the study folder is made, so a typo leaves nothing behind."""
    try:
        load_config(study.train_config, [f"{k}={json.dumps(v)}" for k, v in study.overrides.items()])
    except S2dmError as exc:
        raise StudyError(f"{study.path}: set: {exc}") from None
    for run in study.runs.values():
        if run.trained:
            run_config(study, run, run.seeds[0])


def check_data(study: Study) -> None:
    """Every data set the trained runs use loads (each once): checked before the study folder is
    made, so a missing data set is one line, not a worker's error after an empty folder."""
    seen = []
    for run in study.runs.values():
        if run.trained:
            data = run_config(study, run, run.seeds[0]).data
            if data not in seen:
                seen.append(data)
                load_dataset(data)


def check_cells(study: Study) -> None:
    """Every cell's sampler options against its model's schedule (``eval.steps: 5000`` with
    T = 1000), and the Inception weights of FID cells, found offline: before any training, in
    the study YAML's keys."""
    cells, schedules, checked = plan_cells(study), {}, set()
    for cell in cells:
        run = study.runs[cell.run]
        source = run.weights_of or run.name  # the trained run whose weights, and schedule, the cell samples
        if source not in schedules:  # one config read per trained run, not per cell
            trained = study.runs[source]
            schedules[source] = NoiseSchedule.from_config(run_config(study, trained, trained.seeds[0]).diffusion)
        options, section = cell_options(study, cell, run), "eval.fid." if cell.metric == "inception" else "eval."
        if (str(options), source, section) not in checked:  # SampleOptions is unhashable
            checked.add((str(options), source, section))
            options.validate(schedules[source], prefix=f"{study.path}: {section}", quiet=True)
    for source in {run.weights_of or run.name for run in study.runs.values()}:  # each run's mosaic
        SampleOptions(sampler="ddim", steps=study.mosaic_steps).validate(schedules[source], quiet=True,
                                                                         prefix=f"{study.path}: eval.mosaic_")
    if any(cell.metric == "inception" for cell in cells):
        try:
            resolve_inception_weights(None, allow_download=None, key=None)
        except S2dmError as exc:
            raise StudyError(f"{study.path}: eval.fid needs the FID Inception weights: {exc}") from None
