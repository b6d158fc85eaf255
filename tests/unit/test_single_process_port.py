"""A plain single process picks its own rendezvous port; one taken between the probe and the
store's bind (jobs and tests starting side by side: the crash test's relaunch failed with
EADDRINUSE) is replaced by another instead of failing the job; the job's
--distributed-timeout-minutes reaches the process group and Megatron's groups."""

import subprocess
import sys

from tests.conftest import PYTHONPATH, ROOT

SCRIPT = """
import os, socket
import torch.distributed as dist
import spiral_megatron.parallel as P
for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    os.environ.pop(key, None)
taken = socket.socket()
taken.bind(("127.0.0.1", 0))
taken.listen()
port, probes, probe = taken.getsockname()[1], [], P._free_port
P._free_port = lambda: probes.append(1) or (port if len(probes) == 1 else probe())  # the first is taken
P.initialize(backend="gloo", timeout_minutes=7)
import torch
from megatron.core import parallel_state
for group in (dist.distributed_c10d._get_default_group(), parallel_state.get_data_parallel_group()):
    print("timeout", group._get_backend(torch.device("cpu")).options._timeout)
print("world", dist.get_world_size(), "probes", len(probes), "port", os.environ["MASTER_PORT"] != str(port))
"""


def test_a_taken_port_is_replaced_and_the_timeout_reaches_every_group():
    env = {"PYTHONPATH": PYTHONPATH, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-6:] == ["world", "1", "probes", "2", "port", "True"], proc.stdout
    assert proc.stdout.split()[:4] == ["timeout", "0:07:00", "timeout", "0:07:00"], proc.stdout
