"""Start a process for Megatron: process group, model-parallel groups, seeds.

NCCL on GPUs; gloo plus the CPU path (`cuda_on_cpu`) where CUDA is absent. Works under
`torchrun` (reads RANK/WORLD_SIZE) and as a single plain process (world size 1).
"""

import os
import socket
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from spiral_megatron.parallel import cuda_on_cpu


# Megatron-LM refuses tensor (or context) parallelism on GPUs before Blackwell unless this is 1:
# the GPU then runs kernels in the order they were queued, so the TP all-reduce/all-gather that
# Megatron queues before a GEMM runs beside it (megatron/training/arguments.py; megatron-core
# warns "recommended ... for maximum speedup" otherwise).
CUDA_CONNECTIONS = "CUDA_DEVICE_MAX_CONNECTIONS"


def default_cuda_connections(environ=os.environ) -> Optional[str]:
    """Set CUDA_DEVICE_MAX_CONNECTIONS to 1 where unset, as Megatron-LM's launch scripts do; a
    value the user exported stays (Blackwell runs with NeMo's 32, for instance). Call before any
    CUDA work: the driver reads it when it starts, a later change does nothing. -> the value"""
    return environ.setdefault(CUDA_CONNECTIONS, "1")


def default_backend() -> str:
    """"nccl" when CUDA is available, else "gloo"."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_on_a_free_port(backend: str, timeout: Optional[timedelta], attempts: int = 5) -> None:
    """A single process's own rendezvous. A port found free can be taken by another program
    before the store binds it (jobs and tests starting side by side): then another port."""
    for attempt in range(attempts):
        os.environ["MASTER_PORT"] = str(_free_port())
        try:
            dist.init_process_group(backend=backend, timeout=timeout)
            return
        except dist.DistNetworkError as e:
            if "EADDRINUSE" not in str(e) or attempt == attempts - 1:
                raise


def initialize(
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    seed: int = 1234,
    backend: Optional[str] = None,
    timeout_minutes: Optional[int] = None,
    **model_parallel_kwargs,
) -> None:
    """Init torch.distributed (if needed) and Megatron's parallel_state, then seed every RNG.

    Seeds: the CPU generator gets `seed` on every rank (Megatron's CPU initialisation builds
    full weights from it, so every layout starts from the same model); Megatron's tracker
    gets its TP-aware seeds from `model_parallel_cuda_manual_seed`. `timeout_minutes`: how long
    a collective of the process group and of Megatron's groups waits (None: torch's and
    megatron-core's defaults).
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    backend = backend or default_backend()
    if backend == "gloo":
        cuda_on_cpu.enable()
    if not dist.is_initialized():
        own_port = "RANK" not in os.environ and "MASTER_PORT" not in os.environ
        if "RANK" not in os.environ:  # a plain single process
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        timeout = timedelta(minutes=timeout_minutes) if timeout_minutes else None
        if own_port:
            _init_on_a_free_port(backend, timeout)
        else:
            dist.init_process_group(backend=backend, timeout=timeout)
    world = dist.get_world_size()
    if world % (tensor_parallel * pipeline_parallel):
        raise ValueError(
            f"world size {world} is not a multiple of tensor_parallel {tensor_parallel} x "
            f"pipeline_parallel {pipeline_parallel}"
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        **({"distributed_timeout_minutes": timeout_minutes} if timeout_minutes else {}),
        **model_parallel_kwargs,
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed, **({"inference_rng_tracker": True} if backend == "gloo" else {}))


def destroy() -> None:
    """Tear down Megatron's groups and the process group."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
