"""The one thread that runs the model. MLX streams are thread-local, so model work must stay on one thread, and a
single worker is also what makes concurrent requests queue."""

from __future__ import annotations

import queue
import threading
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from .schema import BadRequest

MAX_QUEUE = 32  # requests waiting for the model beyond the one it runs; more get 503


@dataclass
class _Job:
    produce: Callable[[], Iterator[Any]]
    out: queue.Queue = field(default_factory=queue.Queue)  # (kind, value) events for the caller
    cancelled: threading.Event = field(default_factory=threading.Event)


class Worker:
    """One thread that runs jobs one at a time. A job is a function returning an iterator; its items travel to
    the caller through a queue, and a caller that stops listening cancels the job at its next item."""

    def __init__(self, max_waiting: int = MAX_QUEUE, on_stop: Callable[[], None] = lambda: None) -> None:
        self.jobs: queue.Queue = queue.Queue()
        self.max_waiting, self.on_stop = max_waiting, on_stop
        self.current: _Job | None = None
        self.thread = threading.Thread(target=self._loop, name="ddtree-model", daemon=True)
        self.thread.start()

    def stream(self, produce: Callable[[], Iterator[Any]]) -> Iterator[Any]:
        if self.jobs.qsize() >= self.max_waiting:  # waiting without bound would only time clients out later
            raise BadRequest(f"the server is busy ({self.max_waiting} requests waiting); retry shortly",
                             status=503, code="server_busy")
        job = _Job(produce)
        self.jobs.put(job)
        try:
            while True:
                kind, value = job.out.get()
                if kind == "done":
                    return
                if kind == "error":
                    raise value
                yield value
        finally:
            job.cancelled.set()

    def stop(self) -> None:
        """Cancel the running job at its next item, refuse the waiting ones, and wait for the thread to end."""
        if (job := self.current) is not None:
            job.cancelled.set()
        while True:
            try:
                waiting = self.jobs.get_nowait()
            except queue.Empty:
                break
            if waiting is not None:
                waiting.out.put(("error", BadRequest("the server is stopping", status=503, code="server_stopping")))
        self.jobs.put(None)
        self.thread.join()

    def _loop(self) -> None:
        while (job := self.jobs.get()) is not None:
            self.current = job
            if job.cancelled.is_set():
                continue
            try:
                with closing(job.produce()) as items:
                    for item in items:
                        job.out.put(("item", item))
                        if job.cancelled.is_set():
                            break
                job.out.put(("done", None))
            except Exception as error:  # handed to the request's thread, which answers 400 or 500
                job.out.put(("error", error))
        self.on_stop()  # on this thread: sharded, the other ranks are told after the last job's collectives
