"""The line heavy jobs wait in: one job on the model at a time, visitors taking turns.

A visitor may have a job running and one waiting (``ui.sessions``); first come first served alone
would then put another visitor's first job behind both. So the next job is the oldest one of the
visitor whose last job started longest ago (a visitor with none started yet comes first): one
visitor's second job waits for the others' first, and among visitors with one job each the line
is first come first served.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from prune.progress import CancelToken
from ui.hosting import LimitExceeded

_NEVER = float("-inf")


@dataclass(eq=False)
class Ticket:
    owner: Hashable  # the visitor (session uid); a job without one is its own owner
    arrival: int = field(default_factory=itertools.count().__next__)


class JobQueue:
    """One heavy job on the model at a time, the others waiting in turn (see the module docstring).
    A waiting job whose token is cancelled leaves the line; ``max_size`` bounds the line."""

    def __init__(self, max_size: int | None = None):
        self.max_size = max_size
        self._cond = threading.Condition()
        self._line: list[Ticket] = []
        self._started: dict[Hashable, int] = {}  # owner -> start number of its last job (owners present)
        self._starts = itertools.count()
        self.holder: Ticket | None = None

    def __len__(self) -> int:
        """Jobs waiting or running."""
        return len(self._line) + (self.holder is not None)

    def _order(self) -> list[Ticket]:
        """The line as it will be served: least recently started visitor first, then arrival."""
        return sorted(self._line, key=lambda t: (self._started.get(t.owner, _NEVER), t.arrival))

    def acquire(
        self,
        token: CancelToken,
        waiting: Callable[[int], None] = lambda ahead: None,
        owner: Hashable | None = None,
    ) -> Ticket:
        """Wait for the model; ``waiting(jobs ahead)`` is called whenever that number changes."""
        with self._cond:
            if self.max_size is not None and len(self) >= self.max_size:
                raise LimitExceeded(
                    f"the lab is busy: {len(self)} jobs are waiting or running, the most this server queues; "
                    "try again in a few minutes"
                )
            ticket = Ticket(owner if owner is not None else object())
            self._line.append(ticket)
        reported = -1
        try:
            while True:
                with self._cond:
                    ahead = self._order().index(ticket)
                    if ahead == 0 and self.holder is None:
                        self._line.remove(ticket)
                        self.holder = ticket
                        self._started[ticket.owner] = next(self._starts)
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

    def release(self, ticket: Ticket) -> None:
        with self._cond:
            if ticket in self._line:
                self._line.remove(ticket)
            if self.holder is ticket:
                self.holder = None
            present = {t.owner for t in self._line} | ({self.holder.owner} if self.holder else set())
            for owner in [o for o in self._started if o not in present]:
                del self._started[owner]  # bounded by the line: a visitor who left starts afresh
            self._cond.notify_all()

    @property
    def busy(self) -> bool:
        return self.holder is not None
