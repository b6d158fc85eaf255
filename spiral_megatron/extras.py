"""The optional installs (setup.py's extras) a tool needs, named in one line when missing.

A tool calls `require("probe.py", "hf", "research")` first thing: without them it exits with
`probe.py needs the research extra (matplotlib is not installed): pip install -e ".[research]"`
instead of a ModuleNotFoundError traceback from deep inside an import.
"""

import importlib.util

EXTRAS = {  # extra -> the modules it installs that the tools import (setup.py's extras_require)
    "hf": ("transformers", "safetensors"),
    "research": ("matplotlib", "lm_eval"),
    "modelopt": ("modelopt",),
}


def missing(extra: str) -> list:
    """The modules of `extra` that are not importable (found, not imported: cheap)."""
    return [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]


def require(tool: str, *extras: str) -> None:
    """SystemExit naming the first of `extras` that is not installed and the pip line for it."""
    for extra in extras:
        absent = missing(extra)
        if absent:
            raise SystemExit(f"{tool} needs the {extra} extra ({', '.join(absent)} "
                             f"{'is' if len(absent) == 1 else 'are'} not installed): "
                             f"pip install -e \".[{extra}]\"")
