"""The resolution schedule on its own: pure Python, no Megatron."""

import pytest

from spiral_megatron.config import schedule
from spiral_megatron.config.schedule import Level


def test_coarse_to_fine_levels_and_shifts():
    levels = schedule.make_levels((8, 4, 2, 1))
    assert levels == (Level(8, 0, 7), Level(4, 0, 3), Level(2, 0, 1), Level(1, 0, 0))
    assert [lv.shift for lv in schedule.make_levels("8,4,2,1", shift="no-overlap")] == [8, 4, 2, 1]


@pytest.mark.parametrize("text,sizes", [
    ("8,4,2,1", (8, 4, 2, 1)), ("16, 8,4,2,1", (16, 8, 4, 2, 1)), ("1,1,1,1", (1, 1, 1, 1)),
    ("1,2,4,8", (1, 2, 4, 8)), ("16,8,4,2", (16, 8, 4, 2)), ("", ()),
])
def test_parse_any_list_of_chunk_sizes(text, sizes):
    assert schedule.parse_chunk_sizes(text) == sizes


def test_relative_core_cost_matches_spec_example():
    assert schedule.relative_core_cost(schedule.make_levels((8, 4, 2, 1))) == pytest.approx(1.875)
    assert schedule.relative_core_cost(schedule.make_levels((1, 1, 1, 1))) == 4


def test_padding_and_latent_lengths():
    levels = schedule.make_levels((8, 4, 2, 1))
    assert schedule.padding_multiple(levels) == 8
    assert schedule.padded_length(4096, levels) == 4096
    assert schedule.padded_length(4097, levels) == 4104
    assert [schedule.latent_length(4096, lv) for lv in levels] == [512, 1024, 2048, 4096]
    assert schedule.padding_multiple(schedule.make_levels((3, 5, 1))) == 15


@pytest.mark.parametrize("kwargs,message", [
    (dict(chunk_sizes=(8, 0, 1)), "chunk size 0 in (8, 0, 1) must be >= 1"),
    (dict(chunk_sizes=(4, -2)), "chunk size -2"),
    (dict(chunk_sizes=(8, 4), offsets=(8, 0)), "chunk offset 8 for chunk size 8 must be in [0, 8)"),
    (dict(chunk_sizes=(8, 4), offsets=(0,)), "must have one entry per chunk size"),
    (dict(chunk_sizes=(8,), shift="sideways"), "shift 'sideways'"),
    (dict(chunk_sizes="8,x"), "must be comma-separated integers"),
])
def test_bad_schedules_name_the_value(kwargs, message):
    with pytest.raises(ValueError) as err:
        schedule.make_levels(**kwargs)
    assert message in str(err.value)


def test_sequence_parallel_layout_rule():
    levels = schedule.make_levels((8, 4, 2, 1))
    schedule.check_sequence_layout(1000, levels, tensor_parallel=2, sequence_parallel=False)  # pads
    schedule.check_sequence_layout(64, levels, tensor_parallel=4, sequence_parallel=True)
    with pytest.raises(ValueError, match=r"seq_length/tp = 48/4 = 12 is not a multiple of chunk size 8"):
        schedule.check_sequence_layout(48, levels, tensor_parallel=4, sequence_parallel=True)
    with pytest.raises(ValueError, match="seq_length 30 is not a multiple of tensor_model_parallel_size 4"):
        schedule.check_sequence_layout(30, levels, tensor_parallel=4, sequence_parallel=True)
    with pytest.raises(ValueError, match="seq_length 0 must be >= 1"):
        schedule.check_sequence_layout(0, levels)
    with pytest.raises(ValueError, match="context_parallel_size 2"):
        schedule.check_sequence_layout(64, levels, context_parallel=2)
