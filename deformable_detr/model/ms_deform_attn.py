"""Multi-scale deformable attention (MSDeformAttn): the op and the attention module.

    MSDeformAttn(z_q, p_q, {x_l}) = sum_m W_m [ sum_l sum_k A_mlqk * W'_m x_l(phi_l(p_q) + p_mlqk) ]

Notation, used in every shape below:
    B batch, Q queries, S = sum_l H_l * W_l flattened value positions, M heads, D = C / M channels per
    head, L feature levels, K sampling points per head and level.
"""

import logging
import math
import os
import threading
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .ms_deform_attn_cpu import build as build_cpu_kernel
from .ms_deform_attn_inputs import op_inputs, output_gradient
from .ms_deform_attn_triton import available as triton_available
from .ms_deform_attn_triton import backward as triton_backward
from .ms_deform_attn_triton import forward as triton_forward

logger = logging.getLogger(__name__)


def _shapes_as_list(spatial_shapes) -> list[tuple[int, int]]:
    """[(H_l, W_l)]; sizes given as a list stay as they are (symbolic under torch.export)."""
    if isinstance(spatial_shapes, torch.Tensor):
        return [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    return [(h, w) for h, w in spatial_shapes]


def _checked_inputs(value, spatial_shapes, sampling_locations, attention_weights) -> list[tuple[int, int]]:
    """spatial_shapes as [(H_l, W_l)], after checking that the op's inputs agree (shapes as in
    `multi_scale_deformable_attention_reference`): the fused kernels trust them, and a mismatch would read outside
    the tensors (on a GPU, an illegal memory access that ends the process's use of the device)."""
    tensors = {"value": value, "sampling_locations": sampling_locations, "attention_weights": attention_weights}
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {getattr(tensor, 'dtype', type(tensor))}")
    if isinstance(spatial_shapes, torch.Tensor):
        well_formed = spatial_shapes.dim() == 2 and spatial_shapes.shape[1] == 2
    else:
        well_formed = isinstance(spatial_shapes, (list, tuple)) and all(
            isinstance(level, (list, tuple)) and len(level) == 2 for level in spatial_shapes
        )
    if not well_formed or len(spatial_shapes) == 0:
        raise ValueError(f"spatial_shapes must be (L, 2) sizes (H_l, W_l), got {spatial_shapes}")
    shapes = _shapes_as_list(spatial_shapes)
    if any(isinstance(size, int) and size < 1 for level in shapes for size in level):
        raise ValueError(f"spatial_shapes must be positive, got {shapes}")
    if value.dim() != 4:
        raise ValueError(f"value must be (B, S, M, D), got shape {tuple(value.shape)}")
    if sum(h * w for h, w in shapes) != value.shape[1]:
        raise ValueError(
            f"spatial_shapes {shapes} cover {sum(h * w for h, w in shapes)} positions, value has {value.shape[1]}"
        )
    B, _, M, _ = value.shape
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(f"sampling_locations must be (B, Q, M, L, K, 2), got shape {tuple(sampling_locations.shape)}")
    _, Q, _, L, K, _ = sampling_locations.shape
    if (sampling_locations.shape[0], sampling_locations.shape[2], L) != (B, M, len(shapes)):
        raise ValueError(
            f"sampling_locations {tuple(sampling_locations.shape)} must be (B, Q, M, L, K, 2) with value's B={B}, "
            f"M={M} and the L={len(shapes)} levels of spatial_shapes"
        )
    if attention_weights.shape != sampling_locations.shape[:-1]:
        raise ValueError(
            f"attention_weights must be (B, Q, M, L, K) = {tuple(sampling_locations.shape[:-1])} as "
            f"sampling_locations, got {tuple(attention_weights.shape)}"
        )
    devices = {t.device for t in tensors.values()}
    if len(devices) > 1:
        raise ValueError(f"value, sampling_locations and attention_weights are on different devices: {devices}")
    return shapes


def multi_scale_deformable_attention_reference(value, spatial_shapes, sampling_locations, attention_weights):
    """The grid_sample reference: per level, bilinear samples (zeros outside, align_corners=False).

    Args:
        value: (B, S, M, D), the L flattened maps one after the other, row-major.
        spatial_shapes: (L, 2) int64 tensor or list of (H_l, W_l).
        sampling_locations: (B, Q, M, L, K, 2) as (x, y); (0, 0) is the top-left corner of the map and
            (1, 1) the bottom-right one, so pixel centres lie at ((j + 0.5) / W, (i + 0.5) / H).
        attention_weights: (B, Q, M, L, K).
    Returns:
        (B, Q, M * D), in value's float type (computed in the widest of the inputs' types, as grid_sample takes one)
    """
    shapes = _checked_inputs(value, spatial_shapes, sampling_locations, attention_weights)
    B, _, M, D = value.shape
    _, Q, _, L, K, _ = sampling_locations.shape
    precise = torch.promote_types(torch.promote_types(value.dtype, sampling_locations.dtype), attention_weights.dtype)
    value_per_level = value.to(precise).split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations.to(precise) - 1  # grid_sample wants [-1, 1]
    sampled = []
    for level, (h, w) in enumerate(shapes):
        # (B, H*W, M, D) -> (B*M, D, H, W)
        value_l = value_per_level[level].permute(0, 2, 3, 1).reshape(B * M, D, h, w)
        # (B, Q, M, K, 2) -> (B*M, Q, K, 2)
        grid_l = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        # (B*M, D, Q, K)
        sampled.append(F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False))
    # (B, Q, M, L, K) -> (B*M, 1, Q, L*K)
    weights = attention_weights.to(precise).transpose(1, 2).reshape(B * M, 1, Q, L * K)
    # (B*M, D, Q, L*K) -> (B*M, D, Q) -> (B, M*D, Q)
    output = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1).view(B, M * D, Q)
    return output.transpose(1, 2).contiguous().to(value.dtype)


# The op namespace follows this module's import name, so that our package and a copy of this file loaded from
# the Hub with trust_remote_code can live in one process.
_NAMESPACE = __name__.replace(".", "_")


def _fused_op(name, kernel_forward, kernel_backward):
    """A torch.library custom op (with a fake for torch.compile / torch.export, and autograd) around a kernel pair:
    kernel_forward(value, shapes, starts, locations, weights) -> (B, Q, M, D);
    kernel_backward(grad_output, value, shapes, starts, locations, weights) -> grads of value, locations, weights."""
    Tensor = torch.Tensor

    def forward(
        value: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        sampling_locations: Tensor,
        attention_weights: Tensor,
    ) -> Tensor:
        return kernel_forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)

    def backward(
        grad_output: Tensor,
        value: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        sampling_locations: Tensor,
        attention_weights: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        return tuple(
            kernel_backward(
                grad_output.contiguous(),
                value,
                spatial_shapes,
                level_start_index,
                sampling_locations,
                attention_weights,
            )
        )

    op = torch.library.custom_op(f"{_NAMESPACE}::{name}", forward, mutates_args=())
    op_backward = torch.library.custom_op(f"{_NAMESPACE}::{name}_backward", backward, mutates_args=())

    @op.register_fake
    def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        B, _, M, D = value.shape
        return value.new_empty(B, sampling_locations.shape[1], M, D)

    @op_backward.register_fake
    def _(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        return torch.empty_like(value), torch.empty_like(sampling_locations), torch.empty_like(attention_weights)

    def save_inputs(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def differentiate(ctx, grad_output):
        value, shapes, starts, locations, weights = ctx.saved_tensors
        grad_value, grad_locations, grad_weights = op_backward(grad_output, value, shapes, starts, locations, weights)
        return grad_value, None, None, grad_locations, grad_weights

    op.register_autograd(differentiate, setup_context=save_inputs)
    return op


def _compile_error_summary(error: BaseException, lines: int = 6, width: int = 200) -> str:
    """A kernel's build or compile error as "Type: message", at most `lines` lines (the first and the last: build
    logs and Triton's compile errors put the cause at the end), each cut at `width` characters."""
    text = f"{type(error).__name__}: {error}".splitlines()
    if len(text) > lines:
        text = text[: lines // 2] + ["[...]"] + text[-(lines - lines // 2) :]
    return "\n".join(line if len(line) <= width else line[:width] + " [...]" for line in text)


_cpu_kernel = {"tried": False, "module": None}
_cpu_kernel_lock = threading.Lock()


def load_cpu_kernel():
    """The fused C++ kernel (ms_deform_attn_cpu.py), built once per process; None where it cannot be built (no
    compiler) or with DEFORMABLE_DETR_NO_CPU_KERNEL=1.

    A failed build warns once (RuntimeWarning), as the grid_sample reference then takes over; the opt-out is silent.
    """
    with _cpu_kernel_lock:
        if _cpu_kernel["tried"]:
            return _cpu_kernel["module"]
        _cpu_kernel["tried"] = True
        if os.environ.get("DEFORMABLE_DETR_NO_CPU_KERNEL") == "1":
            return None
        try:
            _cpu_kernel["module"] = build_cpu_kernel()
        except Exception as error:  # noqa: BLE001 -- no compiler, no headers: the reference takes over
            logger.info("the fused CPU kernel's build failed:\n%s", error)  # in full, for the training log
            warnings.warn(
                "The fused CPU kernel of multi-scale deformable attention could not be built:\n"
                f"{_compile_error_summary(error)}\n"
                "Using the grid_sample reference instead: several times slower on the CPU and more memory. "
                "Set DEFORMABLE_DETR_NO_CPU_KERNEL=1 to skip the build (and this warning).",
                RuntimeWarning,
                stacklevel=2,
            )
        return _cpu_kernel["module"]


_FUSED = {
    "cpu": _fused_op(
        "ms_deform_attn_cpu", lambda *a: load_cpu_kernel().forward(*a), lambda *a: load_cpu_kernel().backward(*a)
    ),
    "triton": _fused_op("ms_deform_attn_triton", triton_forward, triton_backward),
}
# the C++ kernel computes in fp32 or fp64; Triton also takes bf16 and fp16 (and sums in fp32)
_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "triton": (torch.float32, torch.float64, torch.bfloat16, torch.float16),
}


def kernel_shapes(shapes: list[tuple[int, int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused kernels' view of the levels [(H_l, W_l)]: (spatial_shapes (L, 2), level_start_index (L,)), int64,
    level l's positions starting at the sum of the earlier levels' H * W.

    Made once per shapes, device and CUDA stream, and shared (read-only) by every later call there: a copy to a
    GPU waits until the GPU has done all the work queued before it, and each attention layer of a forward asks for
    the same ones. The last 64 are kept.
    """
    if torch.compiler.is_compiling():  # constants of the compiled graph, or sizes left symbolic by torch.export
        return _kernel_shapes(shapes, torch.device(device))
    device = _indexed(torch.device(device))
    # per stream: a tensor dropped from the cache goes back to its stream's memory, safe only where it was used
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None
    key = (tuple((int(h), int(w)) for h, w in shapes), device, stream)
    tensors = _shared_kernel_shapes.get(key)
    if tensors is None:
        with torch.inference_mode(False):  # made in inference mode, they could not be saved for a later backward
            tensors = _kernel_shapes(key[0], device)
        if all(type(t) is torch.Tensor for t in tensors):  # not fake tensors (FakeTensorMode), which hold no data
            with _shared_kernel_shapes_lock:
                if len(_shared_kernel_shapes) >= 64:
                    del _shared_kernel_shapes[next(iter(_shared_kernel_shapes))]  # the oldest
                _shared_kernel_shapes[key] = tensors
    return tensors


_shared_kernel_shapes: dict = {}  # (shapes, device, stream) -> kernel_shapes' tensors
_shared_kernel_shapes_lock = threading.Lock()


def _kernel_shapes(shapes, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    sizes = [h * w for h, w in shapes]
    starts = torch.tensor([sum(sizes[:level]) for level in range(len(sizes))], dtype=torch.int64, device=device)
    return torch.tensor(shapes, dtype=torch.int64, device=device), starts


def _fused(backend, value, spatial_shapes, sampling_locations, attention_weights):
    """A fused kernel behind the op's signature; shapes as in `multi_scale_deformable_attention_reference`."""
    checked = _checked_inputs(value, spatial_shapes, sampling_locations, attention_weights)
    shapes, starts = kernel_shapes(checked, value.device)
    dtype = value.dtype if value.dtype in _DTYPES[backend] else torch.float32
    # locations and weights stay in the sums' precision: in bf16 a location on a 167-pixel-wide map would be
    # off by up to a third of a pixel
    precise = torch.float64 if dtype == torch.float64 else torch.float32
    B, Q, M = sampling_locations.shape[:3]
    output = _FUSED[backend](
        value.to(dtype).contiguous(),
        shapes,
        starts,
        sampling_locations.to(precise).contiguous(),
        attention_weights.to(precise).contiguous(),
    )
    return output.view(B, Q, M * value.shape[-1]).to(value.dtype)


def multi_scale_deformable_attention_cpu(value, spatial_shapes, sampling_locations, attention_weights):
    """The fused C++ kernel (ms_deform_attn_cpu.py); fp32 and fp64, other float types computed in fp32."""
    return _fused("cpu", value, spatial_shapes, sampling_locations, attention_weights)


def multi_scale_deformable_attention_triton(value, spatial_shapes, sampling_locations, attention_weights):
    """The Triton kernels (ms_deform_attn_triton.py): fp32, bf16, fp16 with fp32 sums (fp64 for fp64)."""
    return _fused("triton", value, spatial_shapes, sampling_locations, attention_weights)


BACKENDS = {
    "reference": multi_scale_deformable_attention_reference,
    "cpu": multi_scale_deformable_attention_cpu,
    "triton": multi_scale_deformable_attention_triton,
}


_triton_checks: dict[torch.device, str | None] = {}  # device -> why Triton failed its self-check; None: passed
_triton_checks_lock = threading.Lock()
_FALLBACKS = {"cpu": "the fused C++ kernel", "reference": "the grid_sample reference (slower, more memory)"}


def _indexed(device: torch.device) -> torch.device:
    """`device` with its index, so that torch.device("cuda") and the current "cuda:i" are one device."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _compare_triton_with_reference(device: torch.device) -> str | None:
    """Forward and backward of the Triton kernels against the reference, in fp32, on the "self_check" inputs of
    ms_deform_attn_inputs.py (the paper's heads, levels and points on tiny maps, so that the kernels compiled for
    the check are those a standard model runs next: one compile, not two). -> the mismatch, or None."""
    # the caller may be in no_grad, inference mode or autocast
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
        inputs = op_inputs("self_check", device=device)
        grad_output = output_gradient(inputs)
        results = {}
        for backend in ("triton", "reference"):
            value, locations, weights = (
                t.detach().requires_grad_(True)  # fresh leaves
                for t in (inputs.value, inputs.sampling_locations, inputs.attention_weights)
            )
            output = BACKENDS[backend](value, inputs.spatial_shapes, locations, weights)
            output.backward(grad_output)
            results[backend] = [output.detach(), value.grad, locations.grad, weights.grad]
    names = ("output", "value gradient", "sampling_locations gradient", "attention_weights gradient")
    for name, ours, reference in zip(names, results["triton"], results["reference"]):
        difference = ((ours - reference).abs().max() / reference.abs().max().clamp(min=1.0)).item()
        if not difference <= 1e-4:  # NaN included
            return f"its {name} differs from the reference's by {difference:.2g} (relative)"
    return None


@torch.compiler.assume_constant_result  # torch.compile calls it while tracing: the build's lock breaks no graph
def _cpu_kernel_loads() -> bool:
    return load_cpu_kernel() is not None


def _backends_without_triton(device: torch.device) -> list[str]:
    """The backends after Triton on `device`, fastest first."""
    return (["cpu"] if device.type == "cpu" and _cpu_kernel_loads() else []) + ["reference"]


def triton_self_check(device: torch.device | str) -> str | None:
    """Why the Triton kernels cannot be used on `device`, or None when they pass their self-check there.

    The check runs once per device and process (the result is cached): forward and backward of a small fp32
    input against the grid_sample reference, milliseconds on a GPU. `available_backends` runs it before it
    first offers Triton for a device. A failure (an exception, such as a Triton compile error, or a relative
    difference over 1e-4) warns once (RuntimeWarning) and the device uses the next backend from then on. The
    explicit `multi_scale_deformable_attention_triton` (BACKENDS["triton"]) stays a direct, unchecked call.
    """
    device = _indexed(torch.device(device))
    if not triton_available(device):
        return f"Triton is not available on {device}"
    with _triton_checks_lock:
        if device not in _triton_checks:
            try:
                failure = _compare_triton_with_reference(device)
            except Exception as error:  # noqa: BLE001 -- whatever breaks, the next backend takes over
                failure = _compile_error_summary(error)
            if failure is not None:
                name = f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)
                warnings.warn(
                    f"The Triton kernels of multi-scale deformable attention fail their self-check on {name}: "
                    f"{failure}\nUsing {_FALLBACKS[_backends_without_triton(device)[0]]} instead.",
                    RuntimeWarning,
                    stacklevel=2,
                )
            _triton_checks[device] = failure
        return _triton_checks[device]


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The backends that can run on `device` here, fastest first; Triton once it passes `triton_self_check`."""
    device = torch.device(device)
    others = _backends_without_triton(device)
    if not triton_available(device):
        return others
    # torch.compile and torch.export trace with fake tensors, on which no check can run: there a device not yet
    # checked gets Triton unchecked, and the first eager call is where the check happens
    if torch.compiler.is_compiling():
        failure = _triton_checks.get(_indexed(device))
    else:
        failure = triton_self_check(device)
    return others if failure else ["triton", *others]


def multi_scale_deformable_attention(value, spatial_shapes, sampling_locations, attention_weights, backend="auto"):
    """Multi-scale deformable attention; shapes as in `multi_scale_deformable_attention_reference`.

    `backend` is "auto" (the fastest available for the inputs' device; under torch.export the reference, made of
    standard ops) or a name in `BACKENDS`; a backend that cannot run here falls back to the fastest one that can.
    """
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"unknown multi-scale deformable attention backend {backend!r}; available: {sorted(BACKENDS)}")
    if backend == "auto" and torch.compiler.is_exporting():
        # torch.export (and so ONNX export) records standard ops, which run anywhere, not the fused kernels
        backend = "reference"
    usable = available_backends(value.device)
    if backend not in usable:
        backend = usable[0]
    return BACKENDS[backend](value, spatial_shapes, sampling_locations, attention_weights)


class MultiScaleDeformableAttention(nn.Module):
    """MSDeformAttn with its projections: offsets and weights from the query, values from the input maps."""

    def __init__(self, d_model: int, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)

    def initial_sampling_offsets(self) -> torch.Tensor:
        """The paper's init of `sampling_offsets.bias`, (M * L * K * 2,): head m's K points start on a ray
        at angle 2*pi*m/M, at distances 1..K (in pixels of each level)."""
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid = grid.repeat(1, self.n_levels, self.n_points, 1)
        return (grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)).flatten()

    def forward(self, query, reference_points, input_flatten, spatial_shapes, input_padding_mask=None):
        """
        Args:
            query: (B, Q, C), position embedding already added.
            reference_points: (B, Q, L, 2) points (x, y) or (B, Q, L, 4) boxes (cx, cy, w, h), in [0, 1] of each
                level's map, top-left (0, 0).
            input_flatten: (B, S, C), the L maps flattened and concatenated.
            spatial_shapes: [(H_l, W_l)] as ints (or an (L, 2) int64 tensor).
            input_padding_mask: (B, S) bool, True on padding; padded positions contribute zeros.
        Returns:
            the output (B, Q, C) and the attention weights (B, Q, M, L, K) it summed with
        """
        value = self.project_values(input_flatten, input_padding_mask)
        return self.attend(query, reference_points, value, spatial_shapes)

    def project_values(self, input_flatten, input_padding_mask=None):
        """The values the queries sample: input_flatten (B, S, C), input_padding_mask (B, S) -> (B, S, M, C / M),
        zero on padding."""
        B, S, _ = input_flatten.shape
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:  # padded positions contribute zeros
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        return value.view(B, S, self.n_heads, self.d_model // self.n_heads)

    def attend(self, query, reference_points, value, spatial_shapes):
        """The queries' side: query (B, Q, C) and reference_points as in `forward`, value (B, S, M, C / M) from
        `project_values` -> the output (B, Q, C) and the attention weights (B, Q, M, L, K).

        The weights are computed before the sampling in every case, so returning them costs nothing, and the fused
        kernel is differentiable in them: gradients reach weights that a caller holds on to."""
        B, Q, _ = query.shape
        M, L, K = self.n_heads, self.n_levels, self.n_points
        offsets = self.sampling_offsets(query).view(B, Q, M, L, K, 2)
        weights = F.softmax(self.attention_weights(query).view(B, Q, M, L * K), -1).view(B, Q, M, L, K)
        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level: normalise by (W_l, H_l)
            normalizer = kernel_shapes(_shapes_as_list(spatial_shapes), offsets.device)[0].flip(-1).to(offsets.dtype)
            locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            # offsets are relative to the box: K points spread over half its width and height
            centre, size = reference_points[:, :, None, :, None, :2], reference_points[:, :, None, :, None, 2:]
            locations = centre + offsets / K * size * 0.5
        else:
            raise ValueError(
                f"reference_points must end in 2 or 4 coordinates, got shape {tuple(reference_points.shape)}"
            )
        output = multi_scale_deformable_attention(value, spatial_shapes, locations, weights)
        return self.output_proj(output), weights
