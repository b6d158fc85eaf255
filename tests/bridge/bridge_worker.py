"""Every Megatron-Bridge check in one 2-rank launch (importing Bridge costs 20-30 s a process).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/bridge/bridge_worker.py OUT HF_FOLDER

Bridge's `pretrain()` with the debug recipe: (A) 4 steps at DP 2 with the distributed optimizer,
saving at 2 and 4; (C) the same resumed from A's step 2; (D) A's 4 steps at PP 2 (the core
replicated on both stages) with buckets smaller than the core; (E) examples/bridge/pretrain_spiral.py's command line on data of a
user's own. The provider at TP 2 + SP against the project's job build.
AutoBridge at TP 1 and TP 2 on HF_FOLDER (made by tools/convert_to_hf.py's code): logits,
exported tensors, the folder save_hf_pretrained writes, and import_ckpt to a Bridge checkpoint
(the test converts it back with the project's converter). Rank 0 writes
OUT/results.json; tests/bridge/test_bridge.py asserts on it.
"""

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

TRAIN = dict(train_iters=4, micro_batch_size=4, global_batch_size=8, log_interval=1, eval_interval=None,
             num_workers=0)


def main() -> None:
    out, hf_folder = Path(sys.argv[1]), Path(sys.argv[2])
    started = time.time()
    import spiral_megatron.bridge  # noqa: F401  (the CPU shim, then Megatron-Bridge)

    results = {"import_s": time.time() - started}
    dist.init_process_group("gloo")  # ours: pretrain() then leaves it up between runs
    from spiral_megatron.job.data import default_data

    if dist.get_rank() == 0:
        default_data.ensure(None, 512)  # the embedded corpus, built once (SPIRAL_CACHE)
    dist.barrier()
    results["recipes"] = recipe_checks()
    results["train"] = train_checks(out)
    results["example"] = example_checks(out)
    results["weights_tp2_sp"] = provider_against_job()
    results["convert"] = {f"tp{tp}": conversion_checks(hf_folder, tp, out) for tp in (1, 2)}
    results["imported"] = import_checkpoint(hf_folder, out)
    results["total_s"] = time.time() - started
    from megatron.core.extensions.transformer_engine import HAVE_TE

    results["shim"] = {"HAVE_TE": bool(HAVE_TE), "absent_in_sys_modules": sorted(
        name for name in sys.modules if name.split(".")[0] in ("transformer_engine", "nvidia_resiliency_ext"))}
    if dist.get_rank() == 0:
        (out / "results.json").write_text(json.dumps(results, indent=2))
    dist.destroy_process_group()


def recipe_checks() -> dict:
    """Each flavor's recipe keys against examples/configs/<flavor>.yaml read by the job (the keys
    that differ), and that every flavor's ConfigContainer is made."""
    from spiral_megatron.bridge import recipes
    from spiral_megatron.config import flavors
    from spiral_megatron.errors import ConfigError
    from spiral_megatron.job.settings import config

    root = Path(__file__).resolve().parents[2] / "examples" / "configs"
    differ = {}
    for flavor, yaml_name in (("debug", "debug-cpu"), ("spiral-160m", "spiral-160m"), ("spiral-410m", "spiral-410m"),
                              ("spiral-1.4b", "spiral-1.4b")):
        ours = recipes.resolved_job(flavor).keys.to_dict()
        theirs = config.read(["--config", str(root / f"{yaml_name}.yaml")]).to_dict()
        differ[flavor] = sorted(k for k in ours if k not in ("save", "load") and ours[k] != theirs[k])
    made = [name for name in flavors.names() if recipes.pretrain_config(name).model.hidden_size]
    refused = {}
    for key, value in (("log-json", "x.jsonl"), ("valid_seed", 7)):  # a Megatron-LM alias, a job key
        try:
            recipes.pretrain_config("debug", **{key: value})
        except ConfigError as e:
            refused[key] = str(e)
    # fp16's loss-scaler keys survive Bridge's MixedPrecisionConfig.setup, which writes its own
    # fields over the optimizer's and DDP's configs
    fp16 = recipes.pretrain_config("debug", precision="fp16", initial_loss_scale=1024.0, min_loss_scale=2.0,
                                   loss_scale_window=50, hysteresis=3, ddp_bucket_size=4000)
    fp16.mixed_precision.setup(fp16.model, fp16.optimizer, fp16.ddp)
    after_setup = {k: getattr(fp16.optimizer, k) for k in ("fp16", "loss_scale", "initial_loss_scale",
                                                            "min_loss_scale", "loss_scale_window", "hysteresis")}
    after_setup.update(grad_reduce_in_fp32=fp16.ddp.grad_reduce_in_fp32, bucket_size=fp16.ddp.bucket_size)
    mock = recipes.pretrain_config("debug", mock_data=True)
    return {"mock": [mock.dataset.blend, mock.dataset.split, mock.tokenizer.tokenizer_type], "schedules": schedules(),
            "differ_from_yaml": differ, "containers": made, "mapped": sorted(recipes.JOB_TO_BRIDGE),
            "job_only": sorted(recipes.JOB_ONLY), "refused": refused, "fp16_after_setup": after_setup}


def schedules() -> dict:
    """The LR schedule's lengths (steps, warmup, decay, weight-decay samples) as Bridge's
    validate() computes them from a recipe and as the job resolves them, in samples and in
    iterations."""
    from spiral_megatron.bridge import recipes

    out = {}
    for name, keys in (("samples", dict(train_samples=4808, lr_warmup_samples=160, lr_decay_samples=4000)),
                       ("samples_fraction", dict(train_samples=4808, lr_warmup_fraction=0.05)),
                       ("iters", dict(train_iters=30, lr_warmup_iters=3, lr_decay_iters=25)),
                       ("wsd", dict(train_iters=30, lr_warmup_iters=3, lr_decay_style="WSD", lr_wsd_decay_iters=8,
                                    lr_wsd_decay_style="minus_sqrt")),
                       ("wsd_samples", dict(train_samples=4808, lr_decay_style="WSD", lr_wsd_decay_samples=700))):
        job = recipes.resolved_job("debug", mock_data=True, **keys)
        cfg = recipes.container(job)
        cfg.validate()
        s, b = job.schedule, cfg.scheduler
        out[name] = [[cfg.train.train_iters, b.lr_warmup_steps, b.lr_decay_steps, b.wd_incr_steps, b.lr_decay_style,
                      b.wsd_decay_steps, b.lr_wsd_decay_style],
                     [job.keys.train_iters, s.lr_warmup_steps, s.lr_decay_steps, s.wd_incr_steps, s.lr_decay_style,
                      s.wsd_decay_steps, s.lr_wsd_decay_style]]
    return out


def pretrain_losses(cfg, forward_step=None, lr: bool = False) -> list:
    """Bridge's pretrain() of `cfg`; the per-step training losses (from the last PP stage), with
    `lr` as [loss, learning rate] pairs."""
    from megatron.bridge.training.callbacks import Callback
    from megatron.bridge.training.pretrain import pretrain

    import spiral_megatron.bridge as bridge

    class Losses(Callback):
        def __init__(self):
            self.values = []

        def on_train_step_end(self, context):
            if context.loss_dict:
                loss = float(context.loss_dict["lm loss"])
                self.values.append([loss, context.optimizer.param_groups[0]["lr"]] if lr else loss)

    losses = Losses()
    pretrain(cfg, forward_step or bridge.forward_step, callbacks=[losses])
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, losses.values)
    return max(everyone, key=len)


def train_checks(out: Path) -> dict:
    from spiral_megatron.bridge import recipes

    a = pretrain_losses(recipes.pretrain_config("debug", **TRAIN, use_distributed_optimizer=True,
                                                save=str(out / "A"), save_interval=2))
    resumed = recipes.pretrain_config("debug", **TRAIN, use_distributed_optimizer=True, save=str(out / "C"),
                                      load=str(out / "A"))
    resumed.checkpoint.ckpt_step = 2
    c = pretrain_losses(resumed)
    split = {"model.pipeline_split": "3,3"}  # prelude + 2 iterations | 2 iterations + coda: the core on both stages
    # buckets smaller than the core: the stages must split its gradients alike (before the
    # provider did as the job does, gloo refused the mismatched sums)
    d = pretrain_losses(recipes.pretrain_config("debug", **TRAIN, use_distributed_optimizer=True, pipeline_parallel=2,
                                                ddp_bucket_size=4000, save=None, **split))
    return {"uninterrupted": a, "resumed": c, "pp2": d, "fp16_early": fp16_early_checks(out)}


def fp16_early_checks(out: Path) -> dict:
    """fp16 at Megatron's initial loss scale (2^32, whose first steps overflow before torch's
    Adam has any state), with and without the distributed optimizer: 17 steps saving at 3, and
    the same resumed from step 3; the steps taken (a learning rate above 0) of each."""
    from spiral_megatron.bridge import recipes

    steps = dict(TRAIN, train_iters=17)
    runs = {}
    for name, distributed in (("plain", False), ("distributed", True)):
        full = pretrain_losses(recipes.pretrain_config("debug", **steps, precision="fp16", use_distributed_optimizer=distributed,
                                                       save=str(out / f"F-{name}"), save_interval=3), lr=True)
        resumed = recipes.pretrain_config("debug", **steps, precision="fp16", use_distributed_optimizer=distributed,
                                          save=str(out / f"G-{name}"), load=str(out / f"F-{name}"))
        resumed.checkpoint.ckpt_step = 3
        runs[name] = {"uninterrupted": full, "resumed": pretrain_losses(resumed, lr=True)}
    return runs


def example_checks(out: Path) -> dict:
    """examples/bridge/pretrain_spiral.py as a user runs it on data of their own (60 documents,
    their own BPE of 300 tokens, so the default split leaves the test split empty, which Bridge
    builds): the job's --data-path flag brings the tokenizer and the split; a Hydra override of
    the data is refused; 2 steps train."""
    import importlib.util
    import random

    from spiral_megatron.errors import ConfigError
    from spiral_megatron.job.data.preprocess import preprocess

    prefix = out / "mine" / "text"
    if dist.get_rank() == 0:
        rng, words = random.Random(0), "the loop runs its core over chunks of tokens coarse to fine".split()
        docs = [f"Document {i}. " + " ".join(rng.choice(words) for _ in range(150)) for i in range(60)]
        prefix.parent.mkdir(parents=True)
        (prefix.parent / "mine.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        preprocess([str(prefix.parent / "mine.jsonl")], str(prefix), vocab_size=300)
    dist.barrier()
    spec = importlib.util.spec_from_file_location(
        "bridge_example", Path(__file__).resolve().parents[2] / "examples" / "bridge" / "pretrain_spiral.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    args, flags, overrides = example.parse_args(
        ["--data-path", str(prefix), "--micro-batch-size", "4", "--eval-interval", "null", "train.train_iters=2",
         "train.global_batch_size=8", f"checkpoint.save={out / 'E'}", "dataset.num_workers=0"])
    cfg = example.make_config(args.flavor, args.config_file, overrides, flags)
    refused = {}
    for override in ("dataset.blend=[[/elsewhere/text],null]", "tokenizer.tokenizer_model=/elsewhere"):
        try:
            example.make_config(args.flavor, None, [override], flags)
        except ConfigError as e:
            refused[override] = str(e)
    for override in ("train.train_iterz=3", "train.train_iters=abc"):
        try:
            example.make_config(args.flavor, None, [override], flags)
        except ConfigError as e:
            refused[override] = str(e)
    data = dict(blend=cfg.dataset.blend, split=cfg.dataset.split, tokenizer=cfg.tokenizer.tokenizer_model,
                flags=flags, overrides=overrides)
    return dict(data, refused=refused, files=config_files(example, out, flags), losses=pretrain_losses(cfg),
                prefix=str(prefix))


def config_files(example, out: Path, flags) -> dict:
    """--config FILE (the job's keys, as examples/pretrain_spiral.py takes them) and
    --config-file FILE (Bridge's ConfigContainer fields; a job file there is refused, naming
    its keys, where Bridge would warn and train without them)."""
    from spiral_megatron.errors import ConfigError

    job_file, bridge_file = out / "job.yaml", out / "bridge.yaml"
    if dist.get_rank() == 0:
        job_file.write_text("model: {flavor: debug, hidden_size: 96, num_attention_heads: 6}\n"
                            "lr: 0.002\nlr_warmup_iters: 3\nmicro_batch_size: 2\n")
        bridge_file.write_text("train: {train_iters: 7}\noptimizer: {lr: 0.004}\n")
    dist.barrier()
    args, job_flags, overrides = example.parse_args(["--config", str(job_file), *flags])
    job = example.make_config(args.flavor, args.config_file, overrides, job_flags)
    args, _, _ = example.parse_args(["--config-file", str(bridge_file), *flags])
    bridge = example.make_config(args.flavor, args.config_file, [], flags)
    try:
        example.make_config("debug", str(job_file), [], flags)
        refused = None
    except ConfigError as e:
        refused = str(e).replace(str(job_file), "JOB")
    return dict(job=[job.model.hidden_size, job.optimizer.lr, job.scheduler.lr_warmup_iters, job.train.micro_batch_size],
                bridge=[bridge.train.train_iters, bridge.optimizer.lr], refused=refused)


def _initialize(tp: int) -> None:
    """Megatron's groups at TP `tp` in the existing process group, the CPU RNG tracker."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    model_parallel_cuda_manual_seed(1234, inference_rng_tracker=True)


def provider_against_job() -> float:
    """Max |difference| of this rank's weights: the debug recipe's SpiralModelProvider at
    TP 2 + SP, built as pretrain() builds it, against the project's job build (job/build.py's
    model from the job's own resolution of its command line)."""
    import copy

    from spiral_megatron.bridge import recipes
    from spiral_megatron.job.settings import resolve
    from spiral_megatron.model import init
    from spiral_megatron.model.model_args import make_model

    _initialize(2)
    provider = recipes.pretrain_config("debug", tensor_parallel=2, sequence_parallel=True).model
    provider.vocab_size, provider.should_pad_vocab = 512, True  # what pretrain() takes from the tokenizer
    provider.finalize()
    ours = provider.provide_distributed_model(wrap_with_ddp=False)[0]
    job = resolve.resolve(["--tensor-model-parallel-size", "2", "--sequence-parallel", "--tokenizer-vocab-size", "512"])
    reference = make_model(copy.copy(job.model), job.model_args, job.backend)
    init.initialize(reference, job.keys.seed)
    a, b = ours.state_dict(), reference.state_dict()
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max((a[k] - b[k]).abs().max().item() for k in a if torch.is_tensor(a[k]) and a[k].is_floating_point())


def conversion_checks(hf_folder: Path, tp: int, out: Path) -> dict:
    """AutoBridge: the folder to Megatron at TP `tp` (logits against the HF model's) and back
    (every exported tensor against the folder's; the folder save_hf_pretrained writes, loaded
    with its own model code: tensors and logits)."""
    from megatron.bridge import AutoBridge

    from spiral_megatron.conversion import convert

    _initialize(tp)
    bridge = AutoBridge.from_hf_pretrained(str(hf_folder), trust_remote_code=True)
    provider = bridge.to_megatron_provider()
    provider.tensor_model_parallel_size, provider.parallel_output = tp, False
    provider.finalize()
    model = provider.provide_distributed_model(wrap_with_ddp=False, use_cpu_initialization=True)
    ids = torch.randint(0, 50, (2, 48), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(ids.shape[1])[None].expand_as(ids)
    with torch.no_grad():
        logits = model[0](ids, pos, None)
    exported = dict(bridge.export_hf_weights(model, cpu=True, show_progress=False))
    saved = out / f"saved-tp{tp}"
    bridge.save_hf_pretrained(model, str(saved), show_progress=False)
    dist.barrier()
    result = {"provider": type(provider).__name__, "model": type(model[0]).__name__}
    if dist.get_rank() == 0:
        with torch.no_grad():
            reference = convert.load_hf(hf_folder)(ids, use_cache=False).logits  # [b, s, V]
            reloaded = convert.load_hf(saved)(ids, use_cache=False).logits
        ours = logits[..., : reference.shape[-1]]
        original = _safetensors(hf_folder)  # the weights and the Megatron vocabulary padding rows
        result["logit_rel_diff"] = ((ours - reference).abs().max() / reference.abs().max()).item()
        result.update(_tensor_report(exported, original))
        result["saved"] = _tensor_report(_safetensors(saved), original)
        result["saved"]["logit_max_diff"] = (reloaded - reference).abs().max().item()
    return result


def _safetensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _tensor_report(got: dict, want: dict) -> dict:
    common = sorted(set(got) & set(want))
    return {"missing": sorted(set(want) - set(got)), "extra": sorted(set(got) - set(want)), "tensors": len(common),
            "max_tensor_diff": max((got[k].float() - want[k].float()).abs().max().item() for k in common)}


def import_checkpoint(hf_folder: Path, out: Path) -> dict:
    """AutoBridge.import_ckpt: the folder to a Bridge checkpoint (converted back by the test)."""
    from megatron.bridge import AutoBridge

    _initialize(1)
    AutoBridge.import_ckpt(str(hf_folder), str(out / "imported"), trust_remote_code=True)
    dist.barrier()
    return {"folders": sorted(p.name for p in (out / "imported").iterdir())}


if __name__ == "__main__":  # checkpoint saving re-imports this module in a helper process
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
