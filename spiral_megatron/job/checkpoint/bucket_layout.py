"""What decides the distributed optimizer's DDP buckets: recorded with each checkpoint, and
compared before `dp_reshardable` state is resumed.

`dp_reshardable` state (Megatron-LM's default format) is stored bucket by bucket
(optimizer_state.py), so it loads only into the same buckets; megatron-core checks that only
after the model is built, with an AssertionError on `per_bucket_numel_unpadded`. A pipeline
stage's buckets follow from
- the parameters it holds: TP (refused earlier: checkpoint_files.check_fits), PP, and which
  prelude and coda layers and whether a replica of the core it holds (`model.loop_placement`,
  `model.pipeline_split`, the pipeline plan: pipeline_plan.py);
- Megatron DDP's bucket size (`ddp_bucket_size`, else max(4e7, 1e6 x DP): settings/training.py), which Megatron
  applies on the first stage only; the other buckets are closed by parameters shared across
  stages (the core's replicas, tied embeddings), whatever the size.
All of it is known before anything is built, so a resume that cannot fit is refused then, in
one line. A DP change keeps the buckets unless it changes the bucket size and some bucket could
reach the smaller of the two sizes (they never did when the largest one is below it).
"""

import dataclasses
from pathlib import Path
from typing import List, Optional

import yaml

from spiral_megatron.parallel import pipeline_plan
from spiral_megatron.job.checkpoint.checkpoint_files import CheckpointError, iteration_dir, read_record
from spiral_megatron.job.settings import training

PIPELINE_KEYS = ("loop_placement", "pipeline_split")  # the model fields that place the layers


def stage_parameters(plan) -> List[str]:
    """Per pipeline stage, the layers whose parameters it holds, e.g. "prelude layer 0 + core"."""
    loop_stages = sum(1 for stage in plan if stage.span("loop"))
    out = []
    for stage in plan:
        parts = []
        for part in ("prelude", "loop", "coda"):
            span = stage.span(part)
            if part == "loop" and span:
                parts.append("core replica" if loop_stages > 1 else "core")
            elif len(span) == 1:
                parts.append(f"{part} layer {span.start}")
            elif span:
                parts.append(f"{part} layers {span.start}-{span.stop - 1}")
        out.append(" + ".join(parts) or "output layer")
    return out


def record(parts) -> dict:
    """The marker's entry (rank 0, the first stage): the pipeline plan, the bucket size DDP
    resolved and the first stage's largest bucket (elements, unpadded)."""
    module, ddp = parts.module, parts.model
    return {"stages": stage_parameters(module.plan), "loop_placement": module.config.loop_placement,
            "pipeline_split": [len(stage.units) for stage in module.plan],
            "bucket_size": ddp.ddp_config.bucket_size,
            "largest_first_stage_bucket": max(b.numel_unpadded for buf in ddp.buffers for b in buf.buckets)}


def _plan(model, folder: Path):
    """The pipeline plan of SpiralConfig `model` at the saved model's sequence length and
    vocabulary (the automatic split weighs them; a change of either is refused later)."""
    from spiral_megatron.model.model_args import ModelArgs

    saved = ModelArgs.load(folder / "model_args.json")
    return pipeline_plan.plan(model, saved.max_sequence_length, saved.vocab_size,
                              model.pipeline_model_parallel_size, model.loop_placement, model.pipeline_split)


def _saved_pipeline(job, folder: Path, saved: Optional[dict]):
    """(stages, loop_placement, pipeline_split) of the checkpoint: recorded, or for a checkpoint
    saved before they were, planned from its config.yaml's model fields (resolved as this job's
    keys with those fields)."""
    from spiral_megatron.job.settings.resolve import resolve_keys

    if saved is not None:
        return saved["stages"], saved["loop_placement"], tuple(saved["pipeline_split"])
    model = yaml.safe_load((folder / "config.yaml").read_text()).get("model", {})
    fields = {**{k: v for k, v in job.keys.model.items() if k not in PIPELINE_KEYS},
              **{k: model[k] for k in PIPELINE_KEYS if k in model}}
    config = resolve_keys(dataclasses.replace(job.keys, model=fields), on_cpu=job.on_cpu).model
    plan = _plan(config, folder)
    return stage_parameters(plan), config.loop_placement, tuple(len(s.units) for s in plan)


def check(load, iteration: int, job, dp: int) -> None:
    """Refuse, before building, `dp_reshardable` distributed-optimizer state whose buckets the
    resolved job `job` would lay out otherwise (same TP and PP: check_fits); `dp`: its DP size."""
    folder = iteration_dir(load, iteration)
    marker = read_record(folder)
    optimizer = marker["optimizer"] or {}
    if not (optimizer.get("distributed") and optimizer.get("format") == "dp_reshardable"):
        return
    saved = optimizer.get("buckets")  # None: saved before the buckets were recorded
    head = (f"load {str(load)!r}: {folder.name} holds distributed-optimizer state in Megatron's "
            f"dp_reshardable format, stored per DDP bucket, which reloads only into the same buckets")
    tail = ("or pass --no-load-optim true (weights, LR schedule and data position; fresh Adam moments); "
            "saves with --dist-ckpt-optim-fully-reshardable true reload at any layout")
    stages, placement, split = _saved_pipeline(job, folder, saved)
    config = job.model
    plan = _plan(config, folder)
    if stage_parameters(plan) != stages:
        raise CheckpointError(
            f"{head}: saved with the pipeline stages [{' | '.join(stages)}] (model.loop_placement "
            f"{placement!r}, model.pipeline_split {','.join(map(str, split))}); this run's are "
            f"[{' | '.join(stage_parameters(plan))}] (model.loop_placement {config.loop_placement!r}, "
            f"model.pipeline_split {','.join(str(len(s.units)) for s in plan)}). Resume with --model.loop_placement "
            f"{placement} --model.pipeline_split {','.join(map(str, split))}, {tail}")
    old_dp = marker["layout"]["dp"]
    if saved is not None:
        old_size, largest = saved["bucket_size"], saved["largest_first_stage_bucket"]
        how = f"its first stage's largest bucket {largest}"
    else:  # Megatron's default at the saved DP: the flag did not exist then
        old_size, largest = training.bucket_size(dataclasses.replace(job.ddp, bucket_size=None), old_dp), None
        how = f"Megatron's default at DP {old_dp}; the checkpoint does not record its buckets"
    new_size = training.bucket_size(job.ddp, dp)
    if new_size != old_size and (largest is None or largest >= min(old_size, new_size)):
        given = "--ddp-bucket-size" if job.ddp.bucket_size is not None else f"Megatron's default at DP {dp}"
        raise CheckpointError(
            f"{head}: saved with DDP buckets of {old_size} elements at DP {old_dp} ({how}); this run's are "
            f"{new_size} ({given}), which would bucket the first pipeline stage's gradients otherwise. Resume with "
            f"--ddp-bucket-size {old_size}, {tail}")
