"""An OpenAI-compatible prefill-decode (PD) proxy for vLLM instances with a PD KV connector.

For each ``POST /v1/completions`` or ``POST /v1/chat/completions`` request the proxy

1. sends the request to a prefill instance with ``max_tokens=1``, ``stream=false`` and
   ``kv_transfer_params={"do_remote_decode": true}``; vLLM's OpenAI server returns the
   connector's hand-off in the response body's ``kv_transfer_params``;
2. sends the original request plus ``"kv_transfer_params": <that hand-off>`` to a decode
   instance, which reads the prompt's KV cache from the prefill instance instead of computing
   it, and passes the decode's response (SSE stream or JSON) through to the client.

With ``--mode push`` (LlumnixConnector's push mode) both requests go out at once, named by
one transfer id: the decode instance allocates blocks and asks the prefill instance to write
into them, and the prefill writes each layer's KV as soon as it is computed, so the transfer
overlaps the prefill. The proxy learns each prefill instance's push endpoint once, with a
one-token probe request.

Prefill and decode instances are picked round-robin. Every upstream call has a timeout; an
upstream failure becomes an OpenAI-style JSON error (a client error keeps the upstream's
status, anything else is 502, a timeout 504). ``GET /health`` is 200 when every upstream
answers its own ``/health``, 503 otherwise. ``GET /v1/models`` is forwarded to a decode
instance.

Run it with ``llumnix-pd-proxy --prefill URL --decode URL`` (or
``python -m llumnix_kv.proxy.pd_proxy``); it listens on 127.0.0.1:8000 by default.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import uuid
from collections.abc import Sequence
from typing import Any

import aiohttp
from aiohttp import web

__all__ = [
    "ENDPOINT_KEY",
    "PROBE_KEY",
    "PROXY_KEY",
    "PUSH_KEY",
    "PdProxy",
    "ProxyError",
    "build_app",
    "main",
    "prefill_body",
]

logger = logging.getLogger(__name__)

# Request bodies with long token-id prompts exceed aiohttp's 1 MiB default.
MAX_BODY_BYTES = 64 << 20
# Request headers passed on to the upstream instances.
FORWARDED_HEADERS = ("Authorization", "X-Request-Id")
HEALTH_TIMEOUT_S = 5.0


class ProxyError(Exception):
    """A request the proxy cannot serve, as the HTTP error the client gets."""

    def __init__(self, status: int, message: str, kind: str = "upstream_error") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind

    def response(self) -> web.Response:
        return error_response(self.status, self.message, self.kind)


def error_response(status: int, message: str, kind: str) -> web.Response:
    """An OpenAI-style error body."""
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return web.json_response(body, status=status)


def normalize_url(url: str) -> str:
    """``host:port`` or ``http://host:port/`` -> ``http://host:port``."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    return url


MODES = ("pull", "push")
# LlumnixConnector's kv_transfer_params keys for push mode (llumnix_kv.plugins.vllm).
PUSH_KEY, PROBE_KEY, ENDPOINT_KEY = "llumnix_push", "llumnix_probe", "llumnix_endpoint"


def prefill_body(
    body: dict[str, Any], chat: bool, kv_params: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The prefill instance's request: the prompt, one output token, the KV kept for a
    remote decode (``kv_params`` replaces the default transfer params)."""
    out = dict(body)
    kv = kv_params if kv_params is not None else {"do_remote_decode": True}
    out.update(max_tokens=1, stream=False, n=1, kv_transfer_params=kv)
    if chat or "max_completion_tokens" in out:
        out["max_completion_tokens"] = 1
    for key in ("stream_options", "min_tokens"):
        out.pop(key, None)
    return out


def check_request(body: Any, chat: bool) -> dict[str, Any]:
    """The request body as a dict; raises ProxyError(400) for what the proxy cannot split
    into one prefill and one decode request."""
    if not isinstance(body, dict):
        raise ProxyError(400, "the request body must be a JSON object", "invalid_request_error")
    if body.get("n", 1) not in (1, None):
        raise ProxyError(400, "only n=1 is supported", "invalid_request_error")
    prompt = body.get("prompt")
    if (
        not chat
        and isinstance(prompt, list)
        and len(prompt) > 1
        and isinstance(prompt[0], (list, str))
    ):
        raise ProxyError(
            400,
            "batched prompts are not supported; send one prompt per request",
            "invalid_request_error",
        )
    return body


class PdProxy:
    """The proxy's state: upstream URLs, their round-robin cursors and the HTTP client."""

    def __init__(
        self,
        prefill_urls: Sequence[str],
        decode_urls: Sequence[str],
        timeout: float,
        mode: str = "pull",
    ) -> None:
        if not prefill_urls or not decode_urls:
            raise ValueError("at least one prefill and one decode URL are needed")
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self._endpoints: dict[str, list[Any]] = {}  # prefill URL -> its push endpoints
        self._prefills: set[asyncio.Task[Any]] = set()  # push mode: prefills in flight
        self.prefill_urls = [normalize_url(u) for u in prefill_urls]
        self.decode_urls = [normalize_url(u) for u in decode_urls]
        self.timeout = timeout
        self._next_prefill = itertools.cycle(self.prefill_urls)
        self._next_decode = itertools.cycle(self.decode_urls)
        self._session: aiohttp.ClientSession | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self, app: web.Application) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), auto_decompress=False
        )

    async def close(self, app: web.Application) -> None:
        for task in list(self._prefills):
            task.cancel()
        if self._prefills:
            await asyncio.gather(*self._prefills, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "the proxy's application is not started"
        return self._session

    # ------------------------------------------------------------------ handlers

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "/v1/completions", chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "/v1/chat/completions", chat=True)

    async def health(self, request: web.Request) -> web.Response:
        urls = [("prefill", u) for u in self.prefill_urls] + [
            ("decode", u) for u in self.decode_urls
        ]
        results = await asyncio.gather(*(self._healthy(u) for _, u in urls))
        report: dict[str, dict[str, bool]] = {"prefill": {}, "decode": {}}
        for (role, url), ok in zip(urls, results, strict=True):
            report[role][url] = ok
        return web.json_response(report, status=200 if all(results) else 503)

    async def models(self, request: web.Request) -> web.Response:
        url = next(self._next_decode) + "/v1/models"
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        try:
            async with self.session.get(url, headers=_forwarded(request), timeout=timeout) as resp:
                data = await resp.read()
                if resp.status != 200:
                    return _upstream_status_error("decode", url, resp.status, data).response()
                return web.Response(body=data, status=200, content_type="application/json")
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            return _connection_error("decode", url, exc).response()

    # ------------------------------------------------------------------ the PD flow

    async def _handle(self, request: web.Request, path: str, chat: bool) -> web.StreamResponse:
        try:
            body = check_request(await request.json(), chat)
        except json.JSONDecodeError as exc:
            return error_response(400, f"invalid JSON body: {exc}", "invalid_request_error")
        except ProxyError as exc:
            return exc.response()
        headers = _forwarded(request)
        headers.setdefault("X-Request-Id", uuid.uuid4().hex)
        kv_params: dict[str, Any] | None
        try:
            if self.mode == "push":
                kv_params = await self._start_push(path, body, chat, headers)
            else:
                kv_params = await self._prefill(path, body, chat, headers)
        except ProxyError as exc:
            return exc.response()
        decode = dict(body)
        if kv_params is not None:
            decode["kv_transfer_params"] = kv_params
        else:
            decode.pop("kv_transfer_params", None)
        url = next(self._next_decode) + path
        if body.get("stream"):
            return await self._stream(request, url, decode, headers)
        try:
            status, data = await self._post(url, decode, headers, "decode")
        except ProxyError as exc:
            return exc.response()
        return web.Response(
            body=data,
            status=status,
            content_type="application/json",
            headers={"X-Request-Id": headers["X-Request-Id"]},
        )

    async def _prefill(
        self, path: str, body: dict[str, Any], chat: bool, headers: dict[str, str]
    ) -> dict[str, Any] | None:
        """Runs the prompt on a prefill instance; returns its hand-off, or None when the
        prefill instance returned none (the decode instance then computes the prompt)."""
        url = next(self._next_prefill) + path
        _, data = await self._post(url, prefill_body(body, chat), headers, "prefill")
        try:
            params = json.loads(data).get("kv_transfer_params")
        except (ValueError, AttributeError) as exc:
            raise ProxyError(502, f"prefill {url} returned invalid JSON: {exc}") from exc
        if not isinstance(params, dict):
            logger.warning(
                "prefill %s returned no kv_transfer_params for %s; the decode instance "
                "computes the prompt itself",
                url,
                headers["X-Request-Id"],
            )
            return None
        return params

    async def _start_push(
        self, path: str, body: dict[str, Any], chat: bool, headers: dict[str, str]
    ) -> dict[str, Any]:
        """Push mode: starts the prefill request in the background and returns the decode
        request's transfer params (the prefill's endpoint and the shared transfer id)."""
        url = next(self._next_prefill)
        endpoints = await self._push_endpoints(url, body, headers)
        transfer_id = uuid.uuid4().hex
        p_body = prefill_body(
            body, chat, {"do_remote_decode": True, PUSH_KEY: {"transfer_id": transfer_id}}
        )
        task = asyncio.create_task(self._post(url + path, p_body, headers, "prefill"))
        self._prefills.add(task)
        task.add_done_callback(lambda t: self._prefill_done(t, url, headers["X-Request-Id"]))
        return {
            "do_remote_prefill": True,
            PUSH_KEY: {"transfer_id": transfer_id, "prefill": endpoints},
        }

    def _prefill_done(self, task: asyncio.Task[Any], url: str, request_id: str) -> None:
        self._prefills.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            # The decode instance waits for the push until its load deadline, then fails
            # or recomputes the request (its kv_load_failure_policy). A restarted prefill
            # has a new endpoint: probe it again next time.
            self._endpoints.pop(url, None)
            logger.warning("push-mode prefill of %s on %s failed: %s", request_id, url, exc)

    async def _push_endpoints(
        self, url: str, body: dict[str, Any], headers: dict[str, str]
    ) -> list[Any]:
        """The prefill instance's push endpoints, from a one-token probe (cached)."""
        endpoints = self._endpoints.get(url)
        if endpoints:
            return endpoints
        probe = {
            "model": body.get("model"),
            "prompt": [0],
            "max_tokens": 1,
            "kv_transfer_params": {PROBE_KEY: True},
        }
        _, data = await self._post(url + "/v1/completions", probe, headers, "prefill")
        try:
            endpoints = json.loads(data)["kv_transfer_params"][ENDPOINT_KEY]
        except (ValueError, KeyError, TypeError) as exc:
            raise ProxyError(
                502, f"prefill {url} returned no push endpoint (is it LlumnixConnector?)"
            ) from exc
        if not isinstance(endpoints, list) or not endpoints:
            raise ProxyError(502, f"prefill {url} has no push endpoint yet")
        self._endpoints[url] = endpoints
        return endpoints

    async def _post(
        self, url: str, body: dict[str, Any], headers: dict[str, str], role: str
    ) -> tuple[int, bytes]:
        """POSTs ``body``; returns (status, body) of a 2xx answer, raises ProxyError."""
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        try:
            async with self.session.post(url, json=body, headers=headers, timeout=timeout) as r:
                data = await r.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise _connection_error(role, url, exc) from exc
        if not 200 <= r.status < 300:
            raise _upstream_status_error(role, url, r.status, data)
        return r.status, data

    async def _stream(
        self, request: web.Request, url: str, body: dict[str, Any], headers: dict[str, str]
    ) -> web.StreamResponse:
        """Passes the decode instance's SSE stream through; ``timeout`` bounds the connect and
        every wait for the next chunk."""
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self.timeout, sock_read=self.timeout
        )
        try:
            upstream = await self.session.post(url, json=body, headers=headers, timeout=timeout)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            return _connection_error("decode", url, exc).response()
        async with upstream:
            if upstream.status != 200:
                try:
                    data = await upstream.read()
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    return _connection_error("decode", url, exc).response()
                return _upstream_status_error("decode", url, upstream.status, data).response()
            resp = web.StreamResponse(
                status=200,
                headers={
                    "Content-Type": upstream.headers.get("Content-Type", "text/event-stream"),
                    "Cache-Control": "no-cache",
                    "X-Request-Id": headers["X-Request-Id"],
                },
            )
            await resp.prepare(request)
            try:
                async for chunk in upstream.content.iter_any():
                    await resp.write(chunk)
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                # The status line is sent already: report the failure as an SSE event.
                err = _connection_error("decode", url, exc)
                event = {"error": {"message": err.message, "type": err.kind, "code": err.status}}
                with contextlib.suppress(ConnectionError):
                    await resp.write(f"data: {json.dumps(event)}\n\n".encode())
            except ConnectionError:
                # The client went away; leaving the block closes the upstream connection,
                # which aborts the request on the decode instance.
                logger.info("client of %s disconnected", headers["X-Request-Id"])
                return resp
            with contextlib.suppress(ConnectionError):
                await resp.write_eof()
            return resp

    async def _healthy(self, url: str) -> bool:
        timeout = aiohttp.ClientTimeout(total=min(self.timeout, HEALTH_TIMEOUT_S))
        try:
            async with self.session.get(url + "/health", timeout=timeout) as resp:
                return resp.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return False


def _forwarded(request: web.Request) -> dict[str, str]:
    return {h: request.headers[h] for h in FORWARDED_HEADERS if h in request.headers}


def _connection_error(role: str, url: str, exc: BaseException) -> ProxyError:
    if isinstance(exc, asyncio.TimeoutError):
        return ProxyError(504, f"{role} instance {url} timed out", "upstream_timeout")
    return ProxyError(502, f"{role} instance {url} failed: {type(exc).__name__}: {exc}")


def _upstream_status_error(role: str, url: str, status: int, data: bytes) -> ProxyError:
    """A non-2xx upstream answer: client errors keep their status and message."""
    message = data.decode(errors="replace")[:2000]
    with contextlib.suppress(ValueError, AttributeError, TypeError, KeyError):
        message = str(json.loads(data)["error"]["message"])
    if 400 <= status < 500:
        return ProxyError(status, f"{role} instance: {message}", "invalid_request_error")
    return ProxyError(502, f"{role} instance {url} answered {status}: {message}")


PROXY_KEY = web.AppKey("pd_proxy", PdProxy)


def build_app(
    prefill_urls: Sequence[str],
    decode_urls: Sequence[str],
    timeout: float = 300.0,
    mode: str = "pull",
) -> web.Application:
    """The proxy as an aiohttp application (its client session opens and closes with it)."""
    proxy = PdProxy(prefill_urls, decode_urls, timeout, mode)
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[PROXY_KEY] = proxy
    app.on_startup.append(proxy.start)
    app.on_cleanup.append(proxy.close)
    app.router.add_post("/v1/completions", proxy.completions)
    app.router.add_post("/v1/chat/completions", proxy.chat_completions)
    app.router.add_get("/v1/models", proxy.models)
    app.router.add_get("/health", proxy.health)
    return app


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="llumnix-pd-proxy",
        description="OpenAI-compatible prefill-decode proxy for vLLM instances with a PD KV "
        "connector (for example LlumnixConnector).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument(
        "--prefill",
        action="append",
        required=True,
        metavar="URL",
        help="a prefill instance's base URL, e.g. http://127.0.0.1:8100 (repeatable)",
    )
    parser.add_argument(
        "--decode",
        action="append",
        required=True,
        metavar="URL",
        help="a decode instance's base URL (repeatable)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="seconds: bound of each upstream call (of each wait for the next chunk when "
        "streaming)",
    )
    parser.add_argument(
        "--mode",
        choices=MODES,
        default="pull",
        help="pull: prefill first, then the decode reads the KV; push: both at once, the "
        "prefill writes each layer's KV into the decode's blocks (LlumnixConnector)",
    )
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app = build_app(args.prefill, args.decode, args.timeout, args.mode)
    logger.info(
        "PD proxy (%s mode) on http://%s:%d: prefill %s, decode %s",
        args.mode,
        args.host,
        args.port,
        args.prefill,
        args.decode,
    )
    web.run_app(app, host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
