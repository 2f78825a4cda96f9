"""``python -m app serve``: the engine and the API without Qt."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from app.api.server import Listener, ServerConfig
from app.engine.facade import Engine, ModelLoadError, ModelNotFound
from app.engine.catalog.registry import Registry
from app.engine.settings.schema import Settings

log = logging.getLogger(__name__)


async def run_server(args: argparse.Namespace, registry: Registry, settings: Settings) -> int:
    registry.check_on_start()  # a broken models.json: clear error, a backup copy, never a silent reset
    engine = Engine(registry, server_settings=settings, max_loaded=args.max_loaded)
    config = ServerConfig(host=args.host, port=args.port, api_key=args.api_key,
                          cors_origins=tuple(args.cors_origin or ()), ollama_port=getattr(args, "ollama_port", None))
    listener = Listener(engine, config)
    last: dict[str, str] = {}

    def show_progress() -> None:
        for state in engine.model_states():
            line = f"{state.name}: {state.state} {state.progress * 100:.0f}% {state.message}"
            if last.get(state.name) != line:
                last[state.name] = line
                print(line, file=sys.stderr, flush=True)

    if args.model and registry.find(args.model) is None:  # before listening: nothing to serve it with
        print(f"error: The model '{args.model}' does not exist in {registry.path}", file=sys.stderr)
        return 2
    engine.add_listener(show_progress)
    await engine.start()
    try:
        await listener.start()
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        await engine.close()
        return 2
    print(f"serving the OpenAI API at {listener.url} (models from {registry.path})", file=sys.stderr, flush=True)
    if listener.ollama_port or listener.ollama_error:
        print(listener.ollama_error or f"serving the Ollama API on port {listener.ollama_port} too", file=sys.stderr,
              flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # Windows
            pass
    if args.model:
        try:
            await engine.load(args.model)
        except (ModelNotFound, ModelLoadError) as exc:  # asked for at start-up: serving without it misleads
            print(f"error: {exc}", file=sys.stderr)
            await engine.close()
            await listener.stop()
            return 2
    try:
        await stop.wait()
    finally:
        print("shutting down", file=sys.stderr, flush=True)
        await engine.close()  # running requests end with an in-band error, models are unloaded
        await listener.stop()
    return 0


def serve_forever(args: argparse.Namespace, registry: Registry, settings: Settings) -> int:
    try:
        return asyncio.run(run_server(args, registry, settings))
    except KeyboardInterrupt:
        return 130
