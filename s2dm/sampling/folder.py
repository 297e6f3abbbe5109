"""``s2dm sample``: per-seed images from a checkpoint, resumable, with ``metadata.json``.

Image i is generated from x_T drawn by seed i's own generator (``samplers.generate``), so it
does not depend on the batch size or on which other seeds are drawn in the same call.

Under torchrun the seeds still to do are split into contiguous parts, one per rank
(``dist.shard``); each rank writes its own PNGs, and rank 0 alone checks the folder's
settings, writes ``metadata.json`` and the preview mosaic once every rank is done. Since an
image depends only on its seed, W ranks write the same files as one process.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import re
import warnings
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from .._version import __version__
from ..core.schedule import NoiseSchedule
from ..errors import DataError, GridWarning, RunError, S2dmError, SamplerError
from ..io.checkpoint import (checkpoint_stamp, checkpoint_step, load_checkpoint, pick_weights, resolve_checkpoint,
                             run_folder_of)
from ..samplers import eps_scale_label, takes_order
from ..samplers.generate import check_batch_size, checked_seeds, generate, generate_batches
from ..samplers.options import SampleOptions
from ..util import dist
from ..util.dist import note, pick_device
from ..util.textfmt import plural
from ..util.fileio import atomic_write_text, remove_stale_temps
from ..util.folderlock import FolderLock
from ..util.images import PREVIEW_DIR, load_image, save_mosaic, save_png, to_uint8
from ..util.records import first_difference

MOSAIC_IMAGES = 64  # the preview mosaic shows the first images of a folder
MOSAIC = Path(PREVIEW_DIR) / "mosaic.png"  # in a sample folder
# tqdm's own counter would print the fractions of images that ``advance`` adds within a batch.
IMAGE_BAR = "{l_bar}{bar}| {n:.0f}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
DEFAULT_N = MOSAIC_IMAGES  # images when neither a number nor seeds are given: one preview mosaic's worth


# More images than any evaluation needs (FID takes 50,000); a list of this many seeds fits in
# memory, where a typo such as 0-100000000000 would not.
MAX_SEEDS = 1_000_000


def parse_seeds(spec: Optional[str], n: Optional[int]) -> List[int]:
    """``"0-99"`` (inclusive), ``"1,5,9"``, mixtures like ``"0-9,20"``; or ``n`` → 0..n−1."""
    if n is not None and n < 1:
        raise SamplerError(f"n must be positive (the number of images), not {n}", key="n")
    too_many = f"more than s2dm samples in one call ({MAX_SEEDS:,}); sample in parts, with seed ranges"
    if n is not None and n > MAX_SEEDS and spec is None:
        raise SamplerError(f"n {n:,} images is {too_many}", key="n")
    if spec is None:
        return list(range(DEFAULT_N if n is None else n))
    out: List[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise SamplerError(f"seeds {spec!r}: expected a range like 0-99 or a list like 1,5,9", key="seeds")
        a, b = int(m.group(1)), int(m.group(2) or m.group(1))
        if b < a:
            raise SamplerError(f"seeds {spec!r}: range {a}-{b} is empty", key="seeds")
        if len(out) + b - a + 1 > MAX_SEEDS:
            raise SamplerError(f"seeds {spec!r}: {len(out) + b - a + 1:,} images is {too_many}", key="seeds")
        out.extend(range(a, b + 1))
    if n is not None:
        out = out[:n]
    if len(set(out)) != len(out):
        raise SamplerError(f"seeds {spec!r} repeats seeds", key="seeds")
    return out


def seed_ranges(seeds: Iterable[int]) -> str:
    """The seeds as ``parse_seeds`` reads them, runs as ranges: ``0-63,100,200-299``."""
    parts: List[str] = []
    for _, run in itertools.groupby(enumerate(sorted(seeds)), key=lambda pair: pair[1] - pair[0]):
        run = [seed for _, seed in run]
        parts.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
    return ",".join(parts)


def folder_seeds(out: Path) -> List[int]:
    """The seeds whose images a sample folder holds (``{seed:06d}.png``), in order."""
    return sorted(int(p.stem) for p in Path(out).glob("[0-9]*.png")
                  if p.stem.isdigit() and p.name == f"{int(p.stem):06d}.png")  # not a stray 42.png


def default_folder(ckpt: Union[str, Path], options: SampleOptions, use_ema: bool = True) -> Optional[Path]:
    """``RUN/samples/<options.folder_name>`` for a checkpoint of a run, with ``-step<N>`` when
    it is not the run's newest (a file named directly, the ``best`` one), so that each
    checkpoint's images have their own folder; None for a file outside a run folder. The name
    without a step is the newest checkpoint's: images left there by a checkpoint that the run
    has since trained past are first moved to their ``-step<N>`` name (rank 0, with a note)."""
    path = resolve_checkpoint(ckpt)  # a missing checkpoint is the error to report
    run = run_folder_of(path)
    if run is None:
        return None
    name, newest = options.folder_name(use_ema), resolve_checkpoint(run)
    dist.run0(lambda: _move_superseded(run / "samples" / name, newest, checkpoint_step(path)))
    if path.resolve() != newest.resolve():
        return run / "samples" / f"{name}-step{checkpoint_step(path)}"
    return run / "samples" / name


def _move_superseded(folder: Path, newest: Path, asked: int) -> None:
    """Move ``folder``'s images of an earlier checkpoint of the run than ``newest`` to
    ``<folder>-step<N>``, when step ``asked`` is sampled now and is the newest (the step-less
    folder is its) or N (its images belong there). Not moved: an unfinished folder (a run may be
    writing it; the command that started it finishes it), images of a checkpoint the run does
    not have before ``newest`` (a run started over, whose file of that step is another): sampling
    refuses them."""
    made = made_with(folder)
    step = None if made is None else made["checkpoint_step"]
    if not isinstance(step, int) or step >= checkpoint_step(newest) or asked not in (step, checkpoint_step(newest)):
        return
    if not made["complete"]:
        return
    then = newest.parent / Path(str(made["checkpoint"])).name  # the file of that step now (kept or pruned)
    recorded = made["checkpoint_stamp"]  # none in folders of an earlier s2dm
    if recorded is not None and then.is_file() and checkpoint_stamp(then) != recorded:
        return
    target = folder.with_name(f"{folder.name}-step{step}")
    if target.exists():
        raise RunError(f"{folder} holds the images of step {step}, which the run has trained past, and {target}, "
                       "where they would move, exists too; merge or delete one of them")
    try:
        folder.rename(target)
    except OSError as exc:
        raise RunError(f"could not move {folder} (images of step {step}) to {target}: {exc.strerror or exc}") from None
    note(f"{folder} held the images of step {step}, which the run has trained past: moved to {target}")


def made_with(folder: Union[str, Path]) -> Optional[dict]:
    """What made a sample folder's images, from its ``metadata.json``: the sampler options,
    the steps walked and their NFE and η, the checkpoint (path, step, stamp), and ``complete``
    (False while, or if, the run that writes it has not finished). None for a folder without
    a readable one."""
    try:
        meta = json.loads((Path(folder) / "metadata.json").read_text())
        settings = dict(meta["settings"])
    except (OSError, ValueError, KeyError, TypeError):  # not written by s2dm sample, or damaged
        return None
    made = {key: settings.get(key) for key in SampleOptions().as_dict()}
    made.update(checkpoint=settings.get("checkpoint"), checkpoint_step=settings.get("checkpoint_step"),
                checkpoint_stamp=settings.get("checkpoint_stamp"),
                ema=settings.get("ema"), complete=meta.get("complete") is True, nfe=meta.get("nfe"))
    # The steps' η: recorded once complete; before that, from the sampler (DDPM's steps are η = 1,
    # PNDM's and DEIS's have none). The steps as walked, once complete; before, as asked.
    made["eta"] = meta["eta"] if "eta" in meta else {"ddim": made["eta"], "ddpm": 1.0}.get(made["sampler"])
    if "steps" in meta:
        made["steps"] = meta["steps"]
    return made


def made_with_text(m: dict) -> str:
    """A sample folder's settings in one line: ``ddim, 20 steps (NFE 20), grid uniform, η 0,
    EMA weights of step 500 (runs/x/checkpoints/ckpt_00000500.pt)``."""
    nfe = "" if m["nfe"] is None else f" (NFE {m['nfe']})"  # recorded when the folder was finished
    parts = [f"{m['sampler']}, {plural(m['steps'], 'step')}{nfe}", f"grid {m['grid']}"]
    if m["eta"] is not None:
        parts.append(f"η {m['eta']:g}")
    if takes_order(m["sampler"]):
        parts.append(f"order {m['order']}")
    if m["eps_scale"]:
        parts.append(f"ε-scale {m['eps_scale']}")
    if m["legacy_pndm_index"]:
        parts.append("legacy PNDM index")
    weights = "EMA" if m["ema"] else "raw"
    parts.append(f"{weights} weights of step {m['checkpoint_step']} ({m['checkpoint']})")
    return "made with " + ", ".join(parts)


def _settings(options: SampleOptions, use_ema: bool, ck) -> dict:
    """What defines the images; resuming into a folder made with other settings is refused."""
    return {"checkpoint": str(Path(ck.path).resolve()), "checkpoint_step": ck.step,
            "checkpoint_stamp": checkpoint_stamp(ck.path), **options.as_dict(),
            "eps_scale": eps_scale_label(options.eps_scale), "ema": bool(use_ema)}  # 1.005 is const:1.005


def sample_to_folder(
    ckpt: str,
    out: str,
    options: Optional[SampleOptions] = None,
    *,
    seeds: Sequence[int],
    use_ema: bool = True,
    batch_size: int = 256,
    device: str = "auto",
    replace_stale: bool = False,
    progress: bool = True,
) -> dict:
    """Write ``{seed:06d}.png`` for every seed (skipping existing files), ``metadata.json``
    and ``preview/mosaic.png`` with the sampler ``options`` (default ``SampleOptions()``);
    returns the metadata. Under torchrun every rank calls it and gets the metadata; the seeds
    are split across ranks. A folder made with other settings is refused, or, with
    ``replace_stale`` (a folder the caller owns, such as ``s2dm eval``'s), emptied first.
    ``progress``: the progress bar."""
    options = SampleOptions() if options is None else SampleOptions.of(options)
    seeds, batch_size = checked_seeds(seeds), check_batch_size(batch_size)  # a range or numpy ints: a list
    dev = pick_device(device)
    ck = load_checkpoint(ckpt, device=dev)
    model = getattr(ck, pick_weights(ck.state, use_ema, ck.path, "sample"))
    cfg = ck.config
    schedule = NoiseSchedule.from_config(cfg.diffusion)
    info = options.validate(schedule)  # fail on a bad option before any work
    out = Path(out)
    settings = _settings(options, use_ema, ck)
    shape = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    with FolderLock(out, "sampling") as lock:
        dist.run0(lock.take)  # before its settings are read: another process may be about to write them
        if not replace_stale:
            dist.run0(lambda: _check_unrecorded(out, model, schedule, options, shape, dev))
        todo = dist.run0(lambda: _prepare(out, seeds, settings, replace_stale))
        info = _generate_and_save(model, schedule, options, out, seeds, todo, shape, batch_size, dev, info, progress)
        return dist.run0(lambda: _finish(out, seeds, settings, cfg, info, shape))


def _check_unrecorded(out: Path, model, schedule: NoiseSchedule, options: SampleOptions, shape, device) -> None:
    """Images in a folder without ``metadata.json`` (deleted, or never written: a copy) are kept
    only if they are what these settings make: the first and the last are made again and
    compared byte for byte (rank 0); else a RunError, before anything is written."""
    held = [] if (out / "metadata.json").exists() else folder_seeds(out)
    if not held:
        return
    probe = sorted({held[0], held[-1]})
    images, _ = generate(model, schedule, probe, image_shape=shape, batch_size=len(probe), device=device,
                         **options.as_kwargs())
    mode = "L" if shape[0] == 1 else "RGB"
    for seed, image in zip(probe, images):
        if not np.array_equal(_read_sample(out / f"{seed:06d}.png", mode), to_uint8(image).permute(1, 2, 0).numpy()):
            raise RunError(f"{out} holds {plural(len(held), 'image')} but no metadata.json, and {seed:06d}.png is not "
                           "what these settings make from this checkpoint; choose another output folder, or move "
                           "the images away", key="out")
    note(f"{out} holds {plural(len(held), 'image')} without metadata.json; images {seed_ranges(probe)} are what these "
         "settings make, so the folder's images are kept")


def _prepare(out: Path, seeds: Sequence[int], settings: dict, replace_stale: bool = False) -> List[int]:
    """The folder, its settings, the seeds still to do (rank 0)."""
    meta_path = out / "metadata.json"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunError(f"cannot create output folder {out}: {exc.strerror}", key="out") from None
    for folder, names in ((out, "[0-9]*.png"), (out, "metadata.json"), (out / MOSAIC.parent, MOSAIC.name)):
        remove_stale_temps(folder, names)  # temp files of a killed run; no rank writes yet
    if meta_path.is_file():
        before = _read_settings(meta_path)
        differ = first_difference(before, settings, ignore=_unchanged(before, settings))
        if differ and replace_stale:
            for old in [*out.glob("[0-9]*.png"), out / MOSAIC, meta_path]:
                old.unlink(missing_ok=True)
        elif differ:
            key, was, now = differ
            made = (f"an earlier file at {settings['checkpoint']} (it was saved again since)" if key == "checkpoint_stamp"
                    else f"{key} {_setting_text(was)}, not {_setting_text(now)}")
            raise RunError(f"{out} holds images made with {made}; choose another output folder", key="out")
    todo = [s for s in seeds if not (out / f"{s:06d}.png").exists()]
    # On record before the first image (a killed run resumes only with the same settings), and
    # unfinished while images are added to a finished folder, until _finish says otherwise.
    if todo or not meta_path.is_file():
        atomic_write_text(meta_path, json.dumps({"settings": settings, "complete": False}, indent=2))
    return todo


def _unchanged(before: dict, settings: dict) -> set:
    """Recorded settings that do not tell the images apart: keys this s2dm no longer records;
    the checkpoint's path when the file is the same (name, size, time: a run folder moved with
    ``mv`` or ``cp -a``); the DEIS order for samplers without one."""
    same = set(before) - set(settings)
    checkpoint = before.get("checkpoint")
    if isinstance(checkpoint, str) and Path(checkpoint).name == Path(settings["checkpoint"]).name \
            and before.get("checkpoint_stamp") == settings["checkpoint_stamp"]:
        same.add("checkpoint")
    if not (takes_order(settings["sampler"]) and takes_order(str(before.get("sampler")))):
        same.add("order")
    return same


def _generate_and_save(model, schedule: NoiseSchedule, options: SampleOptions, out: Path, seeds: Sequence[int],
                       todo: List[int], shape, batch_size: int, device, info: dict, progress: bool) -> dict:
    """This rank's part of ``todo`` as PNGs; returns the sampler's info of its last batch
    (``info`` if it had none)."""
    mine = dist.shard(todo)  # this rank's part (all of it in a plain process)
    world = dist.world_size()
    bar = tqdm(total=len(seeds), initial=len(seeds) - len(todo), unit="img", dynamic_ncols=True,
               desc="sample" if world == 1 else f"sample ({world} ranks, rank 0 shown x{world})",
               disable=not (progress and dist.is_main()), bar_format=IMAGE_BAR)

    def advance(images: float) -> None:  # within a batch, at every network call: 1000 steps are long
        bar.update(min(images * world, bar.total - bar.n))  # the shares' float sum can pass B

    with dist.same_outcome(), bar, warnings.catch_warnings():  # the bar closes before an error line: it stays the last
        warnings.simplefilter("ignore", GridWarning)  # validate() said it, before the bar
        done = bar.n
        for batch, images, info in generate_batches(model, schedule, mine, image_shape=shape, batch_size=batch_size,
                                                    device=device, progress=advance, **options.as_kwargs()):
            for seed, img in zip(batch, images):
                save_png(img, out / f"{seed:06d}.png")
            done = min(done + len(batch) * world, bar.total)
            bar.update(done - bar.n)  # whole images again, whatever the calls' shares summed to
    return info


def _setting_text(value) -> str:
    """A recorded setting as an error shows it: on/off, none, text unquoted (not Python's repr)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return "none" if value is None else str(value)


def _read_settings(meta_path: Path) -> dict:
    """The settings a sample folder's metadata.json records; one RunError if it is unreadable."""
    try:
        meta = json.loads(meta_path.read_text())
        if not isinstance(meta, dict) or not isinstance(meta.get("settings"), dict):
            raise ValueError("no settings")
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise RunError(f"{meta_path} is truncated or corrupt ({exc}); delete it and rerun the same command "
                       "to rebuild it from the images already there (kept if they are what the command makes), "
                       "or choose another output folder") from None
    settings = meta["settings"]
    if isinstance(settings.get("eps_scale"), str):  # earlier folders recorded it as typed: compare labels
        with contextlib.suppress(S2dmError):
            settings["eps_scale"] = eps_scale_label(settings["eps_scale"])
    return settings


def _read_sample(path: Path, mode: str) -> np.ndarray:
    """A sample PNG for the mosaic; a corrupt one (a copy cut short) says how to make it again."""
    try:
        return load_image(path, mode=mode)
    except DataError as exc:
        raise exc.retold(f"{exc}; delete it and rerun the same command to make it again") from None


def _finish(out: Path, seeds: Sequence[int], settings: dict, cfg, info: dict, shape) -> dict:
    """metadata.json and the preview mosaic, once every image is on disk (rank 0)."""
    meta_path = out / "metadata.json"
    held = folder_seeds(out)  # this call's seeds and those of earlier calls into the folder
    meta = {
        "settings": settings,
        "complete": True,  # False while the images are being made
        "config": cfg.to_dict(),
        "n_images": len(held),
        "seeds": seed_ranges(held),
        "steps": info.get("steps"),  # walked: fewer than settings' steps where a grid's points coincide
        "nfe": info.get("nfe"),
        "eta": info.get("eta"),  # the steps' η: DDIM's, 1 for DDPM; none for PNDM and DEIS
        "timesteps": info.get("timesteps"),
        "eps_scale": info.get("eps_scale"),
        "versions": {"s2dm": __version__, "torch": torch.__version__},
    }
    atomic_write_text(meta_path, json.dumps(meta, indent=2))  # a kill leaves the old file or none
    first = held[:MOSAIC_IMAGES]
    mosaic_imgs = torch.stack([
        torch.from_numpy(np.array(_read_sample(out / f"{s:06d}.png", "L" if shape[0] == 1 else "RGB"))).permute(2, 0, 1)
        for s in first
    ]).float() / 127.5 - 1.0
    save_mosaic(mosaic_imgs, out / MOSAIC)
    return meta
