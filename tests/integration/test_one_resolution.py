"""A setting travels one way (issue 23): one job start looks up the flavor, decides the fusion
defaults, builds the SpiralConfig and makes the model's record exactly once each, all before the
run starts; the run, the build and the datasets are handed that one Resolved object, and
nothing after the resolution enters the modules that decide settings.

Before issue 23 this job start (debug flavor, 1 step) ran flavors.get and as_config_kwargs 6 times
each and the fusion defaults 3 times, and built the SpiralConfig twice (checks.py, then build.py
from the keys again after the run had started)."""

import json
import subprocess
import sys

from tests.integration.conftest import ROOT, environment

WORKER = ROOT / "tests" / "integration" / "job_start_worker.py"
JOB = ["--mock-data", "true", "--train-iters", "1", "--log-interval", "1", "--eval-interval", "null",
       "--save", "null", "--micro-batch-size", "2", "--global-batch-size", "2", "--num-workers", "0"]
ONCE = {"flavors.get": 1, "fusions.defaults": 1, "model_fields.as_config_kwargs": 1, "SpiralConfig built": 1,
        "ModelArgs.from_config": 1}
# What decides a setting; after the resolution only the world-size check runs (it needs the world).
DECIDERS = ("spiral_megatron.job.settings.", "spiral_megatron.config.flavors.", "spiral_megatron.model.fusions.")
READS = {"spiral_megatron.job.settings.checks.check_world", "spiral_megatron.job.settings.keys.to_yaml",
         "spiral_megatron.job.settings.keys.to_dict", "spiral_megatron.job.settings.resolve.padded_vocab_size"}


def test_a_job_start_resolves_each_setting_once(cache_dir, tmp_path):
    out = tmp_path / "path.json"
    proc = subprocess.run([sys.executable, str(WORKER), str(out), *JOB], capture_output=True, text=True,
                          timeout=300, env=environment(cache_dir), cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    report = json.loads(out.read_text())
    assert report["rc"] == 0 and "finished iteration 1" in proc.stdout
    assert report["counts"] == ONCE
    assert report["counts_at_run"] == ONCE  # all of it before the run started
    assert report["run_got"] == "Resolved" and report["build_got_the_runs"] and report["datasets_got_its_data"]
    assert report["hooks_left_on_the_jobs_config"] == []
    deciding = [f for f in report["entered_after_resolution"] if f.startswith(DECIDERS) and f not in READS]
    assert deciding == []
    assert any(f.startswith("spiral_megatron.job.build.") for f in report["entered_after_resolution"])  # it saw
