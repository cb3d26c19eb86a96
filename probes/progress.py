"""Progress bars: an ipywidgets bar in JupyterLab, a text bar in a terminal (``tqdm.auto``).

``progress=False`` hides a bar; so does ``TQDM_DISABLE=1`` in the environment, which tqdm applies only to the
arguments a call leaves out, hence ``disable`` is passed only to hide.
"""

from __future__ import annotations

from typing import Any, Iterable

from tqdm.auto import tqdm


def progress_bar(iterable: Iterable | None = None, *, progress: bool = True, **kwargs: Any) -> tqdm:
    """``tqdm.auto.tqdm(iterable, **kwargs)``, hidden when ``progress`` is False or ``TQDM_DISABLE`` is set."""
    if not progress:
        kwargs["disable"] = True
    return tqdm(iterable, **kwargs)
