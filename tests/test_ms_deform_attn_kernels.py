"""The Triton kernels against the grid_sample reference and the plain per-point loop.

Every test runs on two devices: on the CPU in Triton's interpreter, at the tiny shape sets (TRITON_INTERPRET=1 must
be set before Triton is imported: test_ms_deform_attn_triton.py runs this file in such a process), and natively on a
GPU, at the paper's shape sets, selected with `pytest -m cuda`.
"""

import dataclasses
import os

import pytest
import torch

pytest.importorskip("triton", reason="Triton is an optional extra (it comes with CUDA builds of torch)")

from deformable_detr.model.ms_deform_attn import (  # noqa: E402
    BACKENDS,
    _compare_triton_with_reference,
    available_backends,
    multi_scale_deformable_attention_triton,
    triton_self_check,
)
from deformable_detr.model.ms_deform_attn_inputs import SHAPE_SETS, OpInputs, op_inputs, output_gradient  # noqa: E402
from tests.support.op_inputs import naive, random_inputs  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
FLOATS = (torch.float32, torch.bfloat16, torch.float16)
# per device: the encoder's and the decoder's shape set, and the larger batch
ENCODER = {"cpu": "tiny", "cuda": "encoder_800x1066"}
DECODER = {"cpu": "tiny_decoder", "cuda": "decoder"}
BATCH = {"cpu": 2, "cuda": 8}


def usable(name: str) -> torch.device:
    """The device `name` ("cpu" or "cuda"), or a skip that says why this process cannot run the kernels there."""
    if name == "cpu" and not INTERPRETED:
        pytest.skip(
            "on the CPU the kernels run in Triton's interpreter: TRITON_INTERPRET=1 (test_ms_deform_attn_triton.py)"
        )
    if name == "cuda" and INTERPRETED:
        pytest.skip("TRITON_INTERPRET=1 runs the kernels on the CPU: the native GPU tests run without it")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device here: the native GPU tests need one (pytest -m cuda on a GPU machine)")
    return torch.device(name)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request) -> torch.device:
    return usable(request.param)


def run(backend: str, inputs: OpInputs, grad_output=None):
    """The output and, with grad_output, the gradients of value, locations and weights."""
    leaves = [
        t.detach().requires_grad_(grad_output is not None)
        for t in (inputs.value, inputs.sampling_locations, inputs.attention_weights)
    ]
    output = BACKENDS[backend](leaves[0], inputs.spatial_shapes, leaves[1], leaves[2])
    if grad_output is None:
        return output.detach(), None
    output.backward(grad_output.to(output.dtype))
    return output.detach(), [t.grad for t in leaves]


def relative(a, b) -> float:
    """max |a - b| / max |b|, in fp64."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() if b.numel() else 0.0


def assert_matches_the_reference(inputs: OpInputs, dtype, forward_limit, gradient_limit):
    """Triton (value in dtype) against the reference in fp32 (fp64 for fp64): the output and the three gradients,
    relative to the reference's largest."""
    precise = torch.float64 if dtype == torch.float64 else torch.float32
    grad_output = output_gradient(inputs).to(precise)
    reference, reference_grads = run("reference", inputs._replace(value=inputs.value.to(precise)), grad_output)
    output, grads = run("triton", inputs._replace(value=inputs.value.to(dtype)), grad_output)
    assert output.dtype == dtype
    assert relative(output, reference) <= forward_limit
    for part, ours, theirs in zip(("value", "locations", "weights"), grads, reference_grads):
        assert relative(ours, theirs) <= gradient_limit, part


def assert_agree(ours, reference, limit, name):
    """|ours - reference| <= limit * max(1, max |reference|)."""
    assert (ours - reference).abs().max() <= limit * max(1.0, reference.abs().max().item()), name


@pytest.mark.parametrize(
    "device_name, shape_set, batch, sampling, dtype",
    [
        pytest.param(
            device_name, shape_set, batch, sampling, dtype,
            marks=[pytest.mark.cuda] if device_name == "cuda" else [],
            id=f"{device_name}-{shape_set}-batch{batch}-{sampling}-{str(dtype)[6:]}",
        )
        for device_name in ("cpu", "cuda")
        for shape_set, batch, sampling, dtypes in (
            (ENCODER[device_name], 1, "uniform", FLOATS),
            (ENCODER[device_name], BATCH[device_name], "uniform", FLOATS[:2]),
            # an encoder layer's own locations: many queries add into the same value rows (the atomic adds' worst)
            (ENCODER[device_name], BATCH[device_name], "encoder", FLOATS[:1]),
            (DECODER[device_name], BATCH[device_name], "uniform", FLOATS),
        )
        for dtype in dtypes
    ],
)  # fmt: skip
def test_matches_the_reference_at_the_shape_sets(device_name, shape_set, batch, sampling, dtype):
    """Relative to the reference's largest: fp32 to 1e-5 (gradients 1e-4), bf16 and fp16 to 1e-2, in their type."""
    inputs = op_inputs(shape_set, batch, device=usable(device_name), sampling=sampling)
    exact = dtype == torch.float32
    assert_matches_the_reference(inputs, dtype, 1e-5 if exact else 1e-2, 1e-4 if exact else 1e-2)


def test_the_self_check_passes(device):
    """The self-check that guards the automatic choice passes; the automatic choice takes Triton on a GPU and never
    the interpreter on the CPU."""
    if device.type == "cuda":
        assert triton_self_check(device) is None and available_backends(device)[0] == "triton"
    else:
        assert "triton" not in available_backends("cpu"), available_backends("cpu")
        assert _compare_triton_with_reference(device) is None


def moved(inputs: OpInputs, device) -> OpInputs:
    """The inputs' tensors on `device` (spatial_shapes stays on the CPU)."""
    value, shapes, locations, weights = inputs
    return OpInputs(value.to(device), shapes, locations.to(device), weights.to(device))


SHAPES = [(5, 7), (3, 4), (2, 3), (1, 2), (1, 1)]


@pytest.mark.parametrize(
    "L, K, D, B, Q", [(1, 1, 4, 1, 1), (2, 3, 5, 2, 3), (3, 8, 12, 1, 2), (4, 4, 32, 1, 4), (5, 2, 3, 2, 1)]
)
def test_forward_matches_the_reference_and_the_naive_loop(device, L, K, D, B, Q):
    """L = 1..5, K = 1..8, D not a power of 2, batch > 1, a single query, points outside the maps and on their
    borders, padded (zero) positions: to 1e-5 of the reference in fp32, to 1e-10 of the naive loop in fp64."""
    inputs = random_inputs(SHAPES[:L], B=B, Q=Q, M=2, D=D, K=K, dtype=torch.float32, seed=L + K)
    inputs.value[:, -2:] = 0
    difference = (run("triton", moved(inputs, device))[0].cpu() - run("reference", inputs)[0]).abs().max()
    assert difference <= 1e-5, difference.item()
    inputs = random_inputs(SHAPES[:L], B=B, Q=Q, M=2, D=D, K=K, seed=L)
    difference = (run("triton", moved(inputs, device))[0].cpu() - naive(*inputs[:1], SHAPES[:L], *inputs[2:])).abs()
    assert difference.max() <= 1e-10, difference.max().item()


@pytest.mark.parametrize(
    "device_name, shapes, Q, M, D, K",
    [
        # small: every perturbation of gradcheck is a launch, and the interpreter runs each in Python
        pytest.param("cpu", [(3, 4), (2, 2)], 2, 1, 2, 2, id="cpu"),
        pytest.param("cuda", [(3, 4), (2, 2)], 3, 2, 4, 2, marks=pytest.mark.cuda, id="cuda"),
    ],
)
def test_gradients_are_exact_in_fp64(device_name, shapes, Q, M, D, K):
    device = usable(device_name)
    value, spatial_shapes, locations, weights = moved(random_inputs(shapes, B=1, Q=Q, M=M, D=D, K=K), device)
    leaves = tuple(t.requires_grad_(True) for t in (value, locations, weights))
    assert torch.autograd.gradcheck(
        lambda v, loc, w: multi_scale_deformable_attention_triton(v, spatial_shapes, loc, w),
        leaves,
        eps=1e-6,
        atol=1e-6,
    )


def test_fp32_gradients_match_the_references(device):
    inputs = random_inputs(SHAPES[:3], B=2, Q=3, M=2, D=6, K=4, dtype=torch.float32)
    grad_output = torch.linspace(-1, 1, 2 * 3 * 2 * 6).view(2, 3, 12)
    _, ours = run("triton", moved(inputs, device), grad_output.to(device))
    _, reference = run("reference", inputs, grad_output)
    for name, a, b in zip(("value", "locations", "weights"), ours, reference):
        assert_agree(a.cpu(), b, 1e-4, name)


def test_bf16_and_fp16_inputs_sum_in_fp32_and_come_back_in_their_type(device):
    inputs = random_inputs(SHAPES[:2], dtype=torch.float32, D=8, K=3, Q=5)
    reference, _ = run("reference", inputs)
    for dtype in (torch.bfloat16, torch.float16):
        value, shapes, locations, weights = (t.to(device, dtype) if t.is_floating_point() else t for t in inputs)
        leaves = [t.requires_grad_(True) for t in (value, locations, weights)]
        out = multi_scale_deformable_attention_triton(leaves[0], shapes, leaves[1], leaves[2])
        assert out.dtype == dtype and (out.float().cpu() - reference).abs().max() < 0.05, dtype
        out.sum().backward()
        assert all(t.grad.dtype == dtype and torch.isfinite(t.grad.float()).all() for t in leaves), dtype


def deterministic_and_atomic_gradients(inputs: OpInputs, grad_output) -> list[list[torch.Tensor]]:
    """The three gradients from the atomic backward, then twice from the deterministic one."""
    runs = []
    before = torch.are_deterministic_algorithms_enabled()
    try:
        for deterministic in (False, True, True):
            torch.use_deterministic_algorithms(deterministic)
            runs.append(run("triton", inputs, grad_output)[1])
    finally:
        torch.use_deterministic_algorithms(before)
    return runs


@pytest.mark.parametrize("dtype, limit", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_the_deterministic_backward_repeats_its_bits_and_matches_the_atomic_sums(device, dtype, limit):
    """Under torch.use_deterministic_algorithms(True) the value gradient is summed in a fixed order (no atomic
    adds): the same bits run after run, and the atomic sums' values to rounding; points outside the maps too."""
    inputs = moved(random_inputs(SHAPES[:4], B=2, Q=5, M=2, D=12, K=3, dtype=dtype), device)
    grad_output = torch.linspace(-1, 1, 2 * 5 * 24, dtype=dtype).view(2, 5, 24).to(device)
    atomic, ordered, again = deterministic_and_atomic_gradients(inputs, grad_output)
    for name, a, b, c in zip(("value", "locations", "weights"), atomic, ordered, again):
        assert_agree(b, a, limit, name)
        assert torch.equal(b, c), name


def test_the_deterministic_backward_at_an_encoder_shape_set(device):
    """An encoder layer at the larger batch, every query summing into the value rows around it: the same bits twice,
    and the atomic sums' values to 1e-5 (relative)."""
    shape_set = {"cpu": "tiny_two_levels", "cuda": "encoder_800x1066"}[device.type]
    inputs = op_inputs(shape_set, BATCH[device.type], device=device, sampling="encoder")
    atomic, ordered, again = deterministic_and_atomic_gradients(inputs, output_gradient(inputs))
    assert all(torch.equal(a, b) for a, b in zip(ordered, again))
    assert max(relative(a, b) for a, b in zip(ordered, atomic)) <= 1e-5


def test_a_nan_location_reaches_only_its_query_and_its_own_gradients(device):
    """NaN in its query's output (that head's D channels) and its point's gradients, as in the reference, and
    nowhere else: the kernels keep a NaN point's corners outside the map."""
    inputs = random_inputs(SHAPES[:2], B=1, Q=3, M=2, D=4, K=2, dtype=torch.float32)
    inputs.sampling_locations[0, 1, 0, 1, 0, 1] = float("nan")
    out, (grad_value, _, grad_weights) = run("triton", moved(inputs, device), torch.ones(1, 3, 8, device=device))
    assert out.isnan().sum() == 4 and out[0, 1, :4].isnan().all(), out
    assert not grad_value.isnan().any() and grad_weights.isnan().sum() == 1


def test_a_nan_location_at_the_encoder_shape_set(device):
    shape_set = dataclasses.replace(SHAPE_SETS[ENCODER[device.type]], queries=9)
    inputs = op_inputs(shape_set, device=device, seed=5)
    inputs.sampling_locations[0, 4, 0, 1, 2, 0] = float("nan")
    M, D = shape_set.heads, shape_set.dim
    output, grads = run("triton", inputs, torch.ones(1, 9, M * D, device=device))
    assert output[0, 4, :D].isnan().all() and output.isnan().sum() == D
    assert grads[0].isnan().sum() == 0 and grads[1].isnan().sum() in (1, 2)  # x's NaN, and y's or not
    assert grads[2].isnan().sum() == 1


def test_points_on_pixel_edges_and_centres_and_on_and_past_the_borders(device):
    levels = ((5, 7), (3, 4))
    shape_set = dataclasses.replace(SHAPE_SETS[ENCODER[device.type]], levels=levels, queries=40, points=3)
    inputs = op_inputs(shape_set, 2, device=device)
    edges = torch.tensor([0.0, 1.0, -0.5, 1.5, 1e-7, 1 - 1e-7])
    for level, (h, w) in enumerate(levels):
        for axis, size in ((0, w), (1, h)):
            grid = torch.cat([torch.arange(size + 1) / size, (torch.arange(size) + 0.5) / size, edges])
            locations = inputs.sampling_locations[..., level, :, axis]
            pick = torch.randint(len(grid), locations.shape, generator=torch.Generator().manual_seed(axis))
            inputs.sampling_locations[..., level, :, axis] = grid[pick].to(device)
    assert_matches_the_reference(inputs, torch.float32, 1e-5, 1e-4)


def test_padded_values(device):
    """Positions a padding mask zeroes: a padded image's bottom rows and right columns, at every level."""
    shape_set = dataclasses.replace(SHAPE_SETS[ENCODER[device.type]], queries=64)
    inputs = op_inputs(shape_set, 2, device=device, seed=3)
    start = 0
    for h, w in shape_set.levels:
        level = inputs.value[1, start : start + h * w].view(h, w, *inputs.value.shape[2:])
        level[h * 2 // 3 :] = 0
        level[:, w * 3 // 4 :] = 0
        start += h * w
    assert_matches_the_reference(inputs, torch.float32, 1e-5, 1e-4)


def test_non_contiguous_inputs(device):
    """Views into larger tensors."""
    shape_set = dataclasses.replace(SHAPE_SETS[ENCODER[device.type]], queries=50)
    value, shapes, locations, weights = op_inputs(shape_set, 2, device=device, seed=4)
    views = OpInputs(
        torch.cat([value, value], dim=-1)[..., ::2],
        shapes,
        locations.transpose(1, 2).contiguous().transpose(1, 2),
        torch.cat([weights, weights], dim=1)[:, ::2],
    )
    assert not any(t.is_contiguous() for t in (views.value, views.sampling_locations, views.attention_weights))
    assert_matches_the_reference(views, torch.float32, 1e-5, 1e-4)


def test_an_empty_batch(device):
    """Outputs and gradients of the inputs' shapes, no launch error."""
    shape_set = dataclasses.replace(SHAPE_SETS[ENCODER[device.type]], queries=7)
    inputs = op_inputs(shape_set, 0, device=device)
    M, D = shape_set.heads, shape_set.dim
    output, grads = run("triton", inputs, torch.zeros(0, 7, M * D, device=device))
    assert output.shape == (0, 7, M * D)
    assert [g.shape for g in grads] == [
        inputs.value.shape,
        inputs.sampling_locations.shape,
        inputs.attention_weights.shape,
    ]
