"""``runtime install|status|remove`` and ``install-desktop``: the runtimes and the desktop integration
from the command line, with the install's progress on the terminal."""

from __future__ import annotations

import argparse
import sys
import threading
from typing import Any

from app.engine.catalog.model_folder import format_size

COMMANDS = ("runtime", "install-desktop", "autostart")


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    from app.engine.runtime.layout import BACKEND_PACKAGES

    p = sub.add_parser("runtime", help="install, show or remove the GPU/CPU runtime of a backend", parents=[common])
    actions = p.add_subparsers(dest="runtime_action", metavar="ACTION", required=True)
    inst = actions.add_parser("install", help="install a backend's runtime (torch and its library) from the package index")
    inst.add_argument("backend", nargs="?", default=None, choices=list(BACKEND_PACKAGES),
                      help="default: exllamav2 on an NVIDIA machine, else transformers")
    inst.add_argument("--torch-index", metavar="URL", default=None,
                      help="where torch comes from (default: PyPI with a GPU, PyTorch's CPU index without; "
                           "'' for pip's own index)")
    actions.add_parser("status", help="what is installed, where, and its size")
    actions.add_parser("remove", help="delete the runtime (its folder)")
    p = sub.add_parser("install-desktop", help="add the app to the desktop's menu (a .desktop entry and icons)",
                       parents=[common])
    p.add_argument("--uninstall", action="store_true", help="remove them again")
    p = sub.add_parser("autostart", help="start the tray app on login (on|off|status)", parents=[common])
    p.add_argument("state", choices=["on", "off", "status"])


def run(args: argparse.Namespace) -> int:
    if args.command == "install-desktop":
        return cmd_install_desktop(args.uninstall)
    if args.command == "autostart":
        return cmd_autostart(args.state)
    if args.runtime_action == "install":
        return cmd_install(args.backend, args.torch_index)
    if args.runtime_action == "status":
        return cmd_status()
    return cmd_remove()


def cmd_install(backend: str | None, torch_index: str | None) -> int:
    from app.engine.runtime.installer import InstallCancelled, RuntimeInstaller, RuntimeInstallError
    from app.engine.runtime.layout import Runtime

    from app.engine.runtime.service import RuntimeService

    backend = backend or RuntimeService.default_backend()
    runtime = Runtime()
    options: dict[str, Any] = {} if torch_index is None else {"torch_index": torch_index or None}
    installer = RuntimeInstaller(runtime, **options)
    print(f"installing the {backend} runtime into {runtime.root} (torch from "
          f"{installer.torch_index or 'pip’s own index'})", flush=True)
    cancel = threading.Event()
    try:
        installer.install(backend, _terminal_progress, cancel)
    except KeyboardInterrupt:
        cancel.set()
        print("\ncancelled; `runtime install` again resumes where it stopped", file=sys.stderr)
        return 130
    except InstallCancelled as exc:
        print(f"\n{exc}", file=sys.stderr)
        return 130
    except RuntimeInstallError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 1
    print(f"\nthe {backend} runtime is ready: {runtime.python}")
    return 0


def _terminal_progress(fraction: float, message: str) -> None:
    width = 30
    filled = int(fraction * width)
    line = f"[{'#' * filled}{'.' * (width - filled)}] {fraction * 100:5.1f}% {message}"
    if sys.stdout.isatty():
        sys.stdout.write("\r" + line[:150].ljust(150))
    else:
        sys.stdout.write(line + "\n")
    sys.stdout.flush()


def cmd_status() -> int:
    from app.engine.runtime.layout import Runtime

    status = Runtime().status()
    print(f"runtime folder: {status.root}")
    if status.python is None:
        print("not installed (`runtime install` installs it)")
        return 0
    print(f"python: {status.python}")
    print(f"backends ready: {', '.join(status.backends) or 'none'}")
    print(f"torch: {status.torch or '?'} from {status.torch_index or 'pip’s own index'}")
    if status.partial_steps:
        print(f"unfinished steps (resumed by `runtime install`): {', '.join(status.partial_steps)}")
    print(f"size: {format_size(status.size_bytes)}")
    return 0


def cmd_remove() -> int:
    from app.engine.runtime.layout import Runtime

    runtime = Runtime()
    print(f"removed {runtime.root}" if runtime.remove() else f"no runtime at {runtime.root}")
    return 0


def cmd_install_desktop(uninstall: bool) -> int:
    from app.desktop.entries import install_desktop, uninstall_desktop

    if uninstall:
        removed = uninstall_desktop()
        print("\n".join(f"removed {p}" for p in removed) or "nothing to remove")
        return 0
    installed = install_desktop()
    print(f"menu entry: {installed.entry}")
    print(f"icons: {len(installed.icons)} sizes under {installed.icons[0].parents[2]}")
    return 0


def cmd_autostart(state: str) -> int:
    from app.desktop.autostart import autostart_path, is_enabled, set_enabled

    if state != "status":
        set_enabled(state == "on")
    print(f"start on login: {'on' if is_enabled() else 'off'} ({autostart_path()})")
    return 0
