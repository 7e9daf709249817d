"""Progress bars on stderr (tqdm), silenced with SUPEREDIT_NO_PROGRESS=1."""

from __future__ import annotations

import os
import sys


def progress(iterable=None, total=None, desc: str | None = None, **kwargs):
    from tqdm.auto import tqdm

    asked = bool(kwargs.pop("disable", False))  # popped first: tqdm must not get it twice
    disable = asked or os.environ.get("SUPEREDIT_NO_PROGRESS", "") not in ("", "0")
    return tqdm(iterable, total=total, desc=desc, file=sys.stderr, disable=disable, leave=False, dynamic_ncols=True, **kwargs)
