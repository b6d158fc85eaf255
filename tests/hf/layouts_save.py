"""torchrun --nproc_per_node=2: every layout of test_layouts.py in one launch (each script
re-initialises Megatron's groups for its layout): SAVE/TP2, SAVE/PP2, SAVE/PP2-prelude-apart."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.hf import pp2_save, tp2_save  # noqa: E402

from spiral_megatron import parallel  # noqa: E402

LAYOUTS = {"TP2": (tp2_save.main, ()), "PP2": (pp2_save.main, ("2,3",)), "PP2-prelude-apart": (pp2_save.main, ("1,4",))}


if __name__ == "__main__":
    for name, (save, extra) in LAYOUTS.items():
        save(f"{sys.argv[1]}/{name}", *extra, finish=False)
    parallel.destroy()
