"""A study cell's record against its key: what the checkpoint and reference of a cell are
(``model_key``, ``reference_key``; paths relative to the study folder), and whether a record on
disk was made with the key a cell has now (``matching_record``), records of an earlier s2dm
included. ``runner.py`` reuses what matches; ``--report-only`` reports only that.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..io.checkpoint import checkpoint_stamp, checkpoint_step
from ..metrics.fid import Stats
from ..samplers import takes_order
from ..samplers.options import SampleOptions
from ..util.fileio import sha256_file
from ..util.records import read_record


def in_study(path, out: Path) -> str:
    """A file of the study folder as its path relative to that folder: the records do not depend
    on how ``--out`` is spelled, and the folder can be moved."""
    path, root = Path(path).resolve(), Path(out).resolve()
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


def model_key(ckpt: Path, out: Path) -> dict:
    """The checkpoint a cell samples: its stamp tells a retrained model from the one before."""
    return {"checkpoint": in_study(ckpt, out), "checkpoint_stamp": checkpoint_stamp(ckpt),
            "checkpoint_step": checkpoint_step(ckpt)}


def reference_key(ref: Stats, out: Path) -> dict:
    """The reference a cell is scored against: its file and a hash of its contents."""
    key = {"ref": in_study(ref.path, out), "ref_n": ref.n, "ref_sha256": sha256_file(ref.path)}
    if ref.features == "cnn":  # another classifier is another metric: the record is redone
        key["classifier_sha256"] = ref.weights_sha256
    return key


# What an earlier s2dm's cell record lacks; ``_earlier_record`` decides without them.
LATER_KEYS = ("checkpoint_stamp", "ref_sha256", "grid", "eta")


def _earlier_record(path: Path, recorded: dict, wanted: dict, out: Path) -> bool:
    """A record made by an earlier s2dm (none of ``LATER_KEYS``) counts as made with ``wanted``
    when everything it records matches (its checkpoint and reference paths, absolute or as
    ``--out`` was spelled, end in the wanted ones), ``wanted`` samples with the only grid and η
    it could (the defaults), and neither the checkpoint nor the reference was written after it
    (which the stamp and hash it lacks would show)."""
    if any(k in recorded for k in LATER_KEYS):
        return False
    default = SampleOptions()
    if (wanted["grid"], wanted["eta"]) != (default.grid, default.eta):
        return False
    for k in (set(recorded) | set(wanted)) - set(LATER_KEYS):
        if k in ("checkpoint", "ref"):
            parts = Path(wanted[k]).parts
            if not isinstance(recorded.get(k), str) or Path(recorded[k]).parts[-len(parts):] != parts:
                return False
        elif recorded.get(k) != wanted.get(k):
            return False
    made = path.stat().st_mtime_ns
    return all((out / wanted[k]).stat().st_mtime_ns <= made for k in ("checkpoint", "ref"))


def _images_key(settings: dict) -> dict:
    """A cell key as far as it tells the images apart: the DEIS order counts for DEIS only (a
    DDIM cell recorded with another order has the same images)."""
    return settings if takes_order(str(settings.get("sampler"))) else {**settings, "order": None}


def matching_record(path: Path, wanted: dict, out: Path) -> Optional[dict]:
    """The cell record at ``path`` if it was made with the key ``wanted`` (the cell is not
    redone, and the report uses it); an earlier s2dm's record that ``_earlier_record`` accepts
    comes back with ``wanted`` as its settings and ``earlier: True``."""
    record = read_record(path)
    if record is None or not isinstance(record.get("settings"), dict):
        return None
    if _images_key(record["settings"]) == _images_key(wanted):
        return record
    if _earlier_record(path, record["settings"], wanted, out):
        return {**record, "settings": wanted, "earlier": True}
    return None
