"""The error type of bad input, and the argument checks shared by the workbench's APIs.

Every error a user can fix (a bad argument, an unknown model, a missing or corrupt file) is a ``ValueError`` or an
``OSError``; the workbench's own are :class:`WorkbenchError`. The command lines print those as one line
(:func:`probes.cli_args.run_cli`).
"""

from __future__ import annotations

from typing import Any, Iterable


class WorkbenchError(ValueError):
    """Bad input refused by the workbench; the message says what is wrong and what to do."""


def as_list(value: Iterable[Any], what: str) -> list:
    """``value`` as a list, refusing a single string: iterating it would silently give its characters."""
    if isinstance(value, (str, bytes)):
        shown = value if len(value) <= 60 else value[:57] + "..."
        raise TypeError(f"{what} must be a list of strings, got one string {shown!r}; pass a list, e.g. "
                        f"[{shown!r}]")
    return list(value)
