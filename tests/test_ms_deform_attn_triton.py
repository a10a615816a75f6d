"""The kernel tests of test_ms_deform_attn_kernels.py on the CPU, in Triton's interpreter: TRITON_INTERPRET=1 must
be set before Triton is imported, so they run in a pytest process of their own."""

import os
import re
import sys
from pathlib import Path

import pytest

from tests.support.processes import run_command

pytest.importorskip("triton", reason="Triton is an optional extra (it comes with CUDA builds of torch)")

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="this process runs the kernel tests itself")
def test_the_kernel_tests_pass_in_tritons_interpreter():
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not cuda"]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = run_command([*command, "tests/test_ms_deform_attn_kernels.py"], cwd=ROOT, env=env, timeout=1200)
    summary = result.stdout.strip().splitlines()[-1]
    assert re.search(r"\d+ passed", summary) and not re.search("failed|skipped|error", summary), summary
