"""`python -m calm` runs the command-line interface."""

from calm.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
