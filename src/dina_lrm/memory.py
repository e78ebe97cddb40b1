"""Peak memory of a block of work: CUDA's peak allocation on a GPU, the process's resident set on CPU."""

from __future__ import annotations

import resource
import threading
from pathlib import Path

import torch


def resident_bytes() -> int:
    """The process's resident set now (Linux; elsewhere its peak so far)."""
    statm = Path("/proc/self/statm")
    if statm.is_file():
        return int(statm.read_text().split()[1]) * resource.getpagesize()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def anonymous_bytes() -> int:
    """The process's anonymous resident memory now (Linux): its own allocations, without the pages of
    memory-mapped files (safetensors), which a device would hold as copies."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise OSError("no RssAnon in /proc/self/status (not Linux?)")


class MemoryMeter:
    """Peak memory while the block runs: CUDA's peak allocation on a GPU; on CPU the process's
    resident set (``anonymous``: its anonymous part only), sampled every 5 ms (the allocator may keep
    freed memory, so this is an upper bound)."""

    def __init__(self, device: torch.device, anonymous: bool = False):
        self.device = torch.device(device)
        self.peak_bytes = 0
        self.read = anonymous_bytes if anonymous else resident_bytes
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak_bytes = max(self.peak_bytes, self.read())

    def __enter__(self) -> MemoryMeter:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> MemoryMeter:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak_bytes = self.read()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def peak_so_far_bytes(self) -> int:
        """The peak up to now, read while the block still runs."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return max(self.peak_bytes, self.read())

    def stop(self) -> None:
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self.peak_bytes, self.read())

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / 2**20
