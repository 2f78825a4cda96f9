"""Entry point for ``python -m app``."""

import multiprocessing
import sys

from app.cli.main import main

if __name__ == "__main__":
    multiprocessing.freeze_support()  # model processes of a frozen (PyInstaller) build
    sys.exit(main())
