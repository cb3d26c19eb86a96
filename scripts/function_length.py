"""Fail when a function in the given folders has a body over the limit (docstring excluded), so that long functions
are split into named steps rather than grown; `make lint` runs it on probes/, steering/ and bench/.

    python scripts/function_length.py probes steering bench --max 60
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path


def body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Source lines of a function's body, from its first statement after the docstring to its last line."""
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]
    if not body:
        return 0
    return node.end_lineno - body[0].lineno + 1


def long_functions(paths: list[Path], limit: int) -> list[str]:
    """``file:line name (n lines)`` for every function whose body is longer than ``limit`` lines."""
    found = []
    for path in sorted(p for root in paths for p in ([root] if root.is_file() else root.rglob("*.py"))):
        nodes = ast.walk(ast.parse(path.read_text(), filename=str(path)))
        functions = sorted((n for n in nodes if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))),
                           key=lambda n: n.lineno)
        found += [f"{path}:{n.lineno} {n.name} ({body_lines(n)} lines)" for n in functions if body_lines(n) > limit]
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", type=Path)
    parser.add_argument("--max", type=int, default=60, help="longest body allowed, in lines")
    args = parser.parse_args(argv)
    found = long_functions(args.paths, args.max)
    for line in found:
        print(f"{line}: body over {args.max} lines; split it into named steps", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
