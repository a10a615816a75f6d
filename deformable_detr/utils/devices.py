"""The torch device a command runs on: `--device` checked against what this machine and this torch can use."""

import torch


def checked_device(device: str | None) -> torch.device:
    """`device` as a torch.device (None: cuda if present, else cpu); ValueError naming one torch cannot use here (a
    type this torch was not built with, or whose hardware is absent: mps, xpu, cuda without a GPU)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device {device!r} is not a torch device (such as cpu, cuda or cuda:1)") from None
    if parsed.type == "cpu":
        return parsed
    if hasattr(torch, "accelerator"):  # torch >= 2.6: the one accelerator this machine's torch can use, if any
        here = torch.accelerator.current_accelerator(check_available=True)  # built for, and present
    else:
        here = torch.device("cuda") if torch.cuda.is_available() else None
    if here is None or here.type != parsed.type:
        also = f"; it has {here.type}" if here is not None else ""
        raise ValueError(
            f"device {device!r}: {parsed.type.upper()} is not available here (torch {torch.__version__}{also})"
        )
    return parsed


def accelerator_options(device: str | None) -> dict:
    """Accelerator's keyword arguments for `device` (checked as `checked_device` checks it): None, its default (the
    GPU or MPS if there is one, else the CPU); "cpu", cpu=True; cuda or mps, the default once found here. A device
    index is refused: accelerate runs on the current device, which CUDA_VISIBLE_DEVICES picks."""
    if device is None:
        return {}
    parsed = checked_device(device)
    if parsed.index is not None:
        raise ValueError(
            f"device {device!r}: give {parsed.type} without an index, and pick the GPU with "
            f"CUDA_VISIBLE_DEVICES={parsed.index}"
        )
    return {"cpu": True} if parsed.type == "cpu" else {}
