"""Build the one-folder bundle: ``python build_spec/build.py [--dist DIR] [--work DIR]``; prints its path and
size. Needs the dev extra (PyInstaller) in the interpreter that runs it, and the app's dependencies."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "build_spec" / "exllama-tray.spec"
NAME = "exllama-tray"


def executable(dist: Path) -> Path:
    """The built executable in ``dist``."""
    return dist / NAME / (f"{NAME}.exe" if sys.platform == "win32" else NAME)


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def build(dist: Path, work: Path, quiet: bool = False) -> Path:
    """Run PyInstaller on the spec; the executable's path."""
    command = [sys.executable, "-m", "PyInstaller", "--noconfirm", "--clean", "--distpath", str(dist),
               "--workpath", str(work), "--log-level", "WARN", str(SPEC)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(command, cwd=ROOT, env=env, check=True,
                   stdout=subprocess.DEVNULL if quiet else None)
    exe = executable(dist)
    if not exe.is_file():
        raise SystemExit(f"PyInstaller finished but {exe} is missing")
    return exe


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dist", type=Path, default=ROOT / "dist", help="output folder (default dist/)")
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "pyinstaller", help="PyInstaller's work folder")
    parser.add_argument("--archive", action="store_true",
                        help="also pack the folder for download (.tar.gz; .zip on Windows)")
    args = parser.parse_args()
    started = time.monotonic()
    exe = build(args.dist, args.work)
    size = folder_size(exe.parent)
    print(f"built {exe} in {time.monotonic() - started:.0f} s; the folder is {size / 2**20:.0f} MiB")
    if args.archive:
        print(f"archive: {archive(exe.parent)}")
    return 0


def archive(folder: Path) -> str:
    """``exllama-tray-PLATFORM-MACHINE.tar.gz`` (``.zip`` on Windows) beside ``folder``, with its size."""
    import platform
    import shutil

    base = folder.parent / f"{NAME}-{sys.platform}-{platform.machine().lower()}"
    path = Path(shutil.make_archive(str(base), "zip" if sys.platform == "win32" else "gztar", folder.parent,
                                    folder.name))
    return f"{path} ({path.stat().st_size / 2**20:.0f} MiB)"


if __name__ == "__main__":
    sys.exit(main())
