"""What a checkpoint folder fails with: CheckpointError, and the megatron-core release this
process runs (the errors name it). Below checkpoint_files.py and old_checkpoints.py, which both
raise it."""

from spiral_megatron.errors import ConfigError


class CheckpointError(ConfigError):
    """A checkpoint folder that cannot be resumed from here; the message says why and what works."""


def megatron_core_version() -> str:
    from importlib.metadata import version

    return version("megatron-core")
