"""The GPU kernels of multi-scale deformable attention in Triton (which ships with CUDA builds of torch).

One program handles BLOCK_Q queries of one (batch, head) pair and all D channels: each sampling location and
attention weight is read once per query and head (not once per channel, as in the original CUDA kernel), the
four corners of every point are gathered as (BLOCK_Q, D) tiles, and sums run in fp32 (fp64 for fp64 inputs)
whatever the input type (fp32, bf16, fp16). The backward scatters the value gradient with atomic adds into an
fp32 buffer, whose sums therefore come in any order; under `torch.use_deterministic_algorithms(True)` it sums
them in a fixed order instead: every (point, corner) is listed with its value row, the list is sorted by row
(stably), and one program per block of rows adds its entries in that order. With TRITON_INTERPRET=1 the same
kernels run on the CPU, which is how the tests check them.
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton: the GPU backend is simply not offered
    triton = None


def available(device: torch.device) -> bool:
    """Whether the automatic choice may use these kernels: on CUDA devices. (Under TRITON_INTERPRET=1 they also run
    on the CPU, far slower than the C++ kernel, when called directly: that is how the tests check them.)"""
    return triton is not None and device.type == "cuda"


if triton is not None:

    @triton.jit
    def _corner(x0, y0, dx: tl.constexpr, dy: tl.constexpr, W, H, fx, fy):
        """Pixel index of one corner, its bilinear weight w and dw/dx, dw/dy; valid is False outside the map."""
        xx = x0 + dx
        yy = y0 + dy
        valid = (xx >= 0) & (xx < W) & (yy >= 0) & (yy < H)
        wx = fx if dx == 1 else 1.0 - fx
        wy = fy if dy == 1 else 1.0 - fy
        sign_x = 1.0 if dx == 1 else -1.0
        sign_y = 1.0 if dy == 1 else -1.0
        return yy * W + xx, wx * wy, sign_x * wy, sign_y * wx, valid

    @triton.jit
    def _tile(Q, M: tl.constexpr, D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
        """This program's batch b, head m, BLOCK_Q queries and BLOCK_D channels, with their in-range masks."""
        bm = tl.program_id(1)
        q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        d = tl.arange(0, BLOCK_D)
        return bm // M, bm % M, q, d, q < Q, d < D

    @triton.jit
    def _point(loc, attn, p, q_ok, W, H, ACC: tl.constexpr):
        """Attention weight, top-left corner and fractions of BLOCK_Q sampling points (p: their indices)."""
        lx = tl.load(loc + 2 * p, mask=q_ok, other=-2.0).to(ACC)
        ly = tl.load(loc + 2 * p + 1, mask=q_ok, other=-2.0).to(ACC)
        a = tl.load(attn + p, mask=q_ok, other=0.0).to(ACC)
        # grid_sample's arithmetic (align_corners=False): grid = 2 * loc - 1, x = ((grid + 1) * W - 1) / 2
        x = ((lx * 2.0 - 1.0 + 1.0) * W - 1.0) / 2.0
        y = ((ly * 2.0 - 1.0 + 1.0) * H - 1.0) / 2.0
        # a NaN location keeps its NaN fractions, which reach the output, but its corners go outside the map, as
        # converting NaN to an integer gives a different pixel on each device
        fx0 = tl.where(x == x, tl.floor(x), -2.0)
        fy0 = tl.where(y == y, tl.floor(y), -2.0)
        return a, fx0.to(tl.int32), fy0.to(tl.int32), x - fx0, y - fy0

    # Q and S are not specialised (Triton would compile again whenever they change divisibility by 16: with
    # every image size)
    @triton.jit(do_not_specialize=["Q", "S"])
    def _forward_kernel(
        value,
        shapes,
        starts,
        loc,
        attn,
        out,
        Q,
        S,
        M: tl.constexpr,
        D: tl.constexpr,
        L: tl.constexpr,
        K: tl.constexpr,
        BLOCK_Q: tl.constexpr,
        BLOCK_D: tl.constexpr,
        ACC: tl.constexpr,
    ):
        b, m, q, d, q_ok, d_ok = _tile(Q, M, D, BLOCK_Q, BLOCK_D)
        acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=ACC)
        point_base = ((b * Q + q) * M + m) * (L * K)
        for level in tl.static_range(L):
            H = tl.load(shapes + 2 * level)
            W = tl.load(shapes + 2 * level + 1)
            start = tl.load(starts + level)
            for k in tl.static_range(K):
                p = point_base + level * K + k
                a, x0, y0, fx, fy = _point(loc, attn, p, q_ok, W, H, ACC)
                for c in tl.static_range(4):
                    idx, w, _, _, valid = _corner(x0, y0, c % 2, c // 2, W, H, fx, fy)
                    valid = valid & q_ok
                    rows = ((b * S + start + idx) * M + m) * D
                    v = tl.load(value + rows[:, None] + d[None, :], mask=valid[:, None] & d_ok[None, :], other=0.0)
                    acc += (a * w)[:, None] * v.to(ACC)
        rows = ((b * Q + q) * M + m) * D
        tl.store(out + rows[:, None] + d[None, :], acc.to(out.dtype.element_ty), mask=q_ok[:, None] & d_ok[None, :])

    @triton.jit(do_not_specialize=["Q", "S"])
    def _backward_kernel(
        grad_out,
        value,
        shapes,
        starts,
        loc,
        attn,
        grad_value,
        grad_loc,
        grad_attn,
        Q,
        S,
        M: tl.constexpr,
        D: tl.constexpr,
        L: tl.constexpr,
        K: tl.constexpr,
        BLOCK_Q: tl.constexpr,
        BLOCK_D: tl.constexpr,
        ACC: tl.constexpr,
        SCATTER: tl.constexpr,
    ):
        """Gradients of the locations and weights; with SCATTER, also the value's, by atomic adds."""
        b, m, q, d, q_ok, d_ok = _tile(Q, M, D, BLOCK_Q, BLOCK_D)
        rows = ((b * Q + q) * M + m) * D
        g = tl.load(grad_out + rows[:, None] + d[None, :], mask=q_ok[:, None] & d_ok[None, :], other=0.0).to(ACC)
        point_base = ((b * Q + q) * M + m) * (L * K)
        for level in tl.static_range(L):
            H = tl.load(shapes + 2 * level)
            W = tl.load(shapes + 2 * level + 1)
            start = tl.load(starts + level)
            for k in tl.static_range(K):
                p = point_base + level * K + k
                a, x0, y0, fx, fy = _point(loc, attn, p, q_ok, W, H, ACC)
                grad_a = tl.zeros((BLOCK_Q,), dtype=ACC)
                grad_x = tl.zeros((BLOCK_Q,), dtype=ACC)
                grad_y = tl.zeros((BLOCK_Q,), dtype=ACC)
                for c in tl.static_range(4):
                    idx, w, w_x, w_y, valid = _corner(x0, y0, c % 2, c // 2, W, H, fx, fy)
                    valid = valid & q_ok
                    corner_rows = ((b * S + start + idx) * M + m) * D
                    tile = valid[:, None] & d_ok[None, :]
                    v = tl.load(value + corner_rows[:, None] + d[None, :], mask=tile, other=0.0).to(ACC)
                    dot = tl.sum(g * v, axis=1)
                    grad_a += w * dot
                    grad_x += w_x * dot
                    grad_y += w_y * dot
                    if SCATTER:
                        # relaxed: the sums need atomicity, not ordering (the default, acq_rel, also orders memory)
                        tl.atomic_add(
                            grad_value + corner_rows[:, None] + d[None, :],
                            (a * w)[:, None] * g,
                            mask=tile,
                            sem="relaxed",
                        )
                tl.store(grad_attn + p, grad_a, mask=q_ok)
                tl.store(grad_loc + 2 * p, a * grad_x * W, mask=q_ok)
                tl.store(grad_loc + 2 * p + 1, a * grad_y * H, mask=q_ok)

    @triton.jit(do_not_specialize=["POINTS", "Q", "S"])
    def _corners_kernel(
        shapes,
        starts,
        loc,
        attn,
        target,
        weight,
        POINTS,
        Q,
        S,
        M: tl.constexpr,
        L: tl.constexpr,
        K: tl.constexpr,
        BLOCK: tl.constexpr,
        ACC: tl.constexpr,
    ):
        """For BLOCK of the B*Q*M*L*K sampling points, each of its 4 corners (entry 4 * point + corner): the value
        row it reads, (b * S + pixel) * M + m (-1 outside the map), and its weight, attention x bilinear."""
        p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = p < POINTS
        level = (p // K) % L
        m = (p // (L * K)) % M
        b = p // (L * K * M * Q)
        H = tl.load(shapes + 2 * level, mask=ok, other=1)
        W = tl.load(shapes + 2 * level + 1, mask=ok, other=1)
        start = tl.load(starts + level, mask=ok, other=0)
        a, x0, y0, fx, fy = _point(loc, attn, p, ok, W, H, ACC)
        for c in tl.static_range(4):
            idx, w, _, _, valid = _corner(x0, y0, c % 2, c // 2, W, H, fx, fy)
            tl.store(target + 4 * p + c, tl.where(valid, (b * S + start + idx) * M + m, -1), mask=ok)
            tl.store(weight + 4 * p + c, a * w, mask=ok)

    @triton.jit(do_not_specialize=["ROWS"])
    def _ordered_sum_kernel(
        grad_out,
        order,
        weight,
        begins,
        ends,
        grad_value,
        ROWS,
        D: tl.constexpr,
        ENTRIES_PER_ROW: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_D: tl.constexpr,
        ACC: tl.constexpr,
    ):
        """The value gradient of BLOCK_R value rows: each row adds weight x grad_out row over its entries
        order[begins[row]:ends[row]], one after the other, so the sum is the same in every run."""
        # rows as a (BLOCK_R, 1) column: with (BLOCK_R,) vectors expanded in the loop, Triton 3.6 fails to compile
        # the kernel for sm_90 (its RemoveLayoutConversions pass leaves a load's mask and pointers in two layouts)
        r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R))[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        r_ok = r < ROWS
        d_ok = d < D
        begin = tl.load(begins + r, mask=r_ok, other=0)
        end = tl.load(ends + r, mask=r_ok, other=0)
        acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=ACC)
        # a while loop: Triton 3.6's interpreter cannot take a tensor as a range() bound (with numpy >= 2.4)
        most = tl.max(tl.max(end - begin, axis=1), axis=0)
        j = 0
        while j < most:
            live = r_ok & (begin + j < end)
            entry = tl.load(order + begin + j, mask=live, other=0)
            w = tl.load(weight + entry, mask=live, other=0.0)
            source = entry // ENTRIES_PER_ROW  # the (b, q, m) row of grad_out that the entry's point belongs to
            g = tl.load(grad_out + source * D + d, mask=live & d_ok, other=0.0)
            acc += w * g.to(ACC)
            j += 1
        tl.store(grad_value + r * D + d, acc, mask=r_ok & d_ok)


# BLOCK_Q (queries per program) and num_warps, measured on an H200 at the "encoder_800x1333" shape set
# (ms_deform_attn_inputs.py), batch 8, in fp32 (scripts/gpu_check.py --sweep and by hand). Forward: 64 / 8 took
# 1.05 ms (64 / 4: 1.54 ms; 32 / 8 and 16 / 4 within 2 %, the other pairs of 16..128 and 2..8 warps up to 2.8 ms).
# Backward: 32 / 4 took 3.87 ms and 16 / 4 3.82 ms, against 6.02 ms for 64 / 4 (162 registers a thread there, 80 at
# 32 / 4); its atomic adds are the vectorised `atom.global.gpu.relaxed.add.v4.f32`.
LAUNCH = {"forward": dict(block_q=64, num_warps=8), "backward": dict(block_q=32, num_warps=4)}


def _launch_config(value, Q, block_q, num_warps):
    B, S, M, D = value.shape
    accumulate = tl.float64 if value.dtype == torch.float64 else tl.float32
    block_d = triton.next_power_of_2(D)
    block_q = min(block_q, max(16, 4096 // block_d))  # keeps a (BLOCK_Q, BLOCK_D) tile within 4096 elements
    meta = dict(M=M, D=D, BLOCK_Q=block_q, BLOCK_D=block_d, ACC=accumulate, num_warps=num_warps)
    return (triton.cdiv(Q, block_q), B * M), meta


def forward(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, block_q=None, num_warps=None
):
    """value (B, S, M, D), spatial_shapes (L, 2), level_start_index (L,), sampling_locations (B, Q, M, L, K, 2),
    attention_weights (B, Q, M, L, K) -> (B, Q, M, D), in value's dtype. Locations and weights may have another
    float type than value (the model passes them in fp32 under autocast). block_q and num_warps override LAUNCH."""
    B, Q, M, L, K, _ = sampling_locations.shape
    out = value.new_empty(B, Q, M, value.shape[-1])
    if out.numel() == 0:
        return out
    grid, meta = _launch_config(
        value, Q, block_q or LAUNCH["forward"]["block_q"], num_warps or LAUNCH["forward"]["num_warps"]
    )
    _forward_kernel[grid](
        value,
        spatial_shapes,
        level_start_index,
        sampling_locations,
        attention_weights,
        out,
        Q,
        value.shape[1],
        L=L,
        K=K,
        **meta,
    )
    return out


def _value_gradient_in_order(grad_output, value, spatial_shapes, level_start_index, locations, weights, dtype):
    """The value gradient (B, S, M, D) in `dtype`, summed in a fixed order: the same bits in every run. Its lists
    take 16 bytes per point and corner (B*Q*M*L*K*4 of them), beside the sort's own memory."""
    B, Q, M, L, K, _ = locations.shape
    S, D = value.shape[1], value.shape[-1]
    points, rows, block = B * Q * M * L * K, B * S * M, 256
    target = torch.empty(4 * points, dtype=torch.int64, device=value.device)
    weight = torch.empty(4 * points, dtype=dtype, device=value.device)
    accumulate = tl.float64 if dtype == torch.float64 else tl.float32
    _corners_kernel[(triton.cdiv(points, block),)](
        spatial_shapes,
        level_start_index,
        locations,
        weights,
        target,
        weight,
        points,
        Q,
        S,
        M=M,
        L=L,
        K=K,
        BLOCK=block,
        ACC=accumulate,
    )
    target, order = torch.sort(target, stable=True)  # a stable sort: each row's entries in their first order
    row_ids = torch.arange(rows, device=value.device)
    begins, ends = torch.searchsorted(target, row_ids), torch.searchsorted(target, row_ids, right=True)
    grad_value = torch.empty(value.shape, dtype=dtype, device=value.device)
    block_d = triton.next_power_of_2(D)
    block_r = max(1, min(64, 4096 // block_d))
    _ordered_sum_kernel[(triton.cdiv(rows, block_r),)](
        grad_output,
        order,
        weight,
        begins,
        ends,
        grad_value,
        rows,
        D=D,
        ENTRIES_PER_ROW=L * K * 4,
        BLOCK_R=block_r,
        BLOCK_D=block_d,
        ACC=accumulate,
    )
    return grad_value


def backward(
    grad_output,
    value,
    spatial_shapes,
    level_start_index,
    sampling_locations,
    attention_weights,
    block_q=None,
    num_warps=None,
):
    """-> gradients of value, sampling_locations and attention_weights, each in its input's dtype. The value's
    is summed by atomic adds, or in a fixed order (the same bits in every run) under
    torch.use_deterministic_algorithms(True)."""
    B, Q, M, L, K, _ = sampling_locations.shape
    accumulate = torch.float64 if value.dtype == torch.float64 else torch.float32
    deterministic = torch.are_deterministic_algorithms_enabled() and grad_output.numel() > 0
    if deterministic:
        grad_value = _value_gradient_in_order(
            grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, accumulate
        )
    else:
        grad_value = torch.zeros(value.shape, dtype=accumulate, device=value.device)
    grad_loc = torch.empty(sampling_locations.shape, dtype=accumulate, device=value.device)
    grad_attn = torch.empty(attention_weights.shape, dtype=accumulate, device=value.device)
    if grad_output.numel() > 0:
        grid, meta = _launch_config(
            value, Q, block_q or LAUNCH["backward"]["block_q"], num_warps or LAUNCH["backward"]["num_warps"]
        )
        _backward_kernel[grid](
            grad_output,
            value,
            spatial_shapes,
            level_start_index,
            sampling_locations,
            attention_weights,
            grad_value,
            grad_loc,
            grad_attn,
            Q,
            value.shape[1],
            L=L,
            K=K,
            SCATTER=not deterministic,
            **meta,
        )
    return grad_value.to(value.dtype), grad_loc.to(sampling_locations.dtype), grad_attn.to(attention_weights.dtype)
