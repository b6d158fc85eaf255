"""The refusals of a job's settings: each names the key, the value and the rule.

Run by resolve.py, each once: `check` on the keys alone, `check_heads` on the model's fields
before its SpiralConfig is built, `check_model` on the built SpiralConfig; `check_world` once
the world size is known (job/run/startup.py). All raise ConfigError.
"""

import dataclasses
import difflib
import math

from spiral_megatron.config import flavors, schedule
from spiral_megatron.parallel import pipeline_plan
from spiral_megatron.config.spiral_config import SpiralConfig
from spiral_megatron.job.settings import model_fields
from spiral_megatron.job.data.dataset_check import parse_split
from spiral_megatron.job.settings.keys import (BACKENDS, FIELDS, LR_DECAY_STYLES, LR_WSD_DECAY_STYLES, PRECISIONS,
                                             ConfigError, TrainingConfig, model_overrides)


def _positive(cfg: TrainingConfig, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value is not None and not value > 0:
            raise ConfigError(f"{name} {value!r} must be > 0")


def check(cfg: TrainingConfig) -> None:
    """Refuse impossible keys and combinations of keys (the model's fields by name only)."""
    _positive(cfg, "tensor_parallel", "pipeline_parallel", "micro_batch_size", "global_batch_size",
              "train_iters", "train_samples", "exit_interval", "exit_duration_in_mins", "lr", "lr_decay_iters",
              "lr_decay_samples", "distributed_timeout_minutes",
              "log_interval", "eval_interval", "save_interval", "seq_length", "tokenizer_vocab_size",
              "make_vocab_size_divisible_by", "peak_tflops", "ddp_bucket_size", "rotary_base")
    if cfg.eval_iters < 0:
        raise ConfigError(f"eval_iters {cfg.eval_iters} must be >= 0 (0: no evaluation, as in Megatron-LM)")
    if not 0 < cfg.rotary_percent <= 1:
        raise ConfigError(f"rotary_percent {cfg.rotary_percent} must be in (0, 1]")
    for name in ("lr", "min_lr", "weight_decay", "clip_grad", "adam_eps"):
        value = getattr(cfg, name)
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"{name} {value!r} must be finite and >= 0")
    if cfg.min_lr > cfg.lr:
        raise ConfigError(f"min_lr {cfg.min_lr} must be <= lr {cfg.lr}")
    if not 0 <= cfg.lr_warmup_init <= cfg.lr:
        raise ConfigError(f"lr_warmup_init {cfg.lr_warmup_init} must be in [0, lr {cfg.lr}]: the warmup rises "
                          "from it to lr")
    if cfg.manual_gc_interval < 0:
        raise ConfigError(f"manual_gc_interval {cfg.manual_gc_interval} must be >= 0 (0: collect only around "
                          "evaluations)")
    if (cfg.manual_gc_interval or not cfg.manual_gc_eval) and not cfg.manual_gc:
        raise ConfigError("manual_gc_interval and manual_gc_eval mean something with manual_gc only: pass --manual-gc")
    if cfg.empty_unused_memory_level not in (0, 1, 2):
        raise ConfigError(f"empty_unused_memory_level {cfg.empty_unused_memory_level} must be 0, 1 or 2")
    for name, allowed in (("precision", PRECISIONS), ("lr_decay_style", LR_DECAY_STYLES),
                          ("lr_wsd_decay_style", LR_WSD_DECAY_STYLES), ("backend", BACKENDS)):
        if getattr(cfg, name) not in allowed:
            raise ConfigError(f"{name} {getattr(cfg, name)!r} must be one of {allowed}")
    _check_warmup(cfg)
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(cfg, name) < 1:
            raise ConfigError(f"{name} {getattr(cfg, name)} must be in [0, 1)")
    if cfg.sequence_parallel and cfg.tensor_parallel == 1:
        raise ConfigError("sequence_parallel true needs tensor_parallel > 1, got tensor_parallel 1")
    _check_loss_scale(cfg)
    if cfg.fp8 is not None and cfg.fp8 not in FP8_FORMATS:
        raise ConfigError(f"fp8 {cfg.fp8!r} must be one of {FP8_FORMATS} (or none)")
    if cfg.fp8 is not None and cfg.precision == "fp32":
        raise ConfigError(f"fp8 {cfg.fp8!r} needs precision bf16 or fp16, got fp32")
    _check_data(cfg)
    if cfg.exit_interval is not None and cfg.exit_interval > cfg.train_iters:
        steps = "" if cfg.train_samples is None else f" (train_samples {cfg.train_samples} // global_batch_size)"
        raise ConfigError(f"exit_interval {cfg.exit_interval} is after train_iters {cfg.train_iters}{steps}: "
                          "it would never stop a run")
    if cfg.finetune and not cfg.load:
        raise ConfigError("finetune needs --load: the checkpoint whose weights start the run")
    _check_model_keys(cfg)


DYNAMIC_LOSS_SCALE = ("initial_loss_scale", "min_loss_scale", "loss_scale_window", "hysteresis")


def _check_loss_scale(cfg: TrainingConfig) -> None:
    """fp16's loss scaling (Megatron's grad scaler): a static `loss_scale`, or the dynamic
    scaler's keys; none of them means anything in another precision, nor the dynamic keys
    beside a static scale."""
    _positive(cfg, "loss_scale", *DYNAMIC_LOSS_SCALE)
    changed = [k for k in DYNAMIC_LOSS_SCALE if getattr(cfg, k) != FIELDS[k].default]
    if cfg.precision != "fp16":
        for name in (["loss_scale"] if cfg.loss_scale is not None else []) + changed:
            raise ConfigError(f"{name} {getattr(cfg, name)} is only used with precision fp16, "
                              f"got precision {cfg.precision!r}")
    if cfg.loss_scale is not None and changed:
        raise ConfigError(f"{changed[0]} {getattr(cfg, changed[0])} sets dynamic loss scaling, but loss_scale "
                          f"{cfg.loss_scale} makes the scale static; give one or the other")
    if cfg.min_loss_scale > cfg.initial_loss_scale:
        raise ConfigError(f"min_loss_scale {cfg.min_loss_scale} must be <= initial_loss_scale "
                          f"{cfg.initial_loss_scale}")


def _check_warmup(cfg: TrainingConfig) -> None:
    """The schedule's lengths in the run's one unit (Megatron-LM's asserts): iterations with
    train_iters, samples with train_samples; a warmup shorter than the decay."""
    samples = cfg.train_samples is not None
    unit = "samples" if samples else "iters"
    for kind in ("decay", "warmup", "wsd_decay"):
        iters, samples_key = f"lr_{kind}_iters", f"lr_{kind}_samples"
        if samples and getattr(cfg, iters):
            raise ConfigError(f"{iters} {getattr(cfg, iters)} counts iterations, but train_samples makes the run "
                              f"sample-based: give {samples_key} (as in Megatron-LM)")
        if not samples and getattr(cfg, samples_key):
            raise ConfigError(f"{samples_key} {getattr(cfg, samples_key)} counts samples, but the run counts "
                              f"iterations: give {iters}, or train_samples for a sample-based run (as in Megatron-LM)")
    warmup = cfg.lr_warmup_samples if samples else cfg.lr_warmup_iters
    decay = (cfg.lr_decay_samples or cfg.train_samples) if samples else (cfg.lr_decay_iters or cfg.train_iters)
    if cfg.lr_warmup_fraction is not None:
        if warmup:
            raise ConfigError(f"lr_warmup_fraction {cfg.lr_warmup_fraction} and lr_warmup_{unit} "
                              f"{warmup} exclude each other (as in Megatron-LM)")
        if not 0 <= cfg.lr_warmup_fraction < 1:
            raise ConfigError(f"lr_warmup_fraction {cfg.lr_warmup_fraction} must be in [0, 1)")
    elif warmup < 0 or warmup >= decay:
        raise ConfigError(f"lr_warmup_{unit} {warmup} must be >= 0 and below lr_decay_{unit} (or "
                          f"train_{unit}) {decay}; or give lr_warmup_fraction")
    _check_wsd(cfg, unit, decay)


def _check_wsd(cfg: TrainingConfig, unit: str, decay: int) -> None:
    """WSD's annealing: given with WSD only, and as long as the decay at most (Megatron-LM asserts
    that it is given)."""
    length = getattr(cfg, f"lr_wsd_decay_{unit}")
    if cfg.lr_decay_style != "WSD":
        given = [f"lr_wsd_decay_{unit} {length}"] if length is not None else []
        if cfg.lr_wsd_decay_style != "exponential":
            given.append(f"lr_wsd_decay_style {cfg.lr_wsd_decay_style!r}")
        if given:
            raise ConfigError(f"{' and '.join(given)} shape WSD's annealing, but lr_decay_style is "
                              f"{cfg.lr_decay_style!r}: pass --lr-decay-style WSD or leave them out")
        return
    if length is None:
        raise ConfigError(f"lr_decay_style 'WSD' needs lr_wsd_decay_{unit}, the length of its annealing "
                          f"(the last {unit} of the decay; as in Megatron-LM)")
    if not 0 < length <= decay:
        raise ConfigError(f"lr_wsd_decay_{unit} {length} must be in [1, lr_decay_{unit} (or train_{unit}) "
                          f"{decay}]: the annealing is the decay's last {unit}")


def _check_data(cfg: TrainingConfig) -> None:
    if cfg.split is not None:
        parse_split(cfg.split)
    if cfg.mock_data and (cfg.data_path or cfg.train_data_path):
        raise ConfigError(f"mock_data true and data_path {cfg.data_path or cfg.train_data_path} "
                          "exclude each other")
    if cfg.data_path and (cfg.train_data_path or cfg.valid_data_path):
        raise ConfigError(f"data_path {cfg.data_path} and train_data_path/valid_data_path exclude "
                          "each other (as in Megatron-LM): data_path is divided by split")
    if cfg.valid_data_path and not cfg.train_data_path:
        raise ConfigError(f"valid_data_path {cfg.valid_data_path} needs train_data_path")
    if cfg.train_data_path and not cfg.valid_data_path and cfg.eval_interval:
        raise ConfigError(f"train_data_path {cfg.train_data_path} needs valid_data_path to evaluate "
                          f"(eval_interval {cfg.eval_interval}); or set eval_interval none")


def _check_model_keys(cfg: TrainingConfig) -> None:
    """A known flavor, and every `model.<field>` a SpiralConfig field the model carries."""
    name = cfg.model.get("flavor")
    if name is None:
        raise ConfigError(f"model {cfg.model!r} needs a 'flavor' key; known: {', '.join(flavors.names())}")
    if name not in flavors.names():
        raise ConfigError(f"model.flavor: unknown flavor {name!r}; known flavors: {', '.join(flavors.names())}")
    model = model_overrides(cfg)
    fields = {f.name for f in dataclasses.fields(SpiralConfig)}
    for key, value in model.items():
        if key not in fields:
            close = difflib.get_close_matches(key, sorted(fields), n=1)
            hint = f"; did you mean --model.{close[0].replace('_', '-')}?" if close else ""
            raise ConfigError(f"unknown model key 'model.{key}' (value {value!r}): not a SpiralConfig "
                              f"field{hint}")
    model_fields.check(model)


def check_heads(cfg: TrainingConfig, fields: dict) -> None:
    """Tensor parallelism splits the heads: said in the job's words before Megatron says it in its."""
    heads = fields.get("num_attention_heads")
    if isinstance(heads, int) and heads % cfg.tensor_parallel:
        raise ConfigError(f"tensor_parallel {cfg.tensor_parallel} does not divide model "
                          f"num_attention_heads {heads}")


def check_model(cfg: TrainingConfig, spiral: SpiralConfig, seq: int, vocab_size: int) -> None:
    """The built SpiralConfig against the sequence layout, the pipeline plan and FP8."""
    try:
        schedule.check_sequence_layout(seq, spiral.levels, cfg.tensor_parallel, cfg.sequence_parallel)
    except ConfigError as e:
        raise ConfigError(f"seq_length {seq}: {e}") from None
    _check_pipeline(cfg, spiral, seq, vocab_size)
    _check_fp8(cfg, spiral, seq)


FP8_FORMATS = ("e4m3", "hybrid")
# Transformer Engine's FP8 GEMMs need their token count to be a multiple of this (by recipe).
FP8_TOKEN_MULTIPLE = {"delayed": 16, "tensorwise": 16, "mxfp8": 32, "blockwise": 128}


def _check_fp8(cfg: TrainingConfig, spiral: SpiralConfig, seq: int) -> None:
    """The recipe must suit the loop, and every GEMM of every resolution must have a token
    count FP8 can take (docs/MEGATRON-ON-CPU.md): prelude and coda see seq_length tokens per sample,
    the core at chunk size g sees padded_length / g (the loop pads to a multiple of every chunk
    size), each / tp under SP, x micro_batch_size."""
    if cfg.fp8 is None:
        return
    multiple = FP8_TOKEN_MULTIPLE.get(cfg.fp8_recipe)
    if multiple is None:
        raise ConfigError(f"fp8_recipe {cfg.fp8_recipe!r} must be one of {tuple(FP8_TOKEN_MULTIPLE)}")
    if cfg.fp8_recipe == "delayed" and spiral.num_loops > 1:
        # One amax history per TE module, and Megatron opens one autocast region around the
        # block: T calls at different resolutions per step would share (and corrupt) it.
        raise ConfigError(
            f"fp8_recipe 'delayed' with a loop of {spiral.num_loops} iterations (chunk_sizes "
            f"{spiral.chunk_sizes}): delayed scaling keeps one amax history per module and the core "
            f"runs each module {spiral.num_loops} times per step; use tensorwise, blockwise or mxfp8")
    split, mbs = cfg.tensor_parallel if cfg.sequence_parallel else 1, cfg.micro_batch_size
    padded = schedule.padded_length(seq, spiral.levels)
    gemms = [(f"the core at chunk size {g}", padded, g) for g in sorted(set(spiral.chunk_sizes), reverse=True)]
    if spiral.num_layers > spiral.num_core_layers:
        gemms.append(("prelude/coda (full resolution)", seq, 1))
    tp = f" / tp {split}" if split > 1 else ""
    for where, length, g in gemms:
        tokens = length // g // split * mbs
        if tokens % multiple:
            pad = f" padded to {length}" if length != seq else ""
            raise ConfigError(
                f"fp8 {cfg.fp8!r} with fp8_recipe {cfg.fp8_recipe!r}: {where} sees seq_length {seq}{pad} / {g}{tp} "
                f"x micro_batch_size {mbs} = {tokens} tokens per GEMM, not a multiple of {multiple}")


def _check_pipeline(cfg: TrainingConfig, spiral: SpiralConfig, seq: int, vocab_size: int) -> None:
    """The model's own pipeline plan (pure Python), so a bad layout fails before any build."""
    pp = cfg.pipeline_parallel
    where = (f"pipeline_parallel {pp}, model.loop_placement {spiral.loop_placement!r}, "
             f"model.pipeline_split {spiral.pipeline_split}")
    try:
        stages = pipeline_plan.plan(spiral, seq, vocab_size, pp, spiral.loop_placement, spiral.pipeline_split)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    loop_stages = sum(1 for stage in stages if stage.span("loop"))
    multiple = schedule.padding_multiple(spiral.levels)
    if loop_stages > 1 and seq % multiple:
        # A stage inside the loop only sees the padded state, not the true length (model.py).
        raise ConfigError(f"{where}: seq_length {seq} must be a multiple of {multiple} (every chunk "
                          f"size of {spiral.chunk_sizes}) when the loop spans {loop_stages} pipeline "
                          "stages; use a multiple, or model.loop_placement one-stage")


def check_world(cfg: TrainingConfig, world_size: int) -> int:
    """Refuse a layout the world size cannot hold; returns the data-parallel size."""
    model_parallel = cfg.tensor_parallel * cfg.pipeline_parallel
    if world_size < model_parallel:
        raise ConfigError(f"tensor_parallel {cfg.tensor_parallel} x pipeline_parallel {cfg.pipeline_parallel} "
                          f"needs at least {model_parallel} processes; {world_size} were started "
                          "(torchrun --nproc_per_node x nodes)")
    if world_size % model_parallel:
        raise ConfigError(f"world size {world_size} is not a multiple of tensor_parallel "
                          f"{cfg.tensor_parallel} x pipeline_parallel {cfg.pipeline_parallel}")
    dp = world_size // model_parallel
    if cfg.global_batch_size % (cfg.micro_batch_size * dp):
        raise ConfigError(f"global_batch_size {cfg.global_batch_size} is not a multiple of "
                          f"micro_batch_size {cfg.micro_batch_size} x data-parallel size {dp}")
    return dp
