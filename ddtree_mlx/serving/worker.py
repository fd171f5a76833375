"""The one thread that runs the model. MLX streams are thread-local, so model work must stay on one thread, and a
single worker is also what makes concurrent requests queue. `Worker` runs one request at a time; `BatchWorker`
runs a BatchGenerator, requests joining and leaving it between its steps (more than its rows wait)."""

from __future__ import annotations

import queue
import threading
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from ..engine.batch import BatchGenerator
from .schema import BadRequest

MAX_QUEUE = 32  # requests waiting for the model beyond the ones it runs; more get 503


@dataclass
class _Job:
    start: Callable[..., Any]  # Worker: () -> the job's items; BatchWorker: (batch) -> (uid, its converter)
    out: queue.Queue = field(default_factory=queue.Queue)  # (kind, value) events for the caller
    cancelled: threading.Event = field(default_factory=threading.Event)
    pieces: Any = None  # BatchWorker: what turns the row's responses into items (serving/pieces.py's Pieces)


def _stopping() -> BadRequest:
    return BadRequest("the server is stopping", status=503, code="server_stopping")


class Worker:
    """One thread that runs jobs one at a time. A job is a function returning an iterator; its items travel to
    the caller through a queue, and a caller that stops listening cancels the job at its next item."""

    def __init__(self, max_waiting: int = MAX_QUEUE, on_stop: Callable[[], None] = lambda: None) -> None:
        self.jobs: queue.Queue = queue.Queue()
        self.max_waiting, self.on_stop = max_waiting, on_stop
        self.current: _Job | None = None
        self.ran = False  # whether any job ran: /health's largest batch is then 1
        self.thread = threading.Thread(target=self._loop, name="ddtree-model", daemon=True)
        self.thread.start()

    def stream(self, start: Callable[..., Any]) -> Iterator[Any]:
        """The job's items as the model thread hands them out; closing this early cancels the job."""
        if self.waiting() >= self.max_waiting:  # waiting without bound would only time clients out later
            raise BadRequest(f"the server is busy ({self.max_waiting} requests waiting); retry shortly",
                             status=503, code="server_busy")
        job = _Job(start)
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

    def waiting(self) -> int:
        return self.jobs.qsize()

    def health(self) -> dict[str, int]:
        return {"active": int(self.current is not None), "waiting": self.waiting(), "max_batch": 1,
                "largest_batch": int(self.ran)}

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
                waiting.out.put(("error", _stopping()))
        self.jobs.put(None)
        self.thread.join()

    def _loop(self) -> None:
        while (job := self.jobs.get()) is not None:
            if job.cancelled.is_set():
                continue
            self.current, self.ran = job, True
            try:
                with closing(job.start()) as items:
                    for item in items:
                        job.out.put(("item", item))
                        if job.cancelled.is_set():
                            break
                job.out.put(("done", None))
            except Exception as error:  # handed to the request's thread, which answers 400 or 500
                job.out.put(("error", error))
            self.current = None
        self.on_stop()  # on this thread: sharded, the other ranks are told after the last job's collectives


class BatchWorker(Worker):
    """The model thread running a BatchGenerator. A job's `start(batch)` inserts its request (a bad one fails
    there, before any model work) and returns its uid and the converter its responses go through. Requests join
    between the batch's steps and leave when their text ends (a stop string ends the row too), when their caller
    stops listening, or when a step fails: that fails the rows it took in, not the requests still waiting."""

    def __init__(self, batch: BatchGenerator, max_waiting: int = MAX_QUEUE) -> None:
        self.batch = batch
        self.active: dict[int, _Job] = {}  # by uid: every request in the batch, waiting or decoding
        super().__init__(max_waiting)

    def waiting(self) -> int:
        return self.jobs.qsize() + len(self.batch.waiting)

    def health(self) -> dict[str, int]:
        return self.batch.health()

    def _loop(self) -> None:
        while self._admit():
            for uid in [uid for uid, job in self.active.items() if job.cancelled.is_set()]:
                self._end(uid)  # its caller is gone: nobody takes an event
            if self.batch.has_work:
                self._step()
        for uid in list(self.active):
            self._end(uid, ("error", _stopping()))

    def _admit(self) -> bool:
        """Insert every request that arrived, waiting for one while there is nothing to run; False once stopped."""
        idle = not self.batch.has_work
        while True:
            try:
                job = self.jobs.get(block=idle)
            except queue.Empty:
                return True
            if job is None:
                return False
            if job.cancelled.is_set():
                continue
            try:
                uid, job.pieces = job.start(self.batch)
            except Exception as error:  # handed to the request's thread, which answers 400 or 500
                job.out.put(("error", error))
                continue
            self.active[uid] = job
            idle = False

    def _step(self) -> None:
        try:
            responses = self.batch.next()
        except Exception as error:  # the rows it took in may be left mid-cycle: they fail, the waiting ones go on
            waiting = {row.uid for row in self.batch.waiting}
            for uid in [uid for uid in self.active if uid not in waiting]:
                # One exception per request: one raised in several threads would gather all their tracebacks.
                failure = RuntimeError(str(error))
                failure.__cause__ = error
                self._end(uid, ("error", failure))
            return
        for response in responses:
            if response.error is not None:  # its prefill failed: that request alone
                self._end(response.uid, ("error", response.error))
                continue
            job = self.active[response.uid]
            try:
                item = job.pieces.push(response)
            except Exception as error:  # this request's text alone failed
                self._end(response.uid, ("error", error))
                continue
            job.out.put(("item", item))
            if job.pieces.done:  # its generation ended, or a stop string ended its text first
                self._end(response.uid, ("done", None))

    def _end(self, uid: int, event: tuple[str, Any] | None = None) -> None:
        """The request leaves the batch (if still in it), its caller told `event`."""
        job = self.active.pop(uid)
        self.batch.cancel(uid)
        if event is not None:
            job.out.put(event)
