"""A real text corpus present on every Python install: the standard library's docstrings.

Deterministic for a given installation (files in sorted order, docstrings in source order).
Tests and examples are skipped: their docstrings are short and repetitive.
"""

import ast
import sysconfig
from pathlib import Path
from typing import Iterator, List

SKIP = ("test", "tests", "site-packages", "dist-packages", "idlelib", "lib2to3", "__pycache__")
MIN_DOCSTRING = 40  # characters; shorter ones are mostly "Return x." boilerplate


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _module_text(path: Path) -> str:
    """Every docstring (module, class, function) of one file, in source order."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return ""
    nodes = (n for n in ast.walk(tree)
             if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)))
    docs = [ast.get_docstring(n) for n in nodes]
    return "\n\n".join(d for d in docs if d and len(d) >= MIN_DOCSTRING)


def _files(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*.py")):
        if not any(part in SKIP for part in path.relative_to(root).parts):
            yield path


def documents(root: Path = None) -> List[str]:
    """One document per standard-library module that has docstrings, in sorted path order."""
    texts = (_module_text(p) for p in _files(root or stdlib_root()))
    return [t for t in texts if t]
