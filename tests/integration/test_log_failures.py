"""A log file that cannot be written (a full disk) under a 2-process job: the run stops every
rank, saves, and ends in one line. Not a checkpoint test (CI runs it on megatron-core 0.19.2
only): what it checks is the job's own logging and stopping, the save it makes is an ordinary one."""

from spiral_megatron.job.checkpoint.checkpointing import TRACKER
from tests.integration.conftest import ROOT, TINY, command, environment
from tests.jobs import Job


def test_a_full_disk_under_the_metrics_log_saves_and_stops_every_rank(cache_dir, tmp_path):
    """The --log-json file's disk fills at iteration 2's line (rank 0 writes it): the run says
    so, stops every rank at the step where that is agreed, saves it, and ends with one line,
    exit 1. Before: rank 0 died of the OSError with a traceback and the steps since the last save
    were lost."""
    save = tmp_path / "ckpt"
    args = [*TINY, "--train-iters", 8, "--save-interval", 100, "--save", save, "--load", save,
            "--log-json", tmp_path / "log.jsonl"]
    env = dict(environment(cache_dir), SPIRAL_TEST_FAULT="full:log-json:2")
    cmd = command(2, args)
    cmd[cmd.index(str(ROOT / "examples" / "pretrain_spiral.py"))] = str(ROOT / "tests" / "integration" / "faulty_job.py")
    with Job(cmd, env, tmp_path, merge=True) as job:
        code = job.follow(timeout=300)
    out = "".join(line for _, line in job.lines)
    failure = (f"writing --log-json {tmp_path / 'log.jsonl'} failed at iteration 2 (OSError: [Errno 28] No space "
               "left on device); ")
    assert code == 1 and f"pretrain_spiral: {failure}" in out, out[-4000:]
    stopped = int((save / TRACKER).read_text())
    assert stopped in (3, 4), out[-4000:]  # the flag travels with the next step's reduction
    line = [line for _, line in job.lines if line.startswith(f"pretrain_spiral: error: {failure}")]
    assert len(line) == 1 and line[0].rstrip().endswith(f"stopped after iteration {stopped} (the same command "
                                                         "resumes)"), out[-4000:]
    assert "Traceback" not in out[out.index("Root Cause"):], out[-4000:]
