"""The multi-scale deformable attention op against a plain per-point bilinear loop."""

import os
import sys

import pytest
import torch

from deformable_detr.model.ms_deform_attn import (
    BACKENDS,
    available_backends,
    kernel_shapes,
    multi_scale_deformable_attention,
)
from tests.support.op_inputs import naive, random_inputs
from tests.support.processes import run_command


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize(
    "shapes, K, D, Q",
    [([(3, 4)], 1, 3, 1), ([(4, 5), (2, 3)], 3, 5, 4), ([(5, 3), (3, 2), (2, 2), (1, 1), (1, 2)], 8, 2, 2)],
)
def test_forward_matches_the_naive_loop(backend, shapes, K, D, Q):
    value, spatial_shapes, locations, weights = random_inputs(shapes, K=K, D=D, Q=Q)
    out = multi_scale_deformable_attention(value, spatial_shapes, locations, weights, backend=backend)
    assert out.shape == (2, Q, 2 * D)
    assert (out - naive(value, shapes, locations, weights)).abs().max() <= 1e-10


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_gradients_are_exact(backend):
    value, spatial_shapes, locations, weights = random_inputs([(3, 4), (2, 2)], Q=2, K=2)
    for tensor in (value, locations, weights):
        tensor.requires_grad_(True)

    def op(v, loc, w):
        return multi_scale_deformable_attention(v, spatial_shapes, loc, w, backend=backend)

    assert torch.autograd.gradcheck(op, (value, locations, weights), eps=1e-6, atol=1e-6)


def test_unknown_backend_and_mismatched_shapes_are_named():
    value, spatial_shapes, locations, weights = random_inputs([(3, 4)])
    with pytest.raises(ValueError, match="'cuda-magic'"):
        multi_scale_deformable_attention(value, spatial_shapes, locations, weights, backend="cuda-magic")
    with pytest.raises(ValueError, match="cover 6 positions, value has 12"):
        multi_scale_deformable_attention(value, torch.tensor([[2, 3]]), locations, weights)


def _mismatched(value, locations, weights):
    """Inputs that disagree, each with the words the error must have."""
    return [
        ((value, [(3, 4)], locations[:, :, :, :1], weights[:, :, :, :1]), "cover 12 positions, value has 16"),
        ((value, [(3, 4), (2, 2)], locations[:, :, :, :1], weights[:, :, :, :1]), "the L=2 levels"),
        ((value, [(3, 4), (2, 2)], locations, weights[:, :1]), r"attention_weights must be \(B, Q, M, L, K\)"),
        ((value, [(3, 4), (2, 2)], locations, weights[..., :1]), "attention_weights must be"),
        ((value, [(3, 4), (2, 2)], locations[..., :1], weights), r"sampling_locations must be \(B, Q, M, L, K, 2\)"),
        ((value, [(3, 4), (2, 2)], locations[:1], weights[:1]), "value's B=2"),
        ((value[:, :, :1], [(3, 4), (2, 2)], locations, weights), "M=1"),
        ((value[0], [(3, 4), (2, 2)], locations, weights), r"value must be \(B, S, M, D\)"),
        ((value, [(-4, -4), (2, 2), (2, 2), (2, 2)], locations, weights), "must be positive"),
        ((value, torch.tensor([4, 4]), locations, weights), "must be \\(L, 2\\) sizes"),
        ((value, [4, 4], locations, weights), "must be \\(L, 2\\) sizes"),
        ((value.long(), [(3, 4), (2, 2)], locations, weights), "value must be a floating-point tensor"),
        ((value, [(3, 4), (2, 2)], locations, weights.long()), "attention_weights must be a floating-point"),
    ]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_inputs_that_disagree_are_refused_before_any_kernel_runs(backend):
    """The fused kernels trust the shapes, so every backend checks them first: each mismatch is refused with the
    tensor and the shape it needs named."""
    value, _, locations, weights = random_inputs([(3, 4), (2, 2)], B=2, Q=5, M=2, D=4, K=3, dtype=torch.float32)
    for inputs, message in _mismatched(value, locations, weights):
        with pytest.raises((ValueError, TypeError), match=message):
            multi_scale_deformable_attention(*inputs, backend=backend)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_a_nan_location_reaches_its_query_output_and_gradients(backend):
    """NaN in that query's output for that head and in the point's own gradients, as in the reference; nowhere
    else."""
    value, spatial_shapes, locations, weights = random_inputs([(3, 4), (2, 2)], Q=3, K=2)
    locations[0, 1, 0, 1, 0, 0] = float("nan")  # batch 0, query 1, head 0, level 1, point 0: x
    inputs = [t.clone().requires_grad_(True) for t in (value, locations, weights)]
    out = multi_scale_deformable_attention(inputs[0], spatial_shapes, inputs[1], inputs[2], backend=backend)
    out.sum().backward()
    D = value.shape[-1]
    assert out[0, 1, :D].isnan().all() and not out[0, 1, D:].isnan().any()  # head 0 of query 1, not head 1
    assert out.isnan().sum() == D  # no other query
    assert inputs[2].grad[0, 1, 0, 1, 0].isnan() and inputs[2].grad.isnan().sum() == 1
    assert inputs[1].grad[0, 1, 0, 1, 0].isnan().any()


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_mixed_float_types_give_the_values_type(backend):
    """fp32 values with fp64 locations, which the fused kernels take: every backend returns fp32, close to fp64's."""
    value, spatial_shapes, locations, weights = random_inputs([(3, 4), (2, 2)], dtype=torch.float32)
    out = multi_scale_deformable_attention(value, spatial_shapes, locations.double(), weights, backend=backend)
    exact = multi_scale_deformable_attention(value.double(), spatial_shapes, locations.double(), weights.double())
    assert out.dtype == torch.float32 and (out - exact).abs().max() < 1e-5


def test_the_fused_cpu_kernel_builds_here():
    """CI has a compiler: the fast path must be there (users without one fall back to the reference)."""
    assert available_backends("cpu")[0] == "cpu"


@pytest.mark.parametrize(
    "L, K, D, B, Q",
    [(1, 1, 32, 1, 1), (2, 3, 24, 2, 7), (4, 4, 32, 2, 50), (5, 8, 16, 1, 9), (3, 2, 64, 2, 5), (4, 5, 30, 1, 11)],
)
def test_fused_cpu_matches_reference_in_fp32_with_gradients(L, K, D, B, Q):
    shapes = [(9, 13), (5, 7), (3, 4), (2, 2), (1, 1)][:L]
    value, spatial_shapes, locations, weights = random_inputs(
        shapes, B=B, Q=Q, M=3, D=D, K=K, dtype=torch.float32, seed=L * 10 + K
    )
    value[:, -4:] = 0  # padded positions carry zeros, as the model masks them
    grads = {}
    for backend in ("cpu", "reference"):
        inputs = [t.clone().requires_grad_(True) for t in (value, locations, weights)]
        out = multi_scale_deformable_attention(inputs[0], spatial_shapes, inputs[1], inputs[2], backend=backend)
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
        grads[backend] = [out.detach()] + [t.grad for t in inputs]
    names = ("output", "value", "locations", "weights")
    for name, ours, ref in zip(names, grads["cpu"], grads["reference"]):
        tolerance = 1e-5 if name == "output" else 1e-4
        assert (ours - ref).abs().max() <= tolerance * max(1.0, ref.abs().max().item()), name


def test_level_tensors_made_under_inference_mode_serve_a_later_backward():
    """The fused kernels' level tensors are made once per shapes and shared: the first ones, made during an
    evaluation under inference mode, must still be savable for the backward of a training step after it."""
    shapes = [(7, 11), (4, 6)]  # shapes no other test uses: this test makes their shared tensors
    value, spatial_shapes, locations, weights = random_inputs(shapes, dtype=torch.float32, seed=3)
    with torch.inference_mode():
        evaluated = multi_scale_deformable_attention(value, spatial_shapes, locations, weights, backend="cpu")
    value.requires_grad_(True)
    trained = multi_scale_deformable_attention(value, spatial_shapes, locations, weights, backend="cpu")
    trained.sum().backward()
    assert torch.equal(trained.detach(), evaluated) and value.grad.abs().sum() > 0


def test_level_tensors_made_under_fake_tensor_mode_are_not_kept():
    """Shape tools trace with fake tensors, which hold no data: the shared level tensors must stay real ones."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    shapes = [(6, 10), (3, 5)]  # shapes no other test uses
    with FakeTensorMode(allow_non_fake_inputs=True):
        kernel_shapes(shapes, "cpu")
    level_shapes, starts = kernel_shapes(shapes, "cpu")
    assert (
        type(level_shapes) is torch.Tensor and level_shapes.tolist() == [[6, 10], [3, 5]] and starts.tolist() == [0, 60]
    )


def test_without_a_compiler_the_reference_takes_over():
    script = (
        "import torch;"
        "from deformable_detr.model.ms_deform_attn import available_backends, multi_scale_deformable_attention as f;"
        "assert available_backends() == ['reference'], available_backends();"
        "out = f(torch.randn(1, 6, 2, 4), torch.tensor([[2, 3]]), torch.rand(1, 5, 2, 1, 2, 2),"
        " torch.rand(1, 5, 2, 1, 2), backend='cpu');"
        "assert out.shape == (1, 5, 8)"
    )
    env = {**os.environ, "DEFORMABLE_DETR_NO_CPU_KERNEL": "1"}
    run_command([sys.executable, "-c", script], env=env, timeout=120)


def test_bfloat16_inputs_run_in_fp32_and_come_back_in_bfloat16():
    value, spatial_shapes, locations, weights = random_inputs([(4, 5), (2, 3)], dtype=torch.float32)
    out = multi_scale_deformable_attention(
        value.bfloat16(), spatial_shapes, locations.bfloat16(), weights.bfloat16(), backend="cpu"
    )
    ref = multi_scale_deformable_attention(value, spatial_shapes, locations, weights, backend="reference")
    assert out.dtype == torch.bfloat16 and (out.float() - ref).abs().max() < 0.1
