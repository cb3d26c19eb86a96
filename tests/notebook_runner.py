"""Execute a notebook with overrides appended after its parameters cell, in the test process's Python environment."""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def run_notebook(name: str, params: dict, timeout: int = 900) -> nbformat.NotebookNode:
    """Run ``notebooks/name`` with ``params`` assigned in a cell right after its cell tagged 'parameters' (as
    papermill does: the notebook's own defaults stay, the overrides win); return the executed notebook."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    index = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(index) == 1, f"{name} needs exactly one cell tagged 'parameters'"
    overrides = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in params.items()))
    nb.cells.insert(index[0] + 1, overrides)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS.parent)}})
    client.km_kwargs = {"kernel_cmd": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]}
    client.execute()
    return nb


def figures(nb: nbformat.NotebookNode) -> list[dict]:
    """The plotly figure JSON of every output of the executed notebook."""
    out = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            fig = output.get("data", {}).get("application/vnd.plotly.v1+json")
            if fig:
                out.append(fig)
    return out
