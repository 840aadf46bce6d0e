"""One OpenMP worker pool on the CPU: the engine thread's.

torch's CPU kernels parallelise with OpenMP (GNU libgomp in the PyPI wheels). libgomp
gives every thread that starts a parallel region a pool of its own workers, and when
the process holds more libgomp-managed threads than CPUs it *throttles* all of them:
a worker stops spinning between regions after ~100 spins and sleeps, so each of the
hundreds of small parallel ops of a decode step pays a futex wake-up. On this 2-core
machine that happens as soon as a second thread has a pool: the thread that loaded the
model keeps its pool after loading, the engine thread makes its own, and every
elementwise op or reduction of the engine and the whole decode step get slower.
``benchmarks/threads_ab.py`` (fresh process per variant, alternating): an ``(8, 49152)``
``mul`` + ``amax`` on a second thread 165 µs with the main thread's pool kept, 47 µs with
it released; the in-process engine on int4 weights 31.7 → 65.6 tok/s at batch 1 and
141 → 249 at batch 8. (Over HTTP the gain is smaller, ~1.1×: the server loads on a
thread that exits, which frees that pool anyway.)

:func:`release_thread_pool` frees the *calling* thread's pool (OpenMP 5's
``omp_pause_resource_all``, soft pause: a later parallel region on that thread makes a
new pool). ``server.loading.load_model`` calls it when a load ends and
``Engine.start`` calls it on the thread that starts the engine, so the engine thread is
normally the only thread with workers. With another OpenMP runtime (Intel's, LLVM's) or
none, it does nothing and says so.
"""

from __future__ import annotations

import ctypes
import logging
from functools import lru_cache
from typing import Any

log = logging.getLogger("steerserve.engine")

_OMP_PAUSE_SOFT = 1  # omp_pause_resource_t: keep the runtime, free the threads


@lru_cache(maxsize=1)
def _libgomp() -> Any | None:
    """The libgomp this process has loaded (torch's own copy), or None."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libgomp" in line and "/" in line}
    except OSError:  # not Linux
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
            fn = lib.omp_pause_resource_all
        except (OSError, AttributeError):  # a libgomp older than GCC 9 has no pause
            continue
        fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
        return fn
    log.debug("no libgomp with omp_pause_resource_all loaded: OpenMP pools left alone")
    return None


def release_thread_pool() -> bool:
    """Free the calling thread's OpenMP workers; True when a pool was released (or there
    was none), False when the runtime cannot (not libgomp, or inside a parallel region)."""
    pause = _libgomp()
    return pause is not None and pause(_OMP_PAUSE_SOFT) == 0


__all__ = ["release_thread_pool"]
