"""Data loading workers under signals (engine/signals.py), in fresh processes: SIGTERM sent to the whole
process group, over and over while workers start, kills none of them; and a run that fails with an error exits
instead of waiting forever for workers that ignore SIGTERM."""

import os
import signal
import subprocess
import sys
import time

from tests.support.processes import run_command

LOADER = """
import signal, sys, time, torch
from deformable_detr.engine.signals import ignore_stop_signals, worker_context

class Items(torch.utils.data.Dataset):
    def __len__(self):
        return 4
    def __getitem__(self, i):
        if sys.argv[1] == "fail" and i == 3:
            raise ValueError("item 3 is bad")
        time.sleep(0.01)
        return i

received = []
signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
loader = torch.utils.data.DataLoader(
    Items(), num_workers=2, worker_init_fn=ignore_stop_signals, multiprocessing_context=worker_context()
)
print("started", flush=True)
epochs = 0
while len(received) < int(sys.argv[2]):  # every epoch starts two new workers
    assert sorted(int(i) for i in torch.cat(list(loader))) == [0, 1, 2, 3]
    epochs += 1
print("epochs", epochs, "signals", len(received))
"""


def test_workers_outlive_sigterm_to_the_process_group():
    """30 SIGTERMs to the group, many while workers are starting: the main process receives each, no worker
    dies (a dead one raises "DataLoader worker ... is killed by signal: Terminated" in the main process)."""
    process = subprocess.Popen(
        [sys.executable, "-c", LOADER, "run", "30"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert process.stdout.readline() == "started\n"
    try:
        for _ in range(30):
            time.sleep(0.05)
            os.killpg(process.pid, signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, stderr[-3000:]
    assert stdout.endswith("signals 30\n")


def test_a_failing_run_with_workers_exits():
    """An error raised in a worker ends the main process with the error: at exit, multiprocessing terminates the
    workers, which must not ignore that SIGTERM (the run would wait forever)."""
    result = run_command([sys.executable, "-c", LOADER, "fail", "1"], timeout=60, returncode=1)
    assert "ValueError: item 3 is bad" in result.stderr
