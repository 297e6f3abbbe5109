"""The file formats the named data sets come in, read into numpy arrays.

- idx (MNIST's format, Fashion-MNIST's files): ``read_idx``.
- CIFAR10's pickled train batches, in ``cifar-10-python.tar.gz`` or its extracted folder:
  ``read_cifar10_train``; the unpickler accepts numpy arrays and nothing else.
- CelebA's ``list_eval_partition.{txt,csv}``: ``read_train_partition``.

Where these files are looked for, and what becomes of the arrays, is ``data.py``'s job. Every
malformed file is a ``DataError`` naming it.
"""
from __future__ import annotations

import gzip
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np

from ..errors import DataError

CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))


# ---------------------------------------------------------------- idx

def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (the MNIST format; gzip if the name ends in .gz) as uint8."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    # header: 2 zero bytes, type code (0x08 = unsigned byte), number of dims, then dims
    # as big-endian int32; e.g. magic 2051 = 0x00000803 for a 3-d ubyte array.
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an idx ubyte file (bad header)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">i4"))
    if len(dims) != ndim or any(d < 0 for d in dims):
        raise DataError(f"{path} is not an idx ubyte file (its header gives dimensions {dims})")
    if len(raw) - header != int(np.prod(dims, dtype=np.int64)):
        raise DataError(
            f"{path} holds {len(raw) - header} data bytes but its header says {dims}; "
            "the file is truncated or corrupt"
        )
    # copy: frombuffer views immutable bytes, which torch.from_numpy warns about
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


# ---------------------------------------------------------------- CIFAR10

class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only plain containers and numpy arrays: a CIFAR batch file needs nothing
    more, and refusing other globals keeps a tampered file from running code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a CIFAR batch")
        if module.startswith("numpy.core") and hasattr(np, "_core"):
            module = "numpy._core" + module[len("numpy.core"):]  # numpy 2 renamed the module
        return super().find_class(module, name)


def _cifar_batch(blob: bytes, where: str) -> np.ndarray:
    """One pickled CIFAR10 batch -> uint8 (N, 3, 32, 32)."""
    try:
        # latin1: the official batches are Python 2 pickles (numpy's advice for those).
        d = _ArrayUnpickler(io.BytesIO(blob), encoding="latin1").load()
        data = d[b"data"] if b"data" in d else d["data"]
    except Exception as e:  # any unpickling failure means a bad file
        raise DataError(f"cannot read CIFAR10 batch {where}: {type(e).__name__}: {e}") from None
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"CIFAR10 batch {where} has {data.dtype} {data.shape}, "
                        "expected uint8 (N, 3072)")
    # each row: 1024 red, 1024 green, 1024 blue values, each plane row-major 32x32
    return data.reshape(-1, 3, 32, 32)


def _cifar_from_tar(path: Path) -> np.ndarray:
    """Read the train batches straight from cifar-10-python.tar.gz (no extraction)."""
    blobs = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:  # one streaming pass over the archive
                base = os.path.basename(member.name)
                if member.isfile() and base in CIFAR10_TRAIN:
                    blobs[base] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    missing = [b for b in CIFAR10_TRAIN if b not in blobs]
    if missing:
        raise DataError(f"{path} lacks {', '.join(missing)}; is it cifar-10-python.tar.gz?")
    return np.concatenate([_cifar_batch(blobs[b], f"{path}:{b}") for b in CIFAR10_TRAIN])


def _cifar_from_dir(folder: Path) -> np.ndarray:
    missing = [b for b in CIFAR10_TRAIN if not (folder / b).is_file()]
    if missing:
        raise DataError(f"{folder} lacks {', '.join(missing)}; it should hold "
                        f"{', '.join(CIFAR10_TRAIN)}")
    return np.concatenate([_cifar_batch((folder / b).read_bytes(), str(folder / b))
                           for b in CIFAR10_TRAIN])


def read_cifar10_train(source: Path) -> np.ndarray:
    """The 50k CIFAR10 train images, uint8 (N, 3, 32, 32), from the archive or the folder
    of its extracted batches."""
    return _cifar_from_tar(source) if source.is_file() else _cifar_from_dir(source)


# ---------------------------------------------------------------- CelebA

def read_train_partition(part: Path) -> set:
    """The file names that CelebA's list_eval_partition.{txt,csv} puts in the train split
    (partition 0)."""
    try:
        text = part.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {part} as text: {exc}") from None
    train = set()
    for line in text.splitlines():
        fields = line.replace(",", " ").split()
        if len(fields) == 2 and fields[1] == "0":  # skips the csv header too
            train.add(fields[0])
    return train
