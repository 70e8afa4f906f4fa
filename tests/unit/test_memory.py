"""Per-step peak memory and the allocator setting of CPU runs (spine_ttrl.engine.memory), on Linux."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spine_ttrl.engine.memory import fix_mmap_threshold, peak_memory_metrics, reset_peak_memory

linux = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux /proc only")


@linux
def test_peak_rss_is_per_window_on_the_cpu():
    import mmap

    cpu = torch.device("cpu")
    reset_peak_memory(cpu)
    before = peak_memory_metrics(cpu)["memory/peak_rss_gb"]
    big = mmap.mmap(-1, 256 * 2**20)  # 256 MiB mapped outside any allocator's cache, then touched
    big.write(b"x" * len(big))
    with_big = peak_memory_metrics(cpu)["memory/peak_rss_gb"]
    big.close()  # unmapped: back to the system
    reset_peak_memory(cpu)
    after = peak_memory_metrics(cpu)["memory/peak_rss_gb"]
    assert with_big - before > 0.2 and with_big - after > 0.2  # the window restarted below the old peak


_CHURN = """
import sys, torch
from spine_ttrl.engine.memory import fix_mmap_threshold
rss = lambda: int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20
if sys.argv[1] == "fix":
    assert fix_mmap_threshold()
base, keep = rss(), []
for _ in range(3):  # activations of a few micro-batches: 8 MiB blocks freed, small survivors between
    big = [torch.ones(2**21) for _ in range(40)]
    small = [torch.ones(2**18) for _ in range(5)]
    keep += small[::2]
    del big, small
print(rss() - base)
"""


@linux
def test_freed_activation_memory_returns_to_the_system_with_the_fixed_threshold():
    def kept_mib(mode: str) -> float:
        out = subprocess.run([sys.executable, "-c", _CHURN, mode], capture_output=True, text=True, check=True)
        return float(out.stdout.split()[-1])

    # 480 MiB allocated and freed per round: glibc's default keeps ~300 MiB of it; fixed, next to nothing
    assert kept_mib("fix") < 60 < kept_mib("default")


def test_the_users_own_malloc_setting_wins(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert fix_mmap_threshold() is False
