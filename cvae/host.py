"""Host-memory settings for training on a CPU.

A training step on a CPU allocates and frees the same large activation buffers every step:
at the lab's size, under teacher forcing, the batched decoder's are 30 frames x up to 768
channels x 32 x 64, about 190 MB each. glibc's malloc serves every block above its mmap
threshold (128 KiB, rising with use to at most 32 MiB) with a fresh ``mmap`` and unmaps it on
``free``, and hands freed heap back once the free top exceeds its trim threshold. So each step
faults those pages in again and the kernel zeroes them. Measured on the development machine
(2-core EPYC), one lab-size step took about a million page faults under teacher forcing
(3.9 s a step with this setting against 5.0-5.4 s without) and 40-80 thousand without
teacher forcing (about 2%).

``reuse_freed_host_memory`` raises both thresholds, so freed buffers stay in the heap and the
next step reuses them: the effect tcmalloc or jemalloc would have, which PyTorch's CPU
performance guide recommends. The process keeps its peak heap instead of returning it; a
training process reaches that peak every step anyway.

The runner applies it when it trains on a CPU; ``CVAE_HOST_MALLOC=0`` leaves malloc alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 30  # blocks above 1 GiB still get a mapping of their own
TRIM_THRESHOLD = (1 << 31) - 1  # mallopt takes an int: the largest it can say

_applied: bool | None = None


def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    # These mallopt parameters are glibc's; musl and macOS have no such knobs.
    if not (hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt")):
        return None
    return libc


def reuse_freed_host_memory() -> bool:
    """Keep freed host buffers in the heap for reuse (glibc; once per process).

    Returns whether the settings are in effect: False off glibc, under
    ``CVAE_HOST_MALLOC=0``, or when glibc refused them.
    """
    global _applied
    if _applied is None:
        libc = None if os.environ.get("CVAE_HOST_MALLOC", "1") == "0" else _glibc()
        _applied = bool(libc is not None
                        and libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                        and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
    return _applied
