"""Checks of the Triton kernels, run by test_ms_deform_attn_triton.py as `python -m tests.support.triton_interpreted`
from the repository root, in a process with TRITON_INTERPRET=1 (set before Triton is imported), so that they run on
the CPU. Exits non-zero on the first failure."""

import os

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch  # noqa: E402

from deformable_detr.model.ms_deform_attn import (  # noqa: E402
    BACKENDS,
    _compare_triton_with_reference,
    available_backends,
)
from tests.support.op_inputs import naive, random_inputs  # noqa: E402

# the interpreter runs the kernels when called directly, but the automatic choice never picks it on the CPU
assert "triton" not in available_backends("cpu"), available_backends("cpu")
# the real kernels pass the self-check that guards the automatic choice on a GPU
failure = _compare_triton_with_reference(torch.device("cpu"))
assert failure is None, failure
SHAPES = [(5, 7), (3, 4), (2, 3), (1, 2), (1, 1)]


def op(backend, value, shapes, locations, weights):
    return BACKENDS[backend](value, shapes, locations, weights)


# forward against the reference in fp32 (and the naive loop in fp64): L = 1..5, K = 1..8, D not a power of 2,
# batch > 1, a single query, points outside the maps and on their borders, padded (zero) positions
for L, K, D, B, Q in [(1, 1, 4, 1, 1), (2, 3, 5, 2, 3), (3, 8, 12, 1, 2), (4, 4, 32, 1, 4), (5, 2, 3, 2, 1)]:
    shapes = SHAPES[:L]
    value, spatial_shapes, locations, weights = random_inputs(
        shapes, B=B, Q=Q, M=2, D=D, K=K, dtype=torch.float32, seed=L + K
    )
    value[:, -2:] = 0
    diff = (
        (
            op("triton", value, spatial_shapes, locations, weights)
            - op("reference", value, spatial_shapes, locations, weights)
        )
        .abs()
        .max()
    )
    assert diff <= 1e-5, (L, K, D, B, Q, diff.item())
    value, spatial_shapes, locations, weights = random_inputs(
        shapes, B=B, Q=Q, M=2, D=D, K=K, dtype=torch.float64, seed=L
    )
    diff = (
        (op("triton", value, spatial_shapes, locations, weights) - naive(value, shapes, locations, weights)).abs().max()
    )
    assert diff <= 1e-10, (L, K, D, diff.item())

# exact gradients in fp64 (small: every perturbation of gradcheck is a launch of the interpreter)
value, spatial_shapes, locations, weights = random_inputs([(3, 4), (2, 2)], B=1, Q=2, M=1, K=2, D=2)
inputs = tuple(t.requires_grad_(True) for t in (value, locations, weights))
assert torch.autograd.gradcheck(lambda v, loc, w: op("triton", v, spatial_shapes, loc, w), inputs, eps=1e-6, atol=1e-6)

# fp32 gradients against the reference's
value, spatial_shapes, locations, weights = random_inputs(SHAPES[:3], B=2, Q=3, M=2, D=6, K=4, dtype=torch.float32)
grads = {}
for backend in ("triton", "reference"):
    inputs = [t.clone().requires_grad_(True) for t in (value, locations, weights)]
    out = op(backend, inputs[0], spatial_shapes, inputs[1], inputs[2])
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
    grads[backend] = [t.grad for t in inputs]
for name, ours, ref in zip(("value", "locations", "weights"), grads["triton"], grads["reference"]):
    assert (ours - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item()), name

# bf16 and fp16 inputs: computed with fp32 sums, returned in their own type
value, spatial_shapes, locations, weights = random_inputs(SHAPES[:2], dtype=torch.float32, D=8, K=3, Q=5)
reference = op("reference", value, spatial_shapes, locations, weights)
for dtype in (torch.bfloat16, torch.float16):
    inputs = [t.to(dtype).requires_grad_(True) for t in (value, locations, weights)]
    out = op("triton", inputs[0], spatial_shapes, inputs[1], inputs[2])
    assert out.dtype == dtype and (out.float() - reference).abs().max() < 0.05, dtype
    out.sum().backward()
    assert all(t.grad.dtype == dtype and torch.isfinite(t.grad.float()).all() for t in inputs), dtype

# deterministic mode: the value gradient summed in a fixed order (no atomic adds), equal to the atomic sums to
# rounding, and the same bits run after run; fp64 too, and points outside the maps (random_inputs has some)
for dtype, limit in ((torch.float32, 1e-6), (torch.float64, 1e-12)):
    value, spatial_shapes, locations, weights = random_inputs(SHAPES[:4], B=2, Q=5, M=2, D=12, K=3, dtype=dtype)
    runs = []
    for deterministic in (False, True, True):
        torch.use_deterministic_algorithms(deterministic)
        inputs = [t.clone().requires_grad_(True) for t in (value, locations, weights)]
        out = op("triton", inputs[0], spatial_shapes, inputs[1], inputs[2])
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=dtype).view_as(out))
        runs.append([t.grad for t in inputs])
    torch.use_deterministic_algorithms(False)
    atomic, ordered, again = runs
    for name, a, b, c in zip(("value", "locations", "weights"), atomic, ordered, again):
        assert (a - b).abs().max() <= limit * max(1.0, a.abs().max().item()), (dtype, name)
        assert torch.equal(b, c), (dtype, name)

# a NaN location: NaN in its query's output and its own gradients, as in the reference, and nowhere else
value, spatial_shapes, locations, weights = random_inputs(SHAPES[:2], B=1, Q=3, M=2, D=4, K=2, dtype=torch.float32)
locations[0, 1, 0, 1, 0, 1] = float("nan")
inputs = [t.clone().requires_grad_(True) for t in (value, locations, weights)]
out = op("triton", inputs[0], spatial_shapes, inputs[1], inputs[2])
out.sum().backward()
assert out.isnan().sum() == 4 and out[0, 1, :4].isnan().all(), out
assert not inputs[0].grad.isnan().any() and inputs[2].grad.isnan().sum() == 1

print("triton kernels: all checks passed")
