"""How the fast encoder shares the machine: usable CPUs, tokenizer threads, paused GC.

The fast tokenizer releases the GIL, so tokenizing runs on worker threads (one per usable CPU
less the calling thread) and, for large line-based sources, in forked processes. Meanwhile the
tokenizer's own thread pool is turned off and Python's cyclic garbage collector is paused.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager


def usable_cpus() -> int:
    """CPUs this process may use, shared with the other ranks on this machine (torchrun sets
    LOCAL_WORLD_SIZE)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cpus = os.cpu_count() or 1
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, cpus // max(1, ranks))


def tokenizer_threads() -> int:
    """Worker threads that tokenize: one per usable CPU, less the calling thread (which reads,
    renders, assembles, and tokenizes whatever the workers have not started)."""
    return max(1, usable_cpus() - 1)


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector. Tokenizing creates millions of short-lived lists
    and no reference cycles (reference counting frees them all), and with the collector on, its
    passes over every live object cost about as much as the reading and rendering themselves."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@contextmanager
def single_threaded_tokenizer() -> Iterator[None]:
    """Turn off the fast tokenizer's own thread pool while our threads tokenize (its pool would
    compete with them for the same cores), unless the user set TOKENIZERS_PARALLELISM."""
    if "TOKENIZERS_PARALLELISM" in os.environ:
        yield
        return
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        os.environ.pop("TOKENIZERS_PARALLELISM", None)
