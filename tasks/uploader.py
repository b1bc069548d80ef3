"""The uploader of one worker process: finishes and stores rendered batches while the next one renders.

Its store steps run in ``pipeline_depth`` threads, so the next batch renders while the previous one
goes over the network (pipelining); at most ``pipeline_depth`` batches wait for it, and a render
that would exceed that waits instead.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class Uploader:
    """Runs store steps in ``depth`` threads, at most ``depth`` more waiting; ``depth`` 0 runs them inline.

    Several threads let the ledger transaction of one batch overlap the uploads of the next
    (batches are independent: each store is its own fenced transaction).
    """

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=max(1, depth))
        self._threads = [threading.Thread(target=self._run, name=f"farm-uploader-{i}", daemon=True)
                         for i in range(max(0, depth))]
        for thread in self._threads:
            thread.start()

    def submit(self, work: Callable[[], None]) -> None:
        if not self._threads:
            work()
        else:
            self._queue.put(work)  # blocks while `depth` batches already wait

    def drain(self) -> None:
        """Wait until every submitted batch is stored."""
        if self._threads:
            self._queue.join()

    def stop(self) -> None:
        threads, self._threads = self._threads, []
        for _ in threads:
            self._queue.put(None)
        for thread in threads:
            thread.join(60)

    def _run(self) -> None:
        while True:
            work = self._queue.get()
            try:
                if work is None:
                    return
                work()
            except Exception:  # store steps handle their own errors; this is a bug
                log.exception("uploader: unhandled error")
            finally:
                self._queue.task_done()
