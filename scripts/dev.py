#!/usr/bin/env python3
"""Set up (or update) the local virtual environment, then run the app or the tests.

    python3 scripts/dev.py run [ARGS...]    # the tray app (or e.g. `run serve --port 8000`)
    python3 scripts/dev.py test [PYTEST ARGS...]

The virtual environment lives in ``.venv`` next to pyproject.toml. It is (re)installed only when
pyproject.toml or the wanted extras change. torch is pinned to one release; on a machine without
an NVIDIA GPU set ``EXLLAMA_TRAY_TORCH_INDEX`` to PyTorch's CPU wheel index to avoid the large CUDA
build (see README). Only the standard library is used here.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
TORCH = "torch==2.13.0"
#: System libraries PySide6 needs to start offscreen on a bare Debian/Ubuntu machine.
QT_APT_PACKAGES = ["libegl1", "libgl1", "libxkbcommon0", "libfontconfig1", "libglib2.0-0", "libdbus-1-3"]
#: and on an X11 desktop, for Qt's xcb platform plugin (it names only xcb-cursor when any is missing)
QT_XCB_APT_PACKAGES = ["libxcb-cursor0", "libxcb-icccm4", "libxcb-keysyms1", "libxcb-image0", "libxcb-randr0",
                       "libxcb-render-util0", "libxcb-shape0", "libxcb-xinerama0", "libxcb-xkb1",
                       "libxkbcommon-x11-0"]


def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def has_nvidia_gpu() -> bool:
    if os.environ.get("EXLLAMA_TRAY_CPU_ONLY"):
        return False
    return shutil.which("nvidia-smi") is not None


def step(msg: str) -> None:
    print(f"[dev] {msg}", flush=True)


def pip(*args: str) -> None:
    subprocess.check_call([str(venv_python()), "-m", "pip", *args, "--disable-pip-version-check"])


def ensure_venv(extras: list[str]) -> None:
    """Create the venv and install the project with ``extras``; nothing is done when pyproject.toml is
    unchanged and those extras are installed already (``run`` after ``test`` reinstalls nothing)."""
    if not venv_python().exists():
        step(f"creating virtual environment in {VENV}")
        venv.EnvBuilder(with_pip=True).create(VENV)
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()[:16]
    stamp = VENV / ".exllama-tray-installed"
    have: set[str] = set()
    if stamp.exists():
        recorded, _, names = stamp.read_text().strip().partition(" ")
        if recorded == digest:
            have = set(filter(None, names.split(",")))
            if set(extras) <= have:
                return
    wanted = sorted(have | set(extras))
    step("installing dependencies (first run, pyproject.toml changed or new extras; this takes a few minutes)")
    torch_args = [TORCH]
    index = os.environ.get("EXLLAMA_TRAY_TORCH_INDEX")
    if index:
        torch_args += ["--index-url", index]
    if {"transformers", "exllamav2", "exllamav3"} & set(wanted):
        pip("install", "-q", *torch_args)
    spec = f".[{','.join(wanted)}]" if wanted else "."
    pip("install", "-q", "-e", spec)
    stamp.write_text(f"{digest} {','.join(wanted)}\n")


CONTINUE_CLI = "@continuedev/cli@1.5.47"


def ensure_continue_cli() -> None:
    """The Continue CLI for the live-client test (skipped there when npm is missing)."""
    prefix = ROOT / ".cache" / "node"
    if (prefix / "node_modules" / ".bin" / "cn").exists() or not shutil.which("npm"):
        return
    step(f"installing {CONTINUE_CLI} for the live client tests")
    prefix.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["npm", "install", "--silent", "--no-audit", "--no-fund", "--prefix", str(prefix),
                          CONTINUE_CLI])
    if res.returncode != 0:
        step("warning: could not install the Continue CLI; its test will be skipped")


def missing_qt_libs(packages: list[str] = QT_APT_PACKAGES) -> list[str]:
    if not sys.platform.startswith("linux") or not shutil.which("dpkg-query"):
        return []
    missing = []
    for pkg in packages:
        res = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True)
        if "install ok installed" not in res.stdout:
            missing.append(pkg)
    return missing


def ensure_qt_system_libs(packages: list[str] = QT_APT_PACKAGES) -> None:
    missing = missing_qt_libs(packages)
    if not missing:
        return
    if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        step(f"installing Qt system libraries: {' '.join(missing)}")
        subprocess.check_call(["apt-get", "update", "-qq"])
        subprocess.check_call(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
                              env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    else:
        step(f"warning: Qt may need these system packages: sudo apt-get install {' '.join(missing)}")


def _pytest_rc(rc: int) -> int:
    if rc == 5:
        print("[dev] pytest collected no tests: that is a failure here", file=sys.stderr)
        return 1
    return rc


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("run", "test"):
        print(__doc__)
        return 2
    command, rest = argv[0], argv[1:]
    os.chdir(ROOT)
    if command == "test":
        ensure_qt_system_libs()
        ensure_venv(["transformers", "dev"])
        ensure_continue_cli()
        env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "PYTHONUNBUFFERED": "1"}
        step("running the test suite")
        # one pytest run over tests/ (the Qt tests included) unless other arguments are given
        return _pytest_rc(subprocess.call([str(venv_python()), "-m", "pytest", *(rest or ["tests"])], env=env))
    extras = ["transformers"] + (["exllamav2", "exllamav3"] if has_nvidia_gpu() else [])
    on_x11 = bool(os.environ.get("DISPLAY")) and os.environ.get("QT_QPA_PLATFORM", "xcb").startswith("xcb")
    ensure_qt_system_libs(QT_APT_PACKAGES + (QT_XCB_APT_PACKAGES if on_x11 else []))
    ensure_venv(extras)
    return subprocess.call([str(venv_python()), "-m", "app", *rest])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
