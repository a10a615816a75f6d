"""Inputs of multi-scale deformable attention for its checks: named shape sets and one seeded generator.

The op's self-check (ms_deform_attn.py), the tests, scripts/benchmark.py and scripts/gpu_check.py all draw their
inputs here. The paper's input is an 800x1066 image: COCO's typical 640x480 photo, resized by the image processor
to a shortest edge of 800 (the longest at most 1333). Shapes as in `multi_scale_deformable_attention_reference`.
"""

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

PAPER_IMAGE = (800, 1066)  # (height, width)
LARGEST_IMAGE = (800, 1333)  # the processor's longest edge: the most value positions a COCO image gives


def feature_levels(height: int, width: int, levels: int = 4) -> tuple[tuple[int, int], ...]:
    """The maps (H_l, W_l) the backbone gives an image of height x width, at strides 8, 16, 32 and 64: every
    stride-2 convolution (padded) halves a side, rounding up."""
    sizes = [(height, width)]
    for _ in range(2 + levels):
        h, w = sizes[-1]
        sizes.append(((h + 1) // 2, (w + 1) // 2))
    return tuple(sizes[3:])


@dataclass(frozen=True)
class ShapeSet:
    """The op's sizes but the batch: levels [(H_l, W_l)], Q queries (None: one per value position, S, as in the
    encoder), M heads of D channels, K points per head and level."""

    levels: tuple[tuple[int, int], ...]
    queries: int | None = None
    heads: int = 8
    dim: int = 32
    points: int = 4

    @property
    def positions(self) -> int:
        """S = sum_l H_l * W_l."""
        return sum(h * w for h, w in self.levels)

    @property
    def num_queries(self) -> int:
        return self.positions if self.queries is None else self.queries


_TINY = ((8, 12), (4, 6), (2, 3), (1, 2))
SHAPE_SETS = {
    # the paper's M = 8, D = 32, L = 4, K = 4 on tiny maps: the kernels the self-check compiles are a model's
    "self_check": ShapeSet(((4, 5), (2, 3), (1, 2), (1, 1)), queries=5),
    # small enough for Triton's interpreter, which runs every program in Python
    "tiny": ShapeSet(_TINY, heads=2),
    "tiny_decoder": ShapeSet(_TINY, queries=10, heads=2),
    "tiny_two_levels": ShapeSet(_TINY[2:], heads=2),
    # an encoder layer and a decoder layer (300 queries) of the paper's image
    "encoder_800x1066": ShapeSet(feature_levels(*PAPER_IMAGE)),
    "decoder": ShapeSet(feature_levels(*PAPER_IMAGE), queries=300),
    "encoder_800x1333": ShapeSet(feature_levels(*LARGEST_IMAGE)),
}


class OpInputs(NamedTuple):
    """The op's arguments, in its order: value (B, S, M, D), spatial_shapes (L, 2) int64 on the CPU,
    sampling_locations (B, Q, M, L, K, 2), attention_weights (B, Q, M, L, K)."""

    value: torch.Tensor
    spatial_shapes: torch.Tensor
    sampling_locations: torch.Tensor
    attention_weights: torch.Tensor


def op_inputs(
    shapes: ShapeSet | str,
    batch: int = 1,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
    sampling: Literal["uniform", "encoder"] = "uniform",
) -> OpInputs:
    """Seeded inputs for a shape set (or its name in SHAPE_SETS): value in `dtype`; locations and weights in fp64
    for fp64, else fp32 (as the model gives them under autocast); on `device`.

    The weights are uniform in [0, 1), unnormalised (no kernel may rely on their sum). "uniform" locations lie in
    [-0.2, 1.2], points outside every side of the maps among them, and the first query's first and last points of
    head 0 sit on the maps' corners (0, 0) and (1, 1); "encoder" ones are an encoder layer's (`encoder_locations`).
    """
    shapes = SHAPE_SETS[shapes] if isinstance(shapes, str) else shapes
    g = torch.Generator().manual_seed(seed)
    B, S, Q, M, L, K = batch, shapes.positions, shapes.num_queries, shapes.heads, len(shapes.levels), shapes.points
    value = torch.randn(B, S, shapes.heads, shapes.dim, generator=g)
    if sampling == "encoder":
        if Q != S:
            raise ValueError(f"encoder sampling needs one query per value position ({S}), got {Q} queries")
        locations = encoder_locations(shapes, B, g)
    else:
        locations = torch.rand(B, Q, M, L, K, 2, generator=g) * 1.4 - 0.2
        if B > 0 and Q > 0:
            locations[0, 0, 0, :, 0] = 0.0
            locations[0, 0, 0, :, -1] = 1.0
    weights = torch.rand(B, Q, M, L, K, generator=g)
    precise = torch.float64 if dtype == torch.float64 else torch.float32
    return OpInputs(
        value.to(device, dtype),
        torch.tensor(shapes.levels, dtype=torch.int64),
        locations.to(device, precise),
        weights.to(device, precise),
    )


def encoder_locations(shapes: ShapeSet, batch: int, generator: torch.Generator, spread: float = 2.0) -> torch.Tensor:
    """(B, S, M, L, K, 2): where an encoder layer samples. Every query is a pixel of one level, and its reference
    point that pixel's centre; head m samples K points along its own direction, k + 1 pixels out at every level (the
    model's initial offsets), each moved by N(0, spread) pixels."""
    centres = []
    for h, w in shapes.levels:
        y, x = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
        centres.append(torch.stack([x, y], -1).view(-1, 2))
    reference = torch.cat(centres)[None, :, None, None, None, :]  # (1, S, 1, 1, 1, 2)
    M, K, L = shapes.heads, shapes.points, len(shapes.levels)
    angles = torch.arange(M) * (2 * math.pi / M)
    directions = torch.stack([angles.cos(), angles.sin()], -1)
    directions = directions / directions.abs().amax(-1, keepdim=True)  # (M, 2), as the model initialises them
    steps = torch.arange(1, K + 1, dtype=torch.float32)
    offsets = directions[:, None, None, :] * steps[None, None, :, None]  # (M, 1, K, 2) pixels
    offsets = offsets + spread * torch.randn(batch, shapes.positions, M, L, K, 2, generator=generator)
    sizes = torch.tensor([[w, h] for h, w in shapes.levels], dtype=torch.float32)[:, None, :]  # (L, 1, 2)
    return reference + offsets / sizes


def output_gradient(inputs: OpInputs, seed: int = 1) -> torch.Tensor:
    """A seeded gradient of the op's output, (B, Q, M * D), in the locations' float type, on their device."""
    B, S, M, D = inputs.value.shape
    Q = inputs.sampling_locations.shape[1]
    g = torch.Generator().manual_seed(seed)
    locations = inputs.sampling_locations
    return torch.randn(B, Q, M * D, generator=g).to(locations.device, locations.dtype)
