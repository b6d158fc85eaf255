"""The main job end to end: few-step runs at 1 and 2 processes, exact resume, resume at
another TP, the checkpoint layout the converters read, NaN stop, SIGTERM save, early errors."""

import re
import signal

import pytest
import torch
import yaml

from spiral_megatron.model.model_args import ModelArgs
from spiral_megatron.job.checkpoint.checkpointing import TRACKER
from tests.integration.conftest import TINY, command, environment, launch, logged
from tests.jobs import Job

pytestmark = pytest.mark.checkpoint  # saves or loads a checkpoint


def test_single_process_run_logs_evaluates_and_saves(reference):
    out, log, stdout = reference
    assert sorted(log) == [1, 2, 3, 4]
    for record in log.values():
        for key in ("loss", "lr", "grad_norm", "tokens_per_sec", "tflops", "consumed_tokens"):
            assert record[key] is not None, key
    assert log[1]["loss"] == pytest.approx(6.24, abs=0.1)  # ln(512): an untrained model
    assert log[4]["loss"] < log[1]["loss"] - 0.05  # the debug flavor (MeSH, sqrt(d) embeddings): about -0.09
    assert "val_loss" in log[2] and "val_loss" in log[4] and "val_loss" not in log[3]
    assert "val ppl" in stdout and "pretrain_spiral: finished iteration 4" in stdout


@pytest.mark.both_releases
def test_checkpoint_layout_for_the_converters(reference, megatron):
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from spiral_megatron.model.model_args import build_model

    root = reference[0] / "ckpt"
    assert (root / TRACKER).read_text() == "4"
    folder = root / "iter_0000004"
    assert (root / "iter_0000002").is_dir()
    args = ModelArgs.load(folder / "model_args.json")
    assert args.vocab_size == 512 and args.config["chunk_sizes"] == [8, 4, 2, 1]
    assert yaml.safe_load((folder / "config.yaml").read_text())["train_iters"] == 4
    assert (folder / "tokenizer" / "tokenizer.json").is_file()
    tensors = dist_checkpointing.load_plain_tensors(str(folder))
    # Model tensors sit under the module's own sharded_state_dict keys (its parameter names).
    module = build_model(args, use_cpu_initialization=True)
    expected = [v for v in nested_values(module.sharded_state_dict()) if isinstance(v, ShardedTensor)]
    assert expected and {v.key for v in expected} <= set(tensors)
    for v in expected:
        assert tuple(tensors[v.key].shape) == tuple(v.global_shape), v.key
    assert tensors["embedding.word_embeddings.weight"].shape == (512, 64)
    assert any(k.startswith("optimizer.state.exp_avg.") for k in tensors)
    # --log-params-norm: the norm of exactly these weights, logged after the step they were saved at
    weights = [tensors[key] for key in {v.key for v in expected}]  # a core layer stack is one key for its layers
    plain = torch.linalg.vector_norm(torch.cat([t.flatten().double() for t in weights])).item()
    assert reference[1][4]["params_norm"] == pytest.approx(plain, rel=1e-6)
    assert 0 < reference[1][4]["num_zeros"] < sum(t.numel() for t in weights)


@pytest.mark.both_releases
def test_exact_resume(reference, cache_dir, tmp_path):
    """2 steps + resume + 2 steps == 4 steps, the same loss at every step (bitwise on CPU)."""
    _, full, _ = reference
    save = tmp_path / "ckpt"
    # the same command twice: --exit-interval stops at each multiple of it, as Megatron-LM's
    args = (*TINY, "--exit-interval", 2, "--load", save, "--save", save)
    proc = launch(cache_dir, *args, "--log-json", tmp_path / "a.jsonl")
    assert (save / TRACKER).read_text() == "2"
    assert "pretrain_spiral: exit interval 2: stopped after iteration 2 of 4 (the same command resumes)" in proc.stdout
    proc = launch(cache_dir, *args, "--log-json", tmp_path / "b.jsonl")
    assert "resumed from" in proc.stdout and "at iteration 2 (8 samples consumed)" in proc.stdout
    assert "pretrain_spiral: finished iteration 4" in proc.stdout
    first, second = logged(tmp_path / "a.jsonl"), logged(tmp_path / "b.jsonl")
    assert sorted(first) == [1, 2] and sorted(second) == [3, 4]
    for it, record in {**first, **second}.items():
        assert record["loss"] == full[it]["loss"], it
        assert record["lr"] == full[it]["lr"], it


@pytest.mark.both_releases
def test_exact_resume_with_the_distributed_optimizer(cache_dir, tmp_path):
    """DP2 with the distributed optimizer: 2 steps + resume + 2 steps == 4 steps, bitwise
    (loss, learning rate and gradient norm; the Adam step count must survive the load), on a
    WSD schedule whose annealing (steps 2-4) spans the resume: Megatron's scheduler state leaves
    it out, the checkpoint keeps it (job/checkpoint/scheduler_state.py)."""
    args = (*TINY, "--use-distributed-optimizer", "true", "--lr-decay-style", "WSD", "--lr-wsd-decay-iters", 3,
            "--lr-wsd-decay-style", "linear")
    launch(cache_dir, *args, "--save", tmp_path / "full", "--log-json", tmp_path / "full.jsonl", nproc=2)
    save = tmp_path / "ckpt"
    launch(cache_dir, *args, "--exit-interval", 2, "--save", save, "--log-json", tmp_path / "a.jsonl", nproc=2)
    launch(cache_dir, *args, "--load", save, "--save", save, "--log-json", tmp_path / "b.jsonl", nproc=2)
    full, resumed = logged(tmp_path / "full.jsonl"), {**logged(tmp_path / "a.jsonl"), **logged(tmp_path / "b.jsonl")}
    assert sorted(resumed) == [1, 2, 3, 4]
    # lr 3e-3 after the warmup step, then linearly to min_lr 3e-4 over the last 3 steps
    assert [full[it]["lr"] for it in (1, 2, 3, 4)] == pytest.approx([3e-3, 2.1e-3, 1.2e-3, 3e-4], rel=1e-12)
    for it, record in resumed.items():
        for key in ("loss", "lr", "grad_norm"):
            assert record[key] == full[it][key], (it, key)


@pytest.fixture(scope="module")
def tp2_then_tp1(cache_dir, tmp_path_factory):
    """2 steps at TP=2 + SP on 2 ranks (gradient accumulation over 2 micro-batches), then 2
    more resumed at TP=1 on one process."""
    out = tmp_path_factory.mktemp("tp2")
    save = out / "ckpt"
    launch(cache_dir, *TINY, "--tensor-parallel", 2, "--sequence-parallel", "--log-params-norm", "--log-num-zeros-in-grad",
           "--exit-interval", 2, "--save", save, "--log-json", out / "tp2.jsonl", nproc=2)
    proc = launch(cache_dir, *TINY, "--load", save, "--save", save, "--log-json", out / "tp1.jsonl")
    return save, {**logged(out / "tp2.jsonl"), **logged(out / "tp1.jsonl")}, proc.stdout


@pytest.mark.both_releases
def test_two_processes_tensor_parallel_then_resume_at_tp1(tp2_then_tp1):
    save, losses, stdout = tp2_then_tp1
    assert "resumed from" in stdout and "at iteration 2 (8 samples consumed)" in stdout
    assert sorted(losses) == [1, 2, 3, 4] and (save / TRACKER).read_text() == "4"
    assert losses[1]["loss"] == pytest.approx(6.24, abs=0.1)
    assert losses[4]["loss"] < losses[1]["loss"]


def test_tensor_parallel_losses_match_single_process(reference, tp2_then_tp1):
    _, full, _ = reference
    for it, record in tp2_then_tp1[1].items():
        assert record["loss"] == pytest.approx(full[it]["loss"], rel=1e-4), it
    for it in (1, 2):  # --log-params-norm and --log-num-zeros-in-grad count each weight once at TP2 too
        record = tp2_then_tp1[1][it]
        assert record["params_norm"] == pytest.approx(full[it]["params_norm"], rel=1e-5), it
        assert record["num_zeros"] == full[it]["num_zeros"], it


def test_nan_loss_stops_naming_the_iteration(cache_dir, tmp_path):
    """An absurd LR blows the weights up: the job stops at the first non-finite step."""
    save = tmp_path / "ckpt"
    proc = launch(cache_dir, *TINY, "--lr", 1e30, "--min-lr", 1e30, "--lr-warmup-iters", 0,
                  "--save-interval", 1, "--save", save, expect_rc=1)
    match = re.search(r"at iteration (\d+): stopping, this step is not saved; latest checkpoint: "
                      r"iteration (\d+)", proc.stderr)
    assert match, proc.stderr[-2000:]
    bad, latest = map(int, match.groups())
    assert latest == bad - 1 and (save / TRACKER).read_text() == str(latest)
    assert not (save / f"iter_{bad:07d}").exists()
    # Honest about what was kept: the step before the NaN was finite, its weights were not.
    assert "largest |weight| 1" in proc.stderr and "e+30" in proc.stderr
    assert "so it is not a good checkpoint; the one before it: none" in proc.stderr


def test_nan_read_a_step_late_still_names_its_own_iteration(cache_dir, tmp_path):
    """Logged and saved only at the end, a step's loss reaches the host during the next step
    (step.StepFlags): the stop names the same iteration as above (2), and nothing is saved."""
    save = tmp_path / "ckpt"
    proc = launch(cache_dir, *TINY, "--lr", 1e30, "--min-lr", 1e30, "--lr-warmup-iters", 0, "--log-interval", 4,
                  "--eval-interval", "null", "--save-interval", "null", "--save", save, expect_rc=1)
    assert re.search(r"at iteration 2: stopping, this step is not saved; no checkpoint in", proc.stderr), \
        proc.stderr[-2000:]
    assert not (save / TRACKER).exists()


@pytest.mark.both_releases
def test_sigterm_saves_then_exits_cleanly(cache_dir, tmp_path):
    save = tmp_path / "ckpt"
    args = [*TINY, "--train-iters", 100000, "--eval-interval", "null", "--save-interval", "null",
            "--save", save]
    with Job(command(1, args), environment(cache_dir), tmp_path) as job:
        job.wait_for(lambda line: line.lstrip().startswith("iteration"))  # training runs
        job.proc.send_signal(signal.SIGTERM)
        assert job.wait(timeout=120) == 0, job.stderr()[-3000:]
    rest = job.stdout()
    stopped = int(re.search(r"stopped after iteration (\d+)", rest).group(1))
    assert (save / TRACKER).read_text() == str(stopped)
    assert (save / f"iter_{stopped:07d}" / "model_args.json").is_file()


@pytest.mark.parametrize("args, message", [
    (["--data-path", "/nonexistent/corpus"], "data_path: '/nonexistent/corpus.bin' does not exist"),
    (["--tokenizer", "/nonexistent/tok"], "tokenizer '/nonexistent/tok': no tokenizer.json there"),
    (["--save", "/proc/spiral_ckpt"], "save '/proc/spiral_ckpt' is not writable"),
    (["--load", "/nonexistent/ckpt"], "load '/nonexistent/ckpt': no latest_checkpointed_iteration.txt"),
])
def test_clear_errors_before_training(cache_dir, tmp_path, args, message):
    proc = launch(cache_dir, *TINY, "--save", tmp_path / "ckpt", *args, expect_rc=2)
    assert message in proc.stderr and "iteration" not in proc.stdout


def test_exit_duration_saves_and_stops_every_rank_at_one_step(cache_dir, tmp_path):
    """--exit-duration-in-mins (Megatron-LM's time limit): past it, every rank stops after the
    same step, saved, exit 0; here a limit shorter than a step: after the first steps."""
    save = tmp_path / "ckpt"
    no_load = ("--load", "null")  # (the config would load what it saves)
    proc = launch(cache_dir, *TINY, "--train-iters", 8, "--exit-duration-in-mins", 1e-4, "--save", save, *no_load,
                  nproc=2)
    stopped = int((save / TRACKER).read_text())
    assert 1 <= stopped < 8 and "pretrain_spiral: exit duration 0.0001 min reached (" in proc.stdout
    assert f"started): stopped after iteration {stopped} (add --load {save} to resume)" in proc.stdout
    # relaunched without --load, it would write over the checkpoint from scratch: refused
    proc = launch(cache_dir, *TINY, "--train-iters", 8, "--save", save, *no_load, expect_rc=2)
    assert (f"save '{save}' holds iteration {stopped} of an earlier run, which this run, starting from scratch "
            f"(no --load), would write over: pass --load {save} to resume it, or another --save folder") in proc.stderr
    assert (save / TRACKER).read_text() == str(stopped)
