"""The job's command line as Megatron-LM users type it: flag names, `--help`, typo hints.

Every TrainingConfig key is a flag (`--micro-batch-size 8` or `--micro_batch_size=8`). On top:
- Megatron-LM's names where ours differ (ALIASES), and `--bf16`/`--fp16` for the precision;
- any SpiralConfig / TransformerConfig field as a top-level flag (`--hidden-size 128` is
  `--model.hidden_size 128`), as Megatron-LM takes model fields at the top level;
- a key nobody knows is refused with the closest known one.
"""

import ast
import dataclasses
import difflib
import inspect
import textwrap
import typing
from typing import Any, Dict, List, Tuple

from spiral_megatron.config.spiral_config import SpiralConfig
from spiral_megatron.config.fields import FUNCTION, kind_of
from spiral_megatron.job.settings.keys import ConfigError

# Megatron-LM flag (underscored) -> (our key, value or None to keep the given one)
ALIASES: Dict[str, Tuple[str, Any]] = {
    "tensor_model_parallel_size": ("tensor_parallel", None),
    "pipeline_model_parallel_size": ("pipeline_parallel", None),
    "fp8_format": ("fp8", None),
    "bf16": ("precision", "bf16"),
    "fp16": ("precision", "fp16"),
    "tokenizer_model": ("tokenizer", None),
    "distributed_backend": ("backend", None),
    "data_cache_path": ("cache_dir", None),
    "no_bias_gelu_fusion": ("model.bias_activation_fusion", False),
    "no_rope_fusion": ("model.apply_rope_fusion", False),
    "disable_bias_linear": ("model.add_bias_linear", False),
    "recompute_activations": ("model.recompute_granularity", "selective"),
    "norm_epsilon": ("model.layernorm_epsilon", None),
    "apply_layernorm_1p": ("model.layernorm_zero_centered_gamma", True),
    "no_bias_swiglu_fusion": ("model.bias_activation_fusion", False),
    "fp8_param_gather": ("model.fp8_param", True),
    "no_mmap_bin_files": ("mmap_bin_files", False),
    "no_manual_gc_eval": ("manual_gc_eval", False),
    "no_use_tokenizer_model_from_checkpoint_args": ("use_tokenizer_model_from_checkpoint_args", False),
}
# Megatron-LM flags that set several fields at once: flag -> the (key, value) pairs it means.
FLAG_SETS: Dict[str, Tuple[Tuple[str, Any], ...]] = {
    "swiglu": (("model.gated_linear_unit", True), ("model.activation_func", "silu")),
}
# Megatron-LM flags for what the job always does: flag -> (the one value it takes, what the job
# does). Taken with that value (a launch script carries them over), refused with any other.
# NEEDS: the key such a flag needs set, and why (else the job would not do what the flag means).
NEEDS = {"overlap_param_gather": ("use_distributed_optimizer", "as Megatron-LM asserts"),
         "group_query_attention": ("model.num_query_groups", "Megatron-LM would take 1: multi-query attention")}
FIXED: Dict[str, Tuple[Any, str]] = {
    "overlap_grad_reduce": (True, "overlaps the gradient reduction with the backward pass"),
    "overlap_param_gather": (True, "overlaps the distributed optimizer's parameter all-gather with the forward "
                                   "pass (with --use-distributed-optimizer)"),
    "accumulate_allreduce_grads_in_fp32": (True, "reduces gradients in fp32"),
    "untie_embeddings_and_output_weights": (True, "keeps the output layer apart from the word embeddings"),
    "use_mcore_models": (True, "builds Megatron-Core models"),
    "position_embedding_type": ("rope", "uses rotary position embeddings"),
    "ckpt_format": ("torch_dist", "saves Megatron-Core's torch_dist checkpoints"),
    "use_dist_ckpt": (True, "saves Megatron-Core's torch_dist checkpoints (Megatron-LM's deprecated flag for it)"),
    "tokenizer_type": ("HuggingFaceTokenizer", "reads a Hugging Face tokenizer.json (--tokenizer-model DIR; "
                                               "--mock-data for none)"),
    "use_rotary_position_embeddings": (True, "uses rotary position embeddings"),
    "no_position_embedding": (True, "learns no position embeddings (rotary positions only)"),
    "group_query_attention": (True, "applies --num-query-groups (grouped-query attention; Megatron-LM would "
                                    "default it to 1, multi-query)"),
    "dataloader_type": ("single", "reads samples in order from the consumed-sample position (Megatron's "
                                  "pretraining sampler)"),
    "no_create_attention_mask_in_dataloader": (True, "builds no attention mask (attention is causal without one)"),
    "log_throughput": (True, "logs tokens/s and TFLOP/s at every log line"),
    "weight_decay_incr_style": ("constant", "keeps the weight decay constant"),
    "optimizer": ("adam", "uses Megatron's Adam with decoupled weight decay (AdamW)"),
    "exit_signal_handler": (True, "saves a checkpoint and exits at the end of the step in which SIGTERM or SIGINT "
                                  "arrives"),
    "check_for_nan_in_loss_and_grad": (True, "stops at a non-finite loss or gradient norm, before that step is "
                                             "saved"),
    "log_memory_to_tensorboard": (True, "logs memory (memory_gib) with every log line, to --tensorboard-dir too"),
    "log_validation_ppl_to_tensorboard": (True, "logs the validation loss and perplexity, to --tensorboard-dir too"),
    "log_loss_scale_to_tensorboard": (True, "logs fp16's loss scale with every log line, to --tensorboard-dir too"),
}
# Megatron-LM flags the job has no equivalent for: flag -> what to do instead (refused in one line).
INSTEAD: Dict[str, str] = {
    "num_layers": "depth is --model.num_prelude_layers + --model.num_core_layers x len(chunk_sizes) + "
                  "--model.num_coda_layers (leave --num-layers out)",
    "max_position_embeddings": "the model has rotary positions only, no table of them: its length is "
                               "--seq-length (leave --max-position-embeddings out)",
    "vocab_file": "GPT2BPETokenizer's vocab and merges files are not read: pass --tokenizer-model with a Hugging "
                  "Face tokenizer.json (tokenizers' ByteLevelBPETokenizer(VOCAB, MERGES).save('DIR/tokenizer.json') "
                  "writes the same tokenizer)",
    "rampup_batch_size": "batch-size ramp-up is not built: train at the full --global-batch-size",
    "use_flash_attn": "the attention kernel is --attention-backend's (auto: Transformer Engine's flash or fused "
                      "attention where it is installed, else torch's scaled_dot_product_attention, which runs "
                      "flash kernels on GPUs)",
    "wandb_project": "Weights & Biases logging is not built: the job logs to --tensorboard-dir and --log-json "
                     "(one JSON line per logged step)",
}
INSTEAD.update({
    "no_check_for_nan_in_loss_and_grad": "the job always stops at a non-finite loss or gradient norm, before that "
                                         "step is saved (leave it out)",
    "grad_reduce_in_bf16": "the job reduces gradients in fp32 (Megatron-LM's --accumulate-allreduce-grads-in-fp32)",
    "decoupled_lr": "one learning rate schedule for every parameter: a separate one for the embedding and output "
                    "layer is not built (leave --decoupled-lr and --decoupled-min-lr out)",
    "reset_attention_mask": "a sample's documents are not separated: attention and the loop's chunks run over the "
                            "whole sample (--eod-mask-loss leaves the predictions across a document boundary out "
                            "of the loss)",
    "step_batch_size_schedule": "batch-size ramp-up is not built: train at the full --global-batch-size",
    "use_precision_aware_optimizer": "needs Transformer Engine's FusedAdam: the job runs Megatron's Adam on fp32 "
                                     "main weights",
    "decoder_first_pipeline_num_layers": "pipeline stages are sized by --model.pipeline_split (layers per stage) "
                                         "and --model.loop_placement",
    "num_layers_per_virtual_pipeline_stage": "the interleaved (virtual) pipeline schedule is not supported",
    "timing_log_level": "Megatron's timers are not built: each log line has the mean step time (step_time_s in "
                        "--log-json), and benchmarks/step_time.py times a step",
    "use_rope_scaling": "Llama 3.1's RoPE scaling is not built: rotary positions take --rotary-base and "
                        "--rotary-percent",
    "squared_relu": "the MLP's activations are gelu, gelu_tanh, silu (--swiglu) and relu "
                    "(--model.activation_func relu)",
    "disable_gloo_process_groups": "the job keeps Megatron's gloo groups (on CPUs they carry every collective)",
    "profile": "profiling is not built into the job: run benchmarks/step_time.py (one step's time) under nsys "
               "or torch.profiler",
    "no_save_optim": "every checkpoint holds what resuming needs (optimizer, RNG, data position); "
                     "tools/convert_to_hf.py writes the weights alone",
    "ckpt_fully_parallel_save": "the job saves with Megatron-Core's torch_dist strategy as it is (each shard "
                                "written by its main replica): the fully parallel wrappers are not built",
    "use_torch_fsdp2": "FSDP is not built: --use-distributed-optimizer shards the optimizer state over "
                       "data-parallel ranks (ZeRO-1)",
    "tensorboard_log_interval": "--tensorboard-dir gets every log line: --log-interval sets both",
    "skip_train": "an evaluation-only run is not built: tools/evaluate.py --model CHECKPOINT --data PREFIX scores "
                  "a checkpoint of any TP/PP layout on indexed data or text (loss and perplexity)",
    "test_data_path": "the test split is never read (nor is --split's third part): leave --test-data-path out; "
                      "tools/evaluate.py --model CHECKPOINT --data PREFIX scores a checkpoint on any data",
    "num_experts": "mixture-of-experts layers are not built: the prelude, core and coda are dense layers",
    "yaml_cfg": "the job's YAML is --config FILE.yaml, with the flat keys --help lists (Megatron-LM's --yaml-cfg "
                "sections are not read)",
    "vocab_size": "the vocabulary is the tokenizer's; with --mock-data it is --tokenizer-vocab-size (Megatron-LM's "
                  "NullTokenizer adds one for its end-of-document token: pass N + 1)",
})
INSTEAD["merge_file"] = INSTEAD["vocab_file"]
INSTEAD["wandb_exp_name"] = INSTEAD["wandb_save_dir"] = INSTEAD["wandb_project"]
INSTEAD["decoupled_min_lr"] = INSTEAD["decoupled_lr"]
INSTEAD["reset_position_ids"] = INSTEAD["reset_attention_mask"]
INSTEAD["decoder_last_pipeline_num_layers"] = INSTEAD["decoder_first_pipeline_num_layers"]
INSTEAD["timing_log_option"] = INSTEAD["log_timers_to_tensorboard"] = INSTEAD["timing_log_level"]
INSTEAD["rope_scaling_factor"] = INSTEAD["use_rope_scaling"]
INSTEAD["use_pytorch_profiler"] = INSTEAD["profile_step_start"] = INSTEAD["profile_step_end"] = \
    INSTEAD["profile_ranks"] = INSTEAD["profile"]
INSTEAD["no_save_rng"] = INSTEAD["no_save_optim"]
INSTEAD["ckpt_fully_parallel_load"] = INSTEAD["ckpt_fully_parallel_save"]
INSTEAD["use_megatron_fsdp"] = INSTEAD["use_torch_fsdp2"]

# Help sections: (title, keys); every TrainingConfig key is in exactly one (a test checks).
GROUPS: List[Tuple[str, Tuple[str, ...]]] = [
    ("model", ("model", "seq_length", "rotary_base", "rotary_percent", "make_vocab_size_divisible_by")),
    ("data", ("data_path", "split", "train_data_path", "valid_data_path", "mock_data", "eod_mask_loss",
              "mmap_bin_files", "tokenizer",
              "tokenizer_vocab_size", "cache_dir", "valid_seed", "num_workers")),
    ("training", ("micro_batch_size", "global_batch_size", "train_iters", "train_samples", "exit_interval",
                  "exit_duration_in_mins", "lr", "min_lr", "lr_warmup_iters", "lr_warmup_fraction", "lr_decay_iters",
                  "lr_warmup_samples", "lr_warmup_init", "lr_decay_samples", "lr_decay_style", "lr_wsd_decay_style",
                  "lr_wsd_decay_iters", "lr_wsd_decay_samples", "weight_decay",
                  "adam_beta1",
                  "adam_beta2", "adam_eps",
                  "clip_grad", "precision", "loss_scale", "initial_loss_scale", "min_loss_scale",
                  "loss_scale_window", "hysteresis", "fp8", "fp8_recipe", "seed", "manual_gc", "manual_gc_interval",
                  "manual_gc_eval", "empty_unused_memory_level",
                  "check_for_spiky_loss", "check_for_large_grads")),
    ("parallelism", ("tensor_parallel", "pipeline_parallel", "sequence_parallel",
                     "use_distributed_optimizer", "ddp_bucket_size", "backend", "distributed_timeout_minutes",
                     "check_memory")),
    ("checkpointing", ("save", "save_interval", "load", "async_save", "override_opt_param_scheduler",
                       "use_checkpoint_opt_param_scheduler", "finetune", "use_checkpoint_args",
                       "use_tokenizer_model_from_checkpoint_args", "no_load_optim",
                       "no_load_rng", "exit_on_missing_checkpoint", "dist_ckpt_optim_fully_reshardable")),
    ("logging", ("log_interval", "eval_interval", "eval_iters", "log_json", "log_params_norm",
                 "log_num_zeros_in_grad", "tensorboard_dir",
                 "peak_tflops", "print_config")),
]


def field_docs(cls) -> Dict[str, str]:
    """The docstring under each field of dataclass `cls` (and its dataclass bases), joined."""
    docs: Dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            body = ast.parse(inspect.getsource(klass)).body[0].body
        except (OSError, TypeError, IndexError):
            continue
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def model_fields() -> Dict[str, dataclasses.Field]:
    """SpiralConfig's init fields (TransformerConfig's included), by name."""
    return {f.name: f for f in dataclasses.fields(SpiralConfig) if f.init}


def canonical(raw_key: str, value: Any, known) -> List[Tuple[str, Any]]:
    """(key, value) pairs that `--raw_key value` means; `known`: our top-level keys."""
    key = raw_key.replace("-", "_")
    if key in known or key.startswith("model.") or key == "config":
        return [(key, value)]
    if key in ALIASES:
        target, fixed = ALIASES[key]
        return [(target, value if fixed is None else _flag(raw_key, value, fixed))]
    if key in FLAG_SETS:
        meaning = FLAG_SETS[key]
        _flag(raw_key, value, ", ".join(f"{k} {v}" for k, v in meaning))
        return list(meaning)
    if key in INSTEAD:
        raise ConfigError(f"--{raw_key} {value!r}: {INSTEAD[key]}")
    if key in FIXED:
        only, does = FIXED[key]
        if value != only and not (only is True and value == "true"):
            raise ConfigError(f"--{raw_key} {value!r}: the job always {does}; "
                              f"{'leave it out' if only is True else f'the one value is {only!r}'}")
        return [(None, NEEDS.get(key))]  # means what the job does anyway (given the key it needs)
    if key in model_fields():
        return [(f"model.{key}", value)]
    bool_key = key[3:] if key.startswith("no_") else None  # Megatron-LM's --no-X-fusion style
    if bool_key in model_fields() and model_fields()[bool_key].type in (bool, "bool"):
        return [(f"model.{bool_key}", _flag(raw_key, value, False))]
    return []


def _flag(raw_key: str, value: Any, fixed: Any) -> Any:
    """`fixed` for a bare --flag; anything else given to a flag is an error."""
    if value not in (True, "true"):
        raise ConfigError(f"--{raw_key} is a flag (it means {fixed}); got value {value!r}")
    return fixed


def unknown_key_message(raw_key: str, value: Any, known) -> str:
    """One line: the key is unknown, the closest known key, and where to find them all."""
    key = raw_key.replace("-", "_")
    names = list(known) + list(ALIASES) + list(FLAG_SETS) + list(FIXED) + [f"model.{k}" for k in model_fields()]
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    hint = f"; did you mean --{close[0].replace('_', '-')}?" if close else ""
    return f"unknown config key {raw_key!r} (value {value!r}){hint} (--help lists every key)"


def _type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        return _type_name(next(a for a in args if a is not type(None))) + "?"
    if origin in (list, List):
        return f"list[{_type_name(args[0])}]"
    if origin in (dict, Dict):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def help_text(cls) -> str:
    """`--help`: every key of TrainingConfig `cls` with type, default and help, by section."""
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    defaults = {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
                for f in dataclasses.fields(cls)}
    reverse = {}
    for alias, (target, fixed) in ALIASES.items():
        reverse.setdefault(target, []).append(f"--{alias.replace('_', '-')}" + ("" if fixed is None else f" (= {fixed})"))
    lines = ["usage: torchrun [--nproc_per_node=N] examples/pretrain_spiral.py [--config FILE.yaml] "
             "[--key value ...]",
             "",
             "Keys take --key value, --key=value, or a bare --flag for true; dashes and underscores "
             "are the same. A YAML --config sets any of them (default examples/configs/debug-cpu.yaml, "
             "which overrides some defaults below); the command line wins.",
             "Megatron-LM's flag names are accepted (shown as 'also'), and any model field at the "
             "top level (--hidden-size 128 = --model.hidden_size 128)."]
    for title, keys in GROUPS:
        lines += ["", f"{title}:"]
        for key in keys:
            also = f" (also {', '.join(reverse[key])})" if key in reverse else ""
            lines.append(f"  --{key.replace('_', '-')} {_type_name(hints[key])} "
                         f"[default: {defaults[key]!r}]{also}")
            lines.append(f"      {docs.get(key, '')}")
        if title == "model":
            lines += model_help()
    lines += ["", "Megatron-LM flags that set several fields:"]
    lines += [f"  --{flag.replace('_', '-')} = " + ", ".join(f"--{k} {v}" for k, v in meaning)
              for flag, meaning in FLAG_SETS.items()]
    lines += ["", "Megatron-LM flags for what the job always does (taken with this value only):"]
    lines += [f"  --{flag.replace('_', '-')}{'' if only is True else f' {only}'}: the job always {does}"
              for flag, (only, does) in FIXED.items()]
    lines += ["", "Megatron-LM flags with no equivalent (refused, saying what to do):"]
    lines += [f"  --{flag.replace('_', '-')}: {instead}" for flag, instead in INSTEAD.items()]
    return "\n".join(lines)


def model_help() -> List[str]:
    """The `--model.FIELD` part of --help: the field classes (docs/CONFIG.md), the FUNCTION
    fields of TransformerConfig, and the loop's own fields with their class."""
    own = field_docs(SpiralConfig)
    kinds = {f.name: kind_of(f) for f in dataclasses.fields(SpiralConfig)}
    megatron = sorted(n for n, k in kinds.items() if k == FUNCTION and n not in SpiralConfig.__annotations__)
    lines = ["  --model.FIELD (or --FIELD) any SpiralConfig / TransformerConfig field, of one class:",
             "      function: changes what the model computes; recorded in model_args.json, a change on resume",
             "        is refused, carried to Hugging Face (or the conversion refuses it)",
             "      runtime: precision, fusions of identical math, recompute, layout; may change between runs",
             "      refused: a feature SpiralGPTModel does not build, or a field a job key sets (the error says which)",
             *textwrap.wrap(f"function fields of TransformerConfig: {', '.join(megatron)}", 100,
                            initial_indent="    ", subsequent_indent="      "),
             "    the loop's own:"]
    return lines + [f"      model.{name} [{kinds[name]}]: {own[name]}" for name in SpiralConfig.__annotations__
                    if name in own]
