"""Thread helpers of the extraction stages: decoding ahead on a thread, and a block run with a set
number of torch or OpenCV threads (small models lose more to a thread pool than they gain)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

import cv2
import torch

PREFETCH_BATCHES = 2

T = TypeVar("T")


def prefetched(items: Iterator[T], depth: int = PREFETCH_BATCHES) -> Iterator[T]:
    """`items`, produced by a thread up to `depth` ahead, so decoding overlaps the models."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    break
            else:
                put(end)
        except BaseException as e:  # handed to the consumer, raised there
            put(e)
        finally:
            close = getattr(items, "close", None)
            if close:
                close()

    thread = threading.Thread(target=produce, daemon=True, name="faces-decode")
    thread.start()
    try:
        while (item := slots.get()) is not end:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Runs the block with `count` intra-op threads (None: unchanged), then restores the caller's."""
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def cv2_threads(count: int) -> Iterator[None]:
    """Runs the block with OpenCV on `count` threads: its small resizes and warps lose more to
    handing work to a pool than they gain, and the decode thread has the other core."""
    before = cv2.getNumThreads()
    cv2.setNumThreads(count)
    try:
        yield
    finally:
        cv2.setNumThreads(before)
