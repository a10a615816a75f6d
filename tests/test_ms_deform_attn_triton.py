"""The Triton kernels, run by Triton's interpreter on the CPU (TRITON_INTERPRET=1 must be set before Triton is
imported, hence a separate process); on a GPU the same kernels are compiled."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="Triton is an optional extra (it comes with CUDA builds of torch)")


def test_triton_kernels_under_the_interpreter():
    script = os.path.join(os.path.dirname(__file__), "triton_interpreted.py")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "all checks passed" in result.stdout
