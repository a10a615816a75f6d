"""scripts/gpu_check.py on the CPU (`--device cpu --quick`: the Triton kernels in Triton's interpreter, small
models), so that the GPU check cannot rot between the sessions that have a GPU."""

import json
import os
import sys

import pytest

from tests.support.processes import run_command

pytest.importorskip("triton", reason="the op checks run the Triton kernels in Triton's interpreter")

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts", "gpu_check.py")


def test_gpu_check_runs_every_part_on_the_cpu(tmp_path):
    run_command([sys.executable, SCRIPT, "--device", "cpu", "--quick", "--sweep", "--out", tmp_path], timeout=900)
    report = json.loads((tmp_path / "report.json").read_text())
    rows = report["rows"]
    assert not [row for row in rows if row["verdict"] == "fail"]
    names = " | ".join(f"{row['section']}: {row['name']}" for row in rows)
    for expected in (
        "test_the_self_check_passes",
        "tiny-batch1-uniform-float32",
        "tiny-batch2-encoder-float32",  # an encoder layer's sampling pattern: correctness, speed and launch settings
        "encoder's locations",
        "encoder locations",
        "tiny_decoder",
        "float16",
        "bfloat16",
        "pixel_edges",
        "padded_values",
        "non_contiguous",
        "a_nan_location",
        "empty_batch",
        "gradients_are_exact_in_fp64",
        "deterministic_backward",
        "deterministic backward",
        "copy bandwidth",
        "forward+backward",
        "launch settings",
        "ours vs transformers",
        "torch.compile",
        "ours, bf16: loss",
        "transformers, fp16: step",
    ):
        assert expected in names, expected
    speed = next(row for row in rows if row["name"].endswith("torch.compile speed"))
    assert speed["figures"]["graphs"] >= 1 and speed["figures"]["graph_breaks"] == 0
    # every kernel test ran here, in Triton's interpreter, and passed
    kernel_tests = [row for row in rows if row["section"] == "op: kernel tests"]
    assert len(kernel_tests) >= 20 and all(row["verdict"] == "pass" for row in kernel_tests)
    # every other check compared something: values are real numbers below their limits
    checks = [row for row in rows if "limit" in row["figures"]]
    assert len(checks) >= 3 and all(0 <= row["figures"]["value"] <= row["figures"]["limit"] for row in checks)
    assert "| pass |" in (tmp_path / "report.md").read_text()
    profiled = next(row for row in rows if row["name"].endswith("one call profiled, eager and compiled"))
    assert profiled["figures"]["eager_kernels"] > profiled["figures"]["compiled_kernels"] > 0
    assert "===== compiled:" in (tmp_path / "profile.txt").read_text()


def test_only_runs_the_parts_asked_for(tmp_path):
    """--sweep times the launch settings with the speed part only: `--only model --sweep` is the model's rows."""
    command = [sys.executable, SCRIPT, "--device", "cpu", "--quick", "--sweep", "--only", "model", "--out", tmp_path]
    run_command(command, timeout=600)
    sections = {row["section"] for row in json.loads((tmp_path / "report.json").read_text())["rows"]}
    assert sections == {"inference, tiny model, 96x128"}


def test_gpu_check_without_cuda_says_so(tmp_path):
    """Asked for CUDA where there is none: a clear message and exit status 2, no traceback."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = run_command([sys.executable, SCRIPT, "--out", tmp_path], timeout=300, returncode=2)
    assert "CUDA is not available" in result.stdout and "Traceback" not in result.stderr
