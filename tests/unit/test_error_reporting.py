"""examples/pretrain_spiral.py's error handling (issue 14 section 5): the project's own checks
end in one line and exit 2; anything else keeps its traceback, also in torchrun's error file;
the checkpoint sentence belongs to a failed save only."""

import importlib.util
import json

import pytest

from spiral_megatron.job.checkpoint.checkpointing import SaveFailed
from spiral_megatron.job.settings.config import ConfigError
from tests.conftest import ROOT


def pretrain(monkeypatch, tmp_path, error):
    """The script's main with `train` raising `error`; torchrun's error file at tmp_path."""
    spec = importlib.util.spec_from_file_location("pretrain_spiral", ROOT / "examples" / "pretrain_spiral.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def train(cfg, quiet=None):
        raise error

    monkeypatch.setattr(module, "train", train)
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error.json"))
    monkeypatch.setenv("RANK", "0")
    return module


def test_a_check_is_one_line_and_anything_else_keeps_its_traceback(monkeypatch, tmp_path, capsys):
    main = pretrain(monkeypatch, tmp_path, ConfigError("data_path: 'x.bin' does not exist")).main
    assert main(["--train-iters", "1"]) == 2
    assert capsys.readouterr().err == "pretrain_spiral: error: data_path: 'x.bin' does not exist\n"

    (tmp_path / "error.json").unlink()
    main = pretrain(monkeypatch, tmp_path, ConnectionResetError(104, "Connection reset by peer")).main
    with pytest.raises(ConnectionResetError):
        main(["--train-iters", "1"])
    recorded = json.loads((tmp_path / "error.json").read_text())["message"]
    assert "Traceback" in recorded["extraInfo"]["py_callstack"] and "Connection reset by peer" in recorded["message"]
    assert "checkpoint" not in capsys.readouterr().err

    main = pretrain(monkeypatch, tmp_path, SaveFailed("saving iteration 4 failed: No space left on device "
                                                       "(/ckpt/x); the last complete checkpoint is still the latest: "
                                                       "iteration 2 in /ckpt")).main
    assert main(["--train-iters", "1"]) == 1
    assert "the last complete checkpoint is still the latest: iteration 2" in capsys.readouterr().err
