"""Items produced ahead of use in a background thread: the data loader's reading, decoding and
packing run while the model trains on the previous step.

A thread rather than worker processes: the work is image decoding (Pillow, numpy, torch and DALI
release the GIL for it), the loader's lanes hold decoded images in memory between micro-batches
(a worker process would have to own whole lanes and ship every image back through shared memory),
'dali-gpu' decodes into CUDA tensors that do not cross processes cheaply, and one producer keeps
the stream's order, and so exact resume, trivially true.

Exact resume is the caller's part: each item carries what describes the stream *after* it (the
trainer pairs every step's micro-batches with the loader's ``state_dict()`` taken right after them),
and the consumer keeps the description of the last item it took, never the loader's own state,
which has already run ``depth`` items ahead.

Errors in the producer reach the consumer: the item it failed on raises in ``__next__`` (the
original exception, chained, with the prefetcher's name). ``close()`` (also on leaving a ``with``
block) stops the thread after the item it is producing and drops what was produced ahead.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)
Item = TypeVar("Item")


class PrefetchError(RuntimeError):
    """The producer failed; the original exception is the ``__cause__``."""


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class Prefetcher(Generic[Item]):
    """``next()`` returns ``produce()``'s results in order, up to ``depth`` of them produced ahead in
    a background thread (bounded: at most ``depth`` items, finished or in the making, exist that the
    consumer has not taken). ``depth`` 0: ``produce()`` runs in the caller's thread, when asked."""

    def __init__(self, produce: Callable[[], Item], depth: int, name: str = "data prefetch") -> None:
        if depth < 0:
            raise ValueError(f"prefetch depth must be >= 0 items ahead, got {depth}")
        self.produce, self.depth, self.name = produce, depth, name
        self._queue: queue.Queue = queue.Queue()
        self._room = threading.Semaphore(depth)  # one slot per item ahead, taken before producing it
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False

    def _start(self) -> None:
        # The CUDA device is per thread: decode and pin on the consumer's device (dali-gpu, pinning).
        import torch

        device = torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

        def run() -> None:
            if device is not None:
                torch.cuda.set_device(device)
            while not self._stop.is_set():
                if not self._room.acquire(timeout=0.1):
                    continue
                try:
                    item: object = self.produce()
                except BaseException as error:  # noqa: BLE001 - handed to the consumer, which raises it
                    item = _Failed(error)
                self._queue.put(item)
                if isinstance(item, _Failed):
                    return

        self._thread = threading.Thread(target=run, name=self.name, daemon=True)
        self._thread.start()

    def __iter__(self) -> Prefetcher[Item]:
        return self

    def __next__(self) -> Item:
        if self._closed:
            raise PrefetchError(f"{self.name}: next() after close()")
        if self.depth == 0:
            return self.produce()
        if self._thread is None:
            self._start()
        while True:
            try:
                item = self._queue.get(timeout=1.0)
                self._room.release()
                break
            except queue.Empty:
                if self._thread is not None and not self._thread.is_alive():  # died without a word: never
                    raise PrefetchError(f"{self.name}: the producer thread ended without an item") from None
        if isinstance(item, _Failed):
            self.close()
            if isinstance(item.error, StopIteration):
                raise StopIteration
            raise PrefetchError(f"{self.name} failed: {type(item.error).__name__}: {item.error}") from item.error
        return item

    def close(self, timeout_s: float = 60.0) -> None:
        """Stop the producer (after the item it is making) and drop what was produced ahead."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                logger.warning(
                    "%s: the producer is still busy after %.0f s; left behind (daemon)", self.name, timeout_s
                )
        while True:  # what was produced ahead is dropped (its pinned memory freed)
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break

    def __enter__(self) -> Prefetcher[Item]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def waiting(self) -> int:
        """Items produced and not yet taken (0 at a step's start: the consumer waits for data)."""
        return self._queue.qsize()

    @property
    def alive(self) -> bool:
        """Whether the producer thread is running."""
        return self._thread is not None and self._thread.is_alive()
