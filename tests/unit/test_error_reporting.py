"""examples/pretrain_spiral.py's error handling (issue 14 section 5, issue 21 item 9): the
project's own checks end in one line and exit 2; anything else keeps its traceback, printed
once and in torchrun's error file; an error caused by a dead peer rank is one line and no error
file; the checkpoint sentence belongs to a failed save only."""

import importlib.util
import json
import os

import pytest

from spiral_megatron.job.run import fatal
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
    main = pretrain(monkeypatch, tmp_path, ZeroDivisionError("division by zero")).main
    with pytest.raises(ZeroDivisionError) as error:
        main(["--train-iters", "1"])
    assert fatal.describe(error.value) == 1  # what fatal.run does with it, before os._exit
    recorded = json.loads((tmp_path / "error.json").read_text())["message"]
    assert recorded["message"] == "pretrain_spiral: rank 0: ZeroDivisionError: division by zero"
    assert "Traceback" in recorded["extraInfo"]["py_callstack"] and "def train" not in recorded["message"]
    err = capsys.readouterr().err
    assert err.count("Traceback") == 1 and err.rstrip().endswith(recorded["message"])
    assert "checkpoint" not in err

    # An error that says a peer rank died is its consequence: one line, no torchrun error file,
    # so that torchrun names the rank that failed first as the root cause.
    (tmp_path / "error.json").unlink()
    peer = RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:1973. This is typically caused by "
                        "a remote worker crashing.")
    assert fatal.describe(peer) == 1 and not (tmp_path / "error.json").exists()
    assert capsys.readouterr().err == ("pretrain_spiral: rank 0 stopped: another rank of the job failed "
                                       f"({peer})\n")
    assert fatal.peer_failure(ConnectionResetError(104, "Connection reset by peer"))

    main = pretrain(monkeypatch, tmp_path, SaveFailed("saving iteration 4 failed: No space left on device "
                                                       "(/ckpt/x); the last complete checkpoint is still the latest: "
                                                       "iteration 2 in /ckpt")).main
    assert main(["--train-iters", "1"]) == 1
    assert "the last complete checkpoint is still the latest: iteration 2" in capsys.readouterr().err


def test_megatrons_refusal_of_a_setting_is_one_line(monkeypatch, tmp_path, capsys):
    """Megatron's own validation (a raise in TransformerConfig.__post_init__) refuses the user's
    combination: one line naming the settings, exit 2."""
    main = pretrain(monkeypatch, tmp_path, AssertionError("train is not reached")).main
    assert main(["--model.recompute_granularity", "full"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pretrain_spiral: error: model {'flavor': 'debug', 'recompute_granularity': 'full'}")
    assert 'recompute_method must be "block" or "uniform"' in err and err.count("\n") == 1


def _bug_in_our_validation(self):
    return self.num_layers + None  # TypeError: a bug, not a refusal


def _bug_below_the_config(*args, **kwargs):
    raise ValueError("math domain error")  # a ValueError that no validation raised on purpose


@pytest.mark.parametrize("where, bug, error", [
    ("_check_parallel_layout", _bug_in_our_validation, TypeError),
    ("scaled_init_method_normal", _bug_below_the_config, ValueError),
])
def test_a_bug_while_resolving_keeps_its_traceback(monkeypatch, tmp_path, capsys, where, bug, error):
    """Before issue 23 any ValueError, TypeError or AssertionError raised while the model's
    config was built read as a one-line 'config error' naming the user's settings."""
    from spiral_megatron.config import spiral_config

    main = pretrain(monkeypatch, tmp_path, AssertionError("train is not reached")).main
    target = spiral_config.SpiralConfig if where.startswith("_") else spiral_config
    monkeypatch.setattr(target, where, bug)
    with pytest.raises(error) as caught:
        main(["--train-iters", "1"])
    from spiral_megatron.job.run import fatal

    fatal.describe(caught.value)  # what fatal.run, the script's entry, does with it
    recorded = json.loads((tmp_path / "error.json").read_text())["message"]
    callstack = recorded["extraInfo"]["py_callstack"]
    assert "Traceback" in callstack and where.lstrip("_") in callstack
    assert "pretrain_spiral: error" not in capsys.readouterr().err


def test_the_job_sets_cuda_connections_before_it_starts_and_keeps_a_users_value(monkeypatch, tmp_path):
    """Megatron-LM refuses TP on GPUs before Blackwell without CUDA_DEVICE_MAX_CONNECTIONS=1; the
    job sets it where unset, before anything can start CUDA (here: before `train` runs)."""
    seen = []
    for exported, expected in ((None, "1"), ("32", "32")):
        module = pretrain(monkeypatch, tmp_path, ConfigError("stop"))
        if exported is None:
            monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS", raising=False)
        else:
            monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", exported)
        parse = module.parse
        monkeypatch.setattr(module, "parse", lambda argv: seen.append(os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS"))
                            or parse(argv))
        assert module.main(["--train-iters", "1"]) == 2
        assert seen[-1] == expected
