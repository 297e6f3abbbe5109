"""Recorded settings: a finished piece of work is reused only when what made it is what is
asked for now; otherwise it is redone, or refused (one place for that comparison)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Tuple, Union


def read_record(path: Union[str, os.PathLike]) -> Optional[dict]:
    """A JSON record, or None when it is missing or unreadable (e.g. cut short by a kill)."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def first_difference(recorded: Mapping, wanted: Mapping,
                     ignore: Iterable[str] = ()) -> Optional[Tuple[str, Any, Any]]:
    """(key, recorded value, wanted value) of the first key, in sorted order, whose values
    differ (a key missing on one side counts as None); None when they agree."""
    skip = set(ignore)
    for key in sorted(set(recorded) | set(wanted)):
        if key not in skip and recorded.get(key) != wanted.get(key):
            return key, recorded.get(key), wanted.get(key)
    return None


def reusable_record(path: Union[str, os.PathLike], field: str, wanted: Any) -> Optional[dict]:
    """The record at ``path`` if its ``field`` equals ``wanted`` (the work can be reused);
    None when it is missing, unreadable or made otherwise (redo the work)."""
    record = read_record(path)
    return record if record is not None and record.get(field) == wanted else None
