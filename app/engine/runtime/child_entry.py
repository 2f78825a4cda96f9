"""``python -m app.engine.runtime.child_entry --fd N TARGET``: a model process on a runtime's Python."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="model-process")
    parser.add_argument("--fd", type=int, help="descriptor of the server's connection (POSIX)")
    parser.add_argument("--address", help="named pipe to connect to (Windows)")
    parser.add_argument("target", help="backend class, module:Class")
    args = parser.parse_args(argv)
    if args.fd is not None:
        from multiprocessing.connection import Connection

        conn = Connection(args.fd)
    else:
        from multiprocessing.connection import Client

        conn = Client(args.address, family="AF_PIPE", authkey=bytes.fromhex(os.environ["EXLLAMA_TRAY_PIPE_KEY"]))
    from app.engine.backends.model_process.child import child_main

    child_main(conn, args.target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
