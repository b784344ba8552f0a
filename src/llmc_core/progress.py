"""``progress``: a tqdm bar on a terminal, the plain iterable otherwise (logs and CI stay clean)."""

from __future__ import annotations

import sys
from typing import Any


def progress(iterable: Any, **kwargs: Any) -> Any:
    """A tqdm bar when attached to a terminal, the plain iterable otherwise."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not sys.stderr.isatty(), leave=False, **kwargs)
