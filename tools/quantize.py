r"""Post-training quantization of a SpiralFormer checkpoint with NVIDIA Model Optimizer.

    python tools/quantize.py --load checkpoints/debug                       # measure: table + JSON
        [--formats fp8,int8_sq,int4_awq] [--scales shared,per-level]
        [--calib-samples 64] [--eval-samples 64] [--json results.json]
    python tools/quantize.py --load checkpoints/debug --formats fp8 --scales per-level \
        --save checkpoints/debug-fp8                                       # one variant, saved
    python tools/quantize.py --load checkpoints/debug-fp8 --export-hf hf/debug-fp8   # to Hugging Face

Reads any TP/PP layout (full tensors, one process). Calibrates on the first N samples of the
job's validation data (the checkpoint's config.yaml), evaluates on the next E. `--save` writes
a model-only checkpoint in the job's layout with the modelopt state (Megatron-LM's
post-training layout): `torchrun examples/pretrain_spiral.py --load DIR` continues it with
quantization-aware training. Fake quantization: runs on CPU (nvfp4 needs CUDA in modelopt).
`--export-hf` writes a quantized checkpoint's Hugging Face folder (fake-quantized weights plus
activation scales; load it with spiral_megatron.quantization.export.load_quantized_hf).
"""

import argparse
import os
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint folder (holds latest_checkpointed_iteration.txt)")
    p.add_argument("--iteration", type=int, default=None, help="iteration (default: the latest)")
    p.add_argument("--formats", default="fp8,int8_sq,int4_awq", help="comma list of fp8, int8_sq, int4_awq, nvfp4")
    p.add_argument("--scales", default="shared,per-level",
                   help="comma list: shared (one activation scale over all loop levels), per-level (one per level)")
    p.add_argument("--calib-samples", type=int, default=64, help="validation samples to calibrate on")
    p.add_argument("--eval-samples", type=int, default=64, help="validation samples to evaluate on (after those)")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--device", default="cuda" if _has_cuda() else "cpu")
    p.add_argument("--json", default=None, help="write the results as JSON here")
    p.add_argument("--save", default=None, help="save the quantized checkpoint here (exactly one variant)")
    p.add_argument("--force", action="store_true", help="replace an existing --save / --export-hf folder")
    p.add_argument("--export-hf", default=None, metavar="OUT",
                   help="export the quantized checkpoint --load to a Hugging Face folder (no measuring)")
    return p.parse_args(argv)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv=None) -> int:
    from spiral_megatron.extras import require

    require("quantize.py", "modelopt", "hf")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    from spiral_megatron.conversion.megatron_io import CheckpointError
    from spiral_megatron.errors import SaveFailed
    from spiral_megatron.quantization import run
    from spiral_megatron.quantization.formats import check_format
    from spiral_megatron.quantization.ptq import QuantRecipe

    if args.export_hf:
        return export(args)
    try:
        formats = [check_format(f) for f in args.formats.split(",")]
        scales = args.scales.split(",")
        bad = [s for s in scales if s not in ("shared", "per-level")]
        if bad:
            raise ValueError(f"unknown scales {bad}; use shared and/or per-level")
        chosen = run.variants(formats, scales)
        if args.save and len(chosen) != 1:
            raise ValueError(f"--save needs exactly one variant (one format, one scales); got {chosen}")
        source = run.read_source(args.load, args.iteration)
        try:
            batches = run.validation_batches(source.folder, args.calib_samples + args.eval_samples, args.micro_batch)
        except run.TooFewSamples as e:  # the evaluation would score samples the calibration saw
            raise run.TooFewSamples(f"--calib-samples {args.calib_samples} + --eval-samples {args.eval_samples}: {e}; "
                              "pass fewer") from None
        cut = args.calib_samples // args.micro_batch
        calib, evals = batches[:cut], batches[cut:]
        results, model = run.measure(source, formats, scales, calib, evals, args.device, run.stderr_log,
                                     keep=bool(args.save))
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(run.table(results))
    if args.json:
        run.write_json(results, args.json)
    if args.save:
        fmt, scale = chosen[0]
        try:
            folder = run.save(model, source, QuantRecipe(fmt, scale == "per-level"), args.save, args.force)
        except SaveFailed as e:  # a full disk, a broken mount: --save holds what it held before
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"saved {fmt} ({scale} scales) to {folder}")
    return 0


def export(args) -> int:
    from spiral_megatron.conversion.megatron_io import CheckpointError
    from spiral_megatron.errors import SaveFailed
    from spiral_megatron.quantization.export import export_hf

    try:
        result = export_hf(args.load, args.export_hf, args.iteration, args.force)
    except SaveFailed as e:  # a full disk, a broken mount: the folder holds what it held before
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (CheckpointError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {result['out']} from iteration {result['iteration']} (fake-quantized weights + activation scales)")
    return 0


if __name__ == "__main__":  # dist_checkpointing's save helper re-imports this module
    from spiral_megatron.job.run.console import quiet_tool

    with quiet_tool("quantize"):  # Megatron's known-harmless warnings counted in one line
        sys.exit(main())
