"""tools/compare_losses.py: the cluster check's verdict (docs/GPU.md)."""

import importlib.util
import json
from pathlib import Path

spec = importlib.util.spec_from_file_location("compare_losses", Path(__file__).parents[2] / "tools" / "compare_losses.py")
compare_losses = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare_losses)


def write(path, losses):
    lines = [json.dumps({"iteration": i + 1, "loss": x}) for i, x in enumerate(losses)]
    path.write_text("\n".join(lines + [json.dumps({"iteration": 2, "val_loss": 9.0})]) + "\n")
    return path


def test_pass_within_rtol_and_fail_beyond(tmp_path, capsys):
    a = write(tmp_path / "a.jsonl", [6.0, 5.5, 5.0])
    b = write(tmp_path / "b.jsonl", [6.0, 5.5001, 5.0])
    assert compare_losses.main([str(a), str(b), "--rtol", "1e-4"]) == 0
    assert "PASS: 3 steps" in capsys.readouterr().out
    assert compare_losses.main([str(a), str(b), "--rtol", "1e-6"]) == 1
    assert "FAIL: 3 steps, largest relative difference 1.8e-05" in capsys.readouterr().out
