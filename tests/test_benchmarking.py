"""The measurement helpers of scripts/benchmark.py and scripts/gpu_check.py (deformable_detr/utils/benchmarking.py):
what a median counts, in which order the timed functions run, and what the peak memory counts."""

import math

import pytest
import torch

from deformable_detr.utils import benchmarking
from deformable_detr.utils.benchmarking import PeakMemory, median_time, median_times, peak_memory

CPU = torch.device("cpu")


def test_median_times_warm_up_once_then_alternate():
    calls = []
    median_times([lambda: calls.append("a"), lambda: calls.append("b")], CPU, repeats=3, calls=2)
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] * 3


def test_a_median_is_of_seconds_per_call_without_the_warm_up(monkeypatch):
    """A fake clock that each call moves on by the next of `steps`: the warm-up's 100 s never count, and each
    timing of two calls is halved."""
    clock, steps = [0.0], iter([100.0, 1.0, 1.0, 3.0, 3.0, 8.0, 4.0])
    monkeypatch.setattr(benchmarking.time, "perf_counter", lambda: clock[0])

    def fn():
        clock[0] += next(steps)

    assert median_time(fn, CPU, repeats=3, calls=2) == 3.0  # per call: 1, 3 and 6


def test_peak_memory_counts_what_a_call_adds_on_the_cpu():
    with PeakMemory(CPU) as probe:
        pass
    if not probe.measuring:
        pytest.skip("no /proc/self/clear_refs here: the CPU's peak memory cannot be measured")
    mib = peak_memory(lambda: torch.ones(2**24).sum(), CPU)  # 64 MiB of fp32, freed on return
    assert 60 <= mib < 200


def test_device_memory_only_gives_nan_on_the_cpu_without_calling():
    assert math.isnan(peak_memory(lambda: 1 / 0, CPU, cpu=False))
    with PeakMemory(CPU, cpu=False) as peak:
        torch.ones(2**20).sum()  # a block runs whatever is measured
    assert not peak.measuring and math.isnan(peak.mib)


def test_a_block_that_raises_measures_nothing():
    with pytest.raises(RuntimeError, match="stopped"), PeakMemory(CPU) as peak:
        raise RuntimeError("stopped")
    assert math.isnan(peak.mib)


def test_the_full_size_pair_trains_the_same_parameters():
    """The speed comparisons train both models with the same trainable backbone (42 tensors): transformers' with
    its own ResNet would freeze the whole backbone (its name check misses "encoder.stages.1") and skip the
    backbone's backward that ours does."""
    from deformable_detr.testing import full_size_pair

    hf, ours = full_size_pair("cpu")
    for model in (hf, ours):
        trained = [p for n, p in model.named_parameters() if p.requires_grad and "backbone" in n]
        assert len(trained) == 42 and sum(p.numel() for p in trained) == 23_232_512
    assert sum(p.numel() for p in hf.parameters() if p.requires_grad) == sum(
        p.numel() for p in ours.parameters() if p.requires_grad
    )


def test_the_data_benchmark_loads_its_synthetic_folder_first_and_from_the_cache(tmp_path, capsys):
    """scripts/benchmark.py --only data at a tiny scale, in one process: its COCO folder holds the images and boxes
    asked for, and a row reports the load of all its images, the first time and from the cache."""
    import importlib.util
    import json
    import os

    spec = importlib.util.spec_from_file_location(
        "benchmark", os.path.join(os.path.dirname(__file__), "..", "scripts", "benchmark.py")
    )
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    root = benchmark.synthetic_coco_folder(str(tmp_path), 40, 300, 5)
    files = [
        json.loads((tmp_path / root / "annotations" / f"instances_{s}.json").read_text()) for s in ("train", "val")
    ]
    assert [len(f["images"]) for f in files] == [38, 2] and len(files[0]["categories"]) == 5
    assert 200 < sum(len(f["annotations"]) for f in files) < 400  # Poisson around 300
    assert os.stat(os.path.join(root, "train", files[0]["images"][0]["file_name"])).st_nlink > 1  # hard links
    benchmark.bench_data_loading(["coco"], 40 / 118_287, [1], str(tmp_path))
    row = capsys.readouterr().out.strip().splitlines()[-1].split()
    assert row[:3] == ["coco", "(40", "images,"] and row[5] == "1"
    assert all(float(value) >= 0 for value in row[6:8])  # seconds first and cached
