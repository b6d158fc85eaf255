"""Kill the training job at random moments, relaunch the same command, compare with a run that
was never killed (issue 21, item 2).

    python tools/crash_test.py --kills 30 --seed 0 [--nproc 2] [--out DIR]

First one uninterrupted run (the reference; its wall time is the kill window). Then, in a fresh
folder, the same command `--load X --save X` (a `--job` that names its own `--load`, a
`--finetune` one, keeps it) is launched again and again; each launch is
killed after a random delay drawn from the window (seeded), as a scheduler kills a job: every
process of it (torchrun, its workers, their loader workers and checkpoint writers) is first
stopped (SIGSTOP, so the snapshot is consistent), then SIGKILLed. A launch that finishes
before its delay ends that episode, and the next one starts in a new folder; episodes
alternate between synchronous and background (`--async-save`) saves. At the end every logged
training step of every launch, killed or not, must equal the reference's bitwise (loss and
learning rate), and every iteration must have been logged. Prints how many kills the job
survived and the phase each landed in (start-up, step, save, background save, publishing,
teardown); exits 0 when all survived, 1 otherwise.
"""

import argparse
import collections
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Optional, Tuple

import psutil

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "pretrain_spiral.py"
# A few seconds of training per launch on a CPU: 12 steps of the debug flavor, saves every 3.
JOB = ("--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "12", "--lr-warmup-iters", "1",
       "--log-interval", "1", "--eval-interval", "6", "--eval-iters", "1", "--save-interval", "3")


def command(nproc: int, args) -> list:
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return launcher + [str(SCRIPT), *map(str, args)]


def job_processes(pid: int) -> list:
    """`pid` and every process below it (torchrun's workers start sessions of their own)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


TAG = "SPIRAL_CRASH_TEST_JOB"  # set in a launch's environment: every process of it inherits it


def tagged(env: dict) -> Tuple[dict, str]:
    """`env` with a fresh tag that `kill_job` finds the launch's processes by."""
    tag = uuid.uuid4().hex
    return dict(env, **{TAG: tag}), tag


def tagged_processes(tag: str) -> list:
    """Every process whose environment carries `tag`: also those whose parent died first (a
    worker's checkpoint writer, left to init when torchrun exited), which `job_processes` misses."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get(TAG) == tag:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def kill_job(pid: int, tag: Optional[str] = None) -> None:
    """Stop every process of the job, then SIGKILL them all: no handler runs, as a scheduler's
    hard kill or a lost node. Stopping first keeps a process from starting another meanwhile.
    The job: `pid` and its descendants, and with `tag` every process carrying it (`tagged`)."""
    stopped = {}
    while True:
        new = [p for p in job_processes(pid) + (tagged_processes(tag) if tag else []) if p.pid not in stopped]
        if not new:
            break
        for p in new:
            try:
                p.send_signal(signal.SIGSTOP)
            except psutil.NoSuchProcess:
                pass
            stopped[p.pid] = p
    for p in stopped.values():
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(list(stopped.values()), timeout=30)


def phase(stdout: str, save: Path, final: int) -> str:
    """Where a launch was when it was stopped: from what it printed and what its folder holds."""
    if "pretrain_spiral: finished" in stdout or f"saved checkpoint {save / f'iter_{final:07d}'}" in stdout:
        return "teardown"
    if list(save.glob(".iter_*.replaced")):
        return "publishing"
    staging = list(save.glob(".iter_*.saving"))
    if staging:
        name = staging[0].name[1:-len(".saving")]
        return "background save" if f"{name} in the background" in stdout else "save"
    if not any(line.lstrip().startswith("iteration") for line in stdout.splitlines()):
        return "start-up"
    return "step"


def logged(path: Path) -> list:
    """Every training step's record in a --log-json file, in order (evaluation lines skipped)."""
    if not path.is_file():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


def differences(reference: dict, records: list, iterations: int) -> list:
    """What in `records` differs from the reference (loss and lr, bitwise) or is missing."""
    found = [f"iteration {r['iteration']}: loss {r['loss']!r} lr {r['lr']!r}, reference "
             f"{reference[r['iteration']]['loss']!r} {reference[r['iteration']]['lr']!r}"
             for r in records if (r["loss"], r["lr"]) != (reference[r["iteration"]]["loss"],
                                                          reference[r["iteration"]]["lr"])]
    missing = sorted(set(range(1, iterations + 1)) - {r["iteration"] for r in records})
    return found + ([f"iterations never logged: {missing}"] if missing else [])


class Episode:
    """One folder, one command, launched until a launch finishes."""

    def __init__(self, out: Path, number: int, nproc: int, background: bool, job: tuple, final: int = 0):
        self.folder = out / f"episode{number:02d}"
        self.save, self.log = self.folder / "ckpt", self.folder / "log.jsonl"
        load = () if "--load" in job else ("--load", self.save)  # a --finetune job names its own --load
        args = [*job, *load, "--save", self.save, "--log-json", self.log]
        self.command = command(nproc, args + (["--async-save"] if background else []))
        self.final = final  # the job's last iteration (the reference run's): what a finished launch saves
        self.launches, self.kills = 0, []

    def launch(self, delay, env, limit: float) -> bool:
        """Launch, and kill after `delay` s (None: never); True once a launch has finished.
        A launch not killed that runs past `limit` s is killed and raises: a hung relaunch is
        a failure, not a wait."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.launches += 1
        out_path = self.folder / f"launch{self.launches:02d}.out"
        env, tag = tagged(env)
        with open(out_path, "w") as out:
            job = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                   start_new_session=True)
            try:
                code = job.wait(timeout=limit if delay is None else delay)
            except subprocess.TimeoutExpired:
                if delay is None:
                    kill_job(job.pid, tag)
                    job.wait()
                    raise RuntimeError(f"{' '.join(self.command)} did not finish within {limit:.0f} s; see "
                                       f"{out_path}:\n" + out_path.read_text()[-3000:]) from None
                for p in job_processes(job.pid):  # freeze first: the phase is read from a still job
                    try:
                        p.send_signal(signal.SIGSTOP)
                    except psutil.NoSuchProcess:
                        pass
                self.kills.append(phase(out_path.read_text(), self.save, self.final))
                kill_job(job.pid, tag)
                job.wait()
                return False
        if code != 0:
            raise RuntimeError(f"{' '.join(self.command)} exited {code}; see {out_path}:\n"
                               + out_path.read_text()[-3000:])
        return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=30, help="how many launches to kill (default 30)")
    ap.add_argument("--seed", type=int, default=0, help="seeds the kill delays")
    ap.add_argument("--nproc", type=int, default=2, help="processes per job (1: no torchrun)")
    ap.add_argument("--out", type=Path, default=Path("crash_test"), help="folder for the runs (default ./crash_test)")
    ap.add_argument("--launch-timeout", type=float, default=900,
                    help="seconds a launch that is not killed may run before it counts as hung (default 900)")
    ap.add_argument("--job", nargs=argparse.REMAINDER, default=None,
                    help="the job's arguments instead of the built-in 12-step debug job (last option)")
    args = ap.parse_args(argv)
    job = tuple(args.job) if args.job else JOB
    # each launch makes its own rendezvous: a caller's torch.distributed variables (a test process
    # that initialised in-process holds its MASTER_PORT) would send it to a port in use
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)

    reference = Episode(args.out, 0, args.nproc, False, job)
    started = time.monotonic()
    reference.launch(None, env, args.launch_timeout)
    window = time.monotonic() - started
    ref = {r["iteration"]: r for r in logged(reference.log)}
    iterations = max(ref)
    print(f"reference: {iterations} steps in {window:.1f} s; killing {args.kills} launches at uniform "
          f"random moments in [0, {window:.1f}] s (seed {args.seed})", flush=True)

    episodes, problems = [], []
    while sum(len(e.kills) for e in episodes) < args.kills:
        episode = Episode(args.out, len(episodes) + 1, args.nproc, background=len(episodes) % 2 == 1, job=job,
                          final=iterations)
        episodes.append(episode)
        while sum(len(e.kills) for e in episodes) < args.kills:
            if episode.launch(rng.uniform(0, window), env, args.launch_timeout):
                break
            print(f"  kill {sum(len(e.kills) for e in episodes):3d}: episode {len(episodes)}, launch "
                  f"{episode.launches}, {episode.kills[-1]}", flush=True)
        else:
            episode.launch(None, env, args.launch_timeout)  # the last episode runs to its end
        problems += [f"episode {len(episodes)}: {d}" for d in differences(ref, logged(episode.log), iterations)]

    phases = collections.Counter(kill for e in episodes for kill in e.kills)
    kills = sum(phases.values())
    print(f"kills by phase: {dict(sorted(phases.items()))}")
    print(f"{len(episodes)} episodes, {sum(e.launches for e in episodes)} launches, {kills} kills")
    if problems:
        print("FAIL:\n  " + "\n  ".join(problems))
        return 1
    print(f"PASS: survived {kills} of {kills} kills; every logged step equals the uninterrupted run's "
          f"bitwise (loss and lr)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
