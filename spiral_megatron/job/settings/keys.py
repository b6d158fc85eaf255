"""TrainingConfig: one flat, typed set of keys (what a job asks for; job/settings/resolve.py
resolves them with the flavor into what the job runs).

A plain module at the bottom of job/settings/: every other module reads the keys from here;
`config.py` fills them from YAML and the command line, `checks.py` refuses impossible ones
(docs/CONFIG.md). Every key has a type and a one-line docstring. The model is a flavor name plus
SpiralConfig overrides: `model: {flavor: debug, hidden_size: 128}` in YAML,
`--model.hidden_size 128` on the command line.
"""

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import yaml

from spiral_megatron.errors import ConfigError  # noqa: F401 (the names callers read from here)

PRECISIONS = ("fp32", "bf16", "fp16")
LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
LR_WSD_DECAY_STYLES = ("exponential", "linear", "cosine", "minus_sqrt")
BACKENDS = ("auto", "gloo", "nccl")


@dataclass(frozen=True)
class TrainingConfig:
    """Everything `pretrain_spiral.py` is asked; saved as config.yaml beside each checkpoint."""

    model: Dict[str, Any] = field(default_factory=lambda: {"flavor": "debug"})
    """`flavor` (see spiral_megatron.config.flavors) plus any SpiralConfig field overrides."""

    seq_length: Optional[int] = None
    """Tokens per sample; None = the flavor's."""

    rotary_base: int = 10000
    """RoPE base period (Megatron-LM's --rotary-base; recorded in model_args.json, rope_theta in
    the Hugging Face config)."""

    rotary_percent: float = 1.0
    """Fraction of each head's dimensions that RoPE rotates, in (0, 1] (Megatron-LM's --rotary-percent)."""

    tensor_parallel: int = 1
    """Tensor model parallel size."""

    pipeline_parallel: int = 1
    """Pipeline model parallel size; where the loop goes: `model.loop_placement`, `model.pipeline_split`."""

    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs tensor_parallel > 1)."""

    micro_batch_size: int = 8
    """Samples per micro-batch per data-parallel rank."""

    global_batch_size: int = 16
    """Samples per optimizer step over all data-parallel ranks (gradient accumulation fills it)."""

    train_iters: int = 300
    """Optimizer steps to train for (or give train_samples)."""

    train_samples: Optional[int] = None
    """Samples to train on instead of train_iters (Megatron-LM's sample-based training): the run
    takes train_samples // global_batch_size steps, and the LR schedule's lengths are samples
    (lr_warmup_samples, lr_decay_samples) instead of iterations."""

    exit_interval: Optional[int] = None
    """Save and stop after an iteration divisible by this (Megatron-LM's: the same command run
    again trains that many more steps; the schedule still assumes train_iters)."""

    exit_duration_in_mins: Optional[float] = None
    """Save and stop after the first step that ends this many minutes after the job started
    (Megatron-LM's: a cluster's time limit; every rank stops at the same step)."""

    lr: float = 3e-3
    """Peak learning rate."""

    min_lr: float = 3e-4
    """Learning rate at the end of the decay."""

    lr_warmup_iters: int = 0
    """Linear warmup steps from 0 to lr (excludes lr_warmup_fraction)."""

    lr_warmup_fraction: Optional[float] = None
    """Warmup as a fraction of the decay (lr_decay_iters or train_iters; with train_samples,
    lr_decay_samples or train_samples), as Megatron-LM's; None = lr_warmup_iters (or _samples)."""

    lr_decay_iters: Optional[int] = None
    """Steps over which lr decays to min_lr; None = train_iters."""

    lr_warmup_samples: int = 0
    """With train_samples: linear warmup over this many samples (excludes lr_warmup_fraction)."""

    lr_warmup_init: float = 0.0
    """The learning rate the linear warmup starts from (Megatron-LM's --lr-warmup-init)."""

    lr_decay_samples: Optional[int] = None
    """With train_samples: samples over which lr decays to min_lr; None = train_samples."""

    lr_decay_style: str = "cosine"
    """The decay from lr to min_lr after the warmup: constant, linear, cosine, inverse-square-root or
    WSD (warmup-stable-decay: lr until the last lr_wsd_decay_iters of the decay, then the
    annealing of lr_wsd_decay_style), as Megatron-LM's --lr-decay-style."""

    lr_wsd_decay_style: str = "exponential"
    """WSD only: the annealing's shape, exponential, linear, cosine or minus_sqrt (Megatron-LM's
    --lr-wsd-decay-style and default)."""

    lr_wsd_decay_iters: Optional[int] = None
    """WSD only: the annealing's length in steps, the last ones of the decay (Megatron-LM's
    --lr-wsd-decay-iters); a WSD run needs it, or lr_wsd_decay_samples with train_samples."""

    lr_wsd_decay_samples: Optional[int] = None
    """WSD with train_samples: the annealing's length in samples (Megatron-LM's --lr-wsd-decay-samples)."""

    weight_decay: float = 0.1
    """AdamW weight decay."""

    adam_beta1: float = 0.9
    """Adam beta1."""

    adam_beta2: float = 0.95
    """Adam beta2."""

    adam_eps: float = 1e-8
    """Adam epsilon."""

    clip_grad: float = 1.0
    """Clip the global gradient norm to this (0 = no clipping)."""

    precision: str = "fp32"
    """"fp32", "bf16" or "fp16" (fp16 uses Megatron's dynamic loss scaling); on CPU too."""

    loss_scale: Optional[float] = None
    """fp16 only: a static loss scale; None = dynamic (the four keys below)."""

    initial_loss_scale: float = 2.0 ** 32
    """fp16, dynamic scaling: the first loss scale (Megatron-LM's --initial-loss-scale)."""

    min_loss_scale: float = 1.0
    """fp16, dynamic scaling: the scale never falls below this (Megatron-LM's --min-loss-scale)."""

    loss_scale_window: int = 1000
    """fp16, dynamic scaling: steps without overflow before the scale doubles (--loss-scale-window)."""

    hysteresis: int = 2
    """fp16, dynamic scaling: overflows in a row before the scale halves (Megatron-LM's --hysteresis)."""

    manual_gc: bool = False
    """Turn Python's automatic garbage collection off during training and collect at known points
    instead (every manual_gc_interval steps, around evaluations), so that ranks do not stall
    one another at random collections (Megatron-LM's --manual-gc)."""

    manual_gc_interval: int = 0
    """With manual_gc: collect every this many steps; 0 = only at the start and around evaluations."""

    manual_gc_eval: bool = True
    """With manual_gc: collect before and after each evaluation (--no-manual-gc-eval: not)."""

    empty_unused_memory_level: int = 0
    """Return the CUDA caching allocator's unused blocks to the device: 1 after each step's
    forward-backward and each evaluation batch, 2 also after the optimizer step; 0 = never
    (Megatron-LM's; costs time, helps against fragmentation)."""

    fp8: Optional[str] = None
    """Transformer Engine FP8 format ("e4m3" or "hybrid"); None = off. Needs GPUs and TE."""

    fp8_recipe: str = "tensorwise"
    """TE FP8 recipe; the looped core needs a per-call recipe (docs/MEGATRON-ON-CPU.md)."""

    use_distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (Megatron's distributed optimizer)."""

    ddp_bucket_size: Optional[int] = None
    """Elements per gradient bucket of Megatron DDP, as Megatron-LM's --ddp-bucket-size; None =
    Megatron's max(4e7, 1e6 x data-parallel size). Megatron splits only the first pipeline
    stage's gradients by size."""

    seed: int = 1234
    """Seed for model init and the training data order."""

    valid_seed: int = 1234
    """Seed of the validation samples' order, apart from `seed` so that runs of any seed score
    the same validation sequences."""

    data_path: Optional[List[str]] = None
    """Indexed dataset prefixes, optionally weighted ("0.7 a 0.3 b"), divided by `split`;
    None = the embedded corpus (or train_data_path and valid_data_path)."""

    train_data_path: Optional[List[str]] = None
    """Training data used whole, as Megatron-LM's --train-data-path (excludes data_path)."""

    valid_data_path: Optional[List[str]] = None
    """Validation data used whole, as Megatron-LM's --valid-data-path (with train_data_path)."""

    mock_data: bool = False
    """Train on Megatron's MockGPTDataset (random tokens) instead of text."""

    eod_mask_loss: bool = False
    """Leave out of the loss the predictions made from an end-of-document token (the first token of
    the next document), as Megatron-LM's --eod-mask-loss."""

    mmap_bin_files: bool = True
    """Read the datasets' .bin files through a memory map; false (--no-mmap-bin-files) reads
    them with file reads instead, for file systems where a memory map is slow (Megatron-LM's)."""

    split: Optional[str] = None
    """Train/valid/test split of data_path's documents, as Megatron's --split (the test part is
    never read); None = 969,30,1, or for data too small for it the fewest last documents that
    fill a validation sample (printed)."""

    tokenizer: Optional[str] = None
    """Folder or tokenizer.json of a Hugging Face tokenizer; None = the embedded corpus's."""

    tokenizer_vocab_size: int = 512
    """Vocabulary of the BPE trained on the embedded corpus (or of mock data); with `tokenizer`,
    read from it. The embedded corpus's BPE must reach it exactly (at least 257 tokens)."""

    make_vocab_size_divisible_by: int = 128
    """Pad the embedding rows to a multiple of this x tensor_parallel."""

    cache_dir: Optional[str] = None
    """Where the embedded corpus and dataset indices are cached; None = $SPIRAL_CACHE or
    ~/.cache/spiral_megatron."""

    log_interval: int = 10
    """Log every this many steps."""

    eval_interval: Optional[int] = 100
    """Evaluate every this many steps and at the end; None = never."""

    eval_iters: int = 10
    """Validation batches per evaluation; 0 = no evaluation (Megatron-LM's), as eval_interval none."""

    save: Optional[str] = "checkpoints/debug"
    """Checkpoint folder; None = do not save."""

    save_interval: Optional[int] = None
    """Save every this many steps (and always at the end); None = only at the end."""

    load: Optional[str] = None
    """Resume from this checkpoint folder (its latest_checkpointed_iteration.txt)."""

    async_save: bool = False
    """Write checkpoints in a background process (Megatron's async save) while training goes on."""

    finetune: bool = False
    """Start from --load's model weights at iteration 0, with a fresh optimizer, LR schedule, RNG
    and data position (Megatron-LM's flag); once --save holds this run's own checkpoint, the
    same command resumes that instead."""

    use_checkpoint_args: bool = False
    """Take the model from the --load checkpoint (its model_args.json: every field of the model's
    function, its rotary settings and embedding rows, and its sequence length unless --seq-length
    is given), as
    Megatron-LM's flag does: to fine-tune a converted model without restating its shape. A
    command-line model field that contradicts the checkpoint is refused."""

    use_tokenizer_model_from_checkpoint_args: bool = True
    """With use_checkpoint_args and no tokenizer given: the checkpoint's tokenizer (Megatron-LM's;
    --no-use-tokenizer-model-from-checkpoint-args: the data's, as without use_checkpoint_args)."""

    no_load_optim: bool = False
    """On resume, start the optimizer fresh: load weights, LR schedule, data position (Megatron-LM's flag)."""

    no_load_rng: bool = False
    """On resume, keep this run's RNG states instead of the checkpoint's (Megatron-LM's flag)."""

    exit_on_missing_checkpoint: bool = False
    """Refuse to start when --load holds no checkpoint, instead of training from scratch
    (Megatron-LM's flag)."""

    dist_ckpt_optim_fully_reshardable: bool = False
    """Save distributed-optimizer state in a format that reloads at any TP/PP layout; the default
    reloads at the saved TP/PP only but writes without gathering (Megatron-LM's flag)."""

    override_opt_param_scheduler: bool = False
    """On resume, this run's LR schedule replaces the checkpoint's (Megatron-LM's flag)."""

    use_checkpoint_opt_param_scheduler: bool = False
    """On resume, the checkpoint's LR schedule is kept, not this run's (Megatron-LM's flag)."""

    check_for_spiky_loss: bool = False
    """Stop, before saving, at a loss 10x the largest of the first 100 steps (Megatron-LM's flag)."""

    check_for_large_grads: bool = False
    """Stop, before saving, at a gradient norm 10x the largest of the first 100 steps."""

    log_json: Optional[str] = None
    """Append one JSON object per logged step to this file."""

    log_params_norm: bool = False
    """Log the global 2-norm of the weights (params_norm) at each log line (Megatron-LM's flag; with
    --overlap-param-gather it finishes the deferred all-gather of the weights first)."""

    log_num_zeros_in_grad: bool = False
    """Log how many gradient entries are zero (num_zeros) at each log line (Megatron-LM's flag)."""

    tensorboard_dir: Optional[str] = None
    """TensorBoard event folder (needs the `tensorboard` package)."""

    peak_tflops: Optional[float] = None
    """Peak dense TFLOP/s per device for MFU; None = from the GPU's name (unknown on CPU)."""

    check_memory: bool = True
    """Refuse, before the first step, a run whose estimated memory per process (a lower bound,
    job/run/memory.py) exceeds what the device or host has."""

    backend: str = "auto"
    """torch.distributed backend: "auto" (nccl with CUDA, else gloo), "gloo" or "nccl"."""

    distributed_timeout_minutes: int = 10
    """How long a collective waits for the other ranks before the job fails, for the process group
    and Megatron's groups (Megatron-LM's flag and default)."""

    num_workers: int = 2
    """Data loader processes per rank that prepare batches off the training thread, into pinned
    memory on GPUs (Megatron-LM's --num-workers); 0 = in the training thread."""

    print_config: bool = False
    """Print the whole resolved config on the console too; it is always written to the save
    folder's config.yaml (Megatron-LM prints it; NeMo writes hparams.yaml)."""

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


FIELDS = {f.name: f for f in dataclasses.fields(TrainingConfig)}
TYPES = typing.get_type_hints(TrainingConfig)


def coerce(key: str, value: Any, tp) -> Any:
    """`value` as type `tp`, or a ConfigError naming key and value."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return coerce(key, value, next(a for a in args if a is not type(None)))
    if origin in (list, List):
        if isinstance(value, str):
            value = value.replace(",", " ").split()
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: {value!r} is not a list")
        return [coerce(key, v, args[0]) for v in value]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: {value!r} is not a mapping")
        return dict(value)
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        elif isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        try:
            if not isinstance(value, bool):
                return float(value)
        except (TypeError, ValueError):
            pass
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{key}: {value!r} is not of type {getattr(tp, '__name__', tp)}")


def model_overrides(cfg: TrainingConfig) -> Dict[str, Any]:
    """The SpiralConfig overrides of `cfg.model` (all but `flavor`); SpiralConfig parses
    list fields given as strings ("8,4,2,1", "3,3")."""
    return {k: v for k, v in cfg.model.items() if k != "flavor"}
