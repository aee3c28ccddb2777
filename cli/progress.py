"""The command line's one progress bar: tqdm on stderr, drawing ``prune.progress.Event``s; where
stderr is not a terminal (a log file, a pipe), one plain line per update instead, since tqdm's
redraws (around every message, at the close) would repeat lines there."""

from __future__ import annotations

import sys
import time

from prune.progress import Event


class Bar:
    """A ``Progress`` for long jobs, plus ``message`` for plain lines; silent with ``--quiet``.

    Use it as a context manager so the bar is closed (its line ended) before anything else is
    printed, an error included, and so it is the only bar: transformers' own are turned off."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.bar = None
        self.lines = not sys.stderr.isatty()
        self.started = time.monotonic()
        self.last = ""

    def __call__(self, event: Event) -> None:
        if self.quiet:
            return
        if self.lines:
            self._line(event)
            return
        if self.bar is None:
            from tqdm import tqdm

            layout = "{percentage:3.0f}%|{bar}| {elapsed} {desc}"
            self.bar = tqdm(total=1000, file=sys.stderr, bar_format=layout)
        self.bar.n = int(1000 * event.fraction)
        self.bar.set_description_str(event.message[:80], refresh=False)  # else drawn twice
        self.bar.refresh()

    def _line(self, event: Event) -> None:
        shown = f"{100 * event.fraction:3.0f}% {event.message[:80]}"
        if shown != self.last:  # an update that changes nothing is not printed again
            minutes, seconds = divmod(int(time.monotonic() - self.started), 60)
            print(f"{minutes:02d}:{seconds:02d} {shown}", file=sys.stderr, flush=True)
            self.last = shown

    def message(self, text: str) -> None:
        """A line of its own on stderr, above the bar when one is drawn."""
        if self.quiet:
            return
        if self.bar is None:
            print(text, file=sys.stderr)
        else:
            self.bar.write(text, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> Bar:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # its weight-loading bars would cut through this one
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
