"""torchrun --nproc_per_node=2: save a TP2 checkpoint and the TP2 model's full logits."""

import sys

import torch


def main(save: str, finish: bool = True) -> None:
    from megatron.core import tensor_parallel

    from spiral_megatron import parallel
    from spiral_megatron.model.model_args import build_model
    from tests.hf import helpers as H

    parallel.initialize(tensor_parallel=2, pipeline_parallel=1, seed=7, backend="gloo")
    args = H.model_args(**H.TP2_CONFIG)
    model = build_model(args, use_cpu_initialization=True, tensor_model_parallel_size=2).eval()
    ids = torch.randint(0, H.VOCAB, (2, 21), generator=torch.Generator().manual_seed(5))
    logits = tensor_parallel.gather_from_tensor_model_parallel_region(H.logits(model, ids))  # [b, s, V]
    H.save_checkpoint(model, args, save)
    if torch.distributed.get_rank() == 0:
        torch.save({"ids": ids, "logits": logits}, f"{save}/tp2_logits.pt")
    if finish:
        parallel.destroy()


if __name__ == "__main__":
    main(sys.argv[1])
