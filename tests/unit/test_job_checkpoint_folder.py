"""Which folder holds a checkpoint of the project's job (examples/bridge/pretrain_spiral.py
refuses one as Bridge's checkpoint.load or pretrained_checkpoint: Bridge cannot read it)."""

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
