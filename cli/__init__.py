"""The command line, one front end in one place: ``python -m prune [run] | info | study``.

``main`` holds THE error table: anything a person can cause is a ``LabError`` (running out of
memory becomes one), printed as one line ``error: ...`` on stderr with exit code 2. Anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys

from prune.errors import as_lab_error
from runtime.hub import go_offline_if_no_hub


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a command; a LabError ends in one line on stderr and exit code 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    go_offline_if_no_hub()  # before the hub libraries are imported, so a hub id fails in seconds
    from cli import run, study

    commands = {"info": run.info, "study": study.study, "run": run.run}
    try:
        if argv and argv[0] in commands:
            return commands[argv[0]](argv[1:])
        return run.run(argv)
    except Exception as err:  # noqa: BLE001 - sorted into user errors and bugs right here
        error = as_lab_error(err)
        if error is None:
            raise
        print(f"error: {one_line(str(error))}", file=sys.stderr)
        return 2


def one_line(message: str) -> str:
    """A message that spans lines (a YAML parser's, say) joined into one."""
    return " ".join(line.strip() for line in message.splitlines() if line.strip())
