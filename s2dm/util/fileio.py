"""Atomic file writes: a kill at any moment leaves the old file or the complete new one."""
from __future__ import annotations

import csv
import hashlib
import io
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, List, Optional, Type, Union

import torch

from ..errors import S2dmError


def atomic_write(path: Union[str, os.PathLike], write: Callable[[BinaryIO], None], fsync: bool = False) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, then rename it over ``path``.
    ``fsync`` also forces the bytes to disk first (checkpoints: survive a power cut)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a written file follows the umask
        with os.fdopen(fd, "wb") as f:
            write(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@contextmanager
def writing(path: Union[str, os.PathLike], error: Type[S2dmError], key: Optional[str] = None) -> Iterator[None]:
    """Turn an OSError raised while writing ``path`` (a read-only or missing folder, a file
    where a folder should be, a full disk) into ``error``: one line naming the path."""
    try:
        yield
    except OSError as exc:
        # name a file that stands where a folder of the path should be ("File exists (runs)")
        within = f" ({exc.filename})" if exc.filename and Path(exc.filename) in Path(path).parents else ""
        raise error(f"cannot write {path}: {exc.strerror or exc}{within}", key=key) from None


def remove_stale_temps(folder: Union[str, os.PathLike], names: str = "*") -> List[Path]:
    """Delete the temporary files (``.NAME.xxxxxxxx.tmp``) that ``atomic_write`` left in
    ``folder`` when its process was killed before the rename, for every NAME matching the glob
    ``names``; returns them. Call it only where no other process is writing there."""
    removed = []
    for tmp in Path(folder).glob(f".{names}.*.tmp"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _umask() -> int:
    """The process's umask (reading it means setting it; set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: Union[str, os.PathLike], text: str, fsync: bool = False) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode()), fsync=fsync)


def atomic_torch_save(obj, path: Union[str, os.PathLike]) -> None:
    """torch.save through a temporary file, fsync and rename (see ``atomic_write``)."""
    atomic_write(path, lambda f: torch.save(obj, f), fsync=True)


def sha256_file(path: Union[str, os.PathLike]) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks (provenance of weights a run starts from)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def csv_text(rows, columns) -> str:
    """Rows (dicts) as CSV text with ``columns`` in order; a missing or None value is empty."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    return buf.getvalue()
