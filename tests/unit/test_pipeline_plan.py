"""The pipeline partition on its own (pure Python): units, costs, balance and refusals."""

import pytest

from spiral_megatron.config import flavors, flops
from spiral_megatron.parallel import pipeline_plan
from spiral_megatron.parallel.pipeline_plan import Unit


def spiral_160m():
    return flavors.get("spiral-160m").config()


def test_program_is_prelude_iterations_coda():
    units = pipeline_plan.program(spiral_160m())
    assert [str(u) for u in units] == [
        "prelude layer 0", "prelude layer 1", "iteration 0", "iteration 1", "iteration 2",
        "iteration 3", "coda layer 0", "coda layer 1"]
    one = pipeline_plan.program(spiral_160m(), "one-stage")
    assert one[2] == Unit("loop", 0, 4) and len(one) == 5


def test_iteration_cost_follows_resolution():
    c = spiral_160m()
    costs = [pipeline_plan.unit_cost(c, Unit("loop", t, t + 1), 4096) for t in range(4)]
    assert costs == sorted(costs)  # coarse (g = 8) is cheapest, full resolution dearest
    assert costs[3] == c.num_core_layers * flops.layer_flops(c, 4096)
    assert costs[0] == c.num_core_layers * flops.layer_flops(c, 512)


def test_balanced_plan_covers_every_unit_once_and_minimises_the_largest_stage():
    c = spiral_160m()
    for stages in (1, 2, 3, 4, 8):
        plan = pipeline_plan.plan(c, 4096, 50304, stages)
        assert [u for s in plan for u in s.units] == list(pipeline_plan.program(c))
        assert all(s.units for s in plan)
        best = max(s.cost for s in plan)
        # no contiguous split is better: brute force over every split for small cases
        if stages <= 3:
            n = len(pipeline_plan.program(c))
            import itertools
            for cuts in itertools.combinations(range(1, n), stages - 1):
                sizes = [b - a for a, b in zip((0,) + cuts, cuts + (n,))]
                other = pipeline_plan.plan(c, 4096, 50304, stages, split=sizes)
                assert best <= max(s.cost for s in other) + 1e-6


def test_explicit_split_and_spans():
    plan = pipeline_plan.plan(spiral_160m(), 4096, 50304, 2, split=(4, 4))
    assert plan[0].span("prelude") == range(0, 2) and plan[0].span("loop") == range(0, 2)
    assert plan[1].span("loop") == range(2, 4) and plan[1].span("coda") == range(0, 2)
    assert plan[1].span("prelude") == range(0)
    assert "stage 1: iteration 2, iteration 3, coda layer 0, coda layer 1" in pipeline_plan.describe(plan)


@pytest.mark.parametrize("stages,split,message", [
    (9, None, "pipeline_model_parallel_size 9 is more than the 8 units of work"),
    (2, (8, 0), "pipeline split (8, 0) must give each of the 2 stages at least one of the 8 units"),
    (2, (3, 3), "pipeline split (3, 3) must give each of the 2 stages"),
    (3, (4, 4), "pipeline split (4, 4) must give each of the 3 stages"),
])
def test_impossible_layouts_name_the_numbers(stages, split, message):
    with pytest.raises(ValueError) as err:
        pipeline_plan.plan(spiral_160m(), 4096, 50304, stages, split=split)
    assert message in str(err.value)


def test_loop_on_one_stage_limits_the_stage_count():
    with pytest.raises(ValueError, match="pipeline_model_parallel_size 6 is more than the 5 units"):
        pipeline_plan.plan(spiral_160m(), 4096, 50304, 6, "one-stage")


def test_interleaved_and_context_parallel_are_refused():
    import torch
    from tests.tiny import tiny_config

    with pytest.raises(ValueError, match="virtual_pipeline_model_parallel_size 2"):
        tiny_config(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2,
                    pipeline_dtype=torch.float32)
    with pytest.raises(ValueError, match="context_parallel_size 2 is not supported with a loop"):
        tiny_config(context_parallel_size=2)
