"""A tool run without the extra it needs says which one to install, in one line."""

import importlib.util
import subprocess
import sys

import pytest

from tests.conftest import ROOT

TOOLS = {  # tool -> (the extras it needs, in the order it checks them)
    "tools/convert_to_hf.py": ("hf",), "tools/convert_from_hf.py": ("hf",), "tools/evaluate.py": ("hf",),
    "examples/generate.py": ("hf",), "tools/probe.py": ("hf", "research"), "tools/ablate.py": ("hf", "research"),
    "tools/quantize.py": ("modelopt", "hf"),
}


def run_without(tool: str, modules) -> subprocess.CompletedProcess:
    """`python TOOL` in a fresh interpreter where `modules` cannot be imported."""
    code = (f"import runpy, sys; sys.modules.update(dict.fromkeys({list(modules)!r})); "
            f"sys.argv = [{tool!r}]; runpy.run_path({tool!r}, run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_missing_transformers_is_one_line():
    proc = run_without("tools/convert_to_hf.py", ["transformers"])
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == ('convert_to_hf.py needs the hf extra (transformers is not '
                                                    'installed): pip install -e ".[hf]"')
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_each_tool_names_each_extra(tool, monkeypatch):
    from spiral_megatron import extras

    found = importlib.util.find_spec
    for extra in TOOLS[tool]:
        absent = set(extras.EXTRAS[extra])
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in absent else found(name, *a))
        module = importlib.util.module_from_spec(importlib.util.spec_from_file_location("tool", ROOT / tool))
        module.__spec__.loader.exec_module(module)
        with pytest.raises(SystemExit, match=rf'^{ROOT.joinpath(tool).name} needs the {extra} extra \(.*\): '
                                             rf'pip install -e "\.\[{extra}\]"$'):
            module.main() if tool == "examples/generate.py" else module.main([])
        monkeypatch.undo()
