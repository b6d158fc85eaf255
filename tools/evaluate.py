"""Perplexity of a SpiralFormer on fixed data, from a training checkpoint or a converted HF folder.

    python tools/evaluate.py --model checkpoints/debug --data data/valid_text_document [--seq-length 128]
    python tools/evaluate.py --model hf/debug --data valid.jsonl notes.txt --out result.json

--model: a checkpoint folder (any TP/PP layout; --iteration picks one) or an HF folder.
--data: Megatron indexed dataset prefixes (.bin/.idx) and/or JSONL (`text` key, or --json-keys KEY) / text files
(or folders of them, or quoted patterns), tokenized with the model's tokenizer (or --tokenizer). Documents are joined with the
end-of-document id and cut into consecutive windows (no seed: the same data every time); the
first --max-sequences of them are scored (default 256; 0 = all), --batch-size at a time, on
--device (default: a GPU when there is one) in --dtype (default fp32; the loss is summed in
fp32 either way). Says up front how many it will score, then shows progress (plain lines in a
log) and the result; --out writes it as JSON. Nothing is downloaded.
"""

import argparse
import json
import os
import sys


def parse_args(argv=None):
    from spiral_megatron.analysis import models

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    models.add_source_arguments(p)
    p.add_argument("--max-sequences", type=int, default=256,
                   help="score the first this many sequences (default 256: bounded time; 0 = all of the data)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    p.add_argument("--device", default=None, help="where the model runs (default: cuda when available, else cpu)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="the model's dtype (a model trained in bf16 can be scored as it ran)")
    p.add_argument("--out", default=None, help="write the result as JSON here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """The command line; autograd is off inside, not for the caller (tests call this in-process)."""
    from spiral_megatron.extras import require

    require("evaluate.py", "hf")
    import torch

    with torch.no_grad():
        return _run(argv)


def _run(argv) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    from spiral_megatron.analysis import evaluate, models

    try:
        loaded, rows, seq = models.load_with_sequences(args.model, args.data, args.iteration, args.tokenizer,
                                                       args.seq_length, args.max_sequences or None, args.text_key)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    from spiral_megatron.conversion.hf_io import DTYPES

    try:
        model, device = models.placed(loaded.model, args.device, DTYPES[args.dtype])
    except ValueError as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    n = rows.shape[0]
    bound = (f" (the first {n}: --max-sequences; 0 scores all)" if args.max_sequences and n == args.max_sequences
             else " (all of the data)")
    print(f"evaluating {loaded.source} ({loaded.kind}, {args.dtype} on {device}) on {n} sequences of {seq} tokens = "
          f"{n * seq:,} tokens{bound}, {args.batch_size} at a time", file=sys.stderr)
    result = evaluate.perplexity(model, rows, args.batch_size, evaluate.text_progress(n))
    result.update(model=loaded.source, data=list(args.data), dtype=args.dtype)
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    # [ours] OpenMP threads that sleep instead of spinning while they wait: on a host whose
    # cores are shared (other jobs, a laptop) spinning threads made scoring 10-100x slower.
    # Set before torch is imported (its thread pool reads it once), for the command only.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from spiral_megatron.job.run.console import quiet_tool

    with quiet_tool("evaluate"):  # Megatron's known-harmless warnings counted in one line
        sys.exit(main())
