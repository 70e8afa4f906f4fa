"""Host and device memory: the per-step peak, and the C allocator's handling of large CPU tensors.

Why the allocator matters on the CPU: glibc serves large blocks with ``mmap`` and returns them on
``free``, but it raises that threshold dynamically (up to 32 MiB) after such a free, so the next
activations of an update come from the heap, which fragments and is not returned to the system.
With Qwen2.5-0.5B (fp32, LoRA r 16, 16 rows of ≈ 470 tokens, 4 per micro-batch, one thread) the
update's peak resident memory was 12.0–13.7 GiB with glibc's default, 9.3 GiB with a fixed 8 MiB
threshold and 7.1 GiB with 1 MiB, and the process kept 11.4–12.7, 6.6 and 2.9–3.0 GiB afterwards;
the price is time, the page faults of fresh memory: the update took 313–316 s, 342 s and 359–364 s,
sampling 7 % longer at 1 MiB (``bench/memory.py``). ``run.mmap_threshold_mb`` (default 1) sets it
for CPU runs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

import torch


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window: torch's peak on a CUDA device; on Linux, the process's peak
    resident set (``VmHWM``, reset through ``/proc/self/clear_refs``). Elsewhere nothing."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def peak_memory_metrics(device: torch.device) -> dict[str, float]:
    """The peak memory since :func:`reset_peak_memory`, in GiB: ``memory/peak_gpu_gb`` (torch's
    allocations on a CUDA device) or ``memory/peak_rss_gb`` (the process's peak resident memory on
    Linux: weights, activations, the allocator's cache); {} where neither can be read."""
    if device.type == "cuda":
        return {"memory/peak_gpu_gb": torch.cuda.max_memory_allocated(device) / 2**30}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return {"memory/peak_rss_gb": int(line.split()[1]) / 2**20}
    except OSError:
        pass
    return {}


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD_BYTES = 1 << 20


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Serve C allocations of ``threshold`` bytes or more with ``mmap`` from now on (glibc's
    ``mallopt(M_MMAP_THRESHOLD)``, which also stops the dynamic raising described above), so the
    memory of freed activations goes back to the system. Returns True when set; a no-op (False)
    outside Linux/glibc, and when ``MALLOC_MMAP_THRESHOLD_`` is in the environment (the user's
    own setting wins)."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, int(threshold)) == 1
