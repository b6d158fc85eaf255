"""The ops the loop adds around its core in one training step (issue 23), pinned: a count is
deterministic. spiral-410m's layer counts (4 prelude + 8 core x chunk sizes 8,4,2,1 + 4 coda,
MeSH, hidden 128) against a GPT of the same 40 layer calls (analysis/op_count.py). It was 542
at issue 15 and 438 before issue 23 (334, 328, then 316 during it); docs/MODEL.md section 9
has the breakdown."""

from spiral_megatron.analysis import op_count

LOOP_ADDED_AT_MOST = 316


def test_the_loop_adds_at_most_its_pinned_op_count(megatron):
    result = op_count.loop_overhead("spiral-410m", batch=2, seq=64, hidden=128)
    assert result["iterations"] == 4 and result["unrolled_gpt"] > 7000  # the 40 layer calls ran
    assert result["loop_added"] <= LOOP_ADDED_AT_MOST, result
