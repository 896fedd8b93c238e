"""Where training runs: the start of a run on its device (seed, peak-memory counter, the
expert dtype from auto.dtype), and the memory a run may use and did use."""

from __future__ import annotations

import os
import time
from typing import Optional

import torch

from mergekit_dam.core import auto
from mergekit_dam.core.errors import DamError
from mergekit_dam.core.settings import DamSettings


def start_run(settings: DamSettings, device: torch.device) -> tuple:
    """(expert dtype, start time) of a training run: seeds, and zeroes the device's peak memory."""
    torch.manual_seed(settings.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return auto.dtype(settings.train_dtype, device), time.perf_counter()


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
