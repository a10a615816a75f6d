"""Checks and times the whole GPU path in one run, and writes report.json, report.md and profile.txt into --out.

  1. the op's kernel tests (tests/test_ms_deform_attn_kernels.py, run by pytest: natively with `-m cuda` on a GPU,
     in Triton's interpreter on the CPU): the Triton kernels against the grid_sample reference at the shape sets of
     deformable_detr/model/ms_deform_attn_inputs.py in each float type, edge cases, the self-check that guards the
     automatic backend choice, the deterministic backward; one row per test;
  2. the op's speed per encoder layer of the paper's 800x1066 image: Triton against the reference, and as a
     multiple of the memory floor (the bytes that must move / the device-to-device copy bandwidth measured in this
     run); the deterministic backward's cost;
  3. the model: ResNet-50 6+6 inference at 800x1333, batch 1 and 8, fp32 and bf16 autocast, ours against
     transformers' with the same weights; eager against torch.compile, and one call of each profiled (their
     longest kernels in profile.txt);
  4. training: 30 steps of the training loop's step (engine/trainer.py's TrainingStep, accelerate) on the
     synthetic shapes data in bf16 and fp16: loss finite and falling, step time, peak memory, ours against
     transformers' at the same precision (the pair runs twice, alternately; the better medians).

Checks pass or fail (any failure: exit status 1); targets (speed) are met or missed; figures are reported.
`--device cpu --quick` runs the same checks on small shapes on the CPU (the Triton kernels in Triton's
interpreter) in a few minutes; its timings mean nothing. `--sweep` also times the kernels' launch settings (at
the encoder shape set of an 800x1333 image, the largest the processor makes) and torch.compile with Inductor's
layout optimisation off. Needs pytest, for part 1.
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL_TESTS = os.path.join(ROOT, "tests", "test_ms_deform_attn_kernels.py")
# the op's shape sets (deformable_detr/model/ms_deform_attn_inputs.py) that the speed part times, by --quick: the
# interpreter runs every program in Python
TIMED = {False: "encoder_800x1066", True: "tiny_two_levels"}
SWEPT = {False: "encoder_800x1333", True: "tiny_two_levels"}


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


def copy_bandwidth(device, quick) -> float:
    """Bytes per second of a device-to-device copy, counting bytes read and written."""
    from deformable_detr.utils.benchmarking import median_time

    source = torch.empty(2**24 if quick else 2**28, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    return 2 * source.numel() * 4 / median_time(lambda: target.copy_(source), device, 5 if quick else 20)


# ---------------------------------------------------------------------------------------------------- the op


class TestOutcomes:
    """A pytest plugin that keeps every test's report: its call, or the setup or teardown that did not pass."""

    def __init__(self):
        self.reports = []

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or report.outcome != "passed":
            self.reports.append(report)


def kernel_tests(report, device, quick):
    """The op's kernel tests, in this process (the device and Triton's mode are this run's): `-m cuda` on a GPU,
    the interpreter's (`-m "not cuda"`) on the CPU. One row per test; a skip fails, as the check did not run."""
    import pytest

    section = "op: kernel tests"
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # the tests' "cuda"
    outcomes = TestOutcomes()
    marker = "cuda" if device.type == "cuda" else "not cuda"
    status = pytest.main(
        [KERNEL_TESTS, "-q", "-p", "no:cacheprovider", "-m", marker, "--rootdir", ROOT], plugins=[outcomes]
    )
    for test in outcomes.reports:
        name = test.nodeid.split("::", 1)[-1]
        if test.passed:
            report.add(section, name, f"passed ({test.duration:.1f} s)", "pass", seconds=test.duration)
        else:
            crash = getattr(test.longrepr, "reprcrash", None)
            why = crash.message if crash else str(test.longrepr)
            report.add(section, name, f"{test.outcome}: {why[:300]}".replace("\n", " "), "fail")
    passed = sum(test.passed for test in outcomes.reports)
    report.add(
        section,
        "pytest " + os.path.relpath(KERNEL_TESTS, ROOT),
        f"{passed} of {len(outcomes.reports)} passed, exit status {int(status)}",
        "pass" if status == 0 and passed else "fail",
        passed=passed,
    )


def deterministic_cost(report, device, quick):
    """What summing the value gradient in a fixed order (torch.use_deterministic_algorithms(True)) costs against the
    atomic adds, one backward at the timed shape set, an encoder layer's own locations, the larger batch."""
    from deformable_detr.model import ms_deform_attn_triton as kernels
    from deformable_detr.model.ms_deform_attn import kernel_shapes
    from deformable_detr.model.ms_deform_attn_inputs import op_inputs
    from deformable_detr.utils.benchmarking import median_time

    batch = 2 if quick else 8
    value, shapes, locations, weights = op_inputs(TIMED[quick], batch, device=device, sampling="encoder")
    grad_output = torch.randn(*locations.shape[:3], value.shape[-1], device=device)
    run = partial(kernels.backward, grad_output, value, *kernel_shapes(shapes.tolist(), device), locations, weights)
    atomic = median_time(run, device, 1 if quick else 5)
    before = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        ordered = median_time(run, device, 1 if quick else 5)
    finally:
        torch.use_deterministic_algorithms(before)
    report.add(
        "op speed, one encoder layer",
        f"deterministic backward, batch {batch}, encoder's locations",
        f"{ordered * 1e3:.2f} ms against {atomic * 1e3:.2f} ms with atomic adds: {ordered / atomic:.1f}x the time",
        ordered_ms=ordered * 1e3,
        atomic_ms=atomic * 1e3,
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


def time_op(device, inputs, backward: bool, bandwidth, quick) -> tuple[float, str, dict]:
    """Triton against the reference (in fp32, as autocast runs grid_sample) on `inputs`, forward or forward and
    backward -> (Triton's seconds, the row's text, its figures)."""
    from deformable_detr.model.ms_deform_attn import BACKENDS
    from deformable_detr.model.ms_deform_attn_inputs import output_gradient
    from deformable_detr.utils.benchmarking import median_time, peak_memory

    value, shapes, locations, weights = inputs
    grad_output = output_gradient(inputs).to(value.dtype)

    def step(backend):
        v = value if backend == "triton" else value.float()
        leaves = [t.detach().requires_grad_(backward) for t in (v, locations, weights)]
        with torch.set_grad_enabled(backward):
            out = BACKENDS[backend](leaves[0], shapes, leaves[1], leaves[2])
            if backward:
                out.backward(grad_output.to(out.dtype))

    repeats, calls = (1, 1) if quick else (7, 5)
    ours, theirs = (median_time(lambda b=b: step(b), device, repeats, calls) for b in ("triton", "reference"))
    memory = [peak_memory(lambda b=b: step(b), device, cpu=False) for b in ("triton", "reference")]
    floor = floor_bytes(value, locations, weights, backward) / bandwidth
    # every point reads its four corners' rows of D channels: from the caches, or memory where they miss
    gathered = weights.numel() * 4 * value.shape[-1] * value.element_size() / ours
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
    return ours, text, figures


def op_speed(report, device, quick, bandwidth):
    """Per encoder layer, Triton against the reference, at uniform sampling locations (no two queries share a
    value row: a worst case for the caches) and at an encoder layer's own (ms_deform_attn_inputs.encoder_locations).
    Targets: >= 5x the reference forward and backward; forward in fp32 >= 10x and within 3x the memory floor, in
    bf16 no slower than fp32's."""
    from deformable_detr.model.ms_deform_attn_inputs import op_inputs

    section = "op speed, one encoder layer"
    fp32_times = {}  # (sampling, batch, backward) -> Triton's seconds in fp32
    cases = [
        (sampling, batch, dtype, backward)
        for sampling in ("uniform", "encoder")
        for batch in ((2,) if quick else (1, 8))  # quick: each case takes the interpreter seconds
        for dtype in (torch.float32, torch.bfloat16)
        for backward in (False, True)
    ]
    for sampling, batch, dtype, backward in cases:
        inputs = op_inputs(TIMED[quick], batch, dtype, device, sampling=sampling)
        ours, text, figures = time_op(device, inputs, backward, bandwidth, quick)
        where = "encoder's locations" if sampling == "encoder" else "uniform locations"
        name = f"{'forward+backward' if backward else 'forward'}, {str(dtype)[6:]}, batch {batch}, {where}"
        if backward:
            report.target(section, name, figures["speedup"] >= 5, text + " (target: >= 5x)", **figures)
        elif dtype == torch.float32:
            fp32_times[sampling, batch, backward] = ours
            met = figures["speedup"] >= 10 and figures["floor_multiple"] <= 3
            report.target(section, name, met, text + " (target: >= 10x, <= 3x the floor)", **figures)
        else:
            fp32 = fp32_times[sampling, batch, backward]
            text += f" (target: no slower than fp32's {fp32 * 1e3:.3f} ms)"
            report.target(section, name, ours <= fp32 * 1.05, text, **figures)


def sweep(report, device, quick):
    """Times the kernels' launch settings at the swept shape set (an 800x1333 image's encoder layer, batch 8),
    uniform and encoder's locations: BLOCK_Q x num_warps (each setting compiles once, for both)."""
    from deformable_detr.model import ms_deform_attn_triton as kernels
    from deformable_detr.model.ms_deform_attn import kernel_shapes
    from deformable_detr.model.ms_deform_attn_inputs import op_inputs
    from deformable_detr.utils.benchmarking import median_time

    batch = 2 if quick else 8
    # the pairs near the fastest of the sweeps that chose LAUNCH (each backward setting takes about 25 s to compile)
    settings = [(32, 4), (64, 4)] if quick else [(16, 4), (32, 4), (32, 8), (64, 4), (64, 8), (128, 8)]
    cases = [
        (dtype, direction, sampling)
        for dtype, directions in ((torch.float32, ("backward", "forward")), (torch.bfloat16, ("forward",)))
        for direction in directions
        for sampling in ("uniform", "encoder")
    ]
    for dtype, direction, sampling in cases:
        value, shapes, locations, weights = op_inputs(SWEPT[quick], batch, dtype, device, sampling=sampling)
        shapes_tensor, starts = kernel_shapes(shapes.tolist(), device)
        grad_output = torch.randn(*locations.shape[:3], value.shape[-1], device=device, dtype=dtype)
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
            f"{direction}, {str(dtype)[6:]}, {sampling} locations",
            f"best {best} {times[best]:.3f} ms; " + ", ".join(f"{k} {v:.3f}" for k, v in times.items()),
            **times,
        )


# ------------------------------------------------------------------------------------------------- the model


def model_pair(device, quick):
    """transformers' Deformable DETR and ours with the same weights: ResNet-50 6+6 (or a tiny one with --quick)."""
    from deformable_detr import from_transformers
    from deformable_detr.testing import full_size_pair, small_hf_model

    if not quick:
        return full_size_pair(device)
    hf = small_hf_model("multi-scale")
    return hf.to(device), from_transformers(hf).to(device)


def inference_section(quick):
    return "inference, " + ("tiny model, 96x128" if quick else "ResNet-50 6+6, 800x1333")


@torch.no_grad()
def infer(model, x, bf16=False):
    """model(pixel_values=x), in fp32 or under bf16 autocast."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        return model(pixel_values=x)


def inference(report, device, quick, hf, ours):
    """Ours against transformers' in fp32 (outputs and speed) and under bf16 autocast, at batch 1 and the larger."""
    from deformable_detr.apps.onnx_export import max_abs_difference
    from deformable_detr.utils.benchmarking import median_time, peak_memory

    section = inference_section(quick)
    height, width = (96, 128) if quick else (800, 1333)
    repeats = 2 if quick else 5
    for batch in (1, 2 if quick else 8):
        x = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(batch)).to(device)
        fp32 = infer(ours, x)
        report.check(
            section,
            f"batch {batch}, fp32: ours vs transformers, max abs diff of logits and boxes",
            max_abs_difference(fp32, infer(hf, x)),
            1e-4,
        )
        models = {"ours": ours, "transformers": hf}
        times = {
            (name, bf16): median_time(lambda m=model, b=bf16: infer(m, x, b), device, repeats)
            for name, model in models.items()
            for bf16 in (False, True)
        }
        memory = {
            (name, bf16): peak_memory(lambda m=model, b=bf16: infer(m, x, b), device, cpu=False)
            for name, model in models.items()
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
        bf16_inference(report, section, batch, times, x, models, fp32)


def bf16_inference(report, section, batch, times, x, models, fp32):
    """Our bf16 autocast against our fp32: its speed-up (times from `inference`) and how far its outputs move."""
    from deformable_detr.apps.onnx_export import max_abs_difference

    gain = times["ours", False] / times["ours", True]
    difference = max_abs_difference(infer(models["ours"], x, True), fp32)
    theirs = max_abs_difference(infer(models["transformers"], x, True), infer(models["transformers"], x))
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
    Inductor's layout optimisation off."""
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
        compiled_without_layout_optimisation(report, device, quick, ours, x, eager)


def compiled_without_layout_optimisation(report, device, quick, ours, x, eager: float):
    """torch.compile with Inductor's layout optimisation off (which turns convolutions channels-last), against
    `eager` seconds."""
    import torch._inductor.config as inductor

    from deformable_detr.utils.benchmarking import median_time

    torch._dynamo.reset()
    with inductor.patch(layout_optimization=False), torch.no_grad():
        compiled = torch.compile(ours)
        compiled(pixel_values=x)  # compiles here, under the patched setting
        plain = median_time(lambda: compiled(pixel_values=x), device, 2 if quick else 5)
    report.add(
        inference_section(quick),
        f"batch {x.shape[0]}, fp32: torch.compile, layout optimisation off",
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
    """`steps` optimiser steps of the training loop's own TrainingStep on a copy of `model`, from a fresh
    Accelerator in `precision`. -> (losses, seconds per step, steps skipped, peak GPU MiB or NaN). The peak counts
    what the run adds to the memory already in use: its copy of the model, the optimiser state and activations."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from deformable_detr.engine.checkpoints import TrainState
    from deformable_detr.engine.model_setup import parameter_groups
    from deformable_detr.engine.options import TrainingOptions
    from deformable_detr.engine.trainer import TrainingStep
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
        train_step = TrainingStep(model, optimizer, scheduler, accelerator, max_grad_norm=options.max_grad_norm)
        for step in range(steps):
            batch = batches[step % len(batches)]
            batch = {
                "pixel_values": batch["pixel_values"].to(device),
                "pixel_mask": batch["pixel_mask"].to(device),
                "labels": [{k: v.to(device) for k, v in label.items()} for label in batch["labels"]],
            }
            synchronize(device)
            started = time.perf_counter()
            outcome = train_step(batch, state)
            synchronize(device)
            times.append(time.perf_counter() - started)
            losses.append(outcome.loss.item())
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
    sys.path.insert(0, ROOT)  # the package by path, installed or not
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 in the comparisons
    torch.backends.cudnn.allow_tf32 = False
    report = Report(args.out, environment(device))
    parts = args.only or ["op", "speed", "model", "train", "compile"]
    if "op" in parts:
        guarded(report, "op: kernel tests")(kernel_tests)(report, device, args.quick)
    if "speed" in parts:
        bandwidth = copy_bandwidth(device, args.quick)
        report.add(
            "op speed, one encoder layer",
            "device-to-device copy bandwidth",
            f"{bandwidth / 1e12:.2f} TB/s (read + write)",
            bytes_per_second=bandwidth,
        )
        guarded(report, "op speed, one encoder layer")(op_speed)(report, device, args.quick, bandwidth)
        guarded(report, "op speed, one encoder layer")(deterministic_cost)(report, device, args.quick)
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
