"""Client for Ollama's registry: a model's prompt template, system prompt, parameters and license.

The manifest lists layers by media type. Only the small metadata blobs are fetched (concurrently);
the weights layer (GGUF) is never downloaded. Blob requests are redirected to a CDN, which is
followed. Each blob is checked against its sha256 digest, so a truncated body is caught.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from typing import Any, Callable

import aiohttp

from app.engine.catalog.ollama_names import InvalidName, OllamaName, parse_name
from app.engine.catalog.registry import OllamaMetadata, now_iso

log = logging.getLogger(__name__)

MANIFEST_ACCEPT = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_PREFIX = "application/vnd.ollama.image."
#: media type suffix -> metadata field
METADATA_LAYERS = {"template": "template", "system": "system", "params": "params", "license": "license",
                   "messages": "messages"}
SKIPPED_LAYERS = {"model", "projector", "adapter"}
MAX_BLOB_BYTES = 2 * 1024 * 1024
RETRY_STATUS = {429, 500, 502, 503, 504}

ProgressFn = Callable[[str, int, int], None]
"""(what is happening, steps done, steps in all)"""


class OllamaError(ValueError):
    """A readable reason why the registry could not give the metadata."""


class _Retryable(Exception):
    pass


class OllamaRegistryClient:
    def __init__(self, base_url: str | None = None, *, timeout: float = 15.0, retries: int = 3,
                 backoff: float = 0.5) -> None:
        """``base_url`` overrides ``https://{host}`` (a mirror, or a loopback server in tests)."""
        self.base_url = base_url.rstrip("/") if base_url else None
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff

    def _base(self, name: OllamaName) -> str:
        return self.base_url or f"https://{name.host}"

    async def fetch(self, name: str | OllamaName, progress: ProgressFn | None = None) -> OllamaMetadata:
        try:
            parsed = parse_name(name) if isinstance(name, str) else name
        except InvalidName as exc:
            raise OllamaError(str(exc)) from None
        report = progress or (lambda what, done, total: None)
        timeout = aiohttp.ClientTimeout(total=self.timeout, sock_connect=min(self.timeout, 10))
        async with aiohttp.ClientSession(timeout=timeout) as session:
            report(f"fetching manifest of {parsed.short}", 0, 1)
            manifest = await self._manifest(session, parsed)
            layers = [layer for layer in manifest.get("layers", []) if isinstance(layer, dict)]
            wanted = []
            for layer in layers:
                kind = str(layer.get("mediaType", "")).removeprefix(MEDIA_PREFIX)
                if kind in METADATA_LAYERS:
                    wanted.append((METADATA_LAYERS[kind], layer))
                elif kind not in SKIPPED_LAYERS:
                    log.debug("ignoring layer %s", layer.get("mediaType"))
            config = manifest.get("config") if isinstance(manifest.get("config"), dict) else None
            total = len(wanted) + (1 if config else 0) + 1
            done = 1
            report("fetching metadata", done, total)

            async def one(layer: dict[str, Any]) -> bytes:
                nonlocal done
                data = await self._blob(session, parsed, layer)
                done += 1
                report(f"fetched {layer.get('mediaType', 'blob').removeprefix(MEDIA_PREFIX)}", done, total)
                return data

            jobs = [one(layer) for _, layer in wanted]
            if config:
                jobs.append(one(config))
            blobs = await asyncio.gather(*jobs)
        meta: dict[str, Any] = {"name": str(parsed), "fetched_at": now_iso()}
        for (field, layer), data in zip(wanted, blobs):
            meta[field] = self._decode(field, data, layer)
        if config:
            meta["config"] = self._json(blobs[-1], "config")
        report("done", total, total)
        return OllamaMetadata(**meta)

    # -- HTTP ---------------------------------------------------------------------------------
    async def _manifest(self, session: aiohttp.ClientSession, name: OllamaName) -> dict[str, Any]:
        url = f"{self._base(name)}/v2/{name.namespace}/{name.model}/manifests/{name.tag}"
        body = await self._get(session, url, {"Accept": MANIFEST_ACCEPT}, name, MAX_BLOB_BYTES)
        manifest = self._json(body, "manifest")
        if not isinstance(manifest, dict) or not isinstance(manifest.get("layers"), list):
            raise OllamaError(f"the registry's manifest for {name.short} has no layers list")
        return manifest

    async def _blob(self, session: aiohttp.ClientSession, name: OllamaName, layer: dict[str, Any]) -> bytes:
        digest = str(layer.get("digest", ""))
        size = layer.get("size")
        if not digest.startswith("sha256:"):
            raise OllamaError(f"the manifest of {name.short} has a layer without a sha256 digest")
        if isinstance(size, int) and size > MAX_BLOB_BYTES:
            raise OllamaError(f"metadata layer {layer.get('mediaType')} of {name.short} is {size} bytes; refusing")
        url = f"{self._base(name)}/v2/{name.namespace}/{name.model}/blobs/{digest}"

        def check(data: bytes) -> None:
            if hashlib.sha256(data).hexdigest() != digest.removeprefix("sha256:"):
                raise _Retryable(f"blob {digest[:19]} arrived damaged (digest mismatch, {len(data)} bytes)")

        return await self._get(session, url, {}, name, MAX_BLOB_BYTES, check)

    async def _get(self, session: aiohttp.ClientSession, url: str, headers: dict[str, str], name: OllamaName,
                   limit: int, check: Callable[[bytes], None] | None = None) -> bytes:
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                async with session.get(url, headers=headers, allow_redirects=True) as resp:
                    if resp.status == 404:
                        raise OllamaError(f"{name.short} was not found in the Ollama library "
                                          f"(no model {name.namespace}/{name.model} with tag {name.tag!r})")
                    if resp.status in RETRY_STATUS:
                        raise _Retryable(f"the registry answered {resp.status} {resp.reason}")
                    if resp.status >= 400:
                        raise OllamaError(f"the registry answered {resp.status} {resp.reason} for {name.short}")
                    data = await resp.content.read(limit + 1)
                    if len(data) > limit:
                        raise OllamaError(f"the registry sent more than {limit} bytes for {url}; refusing")
                    if check is not None:
                        check(data)
                    return data
            except OllamaError:
                raise
            except _Retryable as exc:
                last = str(exc)
            except asyncio.TimeoutError:
                last = f"no answer within {self.timeout:g} s"
            except aiohttp.ClientPayloadError as exc:
                last = f"the body was cut short ({exc})"
            except aiohttp.ClientConnectorError as exc:
                last = f"cannot connect to {exc.host}:{exc.port} ({exc.os_error.strerror or exc.os_error})"
            except aiohttp.ClientError as exc:
                last = f"{type(exc).__name__}: {exc}"
            log.info("registry request failed (attempt %d of %d): %s", attempt + 1, self.retries + 1, last)
        raise OllamaError(f"could not fetch {name.short} from the Ollama registry: {last}")

    @staticmethod
    def _json(data: bytes, what: str) -> Any:
        try:
            return json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise OllamaError(f"the registry sent invalid JSON for the {what}: {exc}") from None

    def _decode(self, field: str, data: bytes, layer: dict[str, Any]) -> Any:
        if field in ("params", "messages"):
            value = self._json(data, field)
            if field == "params" and not isinstance(value, dict):
                raise OllamaError("the registry's params layer is not a JSON object")
            if field == "messages" and not isinstance(value, list):
                raise OllamaError("the registry's messages layer is not a JSON list")
            return value
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise OllamaError(f"the registry's {field} layer is not UTF-8 text") from None
