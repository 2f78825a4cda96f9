"""Screenshots of the bundled app on an X server (a development tool, not CI): the runtime offer, its
install in progress, the status window and the tray menu, taken from the built executable under Xvfb with
openbox and trayer as the tray host, driven with xdotool (the desktop of scripts/ui/drive_app.py).

``python build_spec/screenshot_bundle.py [dist/exllama-tray/exllama-tray] [--out docs/screenshots]``
Needs Xvfb, xdotool, xwininfo, xprop, imagemagick, openbox, trayer (``bash scripts/ui/drive_app.sh`` installs
them) and the package index for the CPU runtime it installs into a temporary folder (about a minute)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts" / "ui"))
sys.path.insert(0, str(ROOT / "build_spec"))
sys.path.insert(0, str(ROOT))
from build import executable  # noqa: E402
from drive_app import SCREEN, Desktop, free_port, wait_for  # noqa: E402


def chat(base: str) -> int:
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 24})
    req = urllib.request.Request(f"{base}/v1/chat/completions", body.encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def open_tray_menu(desktop: Desktop) -> None:
    panel = desktop.xdotool("search", "--onlyvisible", "--class", "trayer").split()
    x, y, w, h = max((desktop.geometry(p) for p in panel), key=lambda g: g[2] * g[3])
    desktop.xdotool("mousemove", str(x + w // 2), str(y + h // 2), "click", "3")
    time.sleep(0.8)


def start_bundle(exe: Path, desktop: Desktop, work: Path) -> tuple[subprocess.Popen, list[str], dict[str, str], str]:
    """The bundled tray on the X server, in its own folders, with a CPU runtime to be installed in ``work``."""
    port = free_port()
    home = work / "home"
    env = {**desktop.env, "HOME": str(home), "XDG_CONFIG_HOME": str(home / "config"),
           "XDG_STATE_HOME": str(home / "state"), "XDG_DATA_HOME": str(home / "data"),
           "EXLLAMA_TRAY_RUNTIME_DIR": str(work / "runtime"), "EXLLAMA_TRAY_TORCH_INDEX": "",
           "EXLLAMA_TRAY_REPORT_READY": "1", "QT_QPA_PLATFORM": "xcb",
           "PYTHON_KEYRING_BACKEND": "keyring.backends.null.Keyring"}
    command = [str(exe), "--models", str(work / "models.json"), "tray", "--port", str(port)]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=open(work / "app.log", "w"), text=True)
    assert proc.stdout is not None
    if not proc.stdout.readline().startswith("READY"):
        raise SystemExit(f"the bundle did not start; see {work / 'app.log'}")
    return proc, command, env, f"http://127.0.0.1:{port}"


def offer_and_install(desktop: Desktop, base: str, work: Path, out: Path) -> None:
    """A chat without a runtime (503): the offer; Install; its progress; done."""
    print(f"chat without a runtime: HTTP {chat(base)}", flush=True)
    dialog = desktop.find_window("^Install runtime", timeout=20)
    time.sleep(0.5)
    desktop.shot(out / "bundle-runtime-offer.png", desktop.geometry(dialog, frame=True))
    desktop.xdotool("windowactivate", "--sync", dialog)
    desktop.keys("Return")  # Install (the default button)
    time.sleep(6)
    desktop.shot(out / "bundle-runtime-installing.png", desktop.geometry(dialog, frame=True))
    wait_for(lambda: (work / "runtime" / "steps" / "backend-transformers.done").exists(), 600, "the install")
    time.sleep(1)
    desktop.shot(out / "bundle-runtime-installed.png", desktop.geometry(dialog, frame=True))
    desktop.keys("Escape")


def status_and_menu(desktop: Desktop, base: str, command: list[str], env: dict[str, str], out: Path) -> None:
    """Chats on the runtime, then the status window (a second start shows it) and the tray menu."""
    print(f"chat with the runtime: HTTP {chat(base)}", flush=True)
    for _ in range(3):
        chat(base)
    subprocess.run(command, env=env, timeout=30, capture_output=True)
    window = desktop.find_window("status$", timeout=20)
    time.sleep(2.5)
    desktop.shot(out / "bundle-status.png", desktop.geometry(window, frame=True))
    desktop.xdotool("windowminimize", window)
    time.sleep(0.5)
    open_tray_menu(desktop)
    desktop.shot(out / "bundle-tray-menu.png", (SCREEN[0] - 560, 0, 560, 275))
    desktop.keys("Up", "Return")  # Quit


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("exe", nargs="?", type=Path, default=executable(ROOT / "dist"))
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    parser.add_argument("--display", default=":73")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bundle-shots-"))
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny_model.py"), str(work / "tiny")], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    from app.engine.catalog.add_model import add_model
    from app.engine.catalog.registry import Registry

    add_model(Registry(work / "models.json"), "tiny", work / "tiny")
    desktop = Desktop(args.display, True, work)
    proc = None
    try:
        proc, command, env, base = start_bundle(args.exe, desktop, work)
        print(f"bundle ready; API at {base}/v1", flush=True)
        offer_and_install(desktop, base, work, args.out)
        status_and_menu(desktop, base, command, env, args.out)
        print(f"Quit: exit code {proc.wait(30)}", flush=True)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        desktop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
