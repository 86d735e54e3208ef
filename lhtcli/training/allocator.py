"""Host memory reuse for CPU training.

A training step allocates and frees the same activation buffers (1-20 MB each) every step. glibc's
malloc serves blocks that large with fresh ``mmap`` pages, or trims them off the heap when freed, so
each step pays page faults and kernel zeroing for every buffer again (~90k faults and ~0.2 s of system
time per step of a 6-layer, N=4096 model on 2 cores). Raising the mmap and trim thresholds keeps freed
buffers in the heap for the next step: the default config trains ~10% faster, with a lower peak.
"""

from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value; larger blocks (dense score matrices) stay mmapped
TRIM_THRESHOLD = 1 << 30


def reuse_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed buffers for reuse; False where that is not glibc (then nothing
    changes)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # absent from musl and other C libraries
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
