"""The step's host reads (issue 15): one all-reduce per step read a step late, and the batch
order of the data loader (the same samples as Megatron's pretraining sampler, on any workers)."""

import math

import torch

from spiral_megatron.job.data import datasets as data
from spiral_megatron.job.run import step


def test_step_flags_hand_back_the_previous_step_then_settle_the_last(megatron):
    flags = step.StepFlags(dp_size=1)
    host = dict(grad_norm=torch.tensor(0.5), lr=1e-3, skipped=False)  # the optimizer's norm, on the device
    assert flags.swap(1, torch.tensor(2.5), False, host) is None  # nothing read yet: no wait
    first = flags.swap(2, torch.tensor(float("nan")), True, dict(host, lr=2e-3, grad_norm=torch.tensor(0.25)))
    assert (first.iteration, first.loss, first.grad_norm, first.lr, first.exit_requested) == (1, 2.5, 0.5, 1e-3, False)
    second = flags.settle()
    assert second.iteration == 2 and math.isnan(second.loss) and second.exit_requested and second.grad_norm == 0.25
    assert flags.settle() is None


def test_step_flags_loss_is_the_sum_over_ranks_divided_by_data_parallel_ranks(megatron):
    flags = step.StepFlags(dp_size=2)  # one rank here: its share stands for both
    flags.push(7, torch.tensor(3.0), False, dict(grad_norm=None, lr=0.0, skipped=True))
    settled = flags.settle()
    assert settled.loss == 1.5 and settled.grad_norm is None  # a skipped step has no norm


class _Numbered(torch.utils.data.Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, i):
        t = torch.full((3,), i)
        return dict(tokens=t, labels=t, loss_mask=torch.ones(3), position_ids=torch.arange(3))


def _firsts(batches, n):
    return [next(batches)["tokens"][:, 0].tolist() for _ in range(n)]


def test_batch_order_is_megatrons_from_any_start_and_wraps():
    # micro-batch 2, DP 2: each micro-step takes the next 4 samples, rank r its r-th pair
    order = iter(data.BatchOrder(10, 4, 2, 1, 2))
    assert [next(order) for _ in range(3)] == [[6, 7], [0, 1], [4, 5]]


def test_loader_workers_give_the_same_batches_as_the_training_thread():
    ds = _Numbered()
    inline = _firsts(data.micro_batches(ds, 2, 2, 0, 2, num_workers=0), 5)
    assert inline == [[2, 3], [6, 7], [0, 1], [4, 5], [8, 9]]
    assert _firsts(data.micro_batches(ds, 2, 2, 0, 2, num_workers=2), 5) == inline
