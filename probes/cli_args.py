"""Command-line values shared by the experiment CLIs."""

from __future__ import annotations


def parse_layers(text: str | None) -> list[int] | None:
    """``"0-11"`` or ``"2,4,6"`` (or a mix, ``"0-3,8"``) -> sorted layer indices; ``None`` stays ``None`` (all)."""
    if text is None:
        return None
    layers: set[int] = set()
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            layers.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise ValueError(f"cannot read layers {text!r}; write e.g. 0-11 or 2,4,6") from None
    return sorted(layers)


def format_layers(layers: list[int] | None) -> str:
    """The inverse of :func:`parse_layers`: ``[0, 1, 2, 3, 8]`` -> ``"0-3,8"``; ``None`` -> ``"all"``."""
    if layers is None:
        return "all"
    runs: list[list[int]] = []
    for layer in sorted(set(layers)):
        if runs and layer == runs[-1][1] + 1:
            runs[-1][1] = layer
        else:
            runs.append([layer, layer])
    return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in runs)
