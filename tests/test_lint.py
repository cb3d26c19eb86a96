"""The function-length check that `make lint` runs (scripts/function_length.py), and that CI runs the lint."""

from pathlib import Path

from scripts.function_length import long_functions, main

ROOT = Path(__file__).resolve().parents[1]


def _function(name: str, lines: int, docstring_lines: int = 0) -> str:
    doc = ['    """' + "doc" * 3] + ["    more"] * max(docstring_lines - 2, 0) + ['    """'] if docstring_lines else []
    return "\n".join([f"def {name}():", *doc, *[f"    x{i} = {i}" for i in range(lines)]]) + "\n"


def test_a_body_over_the_limit_is_named_and_the_docstring_does_not_count(tmp_path):
    (tmp_path / "m.py").write_text(_function("short", 60, docstring_lines=30) + _function("long", 61))
    found = long_functions([tmp_path], 60)
    assert len(found) == 1 and "long (61 lines)" in found[0] and "m.py:" in found[0]
    assert main([str(tmp_path), "--max", "61"]) == 0 and main([str(tmp_path)]) == 1


def test_nested_and_async_functions_are_checked(tmp_path):
    inner = _function("inner", 5).replace("\n", "\n    ")
    (tmp_path / "m.py").write_text("def outer():\n    " + inner + "\nasync def worker():\n" +
                                   "".join(f"    await x{i}\n" for i in range(7)))
    assert [f.split()[1] for f in long_functions([tmp_path], 4)] == ["outer", "inner", "worker"]


def test_ci_runs_the_lint_before_the_tests():
    run = (ROOT / ".ci" / "run").read_text()
    assert "make lint" in run and run.index("make lint") < run.index("make test")
