#!/usr/bin/env python3
"""Drive the real tray app under Xvfb as a person would: add a model, load it, send a request, unload
it, quit; take screenshots on the way and check that Quit ends the process within 2 s.

Usage: python scripts/ui/drive_app.py --mode {window,tray} [--out docs/screenshots] [--display :71]

``window``: no system tray (only openbox): the status window is the main window and its menu bar is
used. ``tray``: trayer provides the system tray; the icon's menu is used. Keyboard and mouse go
through xdotool; screenshots are ``import -window root`` (ImageMagick; xwd shows popup menus black).
A manual and development tool (scripts/ui/drive_app.sh runs both modes), not part of CI. Needs xvfb,
xdotool, x11-utils, imagemagick, openbox and (for ``tray``) trayer.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[2]
SCREEN = (1280, 800)
QUIT_LIMIT_S = 2.0
#: where the window-first mode's menu bar entries are, from the window's top left corner
MENU_BAR = {"Models": (30, 10), "App": (78, 10)}
log = logging.getLogger("drive_app")


class Desktop:
    """An X server with a window manager (and a tray host), ended in :meth:`close`."""

    def __init__(self, display: str, tray: bool, work: Path) -> None:
        self.display = display
        self.env = {**os.environ, "DISPLAY": display}
        self.procs: list[subprocess.Popen] = []
        number = display.lstrip(":")
        self._start(["Xvfb", display, "-screen", "0", f"{SCREEN[0]}x{SCREEN[1]}x24", "-nolisten", "tcp"], work)
        wait_for(lambda: Path(f"/tmp/.X11-unix/X{number}").exists(), 10, "the X server")
        self._start(["openbox"], work)
        time.sleep(0.5)
        if tray:
            self._start(["trayer", "--edge", "top", "--align", "right", "--widthtype", "request", "--height", "32",
                         "--SetDockType", "true", "--transparent", "false", "--tint", "0x333333"], work)
            time.sleep(0.5)

    def _start(self, cmd: list[str], work: Path) -> None:
        out = open(work / f"{cmd[0].lower()}.log", "w")
        self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT))

    def xdotool(self, *args: str) -> str:
        return subprocess.run(["xdotool", *args], env=self.env, capture_output=True, text=True, timeout=30).stdout

    def keys(self, *keys: str) -> None:
        for key in keys:
            self.xdotool("key", key)
            time.sleep(0.15)

    def find_window(self, name: str, timeout: float = 15) -> str:
        found: list[str] = []

        def look() -> bool:
            found[:] = self.xdotool("search", "--onlyvisible", "--name", name).split()
            return bool(found)

        wait_for(look, timeout, f"a window named {name!r}")
        return found[-1]

    def geometry(self, window: str, *, frame: bool = False) -> tuple[int, int, int, int]:
        """x, y, width, height of ``window`` on the screen (with the window manager's frame: title bar
        and borders). xwininfo's absolute position: xdotool's counts the frame twice under openbox."""
        info = subprocess.run(["xwininfo", "-id", window], env=self.env, capture_output=True, text=True,
                              timeout=30).stdout
        fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in info.splitlines() if ":" in line)}
        x, y = int(fields["Absolute upper-left X"]), int(fields["Absolute upper-left Y"])
        w, h = int(fields["Width"]), int(fields["Height"])
        if not frame:
            return x, y, w, h
        extents = subprocess.run(["xprop", "-id", window, "_NET_FRAME_EXTENTS"], env=self.env, capture_output=True,
                                 text=True, timeout=30).stdout
        try:
            left, right, top, bottom = (int(v) for v in extents.split("=", 1)[1].split(","))
        except (IndexError, ValueError):
            left = right = top = bottom = 0
        return x - left, y - top, w + left + right, h + top + bottom

    def shot(self, path: Path, crop: tuple[int, int, int, int] | None = None) -> None:
        """The whole screen (menus included), cropped to x, y, width, height."""
        subprocess.run(["import", "-window", "root", str(path)], env=self.env, check=True, timeout=30)
        if crop is not None:
            x, y, w, h = crop
            x, y = max(x, 0), max(y, 0)
            w, h = min(w, SCREEN[0] - x), min(h, SCREEN[1] - y)
            subprocess.run(["convert", str(path), "-crop", f"{w}x{h}+{x}+{y}", "+repage", str(path)], check=True)
        print(f"screenshot: {path}", flush=True)

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


def http_json(url: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class App:
    """The real app (``python -m app tray``) in its own config folders, with a menu opener per mode."""

    def __init__(self, desktop: Desktop, work: Path, mode: str) -> None:
        self.desktop, self.work, self.mode = desktop, work, mode
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        home = work / "home"
        env = {**desktop.env, "HOME": str(home), "XDG_CONFIG_HOME": str(home / "config"),
               "XDG_STATE_HOME": str(home / "state"), "XDG_CACHE_HOME": str(home / "cache"),
               "EXLLAMA_TRAY_REPORT_READY": "1", "QT_QPA_PLATFORM": "xcb",
               "PYTHON_KEYRING_BACKEND": "keyring.backends.null.Keyring"}
        self.log_path = work / "app.log"
        started = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "app", "--models", str(work / "models.json"), "tray",
                                      "--port", str(self.port)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=open(self.log_path, "w"), text=True)
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("READY"):
                break
        else:
            raise SystemExit(f"the app exited before it was ready; see {self.log_path}")
        print(f"[{mode}] app ready in {time.perf_counter() - started:.2f} s, API at {self.base}/v1", flush=True)
        self.window = desktop.find_window("^ExLlama Tray$") if mode == "window" else None

    def open_menu(self, which: str = "App") -> None:
        """The tray icon's menu (right click on it) or the main window's menu bar entry ``which``."""
        if self.window is None:
            panel = self.desktop.xdotool("search", "--onlyvisible", "--class", "trayer").split()
            x, y, w, h = max((self.desktop.geometry(p) for p in panel), key=lambda g: g[2] * g[3])
            self.desktop.xdotool("mousemove", str(x + w // 2), str(y + h // 2), "click", "3")
        else:
            mx, my = MENU_BAR[which]
            self.desktop.xdotool("mousemove", "--window", self.window, str(mx), str(my), "click", "1")
        time.sleep(0.6)

    def health(self) -> dict:
        return http_json(f"{self.base}/health")

    def menu_crop(self) -> tuple[int, int, int, int]:
        """Where the menus show: the top right corner (tray) or the main window."""
        if self.window is None:
            return SCREEN[0] - 860, 0, 860, 300
        return self.desktop.geometry(self.window, frame=True)


def add_model(app: App, model_dir: Path) -> None:
    # window: App ▸ Add model…; tray: the empty model list's "No models yet — Add model…" entry
    for attempt in range(5):  # the tray icon may not be embedded yet: its first click can miss
        app.open_menu("App")
        app.desktop.keys("Down", "Return")
        try:
            dialog = app.desktop.find_window("^Add model", timeout=3)
            break
        except SystemExit:
            app.desktop.keys("Escape")
            print(f"[{app.mode}] no Add model dialog after attempt {attempt + 1}: again", flush=True)
    else:
        raise SystemExit("the Add model dialog did not open")
    app.desktop.xdotool("windowactivate", "--sync", dialog)
    app.desktop.xdotool("type", "--delay", "15", str(model_dir))  # the folder field has the focus
    time.sleep(0.6)
    app.desktop.keys("Return")  # Save (the name defaults to the folder's: "tiny")
    wait_for(lambda: any(m["id"] == "tiny" for m in http_json(f"{app.base}/v1/models")["data"]), 15,
             "the model in /v1/models")
    print(f"[{app.mode}] added model tiny from {model_dir}", flush=True)


def model_action(app: App) -> None:
    """Models ▸ tiny ▸ its first enabled action (Load when unloaded, Unload when loaded)."""
    app.open_menu("Models")
    app.desktop.keys("Down", "Right", "Return")


def request(app: App) -> str:
    import openai

    client = openai.OpenAI(base_url=f"{app.base}/v1", api_key="unused", max_retries=0, timeout=60)
    started = time.perf_counter()
    text = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hello!"}], max_tokens=24, stream=True)
        if chunk.choices)
    print(f"[{app.mode}] streamed {len(text)} characters in {time.perf_counter() - started:.2f} s", flush=True)
    return text


def quit_app(app: App) -> float:
    """Quit from the menu (the last entry); seconds from the key press to the process's end."""
    app.open_menu("App")
    app.desktop.keys("Up")  # from no entry, Up selects the last one: Quit
    started = time.perf_counter()
    app.desktop.xdotool("key", "Return")
    try:
        app.proc.wait(30)
    except subprocess.TimeoutExpired:
        app.proc.send_signal(signal.SIGTERM)
        raise SystemExit(f"[{app.mode}] Quit did not end the app within 30 s; see {app.log_path}") from None
    return time.perf_counter() - started


def scenario(app: App, model_dir: Path, out: Path) -> float:
    shots = {"window": ("window-first.png", "window-first-menu.png"), "tray": ("tray-menu.png", "tray-menu-model.png")}
    whole, submenu = shots[app.mode]
    add_model(app, model_dir)
    model_action(app)  # Load
    wait_for(lambda: app.health()["loaded"] == ["tiny:latest"], 120, "the model to load")
    print(f"[{app.mode}] loaded: {app.health()['loaded']}", flush=True)
    request(app)
    time.sleep(2.5)  # a plot sample or two after the request
    if app.mode == "tray":
        app.open_menu()
        app.desktop.shot(out / whole, app.menu_crop())
        app.desktop.keys("Down", "Right")
        time.sleep(0.4)
        app.desktop.shot(out / submenu, app.menu_crop())
        app.desktop.keys("Escape", "Escape", "Escape")
    else:
        app.desktop.shot(out / whole, app.menu_crop())
        app.open_menu("Models")
        app.desktop.keys("Down", "Right")
        time.sleep(0.4)
        app.desktop.shot(out / submenu, app.menu_crop())
        app.desktop.keys("Escape", "Escape", "Escape")
    time.sleep(0.3)
    model_action(app)  # Unload (Load is disabled now)
    wait_for(lambda: app.health()["loaded"] == [], 60, "the model to unload")
    print(f"[{app.mode}] unloaded: {app.health()['loaded']}", flush=True)
    return quit_app(app)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("window", "tray"), required=True)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    parser.add_argument("--display", default=":71")
    args = parser.parse_args()
    for tool in ("Xvfb", "xdotool", "xwininfo", "xprop", "import", "convert", "openbox", *(["trayer"] if args.mode == "tray" else [])):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: run scripts/ui/drive_app.sh (it installs what is needed)")
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"drive-app-{args.mode}-"))
    model_dir = work / "tiny"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny_model.py"), str(model_dir)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    desktop = Desktop(args.display, args.mode == "tray", work)
    app = None
    try:
        app = App(desktop, work, args.mode)
        took = scenario(app, model_dir, args.out)
    finally:
        if app is not None and app.proc.poll() is None:
            app.proc.kill()
        desktop.close()
    ok = took <= QUIT_LIMIT_S
    print(f"[{args.mode}] Quit ended the app in {took:.2f} s (limit {QUIT_LIMIT_S:.0f} s): "
          f"{'ok' if ok else 'TOO SLOW'}; log: {app.log_path}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
