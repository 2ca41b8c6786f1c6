"""The per-process cache of what tasks load once per worker (:func:`worker_cache`)."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

from wsi_hipe.cache import ProcessCache

#: What tasks load once per worker process (the model, keyed by its path and hash; a slide,
#: keyed by its path and options). Evicted values are closed (a slide's file handle).
_WORKER_CACHE: ProcessCache[Any] = ProcessCache("worker", maxsize=8, close_evicted=True)


def worker_cache(key: Hashable, factory: Callable[[], Any]) -> Any:
    """Return the object cached under ``key`` in this process, building it once with ``factory``.

    Used inside tasks for what must be loaded once per worker (the model, keyed by its path
    and hash) or opened once per worker (a slide, keyed by its path and options). A thin use
    of one :class:`wsi_hipe.cache.ProcessCache`: thread-safe (concurrent callers with the same
    key wait for one build), per process, at most 8 objects (the least recently used one is
    dropped and closed).
    """
    return _WORKER_CACHE.get(key, factory)


def clear_worker_cache() -> None:
    """Drop every object cached by :func:`worker_cache` in this process (closing slides)."""
    _WORKER_CACHE.clear()
