"""Pipelined rounds: a writer plans a round at once and commits it in the background.

`UpdateStore.record_round` on a store opened with ``pipeline=N`` validates the round and
computes everything it stores (the aggregate, the next model, the differentials: the
round's plan) in the caller's thread, then hands the coding and the commit to one
background thread and returns; the caller trains the next round meanwhile. Rounds commit
in order; at most ``N`` wait, beyond which `record_round` blocks (a bounded queue: memory
stays at ``N`` rounds of updates).

Failures are never lost and never half-visible: a round that fails in the background
commits nothing (one round is one Icechunk commit), the rounds queued behind it are
dropped unwritten, and the error is raised by the next call (`record_round`, `flush`,
`close`, or any read, which first waits for the queue); the store then refuses more rounds
(reopen it to continue from the last committed one). A crash loses exactly the rounds not
yet committed: `flush` returns once every recorded round is committed.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

__all__ = ["Pipeline"]


class Pipeline:
    """Jobs run one at a time, in submission order, at most ``depth`` waiting."""

    def __init__(self, depth: int) -> None:
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"pipeline depth must be an int >= 1, got {depth!r}")
        self.depth = depth
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medustore-commit")
        self._queue: deque[Future] = deque()
        self._error: BaseException | None = None
        self._lock = threading.Lock()

    @property
    def pending(self) -> int:
        """Jobs submitted and not finished."""
        return sum(not f.done() for f in self._queue)

    def check(self) -> None:
        """Raise the error of a failed job, if any (every time: the pipeline is dead)."""
        if self._error is not None:
            raise self._error

    def submit(self, job: Callable[[], None], what: str) -> None:
        """Queue ``job`` (``what`` names it in the error a failure raises)."""
        self.check()
        while len(self._queue) >= self.depth:
            self._wait(self._queue.popleft())
        self._queue.append(self._pool.submit(self._run, job, what))

    def flush(self) -> None:
        """Wait for every queued job; raise the first failure."""
        while self._queue:
            self._wait(self._queue.popleft())
        self.check()

    def close(self) -> None:
        """Flush, then stop the thread (also when the flush raises)."""
        try:
            self.flush()
        finally:
            self._pool.shutdown(wait=True)

    def _run(self, job: Callable[[], None], what: str) -> None:
        with self._lock:
            if self._error is not None:
                return  # a job before this one failed: this one is dropped, unwritten
        try:
            job()
        except BaseException as err:
            err.add_note(f"(raised by the background commit of {what}; the rounds queued "
                         "after it were not written; reopen the archive to continue from "
                         "its last committed round)")
            with self._lock:
                self._error = err

    def _wait(self, future: Future) -> None:
        future.result()  # _run never raises: a failure is kept in _error
        self.check()
