"""One per-process cache, with LRU eviction, for handles that are expensive to open.

Slide handles, models loaded inside a Dask worker and the napari reader's open stores all live in
:class:`ProcessCache` instances. A cache is

- **per process**: entries made before a ``fork`` are never returned in the child (the key holds
  the pid), so a worker never shares a file handle or a CUDA context with its parent;
- **bounded**: at most ``maxsize`` entries; the least recently used one is evicted and, when
  ``close_evicted`` is set, its ``close()`` is called (errors while closing are logged, not
  raised: a stale handle must not fail a task);
- **thread-safe**: concurrent callers of :meth:`ProcessCache.get` with one key wait for a single
  build, while builds of different keys run in parallel.

>>> cache = ProcessCache("doc", maxsize=2)
>>> cache.get("a", lambda: 1), cache.get("a", lambda: 2)
(1, 1)
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

__all__ = ["ProcessCache", "clear_all_caches"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_ALL: list[ProcessCache[Any]] = []
_ALL_LOCK = threading.Lock()


class ProcessCache(Generic[T]):
    """An LRU cache of objects built once per process and key.

    Parameters
    ----------
    name : str
        Used in log messages.
    maxsize : int
        Entries kept; the least recently used one is evicted beyond it.
    close_evicted : bool
        Call ``close()`` on an evicted (or cleared) value when it has one. Leave False for
        values that another thread may still be using after eviction (they are released when
        their last reference goes).
    """

    def __init__(self, name: str, *, maxsize: int = 8, close_evicted: bool = False) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be >= 1, got {maxsize}")
        self.name = name
        self.maxsize = maxsize
        self.close_evicted = close_evicted
        self._items: OrderedDict[tuple[int, Hashable], T] = OrderedDict()
        self._lock = threading.Lock()
        self._key_locks: dict[tuple[int, Hashable], threading.Lock] = {}
        with _ALL_LOCK:
            _ALL.append(self)

    def get(self, key: Hashable, factory: Callable[[], T]) -> T:
        """The value cached under ``key`` in this process, built once with ``factory()``."""
        full = (os.getpid(), key)
        with self._lock:
            if full in self._items:
                self._items.move_to_end(full)
                return self._items[full]
            key_lock = self._key_locks.setdefault(full, threading.Lock())
        with key_lock:
            with self._lock:
                if full in self._items:
                    self._items.move_to_end(full)
                    return self._items[full]
            value = factory()
            evicted = []
            with self._lock:
                self._items[full] = value
                self._items.move_to_end(full)
                while len(self._items) > self.maxsize:
                    old_key, old = self._items.popitem(last=False)
                    self._key_locks.pop(old_key, None)
                    evicted.append((old_key, old))
            for old_key, old in evicted:
                self._release(old_key[1], old)
            return value

    def pop(self, key: Hashable) -> T | None:
        """Forget ``key`` (this process's entry); returns the value, not closed."""
        full = (os.getpid(), key)
        with self._lock:
            self._key_locks.pop(full, None)
            return self._items.pop(full, None)

    def clear(self) -> None:
        """Forget every entry (closing them when ``close_evicted``)."""
        with self._lock:
            items = list(self._items.items())
            self._items.clear()
            self._key_locks.clear()
        for full, value in items:
            self._release(full[1], value)

    def __len__(self) -> int:
        pid = os.getpid()
        with self._lock:
            return sum(1 for p, _ in self._items if p == pid)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return (os.getpid(), key) in self._items

    def _release(self, key: Hashable, value: Any) -> None:
        if not self.close_evicted:
            return
        close = getattr(value, "close", None)
        if callable(close):
            try:
                close()
            except Exception:  # closing a stale handle must not fail a task
                logger.debug("%s cache: closing %r failed", self.name, key, exc_info=True)


def clear_all_caches() -> None:
    """Clear every :class:`ProcessCache` of this process (e.g. between tests)."""
    with _ALL_LOCK:
        caches = list(_ALL)
    for cache in caches:
        cache.clear()
