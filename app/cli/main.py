"""Command line: ``python -m app [serve|add-model|models|remove-model|prompt|runtime|install-desktop|autostart]``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence, get_args

from pydantic import ValidationError

from app import __version__
from app.engine.catalog.ollama_client import OllamaError
from app.engine.prompting.builders import PromptError
from app.engine.catalog.model_folder import ModelFolderError, format_size, inspect_model_folder
from app.engine.catalog.add_model import add_model
from app.engine.catalog.registry import Registry, RegistryError, display_name
from app.engine.settings.schema import SCHEMA, Settings, format_validation_error
from app.paths import default_models_path

log = logging.getLogger("app.cli.main")

class CliError(Exception):
    """A readable error for the user; printed without a traceback."""


def add_setting_options(parser: argparse.ArgumentParser) -> None:
    """One option per setting of the settings model (declared there, not repeated here)."""
    group = parser.add_argument_group("setting overrides")
    for name, info in Settings.model_fields.items():
        declared = SCHEMA[name]  # extra spellings: the original server's option names and Ollama's
        flags = ["--" + name.replace("_", "-"), *declared.cli]
        help_text = declared.description
        choices = _literal_choices(info.annotation)
        if name == "stop":
            group.add_argument(*flags, dest=f"set_{name}", action="append", metavar="TEXT",
                               help="stop string (repeat for several)")
        elif choices:
            group.add_argument(*flags, dest=f"set_{name}", choices=choices, help=help_text)
        else:
            group.add_argument(*flags, dest=f"set_{name}", metavar=_metavar(info.annotation), help=help_text)


def _literal_choices(annotation: Any) -> list[str] | None:
    for arg in get_args(annotation):
        values = get_args(arg)
        if values and all(isinstance(v, str) for v in values):
            return list(values)
    return None


def _metavar(annotation: Any) -> str:
    text = str(annotation)
    if "int" in text:
        return "N"
    if "float" in text:
        return "X"
    return "TEXT"


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The setting overrides given on the command line, validated."""
    data = {name: getattr(args, f"set_{name}") for name in Settings.model_fields
            if getattr(args, f"set_{name}", None) is not None}
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise CliError(f"invalid setting: {format_validation_error(exc)}") from None


def add_common_options(parser: argparse.ArgumentParser, models_default: Any, level_default: Any) -> None:
    parser.add_argument("--models", metavar="PATH", default=models_default,
                        help="models.json to use (default: see README)")
    parser.add_argument("--log-level", default=level_default, choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def port_number(text: str) -> int:
    """A TCP port for argparse: 0 (any free one) to 65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0-65535, not {port}")
    return port


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="exllama-tray",
        description="Serve local LLMs to OpenAI-compatible clients. Without a command: start the tray app.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    add_common_options(parser, None, "INFO")
    # the same options after the command too (``models --models X``); there they only override
    common = argparse.ArgumentParser(add_help=False)
    add_common_options(common, argparse.SUPPRESS, argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("tray", help="start the tray app (the default)", parents=[common])
    p.add_argument("--port", type=port_number, default=None, help="API port (default: saved server settings)")

    p = sub.add_parser("serve", help="run the OpenAI-compatible server headless", parents=[common])
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=port_number, default=8000, help="port (default 8000)")
    p.add_argument("--model", metavar="NAME", help="load this model at start-up")
    p.add_argument("--max-loaded", type=int, default=1, metavar="N", help="models resident at once (default 1)")
    p.add_argument("--api-key", metavar="KEY", default=os.environ.get("EXLLAMA_TRAY_API_KEY"),
                   help="require this API key (Authorization: Bearer); default $EXLLAMA_TRAY_API_KEY")
    p.add_argument("--cors-origin", action="append", metavar="ORIGIN", help="allow CORS from this origin")
    p.add_argument("--ollama-port", type=port_number, nargs="?", const=11434, default=None, metavar="PORT",
                   help="also serve on Ollama's port (default 11434) unless Ollama itself answers there")
    add_setting_options(p)

    p = sub.add_parser("add-model", help="register a model folder under NAME[:TAG]", parents=[common])
    p.add_argument("name", metavar="NAME[:TAG]")
    p.add_argument("--model-dir", required=True, metavar="DIR", help="folder with config.json and weights")
    p.add_argument("--replace", action="store_true", help="replace an existing entry of the same name")
    p.add_argument("--no-ollama", action="store_true", help="do not fetch Ollama library metadata")
    p.add_argument("--ollama", metavar="NAME", help="Ollama library entry to use (default: NAME)")
    p.add_argument("--registry-url", metavar="URL", help="Ollama registry to ask instead of https://HOST (a mirror)")
    add_setting_options(p)

    sub.add_parser("models", help="list registered models", parents=[common])

    p = sub.add_parser("remove-model", help="remove a model from the registry (files are kept)", parents=[common])
    p.add_argument("name", metavar="NAME[:TAG]")

    p = sub.add_parser("prompt", help="print the exact prompt a chat would send to the model", parents=[common])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="NAME", help="use this registered model's template")
    src.add_argument("--template-file", type=Path, metavar="FILE", help="a Go or Jinja template file")
    p.add_argument("--messages-file", type=Path, required=True, metavar="FILE.json",
                   help="JSON list of {role, content} messages (or {messages: [...], tools: [...]})")
    from app.cli import runtime_cmd

    runtime_cmd.add_parsers(sub, common)
    return parser


def cmd_add_model(args: argparse.Namespace, registry: Registry) -> int:
    try:
        info = inspect_model_folder(args.model_dir)  # before the fetch: a wrong folder fails at once
    except ModelFolderError as exc:
        raise CliError(str(exc)) from None
    settings = settings_from_args(args)
    ollama = None
    if not args.no_ollama:
        from app.cli.ollama_fetch import fetch_for_cli

        ollama = fetch_for_cli(args.ollama or args.name, args.registry_url)
    key = add_model(registry, args.name, info.path, settings=settings, ollama=ollama, info=info,
                    replace=args.replace).key
    print(f"added {display_name(key)}: {info.path}")
    print(f"  {info.summary()}")
    if ollama is not None:
        print(f"  Ollama metadata from {ollama.name}: template {'yes' if ollama.template else 'no'}, "
              f"system prompt {'yes' if ollama.system else 'no'}, params {sorted(ollama.params) or 'none'}")
    print(f"  registry: {registry.path}")
    return 0


def cmd_models(registry: Registry) -> int:
    entries = registry.entries()
    if not entries:
        print(f"no models registered in {registry.path}")
        return 0
    rows = [("NAME", "FORMAT", "CONTEXT", "SIZE", "FOLDER", "")]
    for key, entry in sorted(entries.items()):
        exists = Path(entry.model_dir).is_dir()
        info = entry.info
        ctx = entry.settings.context_length or info.get("context_length") or "?"
        fmt = info.get("format", "?")
        if fmt != "?" and info.get("bits_per_weight"):
            fmt = f"{fmt} {info['bits_per_weight']:g}bpw"
        size = format_size(info["size_bytes"]) if "size_bytes" in info else "?"
        rows.append((display_name(key), fmt, str(ctx), size, entry.model_dir, "" if exists else "(missing)"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)) + ("  " + row[5] if row[5] else ""))
    return 0


def cmd_prompt(args: argparse.Namespace, registry: Registry) -> int:
    from app.cli.prompt import render_prompt_for_cli

    sys.stdout.write(render_prompt_for_cli(registry, args.model, args.template_file, args.messages_file))
    sys.stdout.flush()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    registry = Registry(default_models_path(args.models))
    command = args.command or "tray"
    try:
        if command == "add-model":
            return cmd_add_model(args, registry)
        if command == "models":
            return cmd_models(registry)
        if command == "remove-model":
            key = registry.remove(args.name)
            print(f"removed {display_name(key)} from {registry.path} (model files kept)")
            return 0
        if command == "prompt":
            return cmd_prompt(args, registry)
        from app.cli import runtime_cmd

        if command in runtime_cmd.COMMANDS:
            return runtime_cmd.run(args)
        from app.desktop.crash_log import install_crash_log

        install_crash_log()  # the tray and serve: uncaught exceptions and fatal signals to crash.log
        if command == "serve":
            from app.api.serve import serve_forever

            return serve_forever(args, registry, settings_from_args(args))
        from app.ui.launch import launch_tray

        return launch_tray(registry, port=getattr(args, "port", None))
    except (CliError, RegistryError, ModelFolderError, PromptError, OllamaError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
