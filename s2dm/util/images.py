"""Image files in and out: list/load image folders, write single PNGs and PNG mosaics.

Conventions: arrays on disk-side are uint8 HWC (C = 1 or 3); tensors model-side are float
CHW in [-1, 1]. The uint8 <-> [-1, 1] maps are ``to_uint8`` and ``from_uint8``.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError, DataError
from .fileio import atomic_write

# ``s2dm sample`` puts its preview mosaic in a subfolder: tools that read only the top level
# (python -m pytorch_fid) then see nothing but the per-seed samples; s2dm's readers skip it.
PREVIEW_DIR = "preview"
# pytorch-fid's IMAGE_EXTENSIONS (tests check it), so that `s2dm fid` reads what it reads.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".pgm", ".ppm", ".tif", ".tiff")
# Grayscale of more than 8 bits: scaled to 8 bits here, where PIL's convert would clip at 255.
WIDE_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")

# PIL raises many exception types on broken files (OSError for truncation, SyntaxError for
# broken PNG chunks, ValueError/EOFError in some decoders); all mean "bad file".
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)

PathLike = Union[str, os.PathLike]


# ---------------------------------------------------------------- reading

def list_images(folder: PathLike) -> list[Path]:
    """Sorted image files under ``folder`` (recursive, through linked folders as well, each
    folder read once, so a link back up is no loop; hidden files and folders skipped; in an
    ``s2dm sample`` folder, one with ``metadata.json``, its ``preview/`` mosaic too)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder not found: {folder}")
    preview = folder / PREVIEW_DIR if (folder / "metadata.json").is_file() else None
    found, seen = [], set()
    for here, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(here)
        if real in seen:  # a link to a folder already read, e.g. back up the tree
            dirs.clear()
            continue
        seen.add(real)
        here = Path(here)
        # Hidden entries are skipped: e.g. macOS "._x.png" resource forks are not images.
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and here / d != preview)  # which link reads a folder
        found += [here / f for f in files if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES
                  and (here / f).is_file()]
    if not found:
        raise DataError(
            f"no images ({'/'.join(s[1:] for s in IMAGE_SUFFIXES)}) found in {folder} "
            "(searched recursively)"
        )
    return sorted(found)


def open_image(path: PathLike) -> Image.Image:
    """Open and fully decode an image (so truncated files fail here, not later)."""
    try:
        with Image.open(path) as im:
            im.load()
            # load() on a lazily opened file keeps the handle; copy detaches from it.
            return im.copy()
    except FileNotFoundError:
        raise DataError(f"image file not found: {path}") from None
    except _DECODE_ERRORS as e:
        raise DataError(f"cannot decode image {path}: {e}") from None


def load_image(path: PathLike, mode: str = "RGB") -> np.ndarray:
    """Load one image as uint8 HWC: ``mode="RGB"`` gives C = 3, ``mode="L"`` gives C = 1."""
    if mode not in ("RGB", "L"):
        raise ValueError(f"mode must be 'RGB' or 'L', not {mode!r}")
    arr = np.asarray(_eight_bit(open_image(path)).convert(mode), dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def _eight_bit(im: Image.Image) -> Image.Image:
    """A 16-bit grayscale image scaled to 8 bits (x / 257): PIL's convert clips its values at
    255, which makes most of such an image white (pytorch-fid's loader clips too). PIL already
    reduces 16-bit RGB to 8 bits itself."""
    if im.mode not in WIDE_GRAY_MODES:
        return im
    scaled = np.rint(np.asarray(im, dtype=np.float64) / 257)
    return Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8), "L")


def _is_gray(im: Image.Image) -> bool:
    # 'P' (palette) images may be coloured even though they have one band.
    return im.mode != "P" and len(im.getbands()) <= 2


def _size_text(hw: Sequence[int]) -> str:
    return f"{hw[1]}x{hw[0]}"  # width x height, as image tools print it


def load_folder(
    folder: PathLike,
    *,
    channels: Optional[int] = None,
    size: Union[int, Sequence[int], None] = None,
    resize_to: Optional[int] = None,
) -> np.ndarray:
    """Load every image under ``folder`` as uint8 (N, H, W, C).

    ``channels``: 1 or 3 (images are converted); None takes it from the first image
    (grayscale -> 1, else 3). ``size``: expected native size, int (square) or (H, W).
    All images must share one size. ``resize_to``: resize each (square) image to
    resize_to x resize_to with PIL bilinear, done per image to keep memory small.
    """
    paths = list_images(folder)
    if channels is None:
        channels = 1 if _is_gray(open_image(paths[0])) else 3
    if channels not in (1, 3):
        raise ConfigError(f"channels must be 1 or 3 for an image folder, not {channels}", key="channels")
    mode = "L" if channels == 1 else "RGB"
    expected = None
    if size is not None:
        expected = (size, size) if isinstance(size, int) else tuple(size)

    first_hw, first_path = None, None
    out = None
    for i, path in enumerate(paths):
        img = load_image(path, mode)
        hw = img.shape[:2]
        if first_hw is None:
            first_hw, first_path = hw, path
            if expected is not None and hw != expected:
                raise DataError(
                    f"{path} is {_size_text(hw)} but {_size_text(expected)} was expected"
                )
            if resize_to is not None and hw[0] != hw[1]:
                raise DataError(
                    f"{path} is {_size_text(hw)}, not square; crop the images in {folder} "
                    "to squares before resizing them"
                )
            out_hw = (resize_to, resize_to) if resize_to is not None else hw
            out = np.empty((len(paths), *out_hw, channels), dtype=np.uint8)
        elif hw != first_hw:
            raise DataError(
                f"images in {folder} differ in size: {path} is {_size_text(hw)} but "
                f"{first_path} is {_size_text(first_hw)}; make them all one size"
            )
        if resize_to is not None and hw != (resize_to, resize_to):
            img = resize_uint8(img, resize_to)
        out[i] = img
    return out


def resize_uint8(img: np.ndarray, size: int) -> np.ndarray:
    """Resize one uint8 HWC image to size x size with PIL bilinear (antialiased)."""
    pil = Image.fromarray(img[..., 0] if img.shape[2] == 1 else img)
    arr = np.asarray(pil.resize((size, size), Image.BILINEAR), dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


# ---------------------------------------------------------------- value maps

def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float -> uint8, as torchvision's save_image does: floor((x+1)*127.5 + 0.5),
    clamped to [0, 255]. NaN input is an error (it has no defined uint8 value)."""
    if not torch.is_floating_point(x):
        raise TypeError(f"to_uint8 expects a float tensor in [-1, 1], got {x.dtype}")
    if bool(torch.isnan(x).any()):
        raise ValueError("to_uint8: input contains NaN")
    return ((x.float() + 1.0) * 127.5 + 0.5).clamp_(0, 255).to(torch.uint8)


def from_uint8(x: Union[torch.Tensor, np.ndarray]) -> torch.Tensor:
    """uint8 -> float32 in [-1, 1] (x / 127.5 - 1; ToTensor then 2x - 1 gives the same)."""
    x = torch.as_tensor(x)
    if x.dtype != torch.uint8:
        raise TypeError(f"from_uint8 expects uint8, got {x.dtype}")
    return x.float() / 127.5 - 1.0


# ---------------------------------------------------------------- writing

def _atomic_save(pil: Image.Image, path: PathLike) -> Path:
    """Write a PNG via a temp file in the same folder + os.replace: readers never see a
    half-written file, even if we are killed mid-write."""
    return atomic_write(path, lambda f: pil.save(f, format="PNG"))


def _hwc_uint8(image: Union[np.ndarray, torch.Tensor]) -> np.ndarray:
    """One image -> uint8 HWC numpy. Tensors are CHW (float in [-1, 1] or uint8);
    numpy arrays must be uint8 HWC or HW."""
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.ndim != 3:
            raise ValueError(f"expected a CHW tensor, got shape {tuple(t.shape)}")
        if torch.is_floating_point(t):
            t = to_uint8(t)
        elif t.dtype != torch.uint8:
            raise TypeError(f"tensor image must be float or uint8, got {t.dtype}")
        arr = t.permute(1, 2, 0).numpy()
    else:
        arr = np.asarray(image)
        if arr.dtype != np.uint8:
            raise TypeError(f"numpy image must be uint8 HWC, got {arr.dtype}")
        if arr.ndim == 2:
            arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3):
        raise ValueError(f"image must have 1 or 3 channels, got shape {arr.shape}")
    return np.ascontiguousarray(arr)


def _pil(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)


def save_png(image: Union[np.ndarray, torch.Tensor], path: PathLike) -> Path:
    """Save one image (uint8 HWC array, or CHW tensor float in [-1, 1] / uint8) as PNG."""
    return _atomic_save(_pil(_hwc_uint8(image)), path)


def mosaic_array(
    images: torch.Tensor,
    nrow: Optional[int] = None,
    pad: int = 2,
    pad_value: int = 255,
    min_width: int = 256,
) -> np.ndarray:
    """Tile (N, C, H, W) images (float in [-1, 1] or uint8) into one uint8 HWC array.

    ``nrow`` is images per row (torchvision's meaning); default ceil(sqrt(N)). Tiny
    images are upscaled by an integer factor (nearest neighbour, so pixels stay crisp)
    until the tiles span at least ``min_width`` pixels.
    """
    x = torch.as_tensor(images).detach().cpu()
    if x.ndim != 4 or x.shape[1] not in (1, 3) or x.shape[0] < 1:
        raise ValueError(f"expected (N, C, H, W) with C in (1, 3), got {tuple(x.shape)}")
    x = to_uint8(x) if torch.is_floating_point(x) else x.to(torch.uint8)
    n, c, h, w = x.shape
    ncol = min(n, nrow) if nrow else math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncol)
    k = max(1, math.ceil(min_width / (ncol * w)))
    if k > 1:
        x = x.repeat_interleave(k, dim=2).repeat_interleave(k, dim=3)
        h, w = h * k, w * k
    mosaic = torch.full(
        (c, nrows * h + (nrows + 1) * pad, ncol * w + (ncol + 1) * pad), pad_value, dtype=torch.uint8
    )
    for i in range(n):
        r, col = divmod(i, ncol)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        mosaic[:, top:top + h, left:left + w] = x[i]
    return mosaic.permute(1, 2, 0).numpy()


def save_mosaic(
    images: torch.Tensor,
    path: PathLike,
    nrow: Optional[int] = None,
    pad: int = 2,
    pad_value: int = 255,
    min_width: int = 256,
) -> np.ndarray:
    """Write (N, C, H, W) images (float in [-1, 1]) as one PNG mosaic; returns the mosaic
    (uint8 HWC). See ``mosaic_array`` for the layout."""
    mosaic = mosaic_array(images, nrow=nrow, pad=pad, pad_value=pad_value, min_width=min_width)
    _atomic_save(_pil(mosaic), path)
    return mosaic
