"""Running a command (mostly a fresh Python: sys.executable) in a subprocess, as the tests of scripts, console
commands, remote code and Hub clients do."""

import subprocess


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
