"""One job start, instrumented: `python job_start_worker.py OUT.json [job flags]` runs
examples/pretrain_spiral.py's main in this process and writes what the path of the settings was.

Counts each decision of the resolution (flavor lookup, fusion defaults, the SpiralConfig, the
model's record, the `model.<field>` conversion) over the whole job and at the moment the run
starts; records what the run, the build and the datasets were handed; and, from the run's
start on, every function of the package that is entered (sys.setprofile), by module.
"""

import collections
import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from spiral_megatron.config import flavors  # noqa: E402
from spiral_megatron.config.spiral_config import SpiralConfig  # noqa: E402
from spiral_megatron.job.data import datasets  # noqa: E402
from spiral_megatron.job.run import loop  # noqa: E402
from spiral_megatron.job.settings import model_fields  # noqa: E402
from spiral_megatron.model import fusions  # noqa: E402
from spiral_megatron.model.model_args import ModelArgs  # noqa: E402

counts, handed, entered = collections.Counter(), {}, set()
report = {"counts_at_run": None}


def count(owner, name, key, wrap=lambda f: f):
    original = getattr(owner, name)

    def counted(*args, **kwargs):
        counts[key] += 1
        return original(*args, **kwargs)

    setattr(owner, name, wrap(counted))


def hand(owner, name, key):
    original = getattr(owner, name)

    def handed_to(first, *args, **kwargs):
        handed[key] = first
        return original(first, *args, **kwargs)

    setattr(owner, name, handed_to)
    return original


count(flavors, "get", "flavors.get")
count(fusions, "defaults", "fusions.defaults")
count(model_fields, "as_config_kwargs", "model_fields.as_config_kwargs")
count(SpiralConfig, "__post_init__", "SpiralConfig built")
count(ModelArgs, "from_config", "ModelArgs.from_config", staticmethod)
hand(loop, "build", "build")
hand(datasets, "build_datasets", "build_datasets")
run = loop.run


def profile(frame, event, arg):
    if event == "call":
        module = frame.f_globals.get("__name__", "")
        if module.startswith("spiral_megatron."):
            entered.add(f"{module}.{frame.f_code.co_name}")


def instrumented_run(job, *args, **kwargs):
    handed["run"], report["counts_at_run"] = job, dict(counts)
    sys.setprofile(profile)
    try:
        return run(job, *args, **kwargs)
    finally:
        sys.setprofile(None)


loop.run = instrumented_run

if __name__ == "__main__":
    spec = importlib.util.spec_from_file_location("pretrain_spiral", ROOT / "examples" / "pretrain_spiral.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    report["rc"] = script.main(sys.argv[2:])
    job = handed.get("run")
    report.update(
        counts=dict(counts), entered_after_resolution=sorted(entered), run_got=type(job).__name__,
        build_got_the_runs=handed.get("build") is job,
        datasets_got_its_data=handed.get("build_datasets") is getattr(job, "data", object()),
        # build wires the schedules' hooks into the model's copy of the config, not into the job's
        hooks_left_on_the_jobs_config=[name for name in ("finalize_model_grads_func", "no_sync_func")
                                       if getattr(getattr(job, "model", None), name, None) is not None],
    )
    Path(sys.argv[1]).write_text(json.dumps(report, indent=1))
