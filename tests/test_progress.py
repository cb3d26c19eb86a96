"""Progress bars go through probes.progress.progress_bar (tqdm.auto): a widget in a Jupyter kernel, text in a
terminal, silenced by progress=False and by TQDM_DISABLE=1."""

import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
SHOW_BAR = "from probes.progress import progress_bar; _ = list(progress_bar(range(3), desc='counting'))"


def library_sources() -> dict[Path, str]:
    return {p: p.read_text() for d in ("probes", "steering") for p in sorted((ROOT / d).glob("*.py"))}


def test_every_bar_is_a_tqdm_auto_bar_made_by_progress_bar():
    sources = library_sources()
    assert not [p.name for p, s in sources.items() if re.search(r"^\s*(from tqdm import|import tqdm$)", s, re.M)]
    made_elsewhere = [p.name for p, s in sources.items() if re.search(r"\btqdm\(", s) and p.name != "progress.py"]
    assert not made_elsewhere, "make bars with probes.progress.progress_bar so that TQDM_DISABLE applies"
    assert not [p.name for p, s in sources.items() if "disable=not progress" in s]


def bar_output(tqdm_disable: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    if tqdm_disable is not None:
        env["TQDM_DISABLE"] = tqdm_disable
    return subprocess.run([sys.executable, "-c", SHOW_BAR], cwd=ROOT, env=env, capture_output=True, text=True,
                          check=True).stderr


def test_terminal_bar_is_text_and_tqdm_disable_silences_it():
    assert "counting: 100%" in bar_output(None)
    assert bar_output("1") == ""


def test_progress_false_silences_the_bar(capsys):
    from probes.progress import progress_bar

    assert list(progress_bar(range(3), progress=False)) == [0, 1, 2]
    assert capsys.readouterr().err == ""


def run(nb: nbformat.NotebookNode) -> None:
    client = NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}})
    client.km_kwargs = {"kernel_cmd": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]}
    client.execute()


def test_bar_in_a_jupyter_kernel_is_a_widget():
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        f"import os; os.environ.pop('TQDM_DISABLE', None)\n{SHOW_BAR}")])
    run(nb)
    outputs = nb.cells[0].outputs
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs), outputs


def test_tqdm_disable_silences_the_bar_in_a_jupyter_kernel_too():
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        f"import os; os.environ['TQDM_DISABLE'] = '1'\n{SHOW_BAR}")])
    run(nb)
    assert nb.cells[0].outputs == []
