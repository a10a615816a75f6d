"""The Triton kernels, run by Triton's interpreter on the CPU (TRITON_INTERPRET=1 must be set before Triton is
imported, hence a separate process); on a GPU the same kernels are compiled."""

import os
import sys
from pathlib import Path

import pytest

from tests.support.processes import run_command

pytest.importorskip("triton", reason="Triton is an optional extra (it comes with CUDA builds of torch)")

ROOT = Path(__file__).resolve().parents[1]


def test_triton_kernels_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = run_command([sys.executable, "-m", "tests.support.triton_interpreted"], cwd=ROOT, env=env, timeout=900)
    assert "all checks passed" in result.stdout
