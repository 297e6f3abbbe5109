"""The image files ``s2dm fid`` reads: a folder's images, their validated headers, and a
Dataset that decodes them as pytorch-fid does (PIL ``convert``, uint8 CHW)."""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

from ..errors import DataError, MetricError, MetricWarning
from ..util.images import IMAGE_SUFFIXES, WIDE_GRAY_MODES, list_images, load_image

PathLike = Union[str, os.PathLike]
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError)


def folder_files(folder: PathLike, n: Optional[int] = None) -> List[Path]:
    """The images of a folder (recursive, sorted, an ``s2dm sample`` folder's ``preview/`` mosaic
    left out; see ``images.list_images``)."""
    folder = Path(folder)
    files = list_images(folder)
    _warn_unlike_pytorch_fid(folder, files)
    if n is not None:
        if n < 2:
            raise MetricError(f"n must be at least 2 (a covariance needs 2 images), not {n}", key="n")
        if len(files) < n:
            raise MetricError(f"n {n}: {folder} holds only {len(files)} images", key="n")
        files = files[:n]
    return files


def _warn_unlike_pytorch_fid(folder: Path, files: Sequence[Path]) -> None:
    """Say when ``python -m pytorch_fid`` would read another set of files from ``folder``: it
    reads only the top level, and only lower-case suffixes (``*.png``, not ``*.PNG``)."""
    deeper = sum(f.parent != folder for f in files)
    upper = sum(f.parent == folder and f.suffix not in IMAGE_SUFFIXES for f in files)
    if deeper or upper:
        what = " and ".join(t for t in (deeper and f"{deeper} in subfolders",
                                         upper and f"{upper} with upper-case suffixes") if t)
        warnings.warn(f"{folder}: {what} of its {len(files)} images, which python -m pytorch_fid does not read "
                      "(top level and lower-case suffixes only): its value for this folder would differ",
                      MetricWarning, stacklevel=2)


@dataclass
class ImageSet:
    """Validated image files: all decodable headers, one size, at least 2."""

    files: List[Path]
    size: Tuple[int, int]  # (H, W)
    gray: bool  # every file is grayscale (pixels features keep 1 channel)
    source: str = ""

    @property
    def channels(self) -> int:
        return 1 if self.gray else 3


def scan_images(files: Sequence[PathLike], source: str = "") -> ImageSet:
    """Check image headers (cheap: nothing is decoded): readable, one size, >= 2 images."""
    files = [Path(f) for f in files]
    if len(files) < 2:
        raise MetricError(f"{source or 'input'} has {len(files)} image(s); statistics need at least 2")
    size, first, gray, wide = None, None, True, 0
    for path in files:
        try:
            with Image.open(path) as im:
                hw, bands, mode = (im.size[1], im.size[0]), len(im.getbands()), im.mode
        except FileNotFoundError:
            raise DataError(f"image file not found: {path}") from None
        except _DECODE_ERRORS as exc:
            raise DataError(f"cannot decode image {path}: {exc}") from None
        if size is None:
            size, first = hw, path
        elif hw != size:
            raise DataError(f"images in {source or path.parent} differ in size: {path} is {hw[1]}x{hw[0]} "
                            f"but {first} is {size[1]}x{size[0]}; make them all one size")
        gray = gray and mode != "P" and bands <= 2
        wide += mode in WIDE_GRAY_MODES
    if wide:
        warnings.warn(f"{source or 'input'}: {wide} of {len(files)} images are 16-bit grayscale, read as their 8-bit "
                      "copies (x/257); python -m pytorch_fid clips them at 255 (mostly white), so its value would differ",
                      MetricWarning, stacklevel=2)
    return ImageSet(files, size, gray, source)


class FileImages(torch.utils.data.Dataset):
    """uint8 CHW tensors, or the one-line error text of a file that does not decode (a
    DataError raised in a DataLoader worker would arrive wrapped in a multi-line message)."""

    def __init__(self, files: Sequence[Path], mode: str):
        self.files, self.mode = list(files), mode

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        try:
            arr = load_image(self.files[i], self.mode)  # PIL .convert(mode), as pytorch-fid
        except DataError as exc:
            return str(exc)
        return torch.from_numpy(np.array(arr)).permute(2, 0, 1)  # a writable copy


def collate_images(items):
    """``FileImages`` items → a uint8 batch, or the first error text (a batch of one size only)."""
    for item in items:
        if isinstance(item, str):
            return item
    try:
        return torch.stack(items)
    except RuntimeError as exc:
        return f"images differ in size within a batch: {str(exc).splitlines()[0]}"
