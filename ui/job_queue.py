"""The line heavy jobs wait in: one job on the model at a time, first come first served."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

from prune.progress import CancelToken
from ui.hosting import LimitExceeded


class JobQueue:
    """First come, first served: one heavy job on the model at a time, the others wait in order.
    A waiting job whose token is cancelled leaves the line; ``max_size`` bounds the line."""

    def __init__(self, max_size: int | None = None):
        self.max_size = max_size
        self._cond = threading.Condition()
        self._line: deque = deque()
        self.holder: object | None = None

    def __len__(self) -> int:
        return len(self._line)

    def acquire(self, token: CancelToken, waiting: Callable[[int], None] = lambda ahead: None) -> object:
        ticket = object()
        reported = -1
        with self._cond:
            if self.max_size is not None and len(self._line) >= self.max_size:
                raise LimitExceeded(
                    f"the lab is busy: {len(self._line)} jobs are waiting, the most this server queues; "
                    "try again in a few minutes"
                )
            self._line.append(ticket)
        try:
            while True:
                with self._cond:
                    ahead = self._line.index(ticket)
                    if ahead == 0 and self.holder is None:
                        self.holder = ticket
                        return ticket
                    token.check()
                    self._cond.wait(0.2)
                    token.check()
                if ahead != reported:
                    reported = ahead
                    waiting(ahead)
        except BaseException:
            self.release(ticket)
            raise

    def release(self, ticket: object) -> None:
        with self._cond:
            if ticket in self._line:
                self._line.remove(ticket)
            if self.holder is ticket:
                self.holder = None
            self._cond.notify_all()

    @property
    def busy(self) -> bool:
        return self.holder is not None
