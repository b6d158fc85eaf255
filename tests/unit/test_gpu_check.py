"""benchmarks/gpu_check.py's logic on CPU (issue 15): its plan, its parsing and its table,
from canned outputs; nothing is timed or launched."""

import json
import sys

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402


def test_the_plan_runs_tests_gpu_step_time_at_410m_and_the_job_on_mock_data(tmp_path):
    steps = gpu_check.plan(tmp_path, cpu_smoke=False)
    assert [s.name for s in steps] == ["tests_gpu", "step_time_b2", "step_time_b8", "job_spiral_410m"]
    assert steps[0].command[-1] == "tests/gpu"
    for step, batch in zip(steps[1:3], ("2", "8")):
        cmd = " ".join(step.command)
        assert "--size 410m --seq 4096" in cmd and f"--batch {batch}" in cmd and "transformer_engine" not in cmd
    job = " ".join(steps[3].command)
    assert "spiral-410m.yaml" in job and "--mock-data true" in job and "--train-iters 20" in job
    assert sum(s.timeout_s for s in steps) < 8 * 60  # the budget on one H100/H200
    smoke = " ".join(" ".join(s.command) for s in gpu_check.plan(tmp_path, cpu_smoke=True))
    assert "--size" not in smoke and "--model.flavor debug" in smoke


def test_dry_run_prints_the_commands(capsys, tmp_path):
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.count("\n") == 4 and not (tmp_path / "summary.txt").exists()


def test_summary_table_from_the_steps_outputs(tmp_path):
    steps = gpu_check.plan(tmp_path, cpu_smoke=False)
    steps[0].outcome = dict(rc=0, seconds=90.0, log="...\n======= 9 passed, 3 skipped in 88.1s =======\n")
    row = dict(model="spiral-410m", seq=4096, batch=2, step_s=0.5, mfu=0.41, memory_gib=30.5, aten_ops=4321,
               measured_vs_analytic=0.95)
    for step in steps[1:3]:
        step.result_file.write_text(json.dumps([row]))
        step.outcome = dict(rc=0, seconds=60.0, log="")
    records = [dict(iteration=i, loss=7.0 - i / 10, tokens_per_sec=1000.0 * i, mfu=0.1 * i / 5, memory_gib=40.0 + i)
               for i in (5, 10, 15, 20)]
    steps[3].result_file.write_text("".join(json.dumps(r) + "\n" for r in records))
    steps[3].outcome = dict(rc="timeout", seconds=150.0, log="")
    table = gpu_check.summary(steps, "NVIDIA H200")
    assert "9 passed, 3 skipped in 88.1s" in table
    assert "spiral-410m       4096     2    0.500  41.0%   30.50      4321              0.950" in table
    # the first log line (warm-up) is left out of the rates: (10 + 15 + 20) / 3 thousand tokens/s
    assert "20 steps, last loss 5.000: 15,000 tokens/s, MFU 30.0%, memory 60.00 GiB" in table
    assert "job_spiral_410m: FAILED (timeout), 150 s" in table
