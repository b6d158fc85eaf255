"""torchrun --nproc_per_node=2: save a PP2 checkpoint and the pipelined model's logits, computed
stage by stage. Split "2,3" (default): prelude and iteration 0 | iterations 1-2 and coda, the
MeSH state crossing the boundary. Split "1,4": the prelude alone on stage 0, which hands the
raw embeddings on with its output (MeSH's slot 0 starts from them on stage 1)."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

PP2_CONFIG = dict(topology="mesh", chunk_offsets=[1, 0, 0], init_method_std=0.2)


def main(save: str, split: str = "2,3", finish: bool = True) -> None:
    from megatron.core import parallel_state as ps

    from spiral_megatron import parallel
    from spiral_megatron.model.model_args import build_model
    from tests.hf import helpers as H

    parallel.initialize(tensor_parallel=1, pipeline_parallel=2, seed=7, backend="gloo")
    args = H.model_args(**PP2_CONFIG)
    first = ps.is_pipeline_first_stage()
    model = build_model(args, pre_process=first, post_process=not first, use_cpu_initialization=True,
                        pipeline_model_parallel_size=2, pipeline_dtype=torch.float32,
                        pipeline_split=split).eval()
    ids = torch.randint(0, H.VOCAB, (2, 24), generator=torch.Generator().manual_seed(5))
    Path(save).mkdir(parents=True, exist_ok=True)
    if first:
        sent = H.logits(model, ids)  # the packed MeSH state [(1 + B) * S, b, h], or (h, e) [2 * s, b, h]
        dist.send(torch.tensor(sent.shape), 1)
        dist.send(sent.contiguous(), 1)
    else:
        shape = torch.zeros(3, dtype=torch.long)
        dist.recv(shape, 0)
        received = torch.empty(*shape.tolist())
        dist.recv(received, 0)
        model.set_input_tensor(received)
        torch.save({"ids": ids, "logits": H.logits(model, ids)}, f"{save}/pp2_logits.pt")
    H.save_checkpoint(model, args, save)
    if finish:
        parallel.destroy()


if __name__ == "__main__":
    main(*sys.argv[1:])
