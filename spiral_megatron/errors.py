"""The errors the project raises on purpose. Imports nothing: every package may raise them.

A SpiralError's message is all a user needs (the bad value and the rule, in one line), so the
job's entry point prints it as one line, without a traceback (examples/pretrain_spiral.py).
Any other exception is a bug, ours or a library's, and keeps its traceback: code converts an
exception into a SpiralError only where it knows the exception is a refusal (e.g. Megatron's
own validation of its TransformerConfig, job/settings/model_config.py).
"""


class SpiralError(Exception):
    """An error raised on purpose; its message names the bad value and what to do."""


class ConfigError(SpiralError, ValueError):
    """A bad setting, value or combination (of the job's keys, its data, checkpoint or folder).
    A ValueError too: SpiralConfig's refusals are ValueErrors wherever it is built."""


class SaveFailed(ConfigError):
    """Writing a checkpoint or a model folder failed (a full disk, a broken mount); what was
    complete before is kept. The message names what failed, the space left there, what is kept."""


def space_left(folder) -> str:
    """The free space of `folder`'s file system, in words, for a SaveFailed message (a writer
    that failed on a full disk may say only "OSError")."""
    import shutil

    try:
        return f"{shutil.disk_usage(folder).free / 2 ** 20:,.1f} MiB free on its file system"
    except OSError as e:
        return f"its free space unknown ({e.strerror})"
