"""The paper's probes: per loop iteration and core head, attention entropy, local attention
mass and mean attention distance (in tokens at every resolution); MeSH's state diagnostics
(relative update, CKA between loop states, singular-value spectra).

    python tools/probe.py --model checkpoints/debug --data data/valid_text_document --out probe/
    python tools/probe.py --model hf/debug --data valid.jsonl --samples 500 --window 16

--model: a checkpoint folder (any TP/PP layout) or a converted HF folder (the same numbers).
--data: indexed dataset prefixes or .jsonl/.txt files; the first --samples windows of
--seq-length tokens (see spiral_megatron/analysis/data.py). Writes OUT/probe.json,
OUT/probe_attention.png and OUT/probe_states.png and prints a table. The model runs in
float32 on --device (default: a GPU when there is one). Definitions:
spiral_megatron/analysis/probe.py and docs/RESEARCH.md.
"""

import argparse
import json
import os
import sys
from pathlib import Path


def parse_args(argv=None):
    from spiral_megatron.analysis import models

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    models.add_source_arguments(p)
    p.add_argument("--samples", type=int, default=500, help="sequences probed (the paper: 500)")
    p.add_argument("--window", type=int, default=16, help="local window W in tokens")
    p.add_argument("--top-fraction", type=float, default=0.4, help="share of heads that change most (paper: 0.4)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None, help="where the model runs (default: cuda when available, else cpu)")
    p.add_argument("--out", required=True, help="output folder for probe.json and the plots")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """The command line; autograd is off inside, not for the caller (tests call this in-process)."""
    from spiral_megatron.extras import require

    require("probe.py", "hf", "research")
    import torch

    with torch.no_grad():
        return _run(argv)


def _run(argv) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    from spiral_megatron.analysis import models, probe

    try:
        loaded, rows, seq = models.load_with_sequences(args.model, args.data, args.iteration, args.tokenizer,
                                                       args.seq_length, args.samples, args.text_key)
        model, _ = models.placed(loaded.model, args.device)
        prober = probe.Probe(model, args.window, args.top_fraction)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as e:
        print(f"probe: error: {e}", file=sys.stderr)
        return 2
    if rows.shape[0] < args.samples:
        print(f"probe: the data holds {rows.shape[0]} windows of {seq + 1} tokens, fewer than --samples "
              f"{args.samples}: probing {rows.shape[0]}", file=sys.stderr)
    from spiral_megatron.analysis.progress import bar

    with bar(rows.shape[0], "samples", desc="probing") as shown:  # plain lines in a log (issue 17)
        for start in range(0, rows.shape[0], args.batch_size):
            batch = rows[start : start + args.batch_size, :-1]
            prober.add(batch)
            shown.update(batch.shape[0])
    result = dict(prober.result(), model=loaded.source, data=list(args.data), seq_length=seq)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe.json").write_text(json.dumps(result, indent=1))
    probe.plot(result, str(out / "probe_attention.png"), str(out / "probe_states.png"),
               f"probes of {Path(loaded.source).name}: {result['samples']} samples of {seq} tokens")
    print(probe.table(result))
    print(f"wrote {out / 'probe.json'}, {out / 'probe_attention.png'}, {out / 'probe_states.png'}")
    return 0


if __name__ == "__main__":
    # OpenMP threads that sleep while they wait, as tools/evaluate.py (before torch is imported).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from spiral_megatron.job.run.console import quiet_tool

    with quiet_tool("probe"):  # Megatron's known-harmless warnings counted in one line
        sys.exit(main())
