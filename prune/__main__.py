"""``python -m prune ...``: the command line lives in the top-level ``cli`` package.

It is imported only when run as a program, so importing ``prune`` never imports a front end."""

if __name__ == "__main__":
    import sys

    from cli import main

    sys.exit(main())
