"""One parallel layout, trained 3 steps from fixed weights and data; results saved for comparison.

    python -m torch.distributed.run --nproc_per_node=N tests/distributed/layout_worker.py \
        --tp 2 --pp 2 --split 3,3 --cases residual-8421,mesh-1111 --out results.pt

The first run (one process) saves its initial weights with `dist_checkpointing`; every other
layout loads them (resharded), so all start from the same model. Megatron all the way: DistributedDataParallel (the job's settings, training.ddp_config, wrapped as the job does: build.wrap_in_ddp), the Adam of
`get_megatron_optimizer` (optionally distributed), the pipeline schedule from
`get_forward_backward_func`, and `spiral_megatron.parallel.pipeline.finalize_model_grads`. Every case
builds the same full weights (CPU initialisation from one seed) and trains on the same
global batches. Rank 0 saves, per case: the loss and gradient norm of every step (Megatron's,
and the job's fused one of the same gradients: parallel/grad_norm.py), the full reduced
gradients of every step (TP shards gathered, PP stages merged under global names, the
distributed optimizer's reduce-scattered shards gathered over DP) and the full parameters
after the last step.

With `--save-at K` the first case also goes through the job's checkpointing
(spiral_megatron.job.checkpoint.checkpointing.save and load) after step K, in each format of
`--formats`: a fresh build at this layout loads it and trains the remaining steps (`resumed`,
which must equal the uninterrupted steps bit for bit); for `fully_reshardable`, rank 0 also keeps
the live optimizer state at the save (`live_optimizer`: main parameters and Adam moments of every
parameter, full size, by checkpoint key) to read the save back against. `--resume-from DIR`
loads such a save at this layout (any TP/PP), trains the remaining steps and returns the
optimizer state the checkpoint holds (`saved_optimizer`).
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
from spiral_megatron.job.checkpoint import checkpointing, loading
from spiral_megatron.job.build import Components, sync_params, wrap_in_ddp
from spiral_megatron.parallel import grad_norm
from spiral_megatron.parallel.params_norm import params_norm
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
    # distributed optimizer; the bucket size), not a copy of them.
    model = wrap_in_ddp(ddp_config(job_config(args)), config, module)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=ADAM_LR, weight_decay=0.01, clip_grad=0.0,
                        use_distributed_optimizer=args.distributed_optimizer), [model])
    config.finalize_model_grads_func = pipeline.finalize_model_grads
    config.no_sync_func = model.no_sync
    return module, model, optimizer


def job_config(args, optimizer_format: str = "dp_reshardable") -> TrainingConfig:
    """The job's keys for this layout (what DDP and checkpointing read)."""
    return TrainingConfig(use_distributed_optimizer=args.distributed_optimizer, ddp_bucket_size=args.ddp_bucket_size,
                          tensor_parallel=args.tp, pipeline_parallel=ps.get_pipeline_model_parallel_world_size(),
                          sequence_parallel=args.sp, weight_decay=0.01, lr=ADAM_LR, min_lr=ADAM_LR,
                          lr_decay_style="constant", clip_grad=0.0,
                          dist_ckpt_optim_fully_reshardable=optimizer_format == "fully_reshardable")


def job_parts(module, model, optimizer) -> Components:
    """What the job's checkpointing saves and loads: the model, Adam and a constant LR schedule."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from spiral_megatron.model.model_args import ModelArgs

    scheduler = OptimizerParamScheduler(optimizer, init_lr=ADAM_LR, max_lr=ADAM_LR, min_lr=ADAM_LR, lr_warmup_steps=0,
                                        lr_decay_steps=1, lr_decay_style="constant", start_wd=0.01, end_wd=0.01,
                                        wd_incr_steps=1, wd_incr_style="constant")
    return Components(model, module, optimizer, scheduler, ModelArgs.from_config(module.config, vocab_size=VOCAB, max_sequence_length=SEQ))


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


def local_batches(args):
    """This DP rank's part of every step's global batch: [STEPS, GLOBAL_BATCH / DP, SEQ + 1]."""
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    return batches()[:, dp_rank * GLOBAL_BATCH // dp : (dp_rank + 1) * GLOBAL_BATCH // dp]


def train_step(model, optimizer, args, micro_batches, result, module=None):
    """One optimizer step; appends its loss, gradient norm and (with `module`) full gradients."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    dp = ps.get_data_parallel_world_size()
    model.zero_grad_buffer()
    optimizer.zero_grad()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(micro_batches.split(1)), model=[model],
        num_microbatches=GLOBAL_BATCH // dp, seq_length=SEQ, micro_batch_size=1,
    )
    loss = torch.stack([x["loss"] for x in losses]).mean() if losses else torch.zeros(())
    dist.all_reduce(loss, group=ps.get_data_parallel_group())
    dist.all_reduce(loss, group=ps.get_pipeline_model_parallel_group())  # only the last stage's is non-zero
    result["loss"].append(loss.item() / dp)
    if module is not None:
        result.setdefault("grads", []).append(full_tensors(module, reduced_grads(model, args.distributed_optimizer)))
    if optimizer.prepare_grads():
        raise RuntimeError(f"optimizer found inf/nan gradients at step {len(result['loss'])}")
    result["grad_norm"].append(float(optimizer.get_grad_norm()))
    # the job's fused norm (parallel/grad_norm.py) of the same gradients, over the same groups
    result.setdefault("fused_grad_norm", []).append(float(grad_norm.fused_norm(optimizer).get_grad_norm()))
    optimizer.step_with_ready_grads()


def train(case, args, save_at=None):
    module, model, optimizer = build(case, args)
    data = local_batches(args)
    result = {"loss": [], "grad_norm": []}
    for step in range(args.steps):
        train_step(model, optimizer, args, data[step], result, module)
        if step + 1 == save_at:
            result["live_optimizer"] = save(case, args, module, model, optimizer, step + 1)
    sync_params(model)  # overlap_param_gather defers the all-gather of the updated weights
    result["params"] = full_tensors(module, list(module.parameters()))
    result["params_norm"] = params_norm(module)  # the job's --log-params-norm, over this layout's ranks
    result["token_losses"] = token_losses(model)
    if args.save_final:  # for the resharding check: loaded elsewhere at another layout
        final = Path(args.save_final) / case
        final.mkdir(parents=True, exist_ok=True)
        dist_checkpointing.save(module.sharded_state_dict(), str(final))
    if save_at is not None:
        result["resumed"] = {fmt: resume(case, args, Path(args.checkpoints) / fmt / case, args.steps)
                             for fmt in args.formats.split(",")}
    return result


def save(case, args, module, model, optimizer, iteration: int):
    """The job's checkpoint of this state in every format of `args.formats`; the live optimizer
    state (rank 0) where one is fully_reshardable."""
    parts = job_parts(module, model, optimizer)
    for fmt in args.formats.split(","):
        checkpointing.save(Path(args.checkpoints) / fmt / case, iteration, iteration * GLOBAL_BATCH, parts,
                           job_config(args, fmt), tokenizer=None)
    return live_optimizer(module, optimizer) if "fully_reshardable" in args.formats else None


def resume(case, args, root, steps: int):
    """A fresh build at this layout, loaded from the job's checkpoint in `root`, trained to step
    `steps`: {"loss", "grad_norm", "params"} of the steps after the checkpoint."""
    module, model, optimizer = build(case, args)
    restored = loading.load(root, job_parts(module, model, optimizer), job_config(args))
    data = local_batches(args)
    result = {"loss": [], "grad_norm": []}
    for step in range(restored.iteration, steps):
        train_step(model, optimizer, args, data[step], result)
    sync_params(model)
    result["params"] = full_tensors(module, list(module.parameters()))
    result["params_norm"] = params_norm(module)  # the job's --log-params-norm, over this layout's ranks
    if args.resume_from:  # what the checkpoint holds of the optimizer, to compare with the live state
        folder = checkpointing.iteration_dir(root, restored.iteration)
        result["saved_optimizer"] = {k: v for k, v in dist_checkpointing.load_plain_tensors(str(folder)).items()
                                     if k.startswith("optimizer.state.")}
    return result


def live_optimizer(module, optimizer):
    """{"optimizer.state.<param | exp_avg | exp_avg_sq>.<model key>": full tensor}: the distributed
    optimizer's main parameters and Adam moments, each rank's shards gathered on rank 0 (None
    elsewhere). The core's replicas on later stages must hold the same values as the first."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories

    (opt,) = getattr(optimizer, "chained_optimizers", [optimizer])
    entries, _ = extract_sharded_tensors_and_factories(module.sharded_state_dict())
    entry_of = {e.data: e for e in nested_values(entries)}
    state = opt.get_parameter_state_dp_reshardable()  # per bucket, this rank's shard of each parameter
    pieces = []
    for gbuf_idx, ranges in enumerate(opt.gbuf_ranges):
        for dtype, buckets in ranges.items():
            for bucket_idx, bucket in enumerate(buckets):
                for (param, where), tensors in zip(bucket["param_map"].items(), state[gbuf_idx][dtype][bucket_idx]):
                    e = entry_of[param]
                    assert e.flattened_range is None, e
                    local_shape = (1,) * e.prepend_axis_num + tuple(e.local_shape)  # e.g. layers stacked in front
                    pieces.append((e.key, e.global_shape, e.global_offset, local_shape, where["param"].start,
                                   where["param"].end, {k: tensors[k].detach().clone()
                                                        for k in ("param", "exp_avg", "exp_avg_sq")}))
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, pieces)
    if dist.get_rank() != 0:
        return None
    full = {}
    for key, shape, offset, local_shape, start, stop, tensors in (p for rank in gathered for p in rank):
        for name, values in tensors.items():
            whole = full.setdefault(f"optimizer.state.{name}.{key}", torch.full(shape, float("nan")))
            region = whole[tuple(slice(o, o + n) for o, n in zip(offset, local_shape))]
            flat = region.reshape(-1).clone()  # [numel of this TP shard]
            known = ~flat[start:stop].isnan()
            assert torch.equal(flat[start:stop][known], values[known]), f"replicas of {key} differ in {name}"
            flat[start:stop] = values
            region.copy_(flat.view(local_shape))
    assert not any(t.isnan().any() for t in full.values()), "some optimizer state was on no rank"
    return full


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
    ap.add_argument("--ddp-bucket-size", type=int, default=None, help="the job's --ddp-bucket-size")
    ap.add_argument("--save-at", type=int, help="the first case: the job's checkpoint after this step, resumed")
    ap.add_argument("--checkpoints", help="with --save-at or --resume-from: FORMAT/CASE/ checkpoint folders")
    ap.add_argument("--formats", default="dp_reshardable",
                    help="distributed-optimizer formats to save (the plain optimizer has one)")
    ap.add_argument("--resume-from", action="store_true",
                    help="the first case: load --checkpoints fully_reshardable/CASE (any layout), train on")
    args = ap.parse_args()
    results = {}
    for i, case in enumerate(args.cases.split(",")):
        parallel.initialize(tensor_parallel=args.tp, pipeline_parallel=args.pp, seed=7, backend="gloo")
        if args.resume_from and i == 0:
            results["resumed"] = resume(case, args, Path(args.checkpoints) / "fully_reshardable" / case, STEPS)
        results[case] = train(case, args, save_at=args.save_at if i == 0 else None)
    if dist.get_rank() == 0:
        torch.save(results, args.out)
    parallel.destroy()


if __name__ == "__main__":
    main()
