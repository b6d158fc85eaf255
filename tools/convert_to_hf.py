"""Convert a SpiralFormer Megatron checkpoint (any TP/PP layout) to a Hugging Face folder.

    python tools/convert_to_hf.py --load checkpoints/debug --out hf/debug [--iteration N]
        [--dtype fp32|bf16|fp16] [--verify] [--force]

The weights are written in the checkpoint's dtype (the format the model trained in: bf16 for a
--bf16 run; Megatron's fp32 main weights are optimizer state) unless --dtype says otherwise.

The folder loads with `AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)`.
`--verify` compares both models' logits on sample text and exits 1 above tolerance.
"""

import argparse
import os
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint folder (holds latest_checkpointed_iteration.txt)")
    p.add_argument("--out", required=True, help="Hugging Face output folder")
    p.add_argument("--iteration", type=int, default=None, help="iteration to convert (default: the latest)")
    p.add_argument("--dtype", default=None, choices=("fp32", "bf16", "fp16"),
                   help="weight dtype written (default: the checkpoint's, the format the model trained in)")
    p.add_argument("--verify", action="store_true", help="compare Megatron and HF logits; exit 1 above tolerance")
    p.add_argument("--tolerance", type=float, default=1e-3, help="max abs logit difference / max(1, max |logit|)")
    p.add_argument("--max-shard-size", type=float, default=2.0, help="GiB per safetensors shard")
    p.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from spiral_megatron.extras import require

    require("convert_to_hf.py", "hf")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    from spiral_megatron.conversion import convert
    from spiral_megatron.errors import SaveFailed
    from spiral_megatron.conversion.hf_config import UnsupportedConfigError
    from spiral_megatron.conversion.megatron_io import CheckpointError

    try:
        result = convert.megatron_to_hf_folder(args.load, args.out, args.iteration, args.dtype, args.force,
                                               int(args.max_shard_size * 1024**3))
    except SaveFailed as e:  # a full disk, a broken mount: the output holds what it held before
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (CheckpointError, UnsupportedConfigError, FileExistsError, FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    written = args.dtype or f"{result['dtype_name']}, the checkpoint's"
    print(f"wrote {result['out']} from iteration {result['iteration']} ({written})")
    if args.verify:
        report = convert.verify(result, args.tolerance)
        print(f"verify: max abs logit difference {report['max_abs_logit_diff']:.3e}, cached vs full "
              f"{report['max_abs_cached_diff']:.3e} over {report['tokens']} tokens (logit scale "
              f"{report['logit_scale']:.2f}, tolerance {args.tolerance:g} x scale)")
        if not report["ok"]:
            print("verify: FAILED, above tolerance", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    from spiral_megatron.job.run.console import quiet_tool

    with quiet_tool("convert_to_hf"):  # Megatron's known-harmless warnings counted in one line
        sys.exit(main())
