"""The bundle's entry point: the same command line as ``python -m app`` (no command: the tray)."""

import multiprocessing
import sys

from app.cli.main import main

if __name__ == "__main__":
    multiprocessing.freeze_support()
    sys.exit(main())
