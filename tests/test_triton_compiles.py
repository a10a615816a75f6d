"""The Triton kernels compile for real GPUs, without one: every launch the op makes (forward, backward with atomic
adds, and the deterministic backward's two kernels) is recorded on the CPU and compiled by the installed Triton for
sm_80 (A100) and sm_90 (H100, H200), at the model's sizes. Triton's interpreter (test_ms_deform_attn_kernels.py)
checks what the kernels compute; only a compile finds what Triton's GPU passes refuse (a kernel the interpreter
runs can still fail to compile for one architecture)."""

import pytest
import torch

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from deformable_detr.model import ms_deform_attn_triton as kernels  # noqa: E402
from deformable_detr.model.ms_deform_attn import kernel_shapes  # noqa: E402
from tests.support.op_inputs import random_inputs  # noqa: E402

KERNELS = ("_forward_kernel", "_backward_kernel", "_corners_kernel", "_ordered_sum_kernel")
POINTER_TYPES = {
    torch.float32: "*fp32",
    torch.bfloat16: "*bf16",
    torch.float16: "*fp16",
    torch.int64: "*i64",
    torch.int32: "*i32",
}


def recorded_launches(monkeypatch, dtype) -> list[tuple]:
    """(kernel, args, kwargs) of every launch of a forward, a backward and a deterministic backward: the kernels
    are replaced by recorders, so nothing runs (the outputs are left empty)."""
    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.kernel, args, kwargs))

    for name in KERNELS:
        monkeypatch.setattr(kernels, name, Recorder(getattr(kernels, name)))
    # the model's attention: 8 heads of 32 channels, 4 levels, 4 points
    shapes = [(10, 12), (5, 6), (3, 3), (2, 2)]
    value, _, locations, weights = random_inputs(shapes, B=1, Q=6, M=8, D=32, K=4, dtype=torch.float32)
    value = value.to(dtype)
    spatial_shapes, starts = kernel_shapes(shapes, "cpu")
    grad_output = torch.zeros(1, 6, 8, 32, dtype=dtype)
    kernels.forward(value, spatial_shapes, starts, locations, weights)
    kernels.backward(grad_output, value, spatial_shapes, starts, locations, weights)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        kernels.backward(grad_output, value, spatial_shapes, starts, locations, weights)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    return launches


def compile_for(kernel, args, kwargs, capability: int):
    """Triton's compile of one recorded launch for an NVIDIA GPU of that compute capability, with the attributes a
    GPU launch would have: tensors 16-byte aligned (as the caching allocator gives them)."""
    options = {"num_warps": kwargs.pop("num_warps", 4)}
    values = dict(zip(kernel.arg_names, args)) | kwargs
    signature, constants, attributes = {}, {}, {}
    for index, (name, parameter) in enumerate(zip(kernel.arg_names, kernel.params)):
        value = values[name]
        if parameter.is_constexpr:
            signature[name], constants[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name], attributes[(index,)] = POINTER_TYPES[value.dtype], [["tt.divisibility", 16]]
        else:
            signature[name] = "i32" if abs(value) < 2**31 else "i64"
    source = ASTSource(kernel, signature, constants, attributes)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)


@pytest.mark.parametrize(
    "dtype, capability",
    [(torch.float32, 80), (torch.float32, 90), (torch.bfloat16, 90)],
    ids=["fp32-sm80", "fp32-sm90", "bf16-sm90"],
)
def test_every_kernel_compiles_for_the_gpu(monkeypatch, dtype, capability):
    launches = recorded_launches(monkeypatch, dtype)
    names = [kernel.__name__ for kernel, _, _ in launches]
    deterministic = ["_corners_kernel", "_ordered_sum_kernel", "_backward_kernel"]
    assert names == ["_forward_kernel", "_backward_kernel", *deterministic]
    for kernel, args, kwargs in launches:
        compiled = compile_for(kernel, args, dict(kwargs), capability)
        assert compiled.asm["cubin"], kernel.__name__
