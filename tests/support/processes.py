"""Running a command (mostly a fresh Python: sys.executable) in a subprocess, as the tests of scripts, console
commands, remote code and Hub clients do."""

import os
import socket
import subprocess
import sys


def run_command(command, *, env=None, cwd=None, timeout=300, returncode=0) -> subprocess.CompletedProcess:
    """Runs `command` (a list; its items are str()-ed) with its output captured as text, asserts that it exits with
    `returncode` (else the message ends with the last of its stdout and stderr) and returns the CompletedProcess.

    env: the whole environment (default: this process's); cwd: where it runs (default: here)."""
    result = subprocess.run(
        [str(item) for item in command], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == returncode, (
        f"{' '.join(map(str, command))[:300]} exited with {result.returncode}, not {returncode}\n"
        f"stdout: {result.stdout[-4000:]}\nstderr: {result.stderr[-4000:]}"
    )
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: str, *args, processes: int = 2, env: dict | None = None, returncode=0):
    """`script` in `processes` CPU processes (gloo, one thread each) through torchrun, as accelerate runs them;
    env: variables to add."""
    environment = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1") | (env or {})
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
    command += ["--master_port", str(free_port()), script, *args]
    return run_command(command, env=environment, timeout=600, returncode=returncode)
