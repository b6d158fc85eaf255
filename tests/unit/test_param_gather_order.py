"""Megatron DDP's parameter all-gathers under the distributed optimizer (`overlap_param_gather`)
follow the order in which the forward first uses each bucket group (parallel/param_gather.py).

Megatron chains them in the order of parameter registration: finishing one group's gather
dispatches the next. The loop's small parameters (MeSH's transitional routers, iteration 0's
down-scale) are registered after the core but used before it, so their group was gathered
out of that order, in the forward's path, and Megatron warned that "the next bucket's
parameter all-gather operation has already been dispatched ... which will hurt the
communication-computation overlap". The reference: the order the groups' gathers are first
waited on in a real forward, recorded by wrapping Megatron's own `finish_param_sync`."""

import warnings

import pytest
import torch

from spiral_megatron.job.build import build
from spiral_megatron.job.settings.resolve import resolve
from tests.conftest import ROOT

DEBUG = ROOT / "examples" / "configs" / "debug-cpu.yaml"
SEQ = 32


@pytest.mark.parametrize("topology", ["mesh", "anchor"])
def test_parameter_gathers_are_chained_in_the_forwards_order(megatron, topology):
    job = resolve(["--seq-length", str(SEQ), "--micro-batch-size", "2", "--global-batch-size", "2",
                   "--mock-data", "true", "--use-distributed-optimizer", "true", "--ddp-bucket-size", "3000",
                   "--model.topology", topology], DEBUG, on_cpu=True)
    parts = build(job)
    ddp = parts.model
    assert ddp.ddp_config.overlap_param_gather and len(ddp.bucket_groups) > 3  # small buckets: a chain to follow
    index = {group: i for i, group in enumerate(ddp.bucket_groups)}
    waited = []
    for group in ddp.bucket_groups:
        def finish(*args, _group=group, _finish=group.finish_param_sync, **kwargs):
            if _group.param_gather_handle is not None or not _group.param_gather_dispatched:
                waited.append(index[_group])  # its gather is waited on (dispatched here if not yet)
            return _finish(*args, **kwargs)
        group.finish_param_sync = finish
    tokens = torch.randint(0, job.keys.tokenizer_vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(SEQ).expand(2, SEQ)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):  # a step, then a forward whose gathers follow that step's update
            parts.optimizer.zero_grad()
            waited.clear()
            parts.model(tokens, positions, None, labels=tokens).float().mean().backward()
            parts.model.finish_grad_sync()
            parts.optimizer.step()
    late = [str(w.message) for w in caught if "already been dispatched" in str(w.message)]
    assert not late, late[0]
    chain, group = [], ddp.bucket_groups[waited[0]]
    while group is not None:
        chain.append(index[group])
        group = group.next_param_gather_bucket_group
    assert waited == chain, f"gathers waited on in the forward {waited}, Megatron's chain {chain}"
