"""One parallel layout, trained 3 steps from fixed weights and data; results saved for comparison.

    python -m torch.distributed.run --nproc_per_node=N tests/distributed/layout_worker.py \
        --tp 2 --pp 2 --split 3,3 --cases residual-8421,mesh-1111 --out results.pt

The first run (one process) saves its initial weights with `dist_checkpointing`; every other
layout loads them (resharded), so all start from the same model. Megatron all the way: DistributedDataParallel (the job's settings: job/settings/training.ddp_config), the Adam of
`get_megatron_optimizer` (optionally distributed), the pipeline schedule from
`get_forward_backward_func`, and `spiral_megatron.parallel.pipeline.finalize_model_grads`. Every case
builds the same full weights (CPU initialisation from one seed) and trains on the same
global batches. Rank 0 saves, per case: the loss and gradient norm of every step, the full
reduced gradients of every step (TP shards gathered, PP stages merged under global names, the
distributed optimizer's reduce-scattered shards gathered over DP) and the full parameters
after the last step.
"""

import argparse
import re
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps

from spiral_megatron import parallel
from spiral_megatron.parallel import pipeline
from spiral_megatron import SpiralGPTModel
from spiral_megatron.job.build import sync_params
from spiral_megatron.job.settings.config import TrainingConfig
from spiral_megatron.job.settings.training import ddp_config
from tests.tiny import VOCAB, tiny_config

SEQ, GLOBAL_BATCH, STEPS = 32, 4, 3
ADAM_LR = 1e-2
CASES = {
    f"{topology}-{name}": dict(topology=topology, chunk_sizes=chunks)
    for topology in ("residual", "anchor", "mesh")
    for name, chunks in (("8421", (8, 4, 2, 1)), ("1111", (1, 1, 1, 1)))
}


def batches():
    """The same global batches everywhere: [STEPS, GLOBAL_BATCH, SEQ + 1] tokens."""
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, VOCAB, (STEPS, GLOBAL_BATCH, SEQ + 1), generator=g)


def forward_step(data_iterator, model):
    tokens = next(data_iterator)  # [1, SEQ + 1]
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    losses = model(inputs, torch.arange(SEQ).expand_as(inputs), None, labels=labels)  # [1, SEQ]

    def reduce(output):
        loss = output.float().mean()
        return loss, {"loss": loss.detach().clone()}

    return losses, reduce


def build(case, args):
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    pp = ps.get_pipeline_model_parallel_world_size()
    torch.manual_seed(3)
    config = tiny_config(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=pp,
                         sequence_parallel=args.sp, pipeline_dtype=torch.float32,
                         loop_placement=args.placement, pipeline_split=args.split, **CASES[case])
    module = SpiralGPTModel(config, VOCAB, SEQ, pre_process=ps.is_pipeline_first_stage(),
                            post_process=ps.is_pipeline_last_stage())
    init = Path(args.init) / case
    if init.exists():  # every layout starts from the reference's weights, resharded
        module.load_state_dict(dist_checkpointing.load(module.sharded_state_dict(), str(init)))
    else:
        init.mkdir(parents=True, exist_ok=True)
        dist_checkpointing.save(module.sharded_state_dict(), str(init))
    # The job's own DDP settings (overlapped gradient reduce; parameter all-gather with the
    # distributed optimizer), not a copy of them.
    ddp = ddp_config(TrainingConfig(use_distributed_optimizer=args.distributed_optimizer))
    model = DistributedDataParallel(config, ddp, module)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=ADAM_LR, weight_decay=0.01, clip_grad=0.0,
                        use_distributed_optimizer=args.distributed_optimizer), [model])
    config.finalize_model_grads_func = pipeline.finalize_model_grads
    config.no_sync_func = model.no_sync
    return module, model, optimizer


def global_name(module, name: str) -> str:
    """Local parameter name -> its name in the whole (unpipelined) model."""
    for part in ("prelude", "coda"):
        first = getattr(module, part).first_layer
        name = re.sub(rf"^{part}\.layers\.(\d+)\.", lambda m: f"{part}.layers.{first + int(m.group(1))}.", name)
    return name


def full_tensors(module, tensors):
    """{global name: full tensor} of this model-parallel group (TP gathered, PP merged)."""
    tp_group, tp = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size()
    out = {}
    for (name, p), t in zip(module.named_parameters(), tensors):
        t = t.detach().clone()
        if tp > 1 and getattr(p, "tensor_model_parallel", False):
            parts = [torch.empty_like(t) for _ in range(tp)]
            dist.all_gather(parts, t.contiguous(), group=tp_group)
            t = torch.cat(parts, dim=p.partition_dim)
        out[global_name(module, name)] = t
    stages = [None] * ps.get_pipeline_model_parallel_world_size()
    dist.all_gather_object(stages, out, group=ps.get_pipeline_model_parallel_group())
    merged = {}
    for stage in stages:
        merged.update(stage)
    return merged


def reduced_grads(model, distributed_optimizer: bool) -> list:
    """Every parameter's reduced gradient (`main_grad`, in module.parameters() order). The
    distributed optimizer reduce-scatters each bucket, so a DP rank holds only its shard
    reduced: the shards are gathered into the bucket first (the optimizer reads its own shard
    only, which the gather leaves as it was)."""
    dp = ps.get_data_parallel_world_size()
    if distributed_optimizer and dp > 1:
        from megatron.core.distributed.param_and_grad_buffer import shard_buffer

        for buffer in model.buffers:
            for bucket in buffer.buckets:
                mine = shard_buffer(bucket.grad_data, dp)[ps.get_data_parallel_rank()].clone()
                dist.all_gather_into_tensor(bucket.grad_data, mine, group=ps.get_data_parallel_group())
    return [p.main_grad for p in model.module.parameters()]


def token_losses(model):
    """Per-token losses [GLOBAL_BATCH, SEQ] of a fixed held-out batch, on every rank."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def keep(output):
        return output.float().mean(), {"tokens": output.detach().clone()}

    def step(data_iterator, model):
        tokens = next(data_iterator)
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        return model(inputs, torch.arange(SEQ).expand_as(inputs), None, labels=labels), keep

    held_out = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=torch.Generator().manual_seed(99))
    out = get_forward_backward_func()(
        forward_step_func=step, data_iterator=iter(held_out.split(1)), model=[model],
        num_microbatches=GLOBAL_BATCH, seq_length=SEQ, micro_batch_size=1, forward_only=True,
    )
    losses = torch.cat([o["tokens"] for o in out]) if out else torch.zeros(GLOBAL_BATCH, SEQ)
    dist.all_reduce(losses, group=ps.get_pipeline_model_parallel_group())  # only the last stage's is non-zero
    return losses


def train(case, args):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    module, model, optimizer = build(case, args)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    data = batches()[:, dp_rank * GLOBAL_BATCH // dp : (dp_rank + 1) * GLOBAL_BATCH // dp]
    result = {"loss": [], "grad_norm": []}
    for step in range(args.steps):
        model.zero_grad_buffer()
        optimizer.zero_grad()
        micro = iter(data[step].split(1))
        losses = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=micro, model=[model],
            num_microbatches=GLOBAL_BATCH // dp, seq_length=SEQ, micro_batch_size=1,
        )
        loss = torch.stack([x["loss"] for x in losses]).mean() if losses else torch.zeros(())
        dist.all_reduce(loss, group=ps.get_data_parallel_group())
        dist.all_reduce(loss, group=ps.get_pipeline_model_parallel_group())  # only the last stage's is non-zero
        result["loss"].append(loss.item() / dp)
        result.setdefault("grads", []).append(full_tensors(module, reduced_grads(model, args.distributed_optimizer)))
        if optimizer.prepare_grads():
            raise RuntimeError(f"{case}: optimizer found inf/nan gradients at step {step}")
        result["grad_norm"].append(float(optimizer.get_grad_norm()))
        optimizer.step_with_ready_grads()
    sync_params(model)  # overlap_param_gather defers the all-gather of the updated weights
    result["params"] = full_tensors(module, list(module.parameters()))
    result["token_losses"] = token_losses(model)
    if args.save_final:  # for the resharding check: loaded elsewhere at another layout
        final = Path(args.save_final) / case
        final.mkdir(parents=True, exist_ok=True)
        dist_checkpointing.save(module.sharded_state_dict(), str(final))
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--sp", action="store_true")
    ap.add_argument("--distributed-optimizer", action="store_true")
    ap.add_argument("--placement", default="across")
    ap.add_argument("--split", type=lambda s: tuple(int(x) for x in s.split(",")), default=None)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--out", required=True)
    ap.add_argument("--init", required=True, help="initial weights: saved there if absent, else loaded")
    ap.add_argument("--steps", type=int, default=STEPS, help="optimizer steps (0: load and evaluate)")
    ap.add_argument("--save-final", help="save the trained weights here (one folder per case)")
    args = ap.parse_args()
    results = {}
    for case in args.cases.split(","):
        parallel.initialize(tensor_parallel=args.tp, pipeline_parallel=args.pp, seed=7, backend="gloo")
        results[case] = train(case, args)
    if dist.get_rank() == 0:
        torch.save(results, args.out)
    parallel.destroy()


if __name__ == "__main__":
    main()
