"""examples/pretrain_spiral.py whose training step at one iteration leaves one weight entry at
a given value (nan, inf), on one rank, as a diverging update would: what the divergence guard
must catch before that step is saved.

    python planted_weight.py VALUE ITERATION RANK <pretrain_spiral arguments>

The entry is the first of the model's LAST parameter on rank RANK (not the first parameter:
a NaN only survives Python's `max` over tensors when it comes first).
"""

import importlib.util
import os
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "pretrain_spiral.py"


def plant(value: float, iteration: int, rank: int) -> None:
    """Wrap step.train_step: the `iteration`-th call sets the entry after its optimizer step."""
    import torch

    from spiral_megatron.job.run import step

    real, calls = step.train_step, [0]

    def train_step(parts, *args, **kwargs):
        out = real(parts, *args, **kwargs)
        calls[0] += 1
        if calls[0] == iteration and int(os.environ.get("RANK", "0")) == rank:
            with torch.no_grad():
                list(parts.module.parameters())[-1].view(-1)[0] = value
        return out

    step.train_step = train_step


if __name__ == "__main__":  # dist_checkpointing's save helper re-imports this module
    plant(float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
    spec = importlib.util.spec_from_file_location("pretrain_spiral", SCRIPT)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    sys.exit(job.main(sys.argv[4:]))
