"""--manual-gc and --empty-unused-memory-level (job/run/housekeeping.py) at Megatron-LM's points."""

import gc

import torch

from spiral_megatron.job.run.housekeeping import ManualGC, release_unused_memory


def _collections():
    """A list that gc's callbacks append each full collection to (remove the callback after)."""
    seen = []

    def callback(phase, info):
        if phase == "start" and info["generation"] == 2:
            seen.append(1)
    gc.callbacks.append(callback)
    return seen, callback


def test_manual_gc_turns_automatic_collection_off_and_collects_at_the_interval_and_around_evaluations():
    seen, callback = _collections()
    try:
        with ManualGC(True, interval=3, around_eval=True) as manual:
            assert not gc.isenabled() and len(seen) == 1  # one collection at the start
            for iteration in range(1, 8):
                manual.after_step(iteration)
            assert len(seen) == 3  # after steps 3 and 6
            manual.evaluation()
            manual.evaluation()
            assert len(seen) == 5
        assert gc.isenabled()  # restored for the rest of the process
        with ManualGC(True, interval=0, around_eval=False) as manual:
            manual.after_step(6)
            manual.evaluation()
        with ManualGC(False, interval=1) as manual:
            assert gc.isenabled()
            manual.after_step(1)
            manual.evaluation()
        assert len(seen) == 6  # only the second one's start
    finally:
        gc.callbacks.remove(callback)
        gc.enable()


def test_empty_unused_memory_at_its_level(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(1))
    for level in (0, 1, 2):
        for needed in (1, 2):
            release_unused_memory(level, needed)
    assert len(calls) == 3  # level 1 after forward-backward; level 2 there and after the optimizer step
