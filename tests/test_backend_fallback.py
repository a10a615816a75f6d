"""The safety net of the fused kernels: a Triton backend that fails its self-check, or a C++ kernel that cannot be
built, warns once and leaves the work to the next backend."""

import os
import warnings

import pytest
import torch
from torch.utils import cpp_extension

from deformable_detr.model import ms_deform_attn, ms_deform_attn_cpu
from deformable_detr.model.ms_deform_attn import (
    available_backends,
    multi_scale_deformable_attention,
    multi_scale_deformable_attention_reference,
    triton_self_check,
)
from tests.support.op_inputs import random_inputs


def triton_on_the_cpu(monkeypatch, kernel):
    """Offers Triton on the CPU, unchecked, with `kernel` as its backend; no C++ kernel, so that the reference comes
    next, as on a GPU."""
    monkeypatch.setattr(ms_deform_attn, "_triton_checks", {})
    monkeypatch.setattr(ms_deform_attn, "triton_available", lambda device: True)
    monkeypatch.setattr(ms_deform_attn, "load_cpu_kernel", lambda: None)
    monkeypatch.setitem(ms_deform_attn.BACKENDS, "triton", kernel)


def run_twice(warning_pattern):
    """The op, auto backend, on a small input: the first call warns once (matching `warning_pattern`), the second
    not at all. -> (the warning's message, both outputs, the reference's output)."""
    value, shapes, locations, weights = random_inputs([(4, 5), (2, 3)], dtype=torch.float32)
    with pytest.warns(RuntimeWarning, match=warning_pattern) as record:
        first = multi_scale_deformable_attention(value, shapes, locations, weights)
    assert len(record) == 1, [str(w.message) for w in record]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = multi_scale_deformable_attention(value, shapes, locations, weights)
    return (
        str(record[0].message),
        (first, second),
        multi_scale_deformable_attention_reference(value, shapes, locations, weights),
    )


def test_a_triton_kernel_that_raises_warns_once_and_the_reference_takes_over(monkeypatch):
    def broken(*args):
        raise RuntimeError("PassManager::run failed\n" + "an MLIR dump\n" * 100)

    triton_on_the_cpu(monkeypatch, broken)
    message, outputs, reference = run_twice("fail their self-check on cpu")
    assert "RuntimeError: PassManager::run failed" in message and "grid_sample reference" in message
    assert len(message) < 2000
    assert all(torch.equal(output, reference) for output in outputs)
    assert available_backends("cpu") == ["reference"]
    assert triton_self_check(torch.device("cpu")).startswith("RuntimeError: PassManager::run failed")


@pytest.mark.parametrize("wrong", ["output", "value gradient"])
def test_a_triton_kernel_that_computes_wrong_values_warns_once_and_the_reference_takes_over(monkeypatch, wrong):
    def off_by_a_thousandth(value, shapes, locations, weights):
        if wrong == "value gradient":  # the same forward, a value gradient 1.001 times too large
            value = value * 1.001 - value.detach() * 0.001
        output = multi_scale_deformable_attention_reference(value, shapes, locations, weights)
        return output * 1.001 if wrong == "output" else output

    triton_on_the_cpu(monkeypatch, off_by_a_thousandth)
    message, outputs, reference = run_twice(f"its {wrong} differs from the reference's by 0.001")
    assert "on cpu" in message and "grid_sample reference" in message
    assert all(torch.equal(output, reference) for output in outputs)


def test_a_passing_self_check_keeps_triton_and_runs_once_per_device(monkeypatch):
    calls = []

    def correct(*args):
        calls.append(1)
        return multi_scale_deformable_attention_reference(*args)

    triton_on_the_cpu(monkeypatch, correct)
    # the first call may come from inference (the check needs gradients) and under autocast
    with warnings.catch_warnings(), torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        warnings.simplefilter("error")
        assert available_backends("cpu")[0] == "triton" and available_backends(torch.device("cpu"))[0] == "triton"
        assert triton_self_check("cpu") is None
    assert len(calls) == 1


def test_while_tracing_an_unchecked_device_gets_triton_and_a_failed_one_does_not(monkeypatch):
    def broken(*args):
        raise RuntimeError("no such GPU")

    triton_on_the_cpu(monkeypatch, broken)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert available_backends("cpu")[0] == "triton" and ms_deform_attn._triton_checks == {}
    with pytest.warns(RuntimeWarning, match="no such GPU"):
        triton_self_check("cpu")
    assert available_backends("cpu") == ["reference"]


def build_fails(monkeypatch):
    """The next load() of the C++ kernel tries to build it again, and the build fails with a long log."""

    def no_compiler(*args, **kwargs):
        raise RuntimeError(
            "Error building extension 'deformable_detr_ms_deform_attn_cpu'\nc++: command not found\n"
            + "a build log line\n" * 100
        )

    monkeypatch.setattr(cpp_extension, "load_inline", no_compiler)
    monkeypatch.setattr(ms_deform_attn, "_cpu_kernel", {"tried": False, "module": None})


def test_a_failed_cpu_kernel_build_warns_once_and_the_reference_takes_over(monkeypatch):
    build_fails(monkeypatch)
    monkeypatch.delenv("DEFORMABLE_DETR_NO_CPU_KERNEL", raising=False)
    message, outputs, reference = run_twice("fused CPU kernel of multi-scale deformable attention could not be built")
    assert "c++: command not found" in message and "several times slower" in message
    assert message.count("a build log line") < 10
    assert all(torch.equal(output, reference) for output in outputs)
    assert available_backends("cpu") == ["reference"]


def test_opting_out_of_the_cpu_kernel_is_silent(monkeypatch):
    build_fails(monkeypatch)
    monkeypatch.setenv("DEFORMABLE_DETR_NO_CPU_KERNEL", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ms_deform_attn.load_cpu_kernel() is None


def test_compile_error_summary_keeps_the_cause_at_the_end():
    """Triton's compile errors start with source lines and end with the cause: the summary keeps both ends."""
    source = "\n".join(f"    line {i} of the kernel" for i in range(20))
    error = RuntimeError(f"at 19:16:\n{source}\nValueError('dx is already defined. constexpr cannot be reassigned.')")
    summary = ms_deform_attn._compile_error_summary(error)
    assert summary.startswith("RuntimeError: at 19:16:") and summary.endswith("constexpr cannot be reassigned.')")
    assert len(summary.splitlines()) == 7 and "line 10 of" not in summary


def test_the_cpu_kernel_is_built_portable_and_kept_per_torch(monkeypatch, tmp_path):
    """No flag ties the cached binary to the CPU that built it (a home folder may be shared across machines; the
    kernels choose AVX2 + FMA at run time), and another torch builds into another folder instead of
    rebuilding the same one in turn."""
    assert not [flag for flag in ms_deform_attn_cpu.CFLAGS if flag.startswith(("-march", "-mtune", "-mavx"))]
    assert "__builtin_cpu_supports" in ms_deform_attn_cpu.CPP_SOURCE
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    here = ms_deform_attn_cpu.build_folder()
    monkeypatch.setattr(torch, "__version__", "2.99.0")
    there = ms_deform_attn_cpu.build_folder()
    assert here != there and here.startswith(str(tmp_path)) and there.startswith(str(tmp_path))


def test_the_cpu_kernel_says_compiling_only_when_it_compiles(monkeypatch, tmp_path, caplog):
    """The log says "compiling (once)" when there is no cached binary, and "loading" when there is one."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.delenv("DEFORMABLE_DETR_NO_CPU_KERNEL", raising=False)
    monkeypatch.setattr(cpp_extension, "load_inline", lambda **kwargs: "the module")
    caplog.set_level("INFO", logger=ms_deform_attn_cpu.__name__)
    for cached in (False, True):
        if cached:
            open(os.path.join(ms_deform_attn_cpu.build_folder(), "deformable_detr_ms_deform_attn_cpu.so"), "w").close()
        caplog.clear()
        assert ms_deform_attn_cpu.build() == "the module"
        assert ("loading the fused CPU" if cached else "compiling (once) the fused CPU") in caplog.text
