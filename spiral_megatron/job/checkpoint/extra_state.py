"""State a checkpoint carries beside the model's own, through hooks that a plugin registers.

The training job saves and restores the model, optimizer and scheduler itself. A plugin that
changes the model (modelopt's quantizers, for quantization-aware training) has more to save and
must restore it onto the freshly built model before the weights load. training/ imports no
plugin: the entry point registers the plugin's `ExtraState` (examples/pretrain_spiral.py
registers spiral_megatron.quantization.checkpoint.TRAINING_HOOK), and the job calls every
registered hook.
"""

from dataclasses import dataclass
from typing import Callable, List

import torch


@dataclass(frozen=True)
class ExtraState:
    """A plugin's two hooks."""

    restore: Callable[[torch.nn.Module, str], None]
    """(module, the --load folder): before DDP and the optimizer, make `module` the model the
    checkpoint holds (the weights arrive with the ordinary load)."""

    save: Callable[[torch.nn.Module, str], None]
    """(module, the iteration folder being written): after the model's dist checkpoint."""


HOOKS: List[ExtraState] = []


def register(hook: ExtraState) -> None:
    """Call `hook` from now on (once, however often it is registered)."""
    if hook not in HOOKS:
        HOOKS.append(hook)


def restore(module: torch.nn.Module, load: str) -> None:
    for hook in HOOKS:
        hook.restore(module, load)


def save(module: torch.nn.Module, folder) -> None:
    for hook in HOOKS:
        hook.save(module, folder)
