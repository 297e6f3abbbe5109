"""List arguments of the Python API that a caller may give as one value."""
from __future__ import annotations

import numbers
import os
from typing import Any, List


def listed(value: Any) -> List[Any]:
    """``value`` as a list: one string, path or number (``samplers="ddim"``, ``steps=10``, a run
    folder) as the list of that one value, which Python would otherwise take apart into
    letters, or fail on; any other iterable as its items."""
    if isinstance(value, (str, bytes, os.PathLike, numbers.Number)):
        return [value]
    return list(value)
