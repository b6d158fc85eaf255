"""Convert a SpiralFormer Hugging Face folder back to a Megatron checkpoint.

    python tools/convert_from_hf.py --load hf/debug --save checkpoints/from_hf [--iteration 0] [--force]

Writes the training script's layout (SAVE/iter_NNNNNNN/ with model_args.json and tokenizer/,
plus latest_checkpointed_iteration.txt); the dist checkpoint loads at any TP/PP layout.
A non-empty --save folder (a training run's, say) is refused unless --force. The folder is
written and published as the training job's saves are (a hidden staging folder renamed in, the
marker moved last), so a kill leaves the previous state, never half a checkpoint.
Megatron -> HF -> Megatron is bit-exact for fp32 conversions.
"""

import argparse
import os
import sys
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="Hugging Face folder (safetensors)")
    p.add_argument("--save", required=True, help="checkpoint folder to write")
    p.add_argument("--iteration", type=int, default=0, help="iteration number to record")
    p.add_argument("--force", action="store_true", help="write into a non-empty --save folder")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from spiral_megatron.extras import require

    require("convert_from_hf.py", "hf")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    from spiral_megatron.conversion import convert
    from spiral_megatron.errors import SaveFailed

    save = Path(args.save)
    if save.exists() and (not save.is_dir() or any(save.iterdir())) and not args.force:
        tracker = save / "latest_checkpointed_iteration.txt"
        held = f" (its marker is at iteration {tracker.read_text().strip()})" if tracker.is_file() else ""
        print(f"error: save {str(save)!r} exists and is not empty{held}; pass --force to write "
              f"iteration {args.iteration} into it and move its marker", file=sys.stderr)
        return 2
    try:
        folder = convert.hf_folder_to_megatron(args.load, args.save, args.iteration, args.force)
    except SaveFailed as e:  # a full disk, a broken mount: the output holds what it held before
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (FileExistsError, FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {folder}")
    return 0


if __name__ == "__main__":
    from spiral_megatron.job.run.console import quiet_tool

    with quiet_tool("convert_from_hf"):  # Megatron's known-harmless warnings counted in one line
        sys.exit(main())
