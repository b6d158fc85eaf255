"""The job's console (issue 17): progress lines with the total and the time left, harmless
third-party warnings held back (counted in one line, all in the save folder's log)."""

import logging
import sys
import warnings

from spiral_megatron.job.run import console
from spiral_megatron.job.run.metrics import duration, format_record


def test_progress_line_shows_the_total_and_the_time_left():
    record = dict(iteration=120, end_iteration=300, consumed_tokens=1000, loss=2.5, lr=1e-3, grad_norm=0.5,
                  tokens_per_sec=2500.0, tflops=0.1, mfu=None, memory_gib=1.0, eta_s=100.0)
    line = format_record(record)
    assert line.startswith(" iteration    120/300 | ") and line.endswith(" | ETA 1m40s")
    assert [duration(s) for s in (0, 12.4, 100, 3725)] == ["0s", "12s", "1m40s", "1h02m"]


def test_harmless_warnings_are_held_and_counted_the_others_shown(tmp_path, capsys):
    shown = []
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, *rest, **kw: shown.append(str(message))
        with console.HeldWarnings() as quiet:
            warnings.warn("Apex is not installed. Falling back to Torch Norm")
            warnings.warn("something the user must see")
            logging.getLogger("megatron.core.dist_checkpointing.strategies.torch").warning(
                "MCore's async save is deprecated and will be removed")
        line = quiet.report(str(tmp_path))
    assert shown == ["something the user must see"]
    assert line.startswith("2 known-harmless Megatron-Core warnings per rank hidden")
    assert f"all in {tmp_path / 'warnings.log'}" in line
    log = (tmp_path / "warnings.log").read_text()
    assert "Apex is not installed" in log and "async save is deprecated" in log
    assert quiet.report(str(tmp_path)) is None  # each warning is counted once
    assert "MCore" not in capsys.readouterr().err


def test_a_tool_counts_harmless_warnings_in_one_line_unless_the_user_chose_with_dash_w(monkeypatch, capsys):
    for warnoptions, expected in (([], ["yours"]), (["default"], ["Apex is not installed. Falling back", "yours"])):
        monkeypatch.setattr(sys, "warnoptions", warnoptions)
        shown = []
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = lambda message, *rest, **kw: shown.append(str(message))
            with console.quiet_tool("mytool"):
                warnings.warn("Apex is not installed. Falling back")
                warnings.warn("yours")
        assert shown == expected
        err = capsys.readouterr().err
        assert ("mytool: 1 known-harmless Megatron-Core/torch warning hidden" in err) == (not warnoptions), err


def test_modelopt_notes_that_hold_in_one_process_are_held_by_a_tool_and_shown_by_the_job(monkeypatch):
    monkeypatch.setattr(sys, "warnoptions", [])
    note = ("Found block-quantized padded weight_quantizer for linear_fc1, amax will not be synced correctly.")
    for held_by, expected in ((lambda: console.quiet_tool("quantize"), []), (console.HeldWarnings, [note])):
        shown = []
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = lambda message, *rest, **kw: shown.append(str(message))
            with held_by():
                warnings.warn(note)
        assert shown == expected
