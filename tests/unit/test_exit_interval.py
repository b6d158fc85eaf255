"""--exit-interval as Megatron-LM's: a run stops after the next iteration divisible by it
(checked after every step), so a requeued run goes on; never past --train-iters."""

from spiral_megatron.job.run.stopping import end_iteration


def test_a_run_stops_at_the_next_multiple_of_the_exit_interval():
    assert end_iteration(0, 300, None) == 300
    assert [end_iteration(start, 300, 100) for start in (0, 99, 100, 150, 200)] == [100, 100, 200, 200, 300]
    assert end_iteration(250, 280, 100) == 280  # train_iters comes first
    assert end_iteration(300, 300, 100) == 300  # finished: nothing to run
