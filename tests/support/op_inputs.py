"""Inputs of the multi-scale deformable attention op, and the plain per-point loop that its backends must match."""

import torch


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
    """Seeded (value, spatial_shapes, locations, weights) of the op for maps of `shapes` [(height, width), ...]."""
    g = torch.Generator().manual_seed(seed)
    S, L = sum(h * w for h, w in shapes), len(shapes)
    value = torch.randn(B, S, M, D, generator=g, dtype=dtype)
    # from outside the map on every side to well inside it, borders included
    locations = torch.rand(B, Q, M, L, K, 2, generator=g, dtype=dtype) * 1.4 - 0.2
    locations[0, 0, 0, :, 0] = torch.tensor([0.0, 0.0], dtype=dtype)
    locations[0, 0, 0, :, -1] = torch.tensor([1.0, 1.0], dtype=dtype)
    weights = torch.rand(B, Q, M, L, K, generator=g, dtype=dtype)
    return value, torch.tensor(shapes), locations, weights
