"""The process's memory allocator (glibc's malloc), set up for PyTorch's large CPU buffers.

PyTorch frees and allocates the same large buffers again on every step: activations, and the copy of every float32
convolution weight that oneDNN reorders on every call (59-118 MB for SD 1.5's 1280-channel layers). By default glibc
serves each block over 32 MB with a fresh mmap and hands a free heap top over 64 MB back to the kernel, so those
buffers come back as new zeroed pages: one page fault per 4 KB, millions per image (RESULTS.md).

`keep_freed_memory()` makes malloc keep that memory for reuse; the pipeline calls it when it loads onto the CPU and
hands the kept memory back after each image (`return_freed_memory()`). Nothing here imports torch: the CLI calls
it first, so that every thread torch and the server start later shares the main heap.
"""

from __future__ import annotations

import ctypes
import os

from . import cpu

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # mallopt parameters, from glibc's <malloc.h>
KEEP_FREED = 1 << 30  # bytes of free heap top malloc keeps for reuse, once keep_freed_memory() has run


def keep_freed_memory() -> bool:
    """Make this process's malloc keep the memory PyTorch frees, for reuse, instead of handing it back to the
    kernel. Process-wide and idempotent; False where it does not apply (no glibc).

    Every block comes from the main heap (M_MMAP_MAX 0), up to KEEP_FREED bytes of free heap top stay
    (M_TRIM_THRESHOLD), and threads that have not allocated yet share the main heap (M_ARENA_MAX 1). A thread
    with a heap of its own still gets blocks over 64 MB as fresh mmaps: without M_ARENA_MAX, a thread running SD
    1.5 float32 at 256px kept about a third of its page faults. glibc may still hand a thread started after
    torch's import a heap of its own, hence the CLI's early call."""
    libc = c_library()
    if not cpu.enabled("malloc") or libc is None or not hasattr(libc, "mallopt") or not hasattr(libc, "malloc_trim"):
        return False
    return all(libc.mallopt(opt, value) == 1 for opt, value in
               ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, KEEP_FREED)))


def return_freed_memory() -> None:
    """Hand the heap's free memory back to the kernel (malloc_trim): what one image's buffers left in the heap does
    not stay resident while the next image pages its weights back in."""
    libc = c_library()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(ctypes.c_size_t(0))


def c_library():
    """The C library (for mallopt, malloc_trim, madvise), or None where there is none to load."""
    try:
        return ctypes.CDLL(None, use_errno=True) if os.name == "posix" else None
    except OSError:
        return None
