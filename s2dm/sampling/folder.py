"""``s2dm sample``: per-seed images from a checkpoint, resumable, with ``metadata.json``.

Image i is generated from x_T drawn by seed i's own generator (``samplers.generate``), so it
does not depend on the batch size or on which other seeds are drawn in the same call.

Under torchrun the seeds still to do are split into contiguous parts, one per rank
(``dist.shard``); each rank writes its own PNGs, and rank 0 alone checks the folder's
settings, writes ``metadata.json`` and the preview grid once every rank is done. Since an
image depends only on its seed, W ranks write the same files as one process.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .._version import __version__
from ..core.schedule import NoiseSchedule
from ..errors import UserError
from ..io.checkpoint import load_checkpoint
from ..samplers import check_options, parse_eps_scale
from ..samplers.generate import generate
from ..util import dist
from ..util.dist import pick_device
from ..util.images import PREVIEW_DIR, load_image, make_grid_png, save_png

DEFAULT_N = 64  # images when neither a number nor seeds are given: one preview grid's worth


def folder_name(sampler: str, steps: int, grid: str = "uniform", eta: float = 0.0, order: int = 3,
                eps_scale: Optional[str] = None, legacy_pndm_index: bool = False, use_ema: bool = True) -> str:
    """``ddim-20``, plus every setting that differs from its default (``ddim-20-eta0.5-quad``),
    so that two runs with different settings never share a folder."""
    parts = [sampler, str(steps)]
    if grid != "uniform":
        parts.append(grid)
    if eta:
        parts.append(f"eta{eta:g}")
    if sampler.startswith("deis") and order != 3:
        parts.append(f"order{order}")
    if eps_scale:
        parts.append("eps" + re.sub(r"[^A-Za-z0-9.]+", "_", str(eps_scale)))
    if legacy_pndm_index:
        parts.append("legacy")
    if not use_ema:
        parts.append("noema")
    return "-".join(parts)


def parse_seeds(spec: Optional[str], n: Optional[int]) -> List[int]:
    """``"0-99"`` (inclusive), ``"1,5,9"``, mixtures like ``"0-9,20"``; or ``n`` → 0..n−1."""
    if n is not None and n < 1:
        raise UserError(f"the number of images must be positive, got {n}")
    if spec is None:
        return list(range(DEFAULT_N if n is None else n))
    out: List[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise UserError(f"--seeds {spec!r}: expected a range like 0-99 or a list like 1,5,9")
        a, b = int(m.group(1)), int(m.group(2) or m.group(1))
        if b < a:
            raise UserError(f"--seeds {spec!r}: range {a}-{b} is empty")
        out.extend(range(a, b + 1))
    if n is not None:
        out = out[:n]
    if len(set(out)) != len(out):
        raise UserError(f"--seeds {spec!r} repeats seeds")
    return out


def _settings(args: dict, ck) -> dict:
    """What defines the images; resuming into a folder made with other settings is refused."""
    return {"checkpoint": str(Path(ck.path).resolve()), "checkpoint_step": ck.step, **args}


def sample_to_folder(
    ckpt: str,
    out: str,
    *,
    seeds: Sequence[int],
    sampler: str = "ddim",
    steps: int = 50,
    grid: str = "uniform",
    eta: float = 0.0,
    order: int = 3,
    eps_scale: Optional[str] = None,
    use_ema: bool = True,
    batch_size: int = 256,
    device: str = "auto",
    legacy_pndm_index: bool = False,
    grid_images: int = 64,
) -> dict:
    """Write ``{seed:06d}.png`` for every seed (skipping existing files), ``metadata.json``
    and ``preview/grid.png``; returns the metadata. Under torchrun every rank calls it and
    gets the metadata; the seeds are split across ranks."""
    dev = pick_device(device)
    ck = load_checkpoint(ckpt, device=dev)
    model = ck.ema if use_ema and ck.ema is not None else ck.model
    if use_ema and ck.ema is None:
        raise UserError(f"{ck.path} holds no EMA weights; pass --no-ema")
    cfg = ck.config
    schedule = NoiseSchedule.from_config(cfg.diffusion)
    options = dict(sampler=sampler, steps=steps, grid=grid, eta=eta, order=order,
                   eps_scale=parse_eps_scale(eps_scale) if isinstance(eps_scale, str) else eps_scale,
                   legacy_pndm_index=legacy_pndm_index)
    info = check_options(schedule, **options)  # fail on a bad option before any work
    out = Path(out)
    settings = _settings({**options, "eps_scale": eps_scale, "ema": bool(use_ema)}, ck)
    meta_path = out / "metadata.json"

    def prepare() -> List[int]:  # rank 0: the folder, its settings, the seeds still to do
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create output folder {out}: {exc.strerror}") from None
        if meta_path.is_file():
            before = json.loads(meta_path.read_text()).get("settings", {})
            for key, value in settings.items():
                if before.get(key) != value:
                    raise UserError(f"{out} holds images made with {key}={before.get(key)!r}, not {value!r}; "
                                    "use another --out")
        return [s for s in seeds if not (out / f"{s:06d}.png").exists()]

    todo = dist.run0(prepare)
    mine = dist.shard(todo)  # this rank's part (all of it in a plain process)
    shape = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    world = dist.world_size()
    bar = tqdm(total=len(seeds), initial=len(seeds) - len(todo), unit="img", dynamic_ncols=True,
               desc="sample" if world == 1 else f"sample ({world} ranks, rank 0 shown x{world})",
               disable=not dist.is_main())
    with dist.same_outcome():
        for i in range(0, len(mine), batch_size):
            batch = mine[i:i + batch_size]
            images, info = generate(model, schedule, batch, image_shape=shape, batch_size=batch_size,
                                    device=dev, **options)
            for seed, img in zip(batch, images):
                save_png(img, out / f"{seed:06d}.png")
            bar.update(min(len(batch) * world, bar.total - bar.n))
    bar.close()
    return dist.run0(lambda: _finish(out, seeds, settings, cfg, info, grid_images, shape))


def _finish(out: Path, seeds: Sequence[int], settings: dict, cfg, info: dict, grid_images: int,
            shape) -> dict:
    """metadata.json and the preview grid, once every image is on disk (rank 0)."""
    meta_path = out / "metadata.json"
    meta = {
        "settings": settings,
        "config": cfg.to_dict(),
        "n_images": len(list(out.glob("[0-9]*.png"))),
        "seeds": f"{min(seeds)}-{max(seeds)}" if seeds == list(range(min(seeds), max(seeds) + 1)) else seeds,
        "nfe": info.get("nfe"),
        "timesteps": info.get("timesteps"),
        "eps_scale": info.get("eps_scale"),
        "versions": {"s2dm": __version__, "torch": torch.__version__},
    }
    meta_path.write_text(json.dumps(meta, indent=2))
    first = sorted(seeds)[:grid_images]
    grid_imgs = torch.stack([
        torch.from_numpy(np.array(load_image(out / f"{s:06d}.png", mode="L" if shape[0] == 1 else "RGB"))).permute(2, 0, 1)
        for s in first
    ]).float() / 127.5 - 1.0
    make_grid_png(grid_imgs, out / PREVIEW_DIR / "grid.png")
    return meta
