"""One CPU thread policy for every interface (Python API, LlamaIndex, LangChain, CLI).

OpenMP threads that compete with other processes for the same cores spin instead of working: on a 2-core machine
with one other busy process, torch's default of one thread per core decodes tens of times slower than one thread.
So the library picks its thread count once, when a model is loaded or wrapped: the explicit ``threads=`` argument,
else ``KVZIP_RAG_THREADS``, else the cores that the 1-minute load average leaves free (at least one). GPU models
are left alone: their CPU threads only launch kernels.
"""

from __future__ import annotations

import os

import torch

from .errors import InvalidArgumentError

THREADS_ENV = "KVZIP_RAG_THREADS"
MAX_THREADS = 1024  # beyond any machine's cores; torch takes a 32-bit count and would spawn every thread asked for


def free_cores() -> int:
    """Cores not busy with other work by the 1-minute load average (all of them where it is unavailable)."""
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not available on this platform
        return cores
    return max(1, cores - round(load))


def resolve_threads(threads: int | None = None) -> int | None:
    """The thread count to use: explicit, else the environment variable, else ``None`` (decide by load)."""
    if threads is None:
        env = os.environ.get(THREADS_ENV, "").strip()
        if not env:
            return None
        try:
            threads = int(env)
        except ValueError:
            raise InvalidArgumentError(f"{THREADS_ENV}={env!r} is not a whole number of threads") from None
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= MAX_THREADS:
        raise InvalidArgumentError(f"threads must be a whole number from 1 to {MAX_THREADS}, got {threads!r}")
    return threads


def apply_thread_policy(device: torch.device | str, threads: int | None = None) -> int:
    """Set torch's CPU threads for a model on ``device`` by the policy above; returns the count in force."""
    chosen = resolve_threads(threads)
    if chosen is not None:
        torch.set_num_threads(chosen)
    elif torch.device(device).type == "cpu":
        free = free_cores()
        if free < torch.get_num_threads():
            torch.set_num_threads(free)
    return torch.get_num_threads()
