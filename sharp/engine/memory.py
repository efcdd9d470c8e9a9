"""Peak memory of one block of work (a prefill, a generate call), for the benchmark scripts.

GPU: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus what was allocated
before (the tensors the block created beyond the model and its inputs). CPU: the process's peak
resident set (``VmHWM``) reset through ``/proc/self/clear_refs`` (Linux), minus the resident set
before; glibc's free lists are returned to the system first (``malloc_trim``) so that memory freed
by an earlier block is not silently reused. Python's ``tracemalloc`` does not see torch's CPU
allocations, so it is not used. Elsewhere (no /proc): None.
"""
from __future__ import annotations

import ctypes
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _kib(field: str) -> Optional[int]:
    try:
        m = re.search(rf"{field}:\s+(\d+) kB", _STATUS.read_text())
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Result holder: ``bytes`` = peak bytes above the start of the block (None: not measurable)."""

    bytes: Optional[int] = None
    kind: str = ""

    @property
    def mib(self) -> Optional[float]:
        return None if self.bytes is None else self.bytes / 2 ** 20


@contextmanager
def peak_memory(device):
    """``with peak_memory(device) as peak: ...`` then ``peak.bytes`` / ``peak.mib`` / ``peak.kind``."""
    device = torch.device(device)
    peak = PeakMemory()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield peak
        torch.cuda.synchronize(device)
        peak.bytes, peak.kind = torch.cuda.max_memory_allocated(device) - base, "cuda max_memory_allocated"
        return
    _trim()
    try:
        _CLEAR_REFS.write_text("5")  # reset VmHWM to the current RSS
        base = _kib("VmRSS")
    except OSError:
        base = None
    yield peak
    if base is not None:
        hwm = _kib("VmHWM")
        if hwm is not None:
            peak.bytes, peak.kind = max(0, hwm - base) * 1024, "peak RSS (VmHWM) above the start"
