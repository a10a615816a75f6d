"""Timing and peak memory for the scripts that measure the model and the op (scripts/benchmark.py,
scripts/gpu_check.py): medians of wall-clock timings taken between device synchronisations after a warm-up, and
the memory that a call adds to the peak.

The library never imports it, and no module of the Hub set (the files that save_pretrained copies beside the
weights) does, so a saved model never holds it. It needs only torch and the standard library.
"""

import ctypes
import math
import platform
import statistics
import time
from collections.abc import Callable, Sequence

import torch

__all__ = ["PeakMemory", "device_name", "median_time", "median_times", "peak_memory", "synchronize"]


def synchronize(device: torch.device):
    """Waits until the kernels queued on `device` have run (every stream of a CUDA device); a CPU call has done its
    work when it returns, so there is nothing to wait for."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_times(
    fns: Sequence[Callable[[], object]], device: torch.device, repeats: int, calls: int = 1
) -> list[float]:
    """Median seconds per call of each of `fns`, in their order.

    Each fn is called once to warm up (compilation, caches, allocator), then `repeats` rounds each time `calls`
    back-to-back calls of every fn in turn, so that a drift in clock speed or load falls on all of them alike; a
    timing runs from one device synchronisation to the next and is divided by `calls`.
    """
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, seconds in zip(fns, times):
            synchronize(device)
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            synchronize(device)
            seconds.append((time.perf_counter() - start) / calls)
    return [statistics.median(seconds) for seconds in times]


def median_time(fn: Callable[[], object], device: torch.device, repeats: int, calls: int = 1) -> float:
    """Median seconds per call of fn alone: one warm-up, then `repeats` timings of `calls` calls (`median_times`)."""
    return median_times([fn], device, repeats, calls)[0]


def _process_status(key: str) -> int:
    """The process's `key` line of /proc/self/status (VmRSS: resident memory now, VmHWM: its peak), in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key)) * 1024  # given in kB


class PeakMemory:
    """`with PeakMemory(device) as peak: ...`, then `peak.mib`: the MiB that the block added to the peak memory.

    On a CUDA device: its peak allocation during the block (torch.cuda.max_memory_allocated, reset on entering)
    less what was allocated before. On the CPU: the process's peak resident memory during the block (Linux: VmHWM,
    reset on entering) less the resident memory before. `mib` is NaN where that cannot be measured (no /proc), on
    the CPU with `cpu=False` (device memory only), and when the block raised; `measuring` says, on entering,
    whether a figure will come.
    """

    def __init__(self, device: torch.device, cpu: bool = True):
        self.device, self.cpu = device, cpu
        self.measuring, self.before, self.mib = False, 0, math.nan  # before: bytes in use on entering

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before, self.measuring = torch.cuda.memory_allocated(self.device), True
        elif self.cpu:
            try:
                ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed memory back to the system: the resident size drops
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM to the current resident size
            except OSError:
                return self
            self.before, self.measuring = _process_status("VmRSS"), True
        return self

    def __exit__(self, error_type, error, traceback) -> bool:
        if self.measuring and error_type is None:
            if self.device.type == "cuda":
                synchronize(self.device)
                peak = torch.cuda.max_memory_allocated(self.device)
            else:
                peak = _process_status("VmHWM")
            self.mib = (peak - self.before) / 2**20
        return False


def peak_memory(fn: Callable[[], object], device: torch.device, cpu: bool = True) -> float:
    """MiB that one call of fn adds to the peak memory, as `PeakMemory` measures it; where it measures nothing, NaN
    without calling fn."""
    with PeakMemory(device, cpu) as peak:
        if peak.measuring:
            fn()
    return peak.mib


def device_name(device: torch.device) -> str:
    """The hardware behind `device`, for a report: the GPU's name, or the processor's (else the machine's type)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
