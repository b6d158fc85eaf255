"""The same seed gives the same model at every layout (docs/MODEL.md section 4, "from the same seed").

A user's first check on a new cluster: the same job from scratch at two layouts, same seed,
must give the same loss curve. The training job (examples/pretrain_spiral.py, its own DDP and
optimizer settings) runs 3 steps from scratch at each layout; every step's loss must equal the
single process's (no shared checkpoint: each layout draws its own weights, spiral_megatron/model/init.py).
"""

import pytest

from tests.integration.conftest import launch, logged

STEPS = ("--train-iters", 3, "--micro-batch-size", 1, "--global-batch-size", 4, "--lr-warmup-iters", 1,
         "--log-interval", 1, "--eval-interval", "none", "--save", "none", "--mock-data", "true")
LAYOUTS = {  # name: (processes, flags); CI runs CI_LAYOUTS (tp2-pp2 splits weights both ways)
    "pp2": (2, ["--pipeline-parallel", 2, "--model.pipeline_split", "3,3"]),
    "tp2": (2, ["--tensor-parallel", 2]),
    "dp2": (2, []),
    "tp2-pp2": (4, ["--tensor-parallel", 2, "--pipeline-parallel", 2, "--model.pipeline_split", "3,3"]),
}


def run(tmp_path_factory, name: str, nproc: int, flags) -> list:
    out = tmp_path_factory.mktemp(name)
    launch(out, *STEPS, *flags, "--log-json", out / "log.jsonl", nproc=nproc, timeout=600)
    log = logged(out / "log.jsonl")
    return [log[i]["loss"] for i in sorted(log)]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return run(tmp_path_factory, "one-process", 1, [])


CI_LAYOUTS = ("tp2-pp2", "dp2")


@pytest.mark.parametrize("layout", [name if name in CI_LAYOUTS else pytest.param(name, marks=pytest.mark.full_matrix)
                                    for name in LAYOUTS])
def test_from_scratch_every_layout_trains_like_one_process(layout, one_process, tmp_path_factory):
    nproc, flags = LAYOUTS[layout]
    losses = run(tmp_path_factory, layout, nproc, flags)
    print(f"SUMMARY same seed {layout}: losses {losses} vs one process {one_process}")
    assert len(losses) == 3
    assert losses == pytest.approx(one_process, rel=1e-5), f"{layout} from scratch: {losses} vs {one_process}"
