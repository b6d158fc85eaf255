"""Megatron-Bridge on a machine without CUDA: what its import and `pretrain()` need there.

Active only where CUDA is absent (`enable()` returns False and changes nothing on a GPU
machine, where Transformer Engine and NVIDIA's resiliency extension are installed, as in the
NeMo container). Measured on megatron-bridge 0.6.2 with megatron-core 0.19.2, Python 3.11:

* Python 3.11 has no `typing.override`, which megatron-core 0.19's `megatron.training.models`
  imports (Bridge declares Python 3.12): `typing_extensions.override` is put there.
* Two Bridge modules import a GPU-only package at module level for names they use only with it:
  `megatron.bridge.peft.lora_layers` imports `transformer_engine.pytorch` (its fused LoRA
  layer), and `megatron.bridge.training.pretrain` imports `nvidia_resiliency_ext.inprocess`
  (in-process restart; megatron-bridge declares nvidia-resiliency-ext, which has no release for
  this machine that megatron-core 0.19 accepts). Those two modules alone are executed with a
  stand-in for that package (`_Absent`): every class in it is a class no object is an instance
  of, every function raises ImportError naming the package. Nothing else sees the stand-in:
  `sys.modules` never holds it, so Megatron's own `HAVE_TE` checks stay False.
* `cuda_on_cpu.enable()`: the project's redirect of `torch.cuda` device calls (docs/
  MEGATRON-ON-CPU.md), which Bridge's setup and checkpointing reach as Megatron's do.
* `initialize_megatron` asserts `torch.cuda.is_available()` unless called with
  `allow_no_cuda=True`, which Bridge's `setup()` never passes: see `_allow_no_cuda`.
* Bridge seeds Megatron's model-parallel RNG tracker only when a CUDA device exists
  (`_set_random_seed`); the local layers' dropout and recomputation fork it: see `_seed_tracker`.
"""

import builtins
import functools
import importlib.machinery
import sys
import types
import typing

import torch

from spiral_megatron.parallel import cuda_on_cpu

# Bridge module -> the GPU-only package it imports at module level without needing it here.
ABSENT_AT_IMPORT = {
    "megatron.bridge.peft.lora_layers": "transformer_engine",
    "megatron.bridge.training.pretrain": "nvidia_resiliency_ext",
}
_ENABLED = False


class _Absent(types.ModuleType):
    """A package that is not installed, as the modules of ABSENT_AT_IMPORT see it."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        where = f"{self.__name__}.{name}"

        def absent(*args, **kwargs):
            raise ImportError(f"{where}: {self.__name__.split('.')[0]} is not installed (CPU machine)")

        if name[:1].isupper():  # a class: isinstance(x, it) is False, instantiating it raises
            value = type(name, (), {"__init__": absent})
        elif name.islower() and "_" not in name:  # a submodule (te.ops, te.pytorch)
            value = _Absent(where)
        else:
            value = absent
        setattr(self, name, value)
        return value


def _allow_no_cuda(setup) -> None:
    """`megatron.bridge.training.setup`: its call of `initialize_megatron` allows no CUDA."""
    setup.initialize_megatron = functools.partial(setup.initialize_megatron, allow_no_cuda=True)


def _seed_tracker(initialize) -> None:
    """`megatron.bridge.training.initialize`: `_set_random_seed` also seeds Megatron's RNG
    tracker without a CUDA device (Bridge does so only where one is). Its states are CUDA
    generator states, which the redirect keeps empty, so dropout draws from the CPU generator
    seeded just before; a checkpoint's `rng_tracker_states` still names the tracker's state,
    which Bridge's resume requires (with none it prints "Unable to load rng state" and calls
    `sys.exit()`, exit status 0)."""
    from megatron.core import tensor_parallel

    set_random_seed = initialize._set_random_seed

    @functools.wraps(set_random_seed)
    def _set_random_seed(seed_, *args, **kwargs):
        set_random_seed(seed_, *args, **kwargs)
        tensor_parallel.model_parallel_cuda_manual_seed(seed_, force_reset_rng=True)

    initialize._set_random_seed = _set_random_seed
    _use_built_helpers(initialize)


def _use_built_helpers(initialize) -> None:
    """`initialize_megatron` runs `make` in megatron/core/datasets (compile_helpers); the
    megatron-core wheel ships the helpers built (helpers_cpp) and no Makefile, so make fails.
    Where the built helpers import, there is nothing to compile."""
    compile_helpers = initialize.compile_helpers

    @functools.wraps(compile_helpers)
    def compile_if_missing():
        try:
            from megatron.core.datasets import helpers_cpp  # noqa: F401
        except ImportError:
            compile_helpers()

    initialize.compile_helpers = compile_if_missing


def _checkpoint_torch_adam(checkpointing) -> None:
    """`megatron.bridge.training.checkpointing` over torch's Adam (no apex or TE, so on the CPU),
    as the job does it (job/build.py `create_adam_state`, job/checkpoint/optimizer_state.py,
    loading.py): Adam's state as its first step creates it, before a save or a load that comes
    before that step (fp16's loss scale skips the first steps; Megatron's DistributedOptimizer
    asserts on no state, its load template holds the moments); Adam's step count kept at 0
    (megatron-core drops it); the checkpoint's step counts after a load (they stay in the
    param groups)."""
    from spiral_megatron.job.build import create_adam_state
    from spiral_megatron.job.checkpoint.optimizer_state import with_step_zero
    from spiral_megatron.job.checkpoint.torch_adam import restore_adam_steps

    generate_state_dict, load_from_path = checkpointing.generate_state_dict, checkpointing._load_checkpoint_from_path

    @functools.wraps(generate_state_dict)
    def generate_with_state(ckpt_cfg, model, optimizer, *args, **kwargs):
        if optimizer is not None:
            create_adam_state(optimizer)
        state = generate_state_dict(ckpt_cfg, model, optimizer, *args, **kwargs)
        if "optimizer" in state:
            with_step_zero(optimizer, state["optimizer"])
        return state

    @functools.wraps(load_from_path)
    def load_with_steps(load_dir, state, model, optimizer, *args, **kwargs):
        result = load_from_path(load_dir, state, model, optimizer, *args, **kwargs)
        if optimizer is not None:
            restore_adam_steps(optimizer)
        return result

    checkpointing.generate_state_dict, checkpointing._load_checkpoint_from_path = generate_with_state, load_with_steps


# Bridge module -> what it needs here once executed.
AFTER_IMPORT = {
    "megatron.bridge.training.setup": _allow_no_cuda,
    "megatron.bridge.training.initialize": _seed_tracker,
    "megatron.bridge.training.checkpointing": _checkpoint_torch_adam,
}


class _CpuLoader(importlib.machinery.SourceFileLoader):
    """Executes one Bridge module with `import <absent package>` answered by an `_Absent`
    stand-in (ABSENT_AT_IMPORT), then applies its adjustment (AFTER_IMPORT)."""

    def exec_module(self, module):
        package = ABSENT_AT_IMPORT.get(self.name)
        if package is not None and not _installed(package):
            real_import, stand_in = builtins.__import__, _Absent(package)

            def import_(name, globals=None, locals=None, fromlist=(), level=0):
                if level == 0 and name.split(".")[0] == package:
                    return stand_in
                return real_import(name, globals, locals, fromlist, level)

            module.__builtins__ = dict(builtins.__dict__, __import__=import_)
        super().exec_module(module)
        if self.name in AFTER_IMPORT:
            AFTER_IMPORT[self.name](module)


class _Finder:
    """Finds the modules of ABSENT_AT_IMPORT and AFTER_IMPORT where they are, to load them
    with `_CpuLoader`."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in ABSENT_AT_IMPORT and fullname not in AFTER_IMPORT:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None:
            spec.loader = _CpuLoader(fullname, spec.origin)
        return spec


def _installed(package: str) -> bool:
    """True when `package` is a regular package here (an empty folder left by an uninstall is
    a namespace package, with no origin)."""
    spec = importlib.machinery.PathFinder.find_spec(package)
    return spec is not None and spec.origin not in (None, "namespace")


def enable() -> bool:
    """Make Megatron-Bridge importable and trainable here when CUDA is absent. Idempotent;
    call before importing `megatron.bridge`. Returns True when the shim is active."""
    global _ENABLED
    if torch.cuda.is_available():
        return False
    if _ENABLED:
        return True
    if not hasattr(typing, "override"):  # Python < 3.12
        import typing_extensions

        typing.override = typing_extensions.override
    sys.meta_path.insert(0, _Finder())
    for name, adjust in AFTER_IMPORT.items():  # Bridge imported before this call
        if name in sys.modules:
            adjust(sys.modules[name])
    cuda_on_cpu.enable()
    _ENABLED = True
    return True


def is_enabled() -> bool:
    return _ENABLED
