"""The multi-scale deformable attention op against a plain per-point bilinear loop."""

import os
import subprocess
import sys

import pytest
import torch

from deformable_detr.ms_deform_attn import BACKENDS, available_backends, multi_scale_deformable_attention


def naive(value, shapes, locations, weights):
    """Loops over every sample: bilinear interpolation with zeros outside, pixel centres at (i + 0.5) / size."""
    B, S, M, D = value.shape
    _, Q, _, L, K, _ = locations.shape
    out = torch.zeros(B, Q, M, D, dtype=value.dtype)
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    for b in range(B):
        for q in range(Q):
            for m in range(M):
                for level, (h, w) in enumerate(shapes):
                    for k in range(K):
                        x = locations[b, q, m, level, k, 0].item() * w - 0.5
                        y = locations[b, q, m, level, k, 1].item() * h - 0.5
                        x0, y0 = int(torch.floor(torch.tensor(x))), int(torch.floor(torch.tensor(y)))
                        for yy, xx in ((y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)):
                            if 0 <= yy < h and 0 <= xx < w:
                                corner = (1 - abs(x - xx)) * (1 - abs(y - yy))
                                out[b, q, m] += (
                                    weights[b, q, m, level, k] * corner * value[b, starts[level] + yy * w + xx, m]
                                )
    return out.flatten(2)


def random_inputs(shapes, B=2, Q=3, M=2, D=3, K=2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    S, L = sum(h * w for h, w in shapes), len(shapes)
    value = torch.randn(B, S, M, D, generator=g, dtype=dtype)
    # from outside the map on every side to well inside it, borders included
    locations = torch.rand(B, Q, M, L, K, 2, generator=g, dtype=dtype) * 1.4 - 0.2
    locations[0, 0, 0, :, 0] = torch.tensor([0.0, 0.0], dtype=dtype)
    locations[0, 0, 0, :, -1] = torch.tensor([1.0, 1.0], dtype=dtype)
    weights = torch.rand(B, Q, M, L, K, generator=g, dtype=dtype)
    return value, torch.tensor(shapes), locations, weights


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


def test_without_a_compiler_the_reference_takes_over():
    script = (
        "import torch;"
        "from deformable_detr.ms_deform_attn import available_backends, multi_scale_deformable_attention as f;"
        "assert available_backends() == ['reference'], available_backends();"
        "out = f(torch.randn(1, 6, 2, 4), torch.tensor([[2, 3]]), torch.rand(1, 5, 2, 1, 2, 2),"
        " torch.rand(1, 5, 2, 1, 2), backend='cpu');"
        "assert out.shape == (1, 5, 8)"
    )
    env = {**os.environ, "DEFORMABLE_DETR_NO_CPU_KERNEL": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_bfloat16_inputs_run_in_fp32_and_come_back_in_bfloat16():
    value, spatial_shapes, locations, weights = random_inputs([(4, 5), (2, 3)], dtype=torch.float32)
    out = multi_scale_deformable_attention(
        value.bfloat16(), spatial_shapes, locations.bfloat16(), weights.bfloat16(), backend="cpu"
    )
    ref = multi_scale_deformable_attention(value, spatial_shapes, locations, weights, backend="reference")
    assert out.dtype == torch.bfloat16 and (out.float() - ref).abs().max() < 0.1
