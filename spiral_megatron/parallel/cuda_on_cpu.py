"""Run Megatron-Core on a machine without CUDA (gloo backend, CPU tensors).

Megatron hard-codes CUDA in places no config flag reaches (measured in
docs/MEGATRON-ON-CPU.md): the forward-backward schedules create `device="cuda"` tensors,
pipeline p2p calls `torch.cuda.current_device()` and `torch.cuda.synchronize()`, the rotary
embedding and the local attention allocate on `torch.cuda.current_device()`, the default
causal mask is built with `device="cuda"`, tied embeddings call `.cuda()`, distributed
checkpoint saving synchronizes, and DDP waits on `torch.cuda.current_stream()`.

`enable()` redirects exactly those `torch.cuda` entry points to the CPU, process-wide:
  * `torch.cuda.current_device / synchronize / current_stream / Stream / Event / ...`
    become CPU stand-ins, `torch.cuda.get_rng_state` an empty state (for recomputation);
  * a `TorchFunctionMode` maps a `device="cuda"` (or integer device) argument and
    `Tensor.cuda()` to the CPU, and reports a CPU tensor's `Tensor.type()` as the CUDA
    type (`torch.cuda.FloatTensor`), which Megatron's distributed optimizer and gradient
    clipping check.
It touches only `torch.cuda`, never an attribute of Megatron, and does nothing where CUDA is
available. CUDA random states are left alone: seed Megatron's tracker with
`model_parallel_cuda_manual_seed(seed, inference_rng_tracker=True)` on CPU. It costs about 25% on tiny models (the mode sees every torch call).
"""

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_MODE = None
_NO_CUDA_RNG_STATE = torch.zeros(0, dtype=torch.uint8)


class _CpuStream:
    """Stands in for `torch.cuda.Stream`: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_event(self, event):
        pass

    def wait_stream(self, stream):
        pass

    def record_event(self, event=None):
        return event or _CpuEvent()

    def synchronize(self):
        pass


class _CpuEvent:
    """Stands in for `torch.cuda.Event`."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True


def _to_cpu_device(device):
    """`"cuda"`, `"cuda:1"`, `torch.device("cuda")` or an integer index -> the CPU."""
    if device is None:
        return None
    if isinstance(device, int) and not isinstance(device, bool):
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


_BACKWARD = (torch.Tensor.backward, torch.autograd.backward)


def _backward_with_mode(func, args, kwargs):
    """Run the autograd engine with the redirect on. A mode is suspended while it handles a
    call, so backward would run without it; but activation recomputation re-runs Megatron's
    forward code (e.g. its `device="cuda"` default causal mask) inside backward. This is the
    tail of `torch.autograd.backward`, which (unlike the call itself) dispatches to no mode."""
    from torch.autograd import _make_grads, _tensor_or_tensors_to_tuple
    from torch.autograd.graph import _engine_run_backward

    if func is torch.Tensor.backward:
        names = ("gradient", "retain_graph", "create_graph", "inputs")
        given = dict(zip(names, args[1:]), **kwargs)
        tensors, grads = (args[0],), given.get("gradient")
        retain, create, inputs = given.get("retain_graph"), given.get("create_graph", False), given.get("inputs")
    else:
        names = ("tensors", "grad_tensors", "retain_graph", "create_graph", "grad_variables", "inputs")
        given = dict(zip(names, args), **kwargs)
        tensors, grads = given["tensors"], given.get("grad_tensors")
        retain, create, inputs = given.get("retain_graph"), given.get("create_graph", False), given.get("inputs")
    tensors = (tensors,) if isinstance(tensors, torch.Tensor) else tuple(tensors)
    inputs = () if inputs is None else ((inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs))
    grads = _make_grads(tensors, _tensor_or_tensors_to_tuple(grads, len(tensors)), is_grads_batched=False)
    with _CudaToCpuMode():
        _engine_run_backward(tensors, grads, create if retain is None else retain, create, inputs,
                             allow_unreachable=True, accumulate_grad=True)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments of any torch call to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in _BACKWARD:
            return _backward_with_mode(func, args, kwargs)
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # Megatron checks type strings ('torch.cuda.FloatTensor') in its distributed
            # optimizer and gradient clipping: a CPU tensor stands in for a CUDA one.
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if args[0].device.type == "cpu" else name
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if func in (torch.Tensor.to,) and len(args) > 1:
            args = (args[0], _to_cpu_device(args[1])) + tuple(args[2:])
        return func(*args, **kwargs)


def enable() -> bool:
    """Redirect `torch.cuda` device calls to the CPU when CUDA is absent. Idempotent.

    Returns True when the redirect is active.
    """
    global _MODE
    if torch.cuda.is_available():
        return False
    if _MODE is not None:
        return True
    cuda = torch.cuda
    # A device object, not an index: Megatron's autograd backward functions allocate with
    # `device=torch.cuda.current_device()`, and backward runs outside the mode below (a
    # TorchFunctionMode is suspended while it handles `Tensor.backward` itself).
    cuda.current_device = lambda: torch.device("cpu")
    cuda.synchronize = lambda device=None: None
    cuda.current_stream = lambda device=None: _CpuStream()
    cuda.default_stream = lambda device=None: _CpuStream()
    cuda.Stream = _CpuStream
    cuda.Event = _CpuEvent
    cuda.stream = lambda stream=None: contextlib.nullcontext()
    cuda.set_device = lambda device: None
    cuda.empty_cache = lambda: None
    cuda.memory_allocated = lambda device=None: 0
    cuda.max_memory_allocated = lambda device=None: 0
    cuda.memory_reserved = lambda device=None: 0
    cuda.reset_peak_memory_stats = lambda device=None: None
    # Activation recomputation saves and restores the CUDA RNG state around each checkpointed
    # region (tensor_parallel.random.CheckpointFunction); on the CPU there is none to keep
    # (the CPU generator it also saves is what dropout uses here). Setting it is already a
    # queued no-op without CUDA (torch.cuda._lazy_call).
    cuda.get_rng_state = cuda.random.get_rng_state = lambda device="cuda": _NO_CUDA_RNG_STATE
    _MODE = _CudaToCpuMode()
    _MODE.__enter__()
    return True


def is_enabled() -> bool:
    """True after `enable()` installed the redirect in this process."""
    return _MODE is not None
