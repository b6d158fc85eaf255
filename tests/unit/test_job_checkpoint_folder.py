"""Which folder holds a checkpoint of the project's job (examples/bridge/pretrain_spiral.py
refuses one as Bridge's checkpoint.load or pretrained_checkpoint: Bridge cannot read it), and
the check that a --save folder can be written."""

from spiral_megatron.job.checkpoint.checkpoint_files import TRACKER, holds_job_checkpoint


def test_a_job_checkpoint_is_told_from_a_bridge_one(tmp_path):
    assert not holds_job_checkpoint(tmp_path / "missing") and not holds_job_checkpoint(tmp_path)
    (tmp_path / TRACKER).write_text("4")
    folder = tmp_path / "iter_0000004"
    folder.mkdir()
    (folder / "model_args.json").write_text("{}")
    assert holds_job_checkpoint(tmp_path)
    (folder / "run_config.yaml").write_text("")  # Bridge writes it beside its own (with the model's record)
    assert not holds_job_checkpoint(tmp_path)


def test_a_save_folder_on_a_full_disk_is_refused_naming_the_space_and_leaves_no_probe(tmp_path, monkeypatch):
    """On a full disk the write probe is created empty and its write fails: the refusal names
    the space left, and the empty probe is deleted (it was left behind before)."""
    import errno
    from pathlib import Path

    import pytest

    from spiral_megatron.errors import ConfigError
    from spiral_megatron.job.checkpoint import checkpointing

    def full(self, *args, **kwargs):
        self.touch()
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(ConfigError, match=r"save '.*/ckpt' is not writable: No space left on device; [\d.,]+ MiB free "
                                          r"on its file system$"):
        checkpointing.check_writable(tmp_path / "ckpt")
    assert list((tmp_path / "ckpt").iterdir()) == []
