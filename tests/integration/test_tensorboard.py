"""--tensorboard-dir: one event file per run (the start-up check of the package wrote a second,
empty one on every launch), holding what --log-json holds. Skipped without the optional
`tensorboard` package (not in `.[dev]`)."""

import pytest

from tests.integration.conftest import TINY, cache_dir, launch, logged  # noqa: F401

pytest.importorskip("tensorboard")


def test_one_event_file_with_the_logged_values(cache_dir, tmp_path):  # noqa: F811
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    launch(cache_dir, *TINY, "--tensorboard-dir", tmp_path / "tb", "--log-json", tmp_path / "log.jsonl")
    [events] = list((tmp_path / "tb").iterdir())
    losses = {ev.step: v.simple_value for ev in EventFileLoader(str(events)).Load()
              for v in ev.summary.value if v.tag == "loss"}
    assert losses == pytest.approx({step: row["loss"] for step, row in logged(tmp_path / "log.jsonl").items()})
