"""Where training runs: the one device resolver (single process and sharded), the expert
dtype, and the memory a run may use and did use."""

from __future__ import annotations

import os
import time
from typing import Optional

import torch

from mergekit_dam.plugin.config import DamError, DamSettings


def resolve_device(name: str) -> torch.device:
    """`train_device` as a torch device: auto = the first CUDA GPU if there is one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DamError(f"dam: train_device `{name}` is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DamError(f"dam: train_device `{name}` but no CUDA GPU is available; use train_device: cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DamError(f"dam: train_device `{name}` but only {torch.cuda.device_count()} GPU(s) exist")
    if device.type not in ("cpu", "cuda"):
        raise DamError(f"dam: train_device `{name}` is not supported; use auto, cpu, cuda or cuda:N")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The expert stacks' dtype: auto = bfloat16 on a GPU, float32 on the CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def start_run(settings: DamSettings, device: torch.device) -> tuple:
    """(expert dtype, start time) of a training run: seeds, and zeroes the device's peak memory."""
    torch.manual_seed(settings.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return resolve_dtype(settings.train_dtype, device), time.perf_counter()


def available_memory(device: torch.device) -> Optional[int]:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def resident_bytes() -> Optional[int]:
    """This process's resident memory now (Linux), or None."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def out_of_memory(device: torch.device, settings: DamSettings, where: str, checkpoint: bool = False) -> DamError:
    """The one-line error for a device that ran out of memory `where` (e.g. "at step 3"),
    with the peak it reached and what to lower."""
    peak = peak_memory(device) / 2**30
    total = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else None
    of = f" of {total:.1f} GiB" if total else ""
    hint = (f"lower max_length (now {settings.max_length}) or batch_size (now {settings.batch_size}), "
            "use recompute: layer or mode: layerwise, or train on a larger device")
    resume = "; a checkpoint was written, so the same command resumes from it" if checkpoint else ""
    return DamError(f"dam: {device} ran out of memory {where} (peak {peak:.1f} GiB{of}); {hint}{resume}")
