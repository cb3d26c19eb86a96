"""Progress bars: an ipywidgets bar in JupyterLab, a text bar in a terminal (``tqdm.auto``).

``progress=False`` hides a bar; so does ``TQDM_DISABLE`` set in the environment (to anything but 0 or false), read
here because tqdm itself applies it only to the arguments a call leaves out, and never in Jupyter.
"""

from __future__ import annotations

import os
from typing import Any, Iterable

from tqdm.auto import tqdm


def disabled_by_environment() -> bool:
    """Whether ``TQDM_DISABLE`` asks for no bars."""
    return os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false")


def progress_bar(iterable: Iterable | None = None, *, progress: bool = True, **kwargs: Any) -> tqdm:
    """``tqdm.auto.tqdm(iterable, **kwargs)``, hidden when ``progress`` is False or ``TQDM_DISABLE`` is set."""
    if not progress or disabled_by_environment():
        kwargs["disable"] = True
    return tqdm(iterable, **kwargs)
