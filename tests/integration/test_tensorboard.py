"""--tensorboard-dir: one event file per run (the start-up check of the package wrote a second,
empty one on every launch), holding what --log-json holds, read as TensorBoard reads it. A
--log-json in a folder not made yet is made (it was a FileNotFoundError traceback). Skipped
without the optional `tensorboard` package."""

import pytest

from tests.integration.conftest import TINY, cache_dir, launch, logged  # noqa: F401

pytest.importorskip("tensorboard")


def test_one_event_file_with_the_logged_values(cache_dir, tmp_path):  # noqa: F811
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    launch(cache_dir, *TINY, "--save", tmp_path / "ck", "--tensorboard-dir", tmp_path / "tb", "--log-json",
           tmp_path / "logs" / "log.jsonl")  # a --log-json folder that does not exist yet is made
    [events] = list((tmp_path / "tb").iterdir())
    scalars = EventAccumulator(str(events))  # as TensorBoard reads it, in any of its releases
    scalars.Reload()
    losses = {event.step: event.value for event in scalars.Scalars("loss")}
    assert len(losses) == 4 and losses == pytest.approx({step: row["loss"] for step, row in logged(tmp_path / "logs" / "log.jsonl").items()})
