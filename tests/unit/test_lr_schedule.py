"""Megatron-LM's WSD schedule (--lr-decay-style WSD): the learning rate of every step against the
schedule written out from its definition, and its annealing kept across a resume."""

import dataclasses
import math

import pytest
import torch

from spiral_megatron.errors import ConfigError
from spiral_megatron.job.checkpoint import resume_check, scheduler_state
from spiral_megatron.job.settings.resolve import resolve
from tests.integration.conftest import ROOT

DEFAULT = ROOT / "examples" / "configs" / "debug-cpu.yaml"
LR, MIN_LR = 1e-3, 1e-4
ANNEAL = {"exponential": lambda r: 2 * 0.5 ** r - 1, "linear": lambda r: 1 - r,
          "cosine": lambda r: 0.5 * (1 + math.cos(math.pi * r)), "minus_sqrt": lambda r: 1 - math.sqrt(r)}


def wsd(n: float, warmup: float, decay: float, anneal: float, style: str) -> float:
    """The learning rate after n samples: linear warmup from 0, lr until the annealing's start
    (decay - anneal), then min_lr + c(r) (lr - min_lr) over r in (0, 1]; min_lr past the decay."""
    if n <= warmup:
        return LR * n / warmup
    if n > decay:
        return MIN_LR
    r = max(n - (decay - anneal), 0) / anneal
    return MIN_LR + ANNEAL[style](r) * (LR - MIN_LR)


def scheduler(job):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    return optimizer, OptimizerParamScheduler(optimizer, **dataclasses.asdict(job.schedule))


def learning_rates(job, steps: int, batch: int = 16) -> list:
    optimizer, s = scheduler(job)
    lrs = []
    for _ in range(steps):
        s.step(increment=batch)
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


@pytest.mark.parametrize("style", sorted(ANNEAL))
def test_wsd_by_iterations(style):
    """12 steps of 16 samples: warmup 2, lr to step 7, annealing over the last 5 (from 6 on) to
    min_lr at 12, then min_lr."""
    job = resolve(["--train-iters", "12", "--lr", str(LR), "--min-lr", str(MIN_LR), "--lr-warmup-iters", "2",
                   "--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "5", "--lr-wsd-decay-style", style], DEFAULT)
    want = [wsd(16 * k, 32, 192, 80, style) for k in range(1, 15)]
    assert learning_rates(job, 14) == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert want[6] == LR and want[11] == pytest.approx(MIN_LR) and want[7] < LR


def test_wsd_by_samples():
    """With --train-samples the annealing's length is --lr-wsd-decay-samples, not a whole number of steps."""
    job = resolve(["--train-samples", "200", "--lr-decay-samples", "180", "--lr-warmup-samples", "20",
                   "--lr", str(LR), "--min-lr", str(MIN_LR), "--lr-decay-style", "WSD",
                   "--lr-wsd-decay-samples", "70", "--lr-wsd-decay-style", "cosine"], DEFAULT)
    want = [wsd(16 * k, 20, 180, 70, "cosine") for k in range(1, job.keys.train_iters + 1)]
    assert learning_rates(job, job.keys.train_iters) == pytest.approx(want, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("argv, message", [
    (["--lr-decay-style", "WSD"], "lr_decay_style 'WSD' needs lr_wsd_decay_iters, the length of its annealing"),
    (["--lr-wsd-decay-iters", "5"], "lr_wsd_decay_iters 5 shape WSD's annealing, but lr_decay_style is 'cosine': "
     "pass --lr-decay-style WSD or leave them out"),
    (["--lr-wsd-decay-style", "linear"], "lr_wsd_decay_style 'linear' shape WSD's annealing"),
    (["--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "301"],
     "lr_wsd_decay_iters 301 must be in [1, lr_decay_iters (or train_iters) 300]"),
    (["--lr-decay-style", "WSD", "--lr-wsd-decay-samples", "64"],
     "lr_wsd_decay_samples 64 counts samples, but the run counts iterations: give lr_wsd_decay_iters"),
    (["--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "5", "--lr-wsd-decay-style", "sqrt"],
     "lr_wsd_decay_style 'sqrt' must be one of ('exponential', 'linear', 'cosine', 'minus_sqrt')"),
    (["--lr-decay-style", "wsd"], "lr_decay_style 'wsd' must be one of ('constant', 'linear', 'cosine', "
     "'inverse-square-root', 'WSD')"),
])
def test_wsd_one_line_errors(argv, message):
    with pytest.raises(ConfigError) as e:
        resolve(argv, DEFAULT)
    assert message in str(e.value) and "\n" not in str(e.value)


def wsd_job(*argv):
    return resolve(["--train-iters", "12", "--lr-decay-style", "WSD", *argv], DEFAULT)


def test_a_resume_compares_and_restores_the_annealing():
    """Megatron's scheduler state leaves WSD's annealing out; the checkpoint's copy of it is
    compared on resume (refused when it changed, unless Megatron-LM's flags say which to take)
    and restored with --use-checkpoint-opt-param-scheduler, also into a run that asks no WSD."""
    _, saved_scheduler = scheduler(wsd_job("--lr-wsd-decay-iters", "4", "--lr-wsd-decay-style", "linear"))
    saved_scheduler.step(increment=16 * 9)
    saved = scheduler_state.state_dict(saved_scheduler)
    job = wsd_job("--lr-wsd-decay-iters", "6")
    with pytest.raises(resume_check.ResumeMismatch) as e:
        resume_check.check_schedule("ckpt", saved, scheduler(job)[1], job.keys)
    assert ("wsd_decay_steps 64 -> 96 (lr_wsd_decay_iters (or _samples)); lr_wsd_decay_style 'linear' -> "
            "'exponential' (lr_wsd_decay_style)") in str(e.value)

    kept = resolve(["--train-iters", "12", "--use-checkpoint-opt-param-scheduler"], DEFAULT)  # cosine
    optimizer, s = scheduler(kept)
    assert "the checkpoint's values are kept" in resume_check.check_schedule("ckpt", saved, s, kept.keys)
    scheduler_state.load(s, saved)
    s.step(increment=16)  # step 10 of 12: 2 of the 4 annealing steps done, linear
    assert optimizer.param_groups[0]["lr"] == pytest.approx(3e-4 + 0.5 * (3e-3 - 3e-4), rel=1e-12)

    replaced = wsd_job("--lr-wsd-decay-iters", "6", "--override-opt-param-scheduler")
    optimizer, s = scheduler(replaced)
    assert "this run's values replace" in resume_check.check_schedule("ckpt", saved, s, replaced.keys)
    scheduler_state.load(s, saved)
    assert (s.wsd_decay_steps, s.lr_wsd_decay_style) == (96, "exponential")
