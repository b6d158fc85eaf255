"""The global 2-norm of the weights (Megatron-LM's --log-params-norm, calc_params_l2_norm).

Each weight counts once over the whole model: a tensor-parallel duplicate (a weight every TP rank
holds whole, such as a norm's or the loop's routers) only on TP rank 0, a shared one only where
it is owned, and the per-rank sums of squares are added over the model-parallel group (TP x PP);
data-parallel replicas hold the same weights. One fused reduction (grad_norm.squared_norm), on
the weights the model computes with: in bf16 and fp16 runs their 16-bit copies, where Megatron-LM
reads the fp32 main copies (the two differ by the format's rounding).
"""

import torch


@torch.no_grad()
def params_norm(module: torch.nn.Module) -> float:
    """sqrt(sum of every weight's square) over the model's ranks, on the host (a sync)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared

    from spiral_megatron.parallel.grad_norm import squared_norm

    device = "cuda" if torch.cuda.is_available() else "cpu"
    params = [p for p in module.parameters() if param_is_not_shared(p) and param_is_not_tensor_parallel_duplicate(p)]
    square = squared_norm(params) if params else torch.zeros((), dtype=torch.float32, device=device)
    torch.distributed.all_reduce(square, group=parallel_state.get_model_parallel_group())
    return square.sqrt().item()
