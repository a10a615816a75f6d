"""The training command under `accelerate launch`, as one machine or as several "machines" on this host: one
launch per machine rank, all started at once, meeting at 127.0.0.1 on a free port, as on a cluster."""

import os
import signal
import subprocess
import sys
import tempfile
import time

from tests.support.processes import free_port


def launch_machines(arguments, *, machines: int, processes: int = 2, timeout: float = 600) -> list[str]:
    """`accelerate launch --multi_gpu -m deformable_detr train ARGUMENTS` on `machines` machines of
    processes // machines CPU processes each (ACCELERATE_USE_CPU=1, gloo; one thread a process); -> each launch's
    output (stdout and stderr), machine rank 0 first. A launch that fails stops the others (which would wait for it
    until the rendezvous times out), and the assertion names it with the end of its output."""
    environment = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes)]
    command += ["--num_machines", str(machines), "--mixed_precision", "no", "--dynamo_backend", "no"]
    command += ["--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port())]
    train = ["-m", "deformable_detr", "train", *map(str, arguments)]
    outputs = [tempfile.TemporaryFile("w+") for _ in range(machines)]
    launches = [
        # a session of its own: a failure stops the launcher and the workers it started
        subprocess.Popen(
            [*command, "--machine_rank", str(rank), *train],
            env=environment,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        for rank, output in enumerate(outputs)
    ]
    failed, ended = None, ""
    try:
        failed = _wait(launches, time.monotonic() + timeout)
        if failed is not None:
            code = launches[failed].poll()
            ended = f"ran past {timeout} s" if code is None else f"exited with {code}"
    finally:
        for launch in launches:
            if launch.poll() is None:
                os.killpg(launch.pid, signal.SIGKILL)
                launch.wait()
    texts = []
    for output in outputs:
        output.seek(0)
        texts.append(output.read())
        output.close()
    assert failed is None, f"machine rank {failed} {ended}:\n{texts[failed][-4000:]}"
    return texts


def _wait(launches: list[subprocess.Popen], deadline: float) -> int | None:
    """Waits for every launch; -> the rank of the first that failed or ran past `deadline` (returncode None),
    or None when all exited with 0."""
    while time.monotonic() < deadline:
        codes = [launch.poll() for launch in launches]
        failed = next((rank for rank, code in enumerate(codes) if code not in (None, 0)), None)
        if failed is not None or all(code == 0 for code in codes):
            return failed
        time.sleep(0.2)
    return next(rank for rank, launch in enumerate(launches) if launch.poll() is None)
