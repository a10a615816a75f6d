"""Checks and times the whole GPU path in one run, and writes report.json, report.md and profile.txt into --out.

  1. the op: the Triton kernels against the grid_sample reference (fp32, bf16, fp16; fp64 gradcheck) at the
     encoder shapes of an 800x1333 image (batch 1 and 8) and decoder shapes (300 queries, batch 8), points outside
     the maps and on their borders, padded values, non-contiguous inputs, an empty batch; the self-check that
     guards the automatic backend choice; the deterministic backward (the same bits twice, and its cost);
  2. the op's speed per encoder layer: Triton against the reference, and as a multiple of the memory floor (the
     bytes that must move / the device-to-device copy bandwidth measured in this run);
  3. the model: ResNet-50 6+6 inference at 800x1333, batch 1 and 8, fp32 and bf16 autocast, ours against
     transformers' with the same weights; eager against torch.compile, and one call of each profiled (their
     longest kernels in profile.txt);
  4. training: 30 steps of the training loop's step (forward_backward and optimiser_step of training/loop.py,
     accelerate) on the synthetic shapes data in bf16 and fp16: loss finite and falling, step time, peak memory,
     ours against transformers' at the same precision (the pair runs twice, alternately; the better medians).

Checks pass or fail (any failure: exit status 1); targets (speed) are met or missed; figures are reported.
`--device cpu --quick` runs the same checks on small shapes on the CPU (the Triton kernels in Triton's
interpreter) in a few minutes; its timings mean nothing. `--sweep` also times the kernels' launch settings and
torch.compile with Inductor's layout optimisation off.
"""

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
import traceback
from functools import partial

import torch

from deformable_detr import from_transformers

ENCODER_SHAPES = [(100, 167), (50, 84), (25, 42), (13, 21)]  # an 800x1333 image at strides 8, 16, 32, 64
QUICK_SHAPES = [(8, 12), (4, 6), (2, 3), (1, 2)]
TIMED_QUICK_SHAPES = [(2, 3), (1, 2)]  # --quick, where it times: the interpreter runs every program in Python


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="gpu_check.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", default="gpu-check", help="folder for report.json, report.md and profile.txt (default: gpu-check)"
    )
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--quick", action="store_true", help="small shapes and models, few repeats")
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="also time the Triton kernels' BLOCK_Q and num_warps (with the speed part), and torch.compile with "
        "Inductor's layout optimisation off (with the compile part)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=["op", "speed", "model", "train", "compile"],
        help="run only these parts (default: all)",
    )
    return parser.parse_args(argv)


class Report:
    """Rows of (section, name, text, verdict, figures); saved after every row, so a run cut short keeps them.
    verdict: "pass"/"fail" (a check), "met"/"missed" (a target) or None (a figure)."""

    def __init__(self, out: str, environment: dict):
        self.out, self.environment, self.rows, self.started = out, environment, [], time.perf_counter()
        os.makedirs(out, exist_ok=True)

    def add(self, section, name, text, verdict=None, **figures):
        self.rows.append({"section": section, "name": name, "text": text, "verdict": verdict, "figures": figures})
        mark = {None: "    ", "pass": "ok  ", "met": "ok  ", "fail": "FAIL", "missed": "MISS"}[verdict]
        print(f"[{time.perf_counter() - self.started:6.1f}s] {mark} {section}: {name}: {text}", flush=True)
        self.save()

    def check(self, section, name, value, limit, text=""):
        """A correctness check: value <= limit."""
        ok = value <= limit
        self.add(
            section,
            name,
            f"{value:.2e} (limit {limit:.0e}){' ' + text if text else ''}",
            "pass" if ok else "fail",
            value=value,
            limit=limit,
        )

    def target(self, section, name, met: bool, text, **figures):
        self.add(section, name, text, "met" if met else "missed", **figures)

    def failed(self) -> list[dict]:
        return [row for row in self.rows if row["verdict"] == "fail"]

    def save(self):
        summary = {
            verdict: sum(row["verdict"] == verdict for row in self.rows)
            for verdict in ("pass", "fail", "met", "missed")
        }
        with open(os.path.join(self.out, "report.json"), "w") as f:
            json.dump(
                {
                    "environment": self.environment,
                    "summary": summary,
                    "seconds": time.perf_counter() - self.started,
                    "rows": self.rows,
                },
                f,
                indent=1,
            )
        lines = [
            "# GPU check",
            "",
            ", ".join(f"{k}: {v}" for k, v in self.environment.items()),
            "",
            f"{summary['pass']} checks passed, {summary['fail']} failed; {summary['met']} targets met, "
            f"{summary['missed']} missed; {time.perf_counter() - self.started:.0f} s",
            "",
        ]
        section = None
        for row in self.rows:
            if row["section"] != section:
                section = row["section"]
                lines += ["", f"## {section}", "", "| | what | figures |", "|---|---|---|"]
            lines.append(f"| {row['verdict'] or ''} | {row['name']} | {row['text']} |")
        with open(os.path.join(self.out, "report.md"), "w") as f:
            f.write("\n".join(lines) + "\n")


def guarded(report, section):
    """Runs a part; an exception becomes a failed check naming it, and the run goes on."""

    def wrap(fn):
        def run(*args, **kwargs):
            try:
                fn(*args, **kwargs)
            except Exception as error:  # noqa: BLE001 - reported, then the next part runs
                traceback.print_exc()
                report.add(
                    section,
                    f"{fn.__name__} raised",
                    f"{type(error).__name__}: {str(error)[:300]}".replace("\n", " "),
                    "fail",
                )

        return run

    return wrap


def relative(a, b) -> float:
    """max |a - b| / max |b|, in fp64."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() if b.numel() else 0.0


def copy_bandwidth(device, quick) -> float:
    """Bytes per second of a device-to-device copy, counting bytes read and written."""
    from deformable_detr.utils.benchmarking import median_time

    source = torch.empty(2**24 if quick else 2**28, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    return 2 * source.numel() * 4 / median_time(lambda: target.copy_(source), device, 5 if quick else 20)


# ---------------------------------------------------------------------------------------------------- the op


def op_inputs(
    shapes, batch, queries, device, dtype=torch.float32, heads=8, dim=32, points=4, seed=0, outside=0.05, local=False
):
    """value (B, S, M, D) in dtype; locations (B, Q, M, L, K, 2) and weights (B, Q, M, L, K), softmax over L*K, in
    fp32 (as the model gives them under autocast); on device. The locations are uniform in [-outside, 1 + outside],
    or with `local` (queries == S) an encoder layer's: near each query's own pixel (encoder_locations)."""
    g = torch.Generator().manual_seed(seed)
    S, L = sum(h * w for h, w in shapes), len(shapes)
    value = torch.randn(batch, S, heads, dim, generator=g)
    if local:
        locations = encoder_locations(shapes, batch, heads, points, g)
    else:
        locations = torch.rand(batch, queries, heads, L, points, 2, generator=g) * (1 + 2 * outside) - outside
    weights = (
        torch.randn(batch, queries, heads, L * points, generator=g).softmax(-1).view(batch, queries, heads, L, points)
    )
    return value.to(device, dtype), locations.to(device), weights.to(device)


def encoder_locations(shapes, batch, heads, points, generator, spread=2.0):
    """(B, S, M, L, K, 2): where an encoder layer samples. Every query is a pixel of one level, and its reference point
    that pixel's centre; head m samples K points along its own direction, k + 1 pixels out at every level (the
    model's initial offsets), each moved by N(0, spread) pixels."""
    centres = []
    for h, w in shapes:
        y, x = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
        centres.append(torch.stack([x, y], -1).view(-1, 2))
    reference = torch.cat(centres)[None, :, None, None, None, :]  # (1, S, 1, 1, 1, 2)
    angles = torch.arange(heads) * (2 * math.pi / heads)
    directions = torch.stack([angles.cos(), angles.sin()], -1)
    directions = directions / directions.abs().amax(-1, keepdim=True)  # (M, 2), as the model initialises them
    steps = torch.arange(1, points + 1, dtype=torch.float32)
    offsets = directions[:, None, None, :] * steps[None, None, :, None]  # (M, 1, K, 2) pixels
    S, L = reference.shape[1], len(shapes)
    offsets = offsets + spread * torch.randn(batch, S, heads, L, points, 2, generator=generator)
    sizes = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32)[:, None, :]  # (L, 1, 2)
    return reference + offsets / sizes


def run_op(backend, value, shapes, locations, weights, grad_output=None):
    """Output and, with grad_output, the gradients of value, locations and weights."""
    from deformable_detr.model.ms_deform_attn import BACKENDS

    inputs = [t.detach().requires_grad_(grad_output is not None) for t in (value, locations, weights)]
    output = BACKENDS[backend](inputs[0], shapes, inputs[1], inputs[2])
    if grad_output is None:
        return output.detach(), None
    output.backward(grad_output.to(output.dtype))
    return output.detach(), [t.grad for t in inputs]


def compare_op(report, name, value, shapes, locations, weights, dtype, forward_limit, grad_limit):
    """Triton (value in dtype) against the reference in fp32 (fp64 for fp64): forward and the three gradients."""
    precise = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(1)
    grad_output = torch.randn(value.shape[0], locations.shape[1], value.shape[2] * value.shape[3], generator=g).to(
        value.device, precise
    )
    reference, reference_grads = run_op(
        "reference", value.to(precise), shapes, locations.to(precise), weights.to(precise), grad_output
    )
    output, grads = run_op("triton", value.to(dtype), shapes, locations, weights, grad_output)
    assert output.dtype == dtype, f"output is {output.dtype}, not {dtype}"
    report.check(
        "op: Triton vs reference", f"{name}, {str(dtype)[6:]}: forward", relative(output, reference), forward_limit
    )
    worst = max(
        (relative(ours, ref), part)
        for ours, ref, part in zip(grads, reference_grads, ("value", "locations", "weights"))
    )
    report.check(
        "op: Triton vs reference", f"{name}, {str(dtype)[6:]}: gradients", worst[0], grad_limit, f"(worst: {worst[1]})"
    )


def op_correctness(report, device, quick):
    """The self-check, and Triton against the reference at the encoder and decoder shapes, in each type."""
    from deformable_detr.model.ms_deform_attn import (
        _compare_triton_with_reference,
        triton_self_check,
    )

    section = "op: Triton vs reference"
    heads = 2 if quick else 8  # quick: Triton's interpreter runs each (batch, head, query block) in Python
    # on the CPU the automatic choice never takes Triton: run the self-check's comparison itself
    failure = triton_self_check(device) if device.type == "cuda" else _compare_triton_with_reference(device)
    report.add(
        section, "self-check of the automatic backend choice", failure or "Triton kept", "fail" if failure else "pass"
    )
    encoder = QUICK_SHAPES if quick else ENCODER_SHAPES
    S = sum(h * w for h, w in encoder)
    big_batch = 2 if quick else 8
    queries = 10 if quick else 300
    cases = [
        (
            f"encoder {'tiny' if quick else '800x1333'}, batch 1",
            encoder,
            1,
            S,
            (torch.float32, torch.bfloat16, torch.float16),
        ),
        (f"encoder, batch {big_batch}", encoder, big_batch, S, (torch.float32, torch.bfloat16)),
        # many queries add into the same value rows: the atomic adds' worst contention
        (f"encoder, its own locations, batch {big_batch}", encoder, big_batch, S, (torch.float32,)),
        (
            f"decoder, {queries} queries, batch {big_batch}",
            encoder,
            big_batch,
            queries,
            (torch.float32, torch.bfloat16, torch.float16),
        ),
    ]
    for name, shapes, batch, q, dtypes in cases:
        value, locations, weights = op_inputs(shapes, batch, q, device, heads=heads, local="own locations" in name)
        for dtype in dtypes:
            exact = dtype == torch.float32
            compare_op(
                report, name, value, shapes, locations, weights, dtype, 1e-5 if exact else 1e-2, 1e-4 if exact else 1e-2
            )


def op_deterministic(report, device, quick):
    """Under torch.use_deterministic_algorithms(True) the backward sums the value gradient in a fixed order: the
    same bits twice, the atomic sums' values to rounding, and what it costs, at the encoder shapes (batch 8)."""
    from deformable_detr.model import ms_deform_attn_triton as kernels
    from deformable_detr.model.ms_deform_attn import kernel_shapes
    from deformable_detr.utils.benchmarking import median_time

    shapes = TIMED_QUICK_SHAPES if quick else ENCODER_SHAPES
    batch, heads = (2, 2) if quick else (8, 8)
    S = sum(h * w for h, w in shapes)
    inputs = kernel_shapes(shapes, device)
    value, locations, weights = op_inputs(shapes, batch, S, device, heads=heads)
    grad_output = torch.randn(batch, S, heads, 32, device=device)
    run = partial(kernels.backward, grad_output, value, *inputs, locations, weights)
    atomic = run()
    before = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        ordered, again = run(), run()
        ordered_time = median_time(run, device, 1 if quick else 5)
    finally:
        torch.use_deterministic_algorithms(before)
    atomic_time = median_time(run, device, 1 if quick else 5)
    section = "op: Triton vs reference"
    same = all(torch.equal(a, b) for a, b in zip(ordered, again))
    report.add(
        section, "deterministic backward, run twice", "the same bits" if same else "differs", "pass" if same else "fail"
    )
    worst = max(relative(a, b) for a, b in zip(ordered, atomic))
    report.check(
        section,
        f"deterministic backward vs atomic, batch {batch}",
        worst,
        1e-5,
        f"({ordered_time * 1e3:.2f} ms against {atomic_time * 1e3:.2f} ms: {ordered_time / atomic_time:.1f}x the time)",
    )


def op_edge_cases(report, device, quick):
    """Points on pixel edges and map borders, padded values, non-contiguous inputs, a NaN location, an empty
    batch."""
    section = "op: Triton vs reference"
    heads = 2 if quick else 8
    encoder = QUICK_SHAPES if quick else ENCODER_SHAPES
    # borders: every location on a pixel edge or centre of its level, or on / just past the map's edges
    shapes = [(5, 7), (3, 4)]
    value, locations, weights = op_inputs(shapes, 2, 40, device, heads=heads, points=3)
    edges = torch.tensor([0.0, 1.0, -0.5, 1.5, 1e-7, 1 - 1e-7], device=device)
    for level, (h, w) in enumerate(shapes):
        for axis, size in ((0, w), (1, h)):
            grid = torch.cat(
                [torch.arange(size + 1, device=device) / size, (torch.arange(size, device=device) + 0.5) / size, edges]
            )
            pick = torch.randint(
                len(grid), locations[..., level, :, axis].shape, generator=torch.Generator().manual_seed(axis)
            )
            locations[..., level, :, axis] = grid[pick.to(device)]
    compare_op(
        report,
        "points on pixel edges and centres, on and past the borders",
        value,
        shapes,
        locations,
        weights,
        torch.float32,
        1e-5,
        1e-4,
    )

    # padded values: positions a padding mask zeroes (a padded image's bottom rows and right columns)
    value, locations, weights = op_inputs(encoder, 2, 64, device, heads=heads, seed=3)
    start = 0
    for h, w in encoder:
        level = value[1, start : start + h * w].view(h, w, *value.shape[2:])
        level[h * 2 // 3 :] = 0
        level[:, w * 3 // 4 :] = 0
        start += h * w
    compare_op(report, "padded values (zeros)", value, encoder, locations, weights, torch.float32, 1e-5, 1e-4)

    # non-contiguous inputs: views into larger tensors
    value, locations, weights = op_inputs(encoder, 2, 50, device, heads=heads, seed=4)
    value_view = torch.cat([value, value], dim=-1)[..., ::2]
    locations_view = locations.transpose(1, 2).contiguous().transpose(1, 2)
    weights_view = torch.cat([weights, weights], dim=1)[:, ::2]
    assert not (value_view.is_contiguous() or locations_view.is_contiguous() or weights_view.is_contiguous())
    compare_op(
        report, "non-contiguous inputs", value_view, encoder, locations_view, weights_view, torch.float32, 1e-5, 1e-4
    )

    # a NaN location: NaN in its query's output (that head's channels) and its own gradients, as in the reference,
    # and nowhere else (converting NaN to a pixel index differs between devices: the kernels keep it outside the map)
    value, locations, weights = op_inputs(encoder, 1, 9, device, heads=heads, seed=5)
    locations[0, 4, 0, 1, 2, 0] = float("nan")
    output, grads = run_op("triton", value, encoder, locations, weights, torch.ones(1, 9, heads * 32, device=device))
    nans = [output.isnan().sum().item(), *(g.isnan().sum().item() for g in grads)]
    # the location's own gradient: x's NaN, y's NaN or not
    ok = output[0, 4, :32].isnan().all().item() and nans[0] == 32 and nans[1] == 0 and nans[2] in (1, 2)
    ok = ok and nans[3] == 1
    report.add(
        section,
        "a NaN location",
        f"NaN in the output {nans[0]} times (32 expected), in the gradients of value {nans[1]}, locations "
        f"{nans[2]}, weights {nans[3]} times",
        "pass" if ok else "fail",
    )

    # an empty batch: shapes right, no launch error
    value, locations, weights = op_inputs(encoder, 0, 7, device, heads=heads)
    output, grads = run_op("triton", value, encoder, locations, weights, torch.zeros(0, 7, heads * 32, device=device))
    assert output.shape == (0, 7, heads * 32) and [g.shape for g in grads] == [
        value.shape,
        locations.shape,
        weights.shape,
    ]
    report.add(section, "empty batch", f"output (0, 7, {heads * 32}) and gradients of the inputs' shapes", "pass")


def op_gradcheck(report, device, quick):
    """Exact gradients in fp64 (tiny shapes: gradcheck perturbs every input element)."""
    from deformable_detr.model.ms_deform_attn import multi_scale_deformable_attention_triton

    section = "op: Triton vs reference"
    shapes, queries, heads, dim, points = ([(2, 2), (1, 2)], 2, 1, 2, 1) if quick else ([(3, 4), (2, 2)], 3, 2, 4, 2)
    value, locations, weights = op_inputs(shapes, 1, queries, device, torch.float64, heads, dim, points)
    inputs = tuple(t.double().requires_grad_(True) for t in (value, locations, weights))
    ok = torch.autograd.gradcheck(
        lambda v, loc, a: multi_scale_deformable_attention_triton(v, shapes, loc, a),
        inputs,
        eps=1e-6,
        atol=1e-6,
        raise_exception=False,
    )
    report.add(
        section,
        "fp64 gradcheck, tiny shapes",
        "gradients match finite differences" if ok else "gradcheck failed",
        "pass" if ok else "fail",
    )


def floor_bytes(value, locations, weights, backward: bool) -> int:
    """Bytes the op must move: read value, locations, weights, write the output; the backward also reads the
    output's gradient and the inputs again and writes their gradients (value's in fp32)."""

    def size(t):
        return t.numel() * t.element_size()

    output = value.shape[0] * locations.shape[1] * value.shape[2] * value.shape[3] * value.element_size()
    forward = size(value) + size(locations) + size(weights) + output
    return forward + (
        output + size(value) + size(locations) + size(weights) + value.numel() * 4 + size(locations) + size(weights)
        if backward
        else 0
    )


def op_speed(report, device, quick, bandwidth):
    """Per encoder layer, Triton against the reference, at uniform sampling locations (no two queries share a
    value row: a worst case for the caches) and at an encoder layer's own (encoder_locations)."""
    from deformable_detr.model.ms_deform_attn import BACKENDS
    from deformable_detr.utils.benchmarking import median_time, peak_memory

    section = "op speed, one encoder layer"
    heads = 2 if quick else 8
    shapes = TIMED_QUICK_SHAPES if quick else ENCODER_SHAPES
    S = sum(h * w for h, w in shapes)
    repeats, calls = (1, 1) if quick else (7, 5)
    results = {}
    cases = [
        (local, batch, dtype, backward)
        for local in (False, True)
        for batch in ((2,) if quick else (1, 8))  # quick: each case takes the interpreter seconds
        for dtype in (torch.float32, torch.bfloat16)
        for backward in (False, True)
    ]
    for local, batch, dtype, backward in cases:
        value, locations, weights = op_inputs(shapes, batch, S, device, dtype, heads, local=local)
        grad_output = torch.randn(batch, S, heads * 32, device=device, dtype=dtype)

        def step(backend):
            # the reference runs in fp32, as autocast runs grid_sample
            v = value if backend == "triton" else value.float()
            inputs = [t.detach().requires_grad_(backward) for t in (v, locations, weights)]
            with torch.set_grad_enabled(backward):
                out = BACKENDS[backend](inputs[0], shapes, inputs[1], inputs[2])
                if backward:
                    out.backward(grad_output.to(out.dtype))

        ours, theirs = (median_time(lambda b=b: step(b), device, repeats, calls) for b in ("triton", "reference"))
        memory = [peak_memory(lambda b=b: step(b), device, cpu=False) for b in ("triton", "reference")]
        floor = floor_bytes(value, locations, weights, backward) / bandwidth
        # every point reads its four corners' rows of D channels: from the caches, or memory where they miss
        gathered = weights.numel() * 4 * value.shape[-1] * value.element_size() / ours
        where = "encoder's locations" if local else "uniform locations"
        name = f"{'forward+backward' if backward else 'forward'}, {str(dtype)[6:]}, batch {batch}, {where}"
        results[name] = ours
        text = (
            f"Triton {ours * 1e3:.3f} ms, reference {theirs * 1e3:.2f} ms: {theirs / ours:.1f}x; "
            f"{ours / floor:.2f}x the memory floor ({floor * 1e3:.3f} ms)"
            + ("" if backward else f", corners read at {gathered / 1e12:.1f} TB/s")
            + f"; peak memory {memory[0]:.0f} / {memory[1]:.0f} MiB"
        )
        figures = dict(
            triton_ms=ours * 1e3,
            reference_ms=theirs * 1e3,
            speedup=theirs / ours,
            floor_ms=floor * 1e3,
            floor_multiple=ours / floor,
            triton_peak_mib=memory[0],
            reference_peak_mib=memory[1],
        )
        if not backward:
            figures["corner_bytes_per_s"] = gathered
        if backward:
            report.target(section, name, theirs / ours >= 5, text + " (target: >= 5x)", **figures)
        elif dtype == torch.float32:
            report.target(
                section,
                name,
                theirs / ours >= 10 and ours / floor <= 3,
                text + " (target: >= 10x, <= 3x the floor)",
                **figures,
            )
        else:
            fp32 = results[name.replace("bfloat16", "float32")]
            report.target(
                section,
                name,
                ours <= fp32 * 1.05,
                text + f" (target: no slower than fp32's {fp32 * 1e3:.3f} ms)",
                **figures,
            )


def sweep(report, device, quick):
    """Times the kernels' launch settings at the encoder shapes (batch 8), uniform and encoder's locations:
    BLOCK_Q x num_warps (each setting compiles once, for both)."""
    from deformable_detr.model import ms_deform_attn_triton as kernels
    from deformable_detr.model.ms_deform_attn import kernel_shapes
    from deformable_detr.utils.benchmarking import median_time

    shapes = TIMED_QUICK_SHAPES if quick else ENCODER_SHAPES
    batch, heads = (2, 2) if quick else (8, 8)
    S = sum(h * w for h, w in shapes)
    shapes_tensor, starts = kernel_shapes(shapes, device)
    # the pairs near the best of earlier sweeps (each backward setting takes about 25 s to compile)
    settings = [(32, 4), (64, 4)] if quick else [(16, 4), (32, 4), (32, 8), (64, 4), (64, 8), (128, 8)]
    cases = [
        (dtype, direction, local)
        for dtype, directions in ((torch.float32, ("backward", "forward")), (torch.bfloat16, ("forward",)))
        for direction in directions
        for local in (False, True)
    ]
    for dtype, direction, local in cases:
        value, locations, weights = op_inputs(shapes, batch, S, device, dtype, heads, local=local)
        grad_output = torch.randn(batch, S, heads, 32, device=device, dtype=dtype)
        times = {}
        for block_q, warps in settings:
            inputs = (value, shapes_tensor, starts, locations, weights, block_q, warps)
            if direction == "forward":
                fn = partial(kernels.forward, *inputs)
            else:
                fn = partial(kernels.backward, grad_output, *inputs)
            times[f"BLOCK_Q={block_q} warps={warps}"] = (
                median_time(fn, device, 2 if quick else 5, 1 if quick else 3) * 1e3
            )
        best = min(times, key=times.get)
        report.add(
            "launch settings, encoder batch " + str(batch),
            f"{direction}, {str(dtype)[6:]}, {'encoder' if local else 'uniform'} locations",
            f"best {best} {times[best]:.3f} ms; " + ", ".join(f"{k} {v:.3f}" for k, v in times.items()),
            **times,
        )


# ------------------------------------------------------------------------------------------------- the model


def model_pair(device, quick):
    """transformers' Deformable DETR and ours with the same weights: ResNet-50 6+6 (or a tiny one with --quick)."""
    from deformable_detr.testing import full_size_pair, small_hf_model

    if not quick:
        return full_size_pair(device)
    hf = small_hf_model("multi-scale")
    return hf.to(device), from_transformers(hf).to(device)


def inference_section(quick):
    return "inference, " + ("tiny model, 96x128" if quick else "ResNet-50 6+6, 800x1333")


def inference(report, device, quick, hf, ours):
    from deformable_detr.apps.onnx_export import max_abs_difference
    from deformable_detr.utils.benchmarking import median_time, peak_memory

    section = inference_section(quick)
    height, width = (96, 128) if quick else (800, 1333)
    repeats = 2 if quick else 5
    for batch in (1, 2 if quick else 8):
        x = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(batch)).to(device)

        @torch.no_grad()
        def run(model, bf16=False):
            if bf16:
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    return model(pixel_values=x)
            return model(pixel_values=x)

        fp32 = run(ours)
        report.check(
            section,
            f"batch {batch}, fp32: ours vs transformers, max abs diff of logits and boxes",
            max_abs_difference(fp32, run(hf)),
            1e-4,
        )
        times = {
            (name, bf16): median_time(lambda m=model, b=bf16: run(m, b), device, repeats)
            for name, model in (("ours", ours), ("transformers", hf))
            for bf16 in (False, True)
        }
        memory = {
            (name, bf16): peak_memory(lambda m=model, b=bf16: run(m, b), device, cpu=False)
            for name, model in (("ours", ours), ("transformers", hf))
            for bf16 in (False, True)
        }
        speedup = times["transformers", False] / times["ours", False]
        text = (
            f"ours {times['ours', False] * 1e3:.1f} ms, "
            f"transformers {times['transformers', False] * 1e3:.1f} ms: {speedup:.2f}x; "
            f"peak {memory['ours', False]:.0f} / {memory['transformers', False]:.0f} MiB"
        )
        figures = {f"{name}_{'bf16' if bf16 else 'fp32'}_ms": t * 1e3 for (name, bf16), t in times.items()}
        figures.update({f"{name}_{'bf16' if bf16 else 'fp32'}_peak_mib": m for (name, bf16), m in memory.items()})
        if batch == 1:
            report.add(section, "batch 1, fp32: speed", text, **figures)
        else:
            report.target(
                section, f"batch {batch}, fp32: speed", speedup >= 1.5, text + " (target: >= 1.5x)", **figures
            )
        gain = times["ours", False] / times["ours", True]
        difference = max_abs_difference(run(ours, True), fp32)
        theirs = max_abs_difference(run(hf, True), run(hf))
        name = f"batch {batch}, bf16 autocast vs our fp32"
        text = (
            f"{times['ours', True] * 1e3:.1f} ms: {gain:.2f}x our fp32, max abs diff {difference:.1e}; "
            f"transformers bf16 {times['transformers', True] * 1e3:.1f} ms, {theirs:.1e} from its fp32"
        )
        figures = {"speedup": gain, "difference": difference, "transformers_difference": theirs}
        if batch == 1:  # the bf16 target is at batch 8; one image is too little work for autocast to pay
            report.add(section, name, text, **figures)
        else:
            met = gain >= 1.3 and difference <= 1e-2
            report.target(section, name, met, text + " (target: >= 1.3x, <= 1e-2)", **figures)


def compiled_inference(report, device, quick, ours, variants=False):
    """torch.compile of our model against eager, fp32, the larger batch; with `variants`, also compiled with
    Inductor's layout optimisation off (which turns convolutions channels-last)."""
    from torch._dynamo.utils import counters

    from deformable_detr.apps.onnx_export import max_abs_difference
    from deformable_detr.utils.benchmarking import median_time

    batch, height, width = (2, 96, 128) if quick else (8, 800, 1333)
    x = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(batch)).to(device)
    counters.clear()
    compiled = torch.compile(ours)
    with torch.no_grad():
        started = time.perf_counter()
        out = compiled(pixel_values=x)
        seconds = time.perf_counter() - started
        report.check(
            inference_section(quick),
            f"batch {batch}, fp32: torch.compile vs eager, max abs diff",
            max_abs_difference(out, ours(pixel_values=x)),
            1e-4,
            f"(compiled in {seconds:.0f} s)",
        )
        eager, fast = (median_time(lambda m=m: m(pixel_values=x), device, 2 if quick else 5) for m in (ours, compiled))
    # graph breaks and recompiles (counted over the compile and every timed call) are where compiled code loses
    breaks = counters["graph_break"]
    graphs = counters["stats"]["unique_graphs"]
    report.add(
        inference_section(quick),
        f"batch {batch}, fp32: torch.compile speed",
        f"eager {eager * 1e3:.1f} ms, compiled {fast * 1e3:.1f} ms: {eager / fast:.2f}x; {graphs} graph(s), "
        f"{sum(breaks.values())} graph break(s)" + "".join(f"; {reason[:150]!r}" for reason in list(breaks)[:3]),
        eager_ms=eager * 1e3,
        compiled_ms=fast * 1e3,
        graphs=graphs,
        graph_breaks=sum(breaks.values()),
    )
    with torch.no_grad():
        profiled, tables = profile_calls(
            {"eager": lambda: ours(pixel_values=x), "compiled": lambda: compiled(pixel_values=x)}, device
        )
    with open(os.path.join(report.out, "profile.txt"), "w") as f:
        f.write(tables)
    report.add(
        inference_section(quick),
        f"batch {batch}, fp32: one call profiled, eager and compiled",
        "; ".join(
            f"{name}: {kernels} kernels, device busy {busy * 1e3:.1f} ms" for name, (kernels, busy) in profiled.items()
        )
        + " (their top kernels: profile.txt)",
        **{f"{name}_kernels": kernels for name, (kernels, _) in profiled.items()},
        **{f"{name}_busy_ms": busy * 1e3 for name, (_, busy) in profiled.items()},
    )
    if variants:
        import torch._inductor.config as inductor

        torch._dynamo.reset()
        with inductor.patch(layout_optimization=False), torch.no_grad():
            compiled = torch.compile(ours)
            compiled(pixel_values=x)  # compiles here, under the patched setting
            plain = median_time(lambda: compiled(pixel_values=x), device, 2 if quick else 5)
        report.add(
            inference_section(quick),
            f"batch {batch}, fp32: torch.compile, layout optimisation off",
            f"{plain * 1e3:.1f} ms: {eager / plain:.2f}x eager",
            compiled_ms=plain * 1e3,
        )


def profile_calls(calls: dict, device) -> tuple[dict, str]:
    """One profiled call of each of `calls` {name: fn} -> ({name: (kernels, seconds the device was busy)}, the
    40 kernels that took longest in each, as tables). On the CPU, kernels are its ops and busy is their time."""
    from torch.profiler import ProfilerActivity, profile

    from deformable_detr.utils.benchmarking import synchronize

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    figures, tables = {}, []
    for name, call in calls.items():
        with profile(activities=activities) as profiled:
            call()
            synchronize(device)
        averages = profiled.key_averages()
        kernels = sum(event.device_type == kind for event in profiled.events())
        busy = sum(getattr(average, key) for average in averages) / 1e6  # microseconds
        figures[name] = kernels, busy
        table = averages.table(sort_by=key, row_limit=40, max_name_column_width=100)
        tables.append(f"===== {name}: {kernels} kernels, busy {busy * 1e3:.1f} ms\n{table}")
    return figures, "\n\n".join(tables)


# ------------------------------------------------------------------------------------------------ training


def training_steps(model, batches, precision: str, device, steps: int) -> tuple[list[float], list[float], int, float]:
    """`steps` optimiser steps of the training loop's own step functions on a copy of `model`, from a fresh
    Accelerator in `precision`. -> (losses, seconds per step, steps skipped, peak GPU MiB or NaN). The peak counts
    what the run adds to the memory already in use: its copy of the model, the optimiser state and activations."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from deformable_detr.engine.checkpoints import TrainState
    from deformable_detr.engine.model_setup import parameter_groups
    from deformable_detr.engine.options import TrainingOptions
    from deformable_detr.engine.trainer import forward_backward, optimiser_step
    from deformable_detr.utils.benchmarking import PeakMemory, synchronize

    options = TrainingOptions(dataset="shapes", config_name="paper")  # the paper's recipe
    state, losses, times = TrainState(), [], []
    with PeakMemory(device, cpu=False) as peak:
        model = copy.deepcopy(model)  # accelerate wraps a prepared model's forward in its autocast
        AcceleratorState._reset_state()  # each run its own mixed precision and grad scaler
        accelerator = Accelerator(mixed_precision=precision, cpu=device.type == "cpu")
        optimizer = torch.optim.AdamW(parameter_groups(model, options), weight_decay=options.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        model, optimizer = accelerator.prepare(model.train(), optimizer)
        for step in range(steps):
            batch = batches[step % len(batches)]
            batch = {
                "pixel_values": batch["pixel_values"].to(device),
                "pixel_mask": batch["pixel_mask"].to(device),
                "labels": [{k: v.to(device) for k, v in label.items()} for label in batch["labels"]],
            }
            synchronize(device)
            started = time.perf_counter()
            with accelerator.accumulate(model):
                outputs, _, bad, _ = forward_backward(model, batch, accelerator, False, False)
                optimiser_step(model, optimizer, scheduler, accelerator, options, state, bad, outputs.loss)
            synchronize(device)
            times.append(time.perf_counter() - started)
            losses.append(outputs.loss.item())
    AcceleratorState._reset_state()
    return losses, times, state.skipped_steps, peak.mib


def training(report, device, quick, hf, ours):
    """30 optimiser steps, ours and transformers', each from the same weights, in bf16 and in fp16. The pair runs
    twice, alternately (ours, transformers, ours, transformers), and each model's step time is its better median:
    one run after the other, the ratio moved by 10 % between H100 machines."""
    from deformable_detr import DeformableDetrImageProcessor
    from deformable_detr.data.samples import DetectionCollator, DetectionSamples
    from deformable_detr.data.shapes import shapes_records

    batch_size, steps, size = (2, 6, 128) if quick else (8, 30, 512)
    section = f"training, batch {batch_size} of {size}x{size} shapes, {steps} steps"
    samples = DetectionSamples(shapes_records(batch_size * 10, size, max_objects=6))  # rows in memory, no files
    processor = DeformableDetrImageProcessor(size={"shortest_edge": size, "longest_edge": size})
    batches = list(torch.utils.data.DataLoader(samples, batch_size=batch_size, collate_fn=DetectionCollator(processor)))
    for precision in ("bf16", "fp16"):
        runs = {"ours": [], "transformers": []}
        for _ in range(2):
            for name, model in (("ours", ours), ("transformers", hf)):
                runs[name].append(training_steps(model, batches, precision, device, steps))
        results = {}
        for name, (first_run, second_run) in runs.items():
            losses, _, skipped, _ = first_run
            window = max(1, steps // 3)
            first, last = statistics.mean(losses[:window]), statistics.mean(losses[-window:])
            finite = all(math.isfinite(v) for run in (first_run, second_run) for v in run[0])
            falling = finite and last < first
            report.add(
                section,
                f"{name}, {precision}: loss",
                f"{first:.3f} (first {window} steps) -> {last:.3f} (last {window}), {skipped} skipped step(s)",
                "pass" if falling else "fail",
                losses=losses,
                skipped=skipped,
            )
            medians = [statistics.median(times[2:]) for _, times, _, _ in (first_run, second_run)]
            peak = max(first_run[3], second_run[3])
            results[name] = min(medians), peak
            report.add(
                section,
                f"{name}, {precision}: step",
                f"{min(medians) * 1e3:.1f} ms (median; the two runs {medians[0] * 1e3:.1f} and "
                f"{medians[1] * 1e3:.1f} ms), peak memory {peak:.0f} MiB",
                step_ms=min(medians) * 1e3,
                run_medians_ms=[m * 1e3 for m in medians],
                peak_mib=peak,
            )
        (ours_time, ours_peak), (hf_time, hf_peak) = results["ours"], results["transformers"]
        speedup = hf_time / ours_time
        text = f"{speedup:.2f}x transformers' step, peak memory {ours_peak:.0f} vs {hf_peak:.0f} MiB"
        if precision == "bf16":
            met = speedup >= 1.5 and not ours_peak > hf_peak
            report.target(
                section, "bf16: ours vs transformers", met, text + " (target: >= 1.5x, less memory)", speedup=speedup
            )
        else:
            report.add(section, "fp16: ours vs transformers", text, speedup=speedup)


def environment(device) -> dict:
    import transformers

    from deformable_detr.utils.benchmarking import device_name

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    return {
        "device": f"{device} ({device_name(device)})",
        "torch": torch.__version__,
        "triton": triton_version,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda or "none",
        "cpus": os.cpu_count(),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: the kernels run in its interpreter
    elif not torch.cuda.is_available():
        print(
            f"--device {args.device}: CUDA is not available here (torch {torch.__version__}); try --device cpu --quick"
        )
        return 2
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, root)  # the package by path, installed or not
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 in the comparisons
    torch.backends.cudnn.allow_tf32 = False
    report = Report(args.out, environment(device))
    parts = args.only or ["op", "speed", "model", "train", "compile"]
    if "op" in parts:
        for check in (op_correctness, op_edge_cases, op_gradcheck, op_deterministic):
            guarded(report, "op: Triton vs reference")(check)(report, device, args.quick)
    if "speed" in parts:
        bandwidth = copy_bandwidth(device, args.quick)
        report.add(
            "op speed, one encoder layer",
            "device-to-device copy bandwidth",
            f"{bandwidth / 1e12:.2f} TB/s (read + write)",
            bytes_per_second=bandwidth,
        )
        guarded(report, "op speed, one encoder layer")(op_speed)(report, device, args.quick, bandwidth)
    if args.sweep and "speed" in parts:
        guarded(report, "launch settings")(sweep)(report, device, args.quick)
    if {"model", "train", "compile"} & set(parts):  # one pair, built once, serves all three
        hf, ours = model_pair(device, args.quick)
        hf.eval(), ours.eval()
    if "model" in parts:
        guarded(report, inference_section(args.quick))(inference)(report, device, args.quick, hf, ours)
    if "train" in parts:
        guarded(report, "training")(training)(report, device, args.quick, hf, ours)
    if "compile" in parts:
        guarded(report, inference_section(args.quick))(compiled_inference)(report, device, args.quick, ours, args.sweep)
    failed = report.failed()
    print(
        f"\nreport: {os.path.join(args.out, 'report.md')}; "
        + (f"{len(failed)} check(s) FAILED" if failed else "all checks passed")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
