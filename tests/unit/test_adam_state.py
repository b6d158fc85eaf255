"""build.create_adam_state gives torch's Adam, before any step, the state its first step would
create: against a plain torch optimizer that creates it lazily, the state (keys, dtypes,
devices, values) and then every parameter and moment over several steps are bit for bit the
same, for Adam and AdamW, with and without amsgrad and foreach."""

from types import SimpleNamespace

import pytest
import torch

from spiral_megatron.job.build import create_adam_state


def _params(seed: int = 0) -> list:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in ((5, 3), (7,), (2, 2, 2))]


def _megatron_like(adam):
    """What create_adam_state reads: Megatron's chained optimizers, each holding its torch optimizer."""
    return SimpleNamespace(chained_optimizers=[SimpleNamespace(optimizer=adam)])


def _same_state(a, b) -> None:
    for pa, pb in zip(a.param_groups[0]["params"], b.param_groups[0]["params"]):
        sa, sb = a.state[pa], b.state[pb]
        assert sorted(sa) == sorted(sb)
        for key in sa:
            assert (sa[key].dtype, sa[key].device, sa[key].shape) == (sb[key].dtype, sb[key].device, sb[key].shape), key
            assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW])
@pytest.mark.parametrize("options", [{}, {"amsgrad": True}, {"foreach": False}, {"foreach": True, "weight_decay": 0.1}])
def test_eager_state_is_what_the_first_step_creates(cls, options):
    lazy_params, eager_params = _params(), _params()
    lazy, eager = cls(lazy_params, lr=1e-2, **options), cls(eager_params, lr=1e-2, **options)
    create_adam_state(_megatron_like(eager))
    assert not lazy.state and len(eager.state) == len(eager_params)
    # the state torch creates in its first step: a step of zero gradients without weight decay
    # leaves the moments at 0; its count goes back to 0
    reference = cls([torch.nn.Parameter(p.detach().clone()) for p in lazy_params], **{**options, "lr": 0.0,
                                                                                      "weight_decay": 0.0})
    for p in reference.param_groups[0]["params"]:
        p.grad = torch.zeros_like(p)
    reference.step()
    for state in reference.state.values():
        state["step"].zero_()
    _same_state(reference, eager)

    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        for pl, pe in zip(lazy_params, eager_params):
            grad = torch.randn(pl.shape, generator=gen)
            pl.grad, pe.grad = grad.clone(), grad.clone()
        lazy.step()
        eager.step()
    for pl, pe in zip(lazy_params, eager_params):
        assert torch.equal(pl, pe)
    _same_state(lazy, eager)


def test_existing_state_and_other_optimizers_are_left_alone():
    params = _params()
    adam = torch.optim.AdamW(params, lr=1e-2)
    for p in params:
        p.grad = torch.ones_like(p)
    adam.step()
    before = {id(p): {k: v.clone() for k, v in adam.state[p].items()} for p in params}
    sgd = torch.optim.SGD(_params(1), lr=1e-2, momentum=0.9)
    create_adam_state(_megatron_like(adam))
    create_adam_state(_megatron_like(sgd))
    assert not sgd.state
    for p in params:
        assert all(torch.equal(adam.state[p][k], v) for k, v in before[id(p)].items())


def test_a_missing_tensor_is_named_through_torchs_checkpoint_exception():
    """megatron-core's load raises KeyError("<key> from model not in state dict: [...]") inside
    torch.distributed.checkpoint, which wraps it per rank: the job's loader names the key (a
    checkpoint saved without Adam state by an earlier version reads as one line)."""
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.utils import _wrap_exception

    from spiral_megatron.job.checkpoint.loading import _missing_key

    key = "optimizer.state.exp_avg.output_layer.weight"
    try:
        raise KeyError(f"{key} from model not in state dict: ['output_layer.weight']")
    except KeyError as e:
        raw = e
    assert _missing_key(raw) == key
    assert _missing_key(CheckpointException("load", {0: _wrap_exception(raw)})) == key
    assert _missing_key(CheckpointException("load", {1: _wrap_exception(ValueError("shape"))})) is None
    assert _missing_key(KeyError("step")) is None
