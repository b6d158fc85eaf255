"""Megatron's checkpoint writer reports through the queue job/checkpoint/results_queue.py sets:
one of this process for synchronous saves, Megatron's manager for background ones, whichever
was set first (the manager itself is checked by test_checkpoint_safety's SIGTERM test)."""

import queue

import pytest

from spiral_megatron.job.checkpoint import results_queue


@pytest.fixture
def writer(monkeypatch):
    """Megatron's writer module with no queue yet and its getter replaced by one that records
    a manager (the real one spawns a process)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async as module

    def start_manager():
        if module._results_queue is None:
            module._results_queue = "manager"
        return module._results_queue

    monkeypatch.setattr(module, "_results_queue", None)
    name = "get_write_results_queue" if hasattr(module, "get_write_results_queue") else "_get_write_results_queue"
    monkeypatch.setattr(module, name, start_manager)
    return module


def test_a_synchronous_save_reports_to_this_process(writer):
    results_queue.in_this_process()
    assert isinstance(writer._results_queue, queue.Queue)


def test_a_tool_keeps_a_manager_already_started(writer):
    results_queue.start_manager()
    results_queue.in_this_process(replace=False)
    assert writer._results_queue == "manager"


def test_background_saves_replace_a_queue_of_this_process(writer):
    results_queue.in_this_process()  # a one-process save first
    results_queue.start_manager()
    assert writer._results_queue == "manager"
