"""A loopback server that speaks the Ollama registry protocol (manifests, blobs behind a 307 redirect)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from dataclasses import dataclass, field

from aiohttp import web

MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class FakeModel:
    template: str
    system: str = ""
    params: dict = field(default_factory=dict)
    license: str = ""
    messages: list = field(default_factory=list)

    def layers(self) -> dict[str, bytes]:
        out = {"application/vnd.ollama.image.model": b"GGUF" + b"\0" * 4096,
               "application/vnd.ollama.image.template": self.template.encode()}
        if self.system:
            out["application/vnd.ollama.image.system"] = self.system.encode()
        if self.params:
            out["application/vnd.ollama.image.params"] = json.dumps(self.params).encode()
        if self.license:
            out["application/vnd.ollama.image.license"] = self.license.encode()
        if self.messages:
            out["application/vnd.ollama.image.messages"] = json.dumps(self.messages).encode()
        return out


CHATML_OLLAMA = (
    "OLLAMA-TEMPLATE\n"
    "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    "{{- range .Messages }}{{ if ne .Role \"system\" }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
    "{{ end }}{{ end }}<|im_start|>assistant\n"
)


class FakeRegistry:
    """Models keyed by (namespace, model, tag). ``mode`` makes blobs misbehave: truncate, slow, flaky."""

    def __init__(self) -> None:
        self.models: dict[tuple[str, str, str], FakeModel] = {}
        self.blobs: dict[str, bytes] = {}
        self.requests: list[str] = []
        self.mode = "ok"
        self.flaky_left = 0
        self.loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self.port = 0
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def add(self, name: tuple[str, str, str], model: FakeModel) -> None:
        self.models[name] = model

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def manifest(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(request.path)
        if self.mode == "slow":
            await asyncio.sleep(5)
        key = (request.match_info["ns"], request.match_info["model"], request.match_info["tag"])
        model = self.models.get(key)
        if model is None:
            return web.json_response({"errors": [{"code": "MANIFEST_UNKNOWN"}]}, status=404)
        if request.headers.get("Accept") != MANIFEST_TYPE:
            return web.json_response({"errors": [{"code": "BAD_ACCEPT"}]}, status=400)
        layers = []
        for media, data in model.layers().items():
            self.blobs[digest(data)] = data
            layers.append({"mediaType": media, "digest": digest(data), "size": len(data)})
        config = json.dumps({"model_format": "gguf", "model_family": "llama"}).encode()
        self.blobs[digest(config)] = config
        return web.json_response({"schemaVersion": 2, "mediaType": MANIFEST_TYPE,
                                  "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                                             "digest": digest(config), "size": len(config)},
                                  "layers": layers})

    async def blob(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(request.path)
        d = request.match_info["digest"]
        if d not in self.blobs:
            return web.Response(status=404)
        raise web.HTTPTemporaryRedirect(f"/cdn/{d}")

    async def cdn(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(request.path)
        data = self.blobs[request.match_info["digest"]]
        if self.flaky_left > 0:
            self.flaky_left -= 1
            return web.Response(status=503)
        if self.mode == "truncate":
            resp = web.StreamResponse(headers={"Content-Length": str(len(data) + 100)})
            try:
                await resp.prepare(request)
                await resp.write(data[: len(data) // 2])
            except ConnectionResetError:  # the client gave up on an earlier cut body: fine here
                return resp
            if request.transport is not None:
                request.transport.close()
            return resp
        return web.Response(body=data)

    def start(self) -> "FakeRegistry":
        self._thread.start()

        async def go() -> None:
            app = web.Application()
            app.router.add_get("/v2/{ns}/{model}/manifests/{tag}", self.manifest)
            app.router.add_get("/v2/{ns}/{model}/blobs/{digest}", self.blob)
            app.router.add_get("/cdn/{digest}", self.cdn)
            self._runner = web.AppRunner(app)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            self.port = self._runner.addresses[0][1]

        asyncio.run_coroutine_threadsafe(go(), self.loop).result(10)
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
