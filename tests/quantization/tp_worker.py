"""torchrun --nproc_per_node=2 tp_worker.py FOLDER...: each quantized checkpoint FOLDER (saved at
TP1 with FOLDER/model_args.json and FOLDER/ids.pt) restored at TP2; prints `LOSS <folder>
<max abs difference>` of its per-token loss from FOLDER/expected.pt (the TP1 model's),
or `REFUSED <folder> <message>`."""

import sys

import torch
import torch.distributed as dist


def main(folders):
    from megatron.core import dist_checkpointing, tensor_parallel

    from spiral_megatron import parallel
    from spiral_megatron.conversion.megatron_io import build_megatron
    from spiral_megatron.errors import ConfigError
    from spiral_megatron.model.model_args import ModelArgs
    from spiral_megatron.quantization import checkpoint

    parallel.initialize(tensor_parallel=2, pipeline_parallel=1, seed=1234, backend="gloo")
    for folder in folders:
        tensor_parallel.model_parallel_cuda_manual_seed(7, inference_rng_tracker=True)
        model = build_megatron(ModelArgs.load(f"{folder}/model_args.json")).eval()
        try:
            checkpoint.restore_state(model, folder)
        except ConfigError as e:
            if dist.get_rank() == 0:
                print(f"REFUSED {folder} {e}", flush=True)
            continue
        model.load_state_dict(dist_checkpointing.load({"model": model.sharded_state_dict()}, folder)["model"])
        ids = torch.load(f"{folder}/ids.pt")  # [b, s]
        pos = torch.arange(ids.shape[1])[None].expand_as(ids)
        with torch.no_grad():
            loss = model(ids, pos, None, labels=ids)  # [b, s], whole on every TP rank
        difference = (loss - torch.load(f"{folder}/expected.pt")).abs().max().item()
        if dist.get_rank() == 0:
            print(f"LOSS {folder} {difference:.3e}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
