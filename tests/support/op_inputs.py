"""The tests' inputs of the multi-scale deformable attention op, and the plain per-point loop that its backends
must match."""

import torch

from deformable_detr.model.ms_deform_attn_inputs import OpInputs, ShapeSet, op_inputs


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


def random_inputs(shapes, B=2, Q=3, M=2, D=3, K=2, dtype=torch.float64, seed=0) -> OpInputs:
    """`op_inputs` for maps of `shapes` [(height, width), ...] at the tests' small sizes, in fp64 unless told:
    (value, spatial_shapes, locations, weights)."""
    return op_inputs(ShapeSet(tuple(tuple(level) for level in shapes), Q, M, D, K), B, dtype, seed=seed)
