"""The command line's one progress bar: tqdm on stderr, drawing ``prune.progress.Event``s."""

from __future__ import annotations

import sys

from prune.progress import Event


class Bar:
    """A ``Progress`` for long jobs, plus ``message`` for plain lines; silent with ``--quiet``.

    Use it as a context manager so the bar is closed (its line ended) before anything else is
    printed, an error included."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.bar = None

    def __call__(self, event: Event) -> None:
        if self.quiet:
            return
        if self.bar is None:
            from tqdm import tqdm

            layout = "{percentage:3.0f}%|{bar}| {elapsed} {desc}"
            self.bar = tqdm(total=1000, file=sys.stderr, bar_format=layout)
        self.bar.n = int(1000 * event.fraction)
        self.bar.set_description_str(event.message[:80])
        self.bar.refresh()

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
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
