"""The authenticated CDP proxy on the public port.

Every request is authenticated from its head, before anything reaches Chromium. Discovery endpoints
(``/json/version``, ``/json/list``...) are fetched from Chromium and answered with URLs that work from
outside, token included. WebSocket upgrades are forwarded to Chromium with a rebuilt handshake (fixed
``Host``, no ``Origin``, no query, no compression offer); once Chromium answers 101, the two TCP
connections are spliced and bytes flow straight through.

Why bytes and not messages: a message relay parses, unmasks, re-frames and re-masks every message and
buffers each one whole; the byte relay does none of that, so a 256 MiB message costs no more memory than
the transports' write buffers (backpressure pauses the reading side) and a small command costs one
``write`` per hop. The relay still follows frame headers (not payloads) in both directions, which is
enough to count messages and to close a client with a proper close frame between two messages.

Design of the relay: asyncio protocols, because ``data_received`` can write to the other transport
synchronously; a stream-based pump pays two event-loop round trips per chunk, which is most of the
latency budget of a small CDP command. Each connection still has one task in the proxy's task group,
which owns the connection's lifetime and cleanup.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Protocol, cast
from urllib.parse import parse_qsl, quote, urlsplit

import anyio
import anyio.abc

from controller import httpio
from controller.auth import TokenVerifier
from controller.config import ProxyConfig
from controller.errors import AuthError
from controller.logs import bind_context, get_logger
from controller.metrics import Metrics, Traffic

__all__ = ["CdpProxy", "ConnectionObserver", "FrameTracker", "Upstream", "route_request"]

log = get_logger(__name__)

_HOST_RE = re.compile(
    r"^(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]{2,45}\])(?::\d{1,5})?$"
)
_ID = r"[A-Za-z0-9_-]{1,128}"
_WS_KEY_RE = re.compile(r"^[A-Za-z0-9+/]{22}==$")
# Write-buffer high-water mark per transport: how much one direction may hold before the other side's
# reading is paused. Large enough for full-speed copies, small enough to bound memory per connection.
_WRITE_HIGH = 4 * 1024 * 1024
_WRITE_LOW = 1024 * 1024


class ConnectionObserver(Protocol):
    """What the app wants to hear about WebSocket clients."""

    def client_connected(self, active: int) -> None:
        """A client's WebSocket is relayed; ``active`` counts the open ones now."""

    def client_disconnected(self, active: int) -> None:
        """A client's WebSocket ended; ``active`` counts the open ones now."""


@dataclass(frozen=True, slots=True)
class Upstream:
    """Chromium's DevTools endpoint: always 127.0.0.1, never derived from a request."""

    port: int
    browser_path: str


@dataclass(frozen=True, slots=True)
class Route:
    """Where an allow-listed request goes."""

    kind: Literal["websocket", "discovery", "passthrough"]
    upstream_path: str
    method: str
    endpoint: str  # a fixed name for metrics and logs, never the request's own text


_EXACT: dict[str, tuple[Literal["discovery", "passthrough"], str, str]] = {
    "/json/version": ("discovery", "GET", "version"),
    "/json": ("discovery", "GET", "list"),
    "/json/list": ("discovery", "GET", "list"),
    "/json/protocol": ("passthrough", "GET", "protocol"),
}
_PATTERNS: tuple[tuple[re.Pattern[str], Literal["websocket", "discovery", "passthrough"], str, str], ...] = (
    (re.compile(rf"^/devtools/browser/{_ID}$"), "websocket", "GET", "browser"),
    (re.compile(rf"^/devtools/page/{_ID}$"), "websocket", "GET", "page"),
    (re.compile(rf"^/json/activate/{_ID}$"), "passthrough", "GET", "activate"),
    (re.compile(rf"^/json/close/{_ID}$"), "passthrough", "GET", "close"),
)
# /json/new?<url>: the URL is Chromium's to parse; it must not smuggle a second request line or host.
_NEW_QUERY_RE = re.compile(r"^[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]{0,4096}$")


def route_request(request: httpio.Request, upstream: Upstream) -> Route | None:
    """Map a request to its upstream path, or None when it is not on the allow-list.

    Matching is done on the raw path, never a decoded one: ``%2e%2e``, ``..``, ``//host`` or
    ``@host`` simply match nothing.
    """
    path = request.path
    if request.target.startswith("/") and not request.target.startswith("//"):
        if path in {"/", "/devtools/browser"}:
            return Route("websocket", upstream.browser_path, "GET", "browser")
        trimmed = path[:-1] if path.endswith("/") and len(path) > 1 else path
        if trimmed in _EXACT:
            exact_kind, method, endpoint = _EXACT[trimmed]
            return Route(exact_kind, trimmed, method, endpoint)
        if trimmed == "/json/new":
            query = signing_key_removed(request.query)
            if not _NEW_QUERY_RE.match(query):
                return None
            return Route("discovery", f"/json/new?{query}" if query else "/json/new", "PUT", "new")
        for pattern, kind, method, endpoint in _PATTERNS:
            if pattern.match(path):
                return Route(kind, path, method, endpoint)
    return None


def signing_key_removed(query: str) -> str:
    """The query without its ``signingKey`` parameter (the rest kept byte for byte)."""
    if "signingKey" not in query:
        return query
    return "&".join(p for p in query.split("&") if p.split("=", 1)[0] != "signingKey")


def token_from(request: httpio.Request) -> str | None:
    """The signing key from the ``Authorization`` header, ``x-bb-signing-key`` or the query."""
    authorization = request.header("authorization")
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    header = request.header("x-bb-signing-key")
    if header:
        return header
    if "signingKey" in request.query:
        for name, value in parse_qsl(request.query, keep_blank_values=True):
            if name == "signingKey":
                return value
    return None


def rewrite_discovery(body: bytes, *, host: str, token: str, scheme: str, chrome_port: int) -> bytes:
    """Rewrite every DevTools URL of a discovery answer to the client's host, with its token.

    Args:
        body: Chromium's JSON answer (an object or a list of targets).
        host: the ``Host`` the client used (already validated).
        token: the client's signing key.
        scheme: ``ws`` or ``wss``.
        chrome_port: Chromium's DevTools port, whose URLs are replaced.

    Returns:
        The rewritten JSON (the body unchanged when it is not JSON).
    """
    try:
        document: Any = json.loads(body)
    except ValueError:
        return body
    suffix = f"?signingKey={quote(token, safe='')}"
    local = {f"127.0.0.1:{chrome_port}", f"localhost:{chrome_port}"}

    def external_ws(url: str) -> str:
        parts = urlsplit(url)
        if parts.netloc not in local:
            return url
        return f"{scheme}://{host}{parts.path}{suffix}"

    def frontend(url: str) -> str:
        def replace(match: re.Match[str]) -> str:
            netloc, path = match.group(2), match.group(3)
            if netloc not in local:
                return match.group(0)
            return match.group(1) + quote(f"{host}{path}{suffix}", safe="/:")

        return re.sub(r"([?&]wss?=)([^/&]+)(/[^&#]*)", replace, url)

    def fix(target: Any) -> Any:
        if isinstance(target, dict):
            if isinstance(target.get("webSocketDebuggerUrl"), str):
                target["webSocketDebuggerUrl"] = external_ws(target["webSocketDebuggerUrl"])
            if isinstance(target.get("devtoolsFrontendUrl"), str):
                target["devtoolsFrontendUrl"] = frontend(target["devtoolsFrontendUrl"])
        return target

    document = [fix(item) for item in document] if isinstance(document, list) else fix(document)
    return json.dumps(document, indent=3).encode()


class FrameTracker:
    """Follows WebSocket frame boundaries through one direction of a raw byte stream.

    Only headers are read (payload bytes are skipped by count), so following costs a few operations
    per frame whatever its size.
    """

    __slots__ = ("_head", "_need", "close_seen", "messages")

    def __init__(self) -> None:
        self._need = 0
        self._head = b""
        self.messages = 0
        self.close_seen = False

    @property
    def at_boundary(self) -> bool:
        """True between two frames."""
        return self._need == 0 and not self._head

    def feed(self, data: bytes, *, stop_at_boundary: bool = False) -> int:
        """Account for ``data``; return how many of its bytes were consumed.

        With ``stop_at_boundary`` consumption stops at the first frame boundary (possibly at 0).
        """
        n = len(data)
        pos = 0
        while pos < n:
            if self._need:
                take = min(self._need, n - pos)
                self._need -= take
                pos += take
                continue
            if stop_at_boundary and not self._head:
                return pos
            head = self._head + data[pos : pos + 14]
            if len(head) < 2:
                self._head = head
                return n
            b0, b1 = head[0], head[1]
            length = b1 & 0x7F
            size = 2 + (2 if length == 126 else 8 if length == 127 else 0) + (4 if b1 & 0x80 else 0)
            if len(head) < size:
                self._head = head
                return n
            if length == 126:
                length = int.from_bytes(head[2:4], "big")
            elif length == 127:
                length = int.from_bytes(head[2:10], "big")
            pos += size - len(self._head)
            self._head = b""
            self._need = length
            opcode = b0 & 0x0F
            if opcode < 8:
                if b0 & 0x80:
                    self.messages += 1
            elif opcode == 8:
                self.close_seen = True
        return pos


def close_frame(code: int, reason: str) -> bytes:
    """An unmasked (server-to-client) close frame."""
    payload = code.to_bytes(2, "big") + reason.encode()[:120]
    return bytes([0x88, len(payload)]) + payload


class _Side(asyncio.Protocol):
    """One TCP connection of a relayed pair; before splicing it buffers a head."""

    def __init__(self, relay: _Relay) -> None:
        self.relay = relay
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.head_ready = asyncio.Event()
        self.lost = asyncio.Event()
        self.peer: _Side | None = None
        self.tracker = FrameTracker()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport by construction (TCP); a cast, not isinstance, so other loops' transports
        # (uvloop's do not subclass asyncio.Transport) work too.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=_WRITE_HIGH, low=_WRITE_LOW)

    def data_received(self, data: bytes) -> None:
        if self.peer is not None:
            self.relay.forward(self, data)
            return
        self.buffer += data
        if b"\r\n\r\n" in self.buffer:
            self.head_ready.set()
            assert self.transport is not None
            self.transport.pause_reading()  # nothing more until the request is decided
        elif len(self.buffer) > self.relay.max_head:
            self.head_ready.set()

    def eof_received(self) -> bool | None:
        self.head_ready.set()
        return None  # close our side; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.head_ready.set()
        self.lost.set()
        self.relay.side_lost(self)

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        # Going away still finishes the frame in flight; only after the goodbye does Chromium stay paused.
        if self.peer is not None and self.peer.transport is not None and not self.relay.said_goodbye:
            self.peer.transport.resume_reading()


class _Relay:
    """The state of one client connection: the head, then maybe a spliced WebSocket."""

    def __init__(self, traffic: Traffic, max_head: int) -> None:
        self.traffic = traffic
        self.max_head = max_head
        self.client = _Side(self)
        self.browser: _Side | None = None
        self.spliced = False
        self.going_away = False
        self.said_goodbye = False
        self.closing_code: int | None = None
        self.closing_reason = ""
        self.done = asyncio.Event()

    def splice(self, browser: _Side) -> None:
        """Join the two connections; from now on bytes flow straight through."""
        client = self.client
        assert client.transport is not None and browser.transport is not None
        self.browser = browser
        client.peer, browser.peer = browser, client
        self.spliced = True
        if browser.buffer:  # frames Chromium sent right behind its 101
            self.forward(browser, bytes(browser.buffer))
            browser.buffer.clear()
        if client.buffer:
            self.forward(client, bytes(client.buffer))
            client.buffer.clear()
        client.transport.resume_reading()
        browser.transport.resume_reading()

    def forward(self, source: _Side, data: bytes) -> None:
        """Relay a chunk from ``source`` to its peer (the hot path: keep it lean)."""
        peer = source.peer
        assert peer is not None and peer.transport is not None
        tracker = source.tracker
        before = tracker.messages
        if source is self.client:
            tracker.feed(data)
            if self.going_away:
                # Chromium is no longer listening; wait only for the client's close frame.
                if tracker.close_seen and source.transport is not None:
                    source.transport.close()
                return
            self.traffic.messages_to_browser += tracker.messages - before
            self.traffic.bytes_to_browser += len(data)
            peer.transport.write(data)
            return
        if self.going_away:
            # Deliver up to the end of the current frame, then say goodbye between two frames.
            data = data[: tracker.feed(data, stop_at_boundary=True)]
        else:
            tracker.feed(data)
        self.traffic.messages_from_browser += tracker.messages - before
        self.traffic.bytes_from_browser += len(data)
        if data:
            peer.transport.write(data)
        if self.going_away and tracker.at_boundary:
            self._goodbye()

    def go_away(self, code: int, reason: str) -> None:
        """Close the client with ``code`` at the next frame boundary; stop talking to Chromium."""
        if self.going_away or not self.spliced:
            return
        self.going_away = True
        self.closing_code, self.closing_reason = code, reason
        if self.browser is not None and self.browser.tracker.at_boundary:
            self._goodbye()

    def _goodbye(self) -> None:
        if self.said_goodbye:
            return
        self.said_goodbye = True
        browser, client = self.browser, self.client
        if browser is not None and browser.transport is not None:
            browser.transport.pause_reading()
            browser.transport.close()
        if client.transport is not None and not client.transport.is_closing():
            client.transport.write(close_frame(self.closing_code or 1001, self.closing_reason))
            # The client answers with its own close frame (see forward), then the TCP connection closes.

    def side_lost(self, side: _Side) -> None:
        """One TCP connection ended: end the other one the way the situation calls for."""
        if side is self.client:
            if self.browser is not None and self.browser.transport is not None:
                self.browser.transport.close()
        elif self.spliced:
            client = self.client.transport
            if client is not None and not client.is_closing():
                if not self.going_away and side.tracker.close_seen:
                    client.close()  # a normal close started by Chromium: flush and end
                elif side.tracker.at_boundary and not self.said_goodbye:
                    # Chromium dropped the connection without a close frame (it died, or the target was
                    # closed): the client learns it with 1011 rather than a bare TCP close.
                    if not self.going_away:
                        self.closing_code, self.closing_reason = 1011, "browser closed the connection"
                    self.going_away = self.said_goodbye = True
                    client.write(close_frame(self.closing_code or 1011, self.closing_reason))
                    client.close()
                elif not self.said_goodbye:
                    client.abort()  # mid-frame: nothing sensible can follow
            self.going_away = True
        if self.client.lost.is_set() and (self.browser is None or self.browser.lost.is_set()):
            self.done.set()

    def abort(self) -> None:
        """Drop both connections at once."""
        for side in (self.client, self.browser):
            if side is not None and side.transport is not None:
                side.transport.abort()


class CdpProxy:
    """The public CDP proxy: an async context manager that listens until closed."""

    def __init__(
        self,
        config: ProxyConfig,
        verifier: TokenVerifier,
        upstream: Upstream,
        metrics: Metrics,
        observer: ConnectionObserver,
        *,
        drain_timeout: float,
    ) -> None:
        """Prepare the proxy.

        Args:
            config: listen address, port and handshake bounds.
            verifier: checks every request's token.
            upstream: Chromium's DevTools port and browser target path.
            metrics: counters and gauges of the proxy.
            observer: told when WebSocket clients come and go.
            drain_timeout: how long closing waits for clients to answer the 1001 close.
        """
        self._config = config
        self._verifier = verifier
        self._upstream = upstream
        self._metrics = metrics
        self._observer = observer
        self._drain_timeout = drain_timeout
        self._relays: set[_Relay] = set()
        self._active = 0
        self._ids = itertools.count(1)
        self._server: asyncio.Server | None = None
        self._stack = AsyncExitStack()
        self._tg: anyio.abc.TaskGroup | None = None
        self.port = 0

    @property
    def active(self) -> int:
        """WebSocket clients relayed right now."""
        return self._active

    async def __aenter__(self) -> CdpProxy:
        await self._stack.__aenter__()
        self._tg = await self._stack.enter_async_context(anyio.create_task_group())
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(
                self._accept, self._config.host, self._config.port, reuse_address=True, backlog=256
            )
        except BaseException:
            await self._stack.aclose()
            raise
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("proxy_listening", port=self.port)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop accepting, close every client with 1001 (bounded), then release everything."""
        with anyio.CancelScope(shield=True):
            if self._server is not None:
                self._server.close()
            for relay in list(self._relays):
                if relay.spliced:
                    relay.go_away(1001, "controller shutting down")
                else:
                    relay.abort()
            with anyio.move_on_after(self._drain_timeout):
                for relay in list(self._relays):
                    await relay.done.wait()
            for relay in list(self._relays):
                relay.abort()
            if self._tg is not None:
                self._tg.cancel_scope.cancel()
        # Outside the shield: a task group's scope must be exited as the current one.
        await self._stack.aclose()
        if self._server is not None:
            with anyio.move_on_after(1, shield=True):
                await self._server.wait_closed()
            self._server = None

    def abort_all(self) -> None:
        """Drop every client at once (a second signal: no more waiting for close replies)."""
        for relay in list(self._relays):
            relay.abort()

    def _accept(self) -> _Side:
        relay = _Relay(self._metrics.traffic, self._config.max_head_bytes)
        self._relays.add(relay)
        assert self._tg is not None
        self._tg.start_soon(self._serve, relay)
        return relay.client

    async def _serve(self, relay: _Relay) -> None:
        # This task's own context: every line it logs carries the connection's id.
        bind_context(conn_id=next(self._ids))
        try:
            await self._handle(relay)
        except Exception:
            log.exception("proxy_connection_error")
        finally:
            client = relay.client
            if client.transport is not None and client.transport.is_closing() and not client.lost.is_set():
                # An answer is still flushing (a large /json/protocol): let it, within the bound.
                with anyio.move_on_after(self._config.handshake_timeout):
                    await client.lost.wait()
            relay.abort()
            self._relays.discard(relay)

    async def _handle(self, relay: _Relay) -> None:
        client = relay.client
        with anyio.move_on_after(self._config.handshake_timeout):
            await client.head_ready.wait()
        transport = client.transport
        if transport is None or client.lost.is_set():
            return
        head, sep, rest = bytes(client.buffer).partition(b"\r\n\r\n")
        if not sep or len(head) > self._config.max_head_bytes:
            status = 431 if len(client.buffer) > self._config.max_head_bytes else 408
            self._reply(relay, status, "bad_request", f"incomplete request head ({status})")
            return
        try:
            request = httpio.parse_request_head(head)
        except httpio.HttpError as exc:
            self._reply(relay, exc.status, "bad_request", str(exc))
            return
        client.buffer = bytearray(rest)

        if request.path == "/health" and request.method in {"GET", "HEAD"}:
            self._send(relay, httpio.response_bytes(200, b"ok\n"))
            return
        token = token_from(request)
        try:
            self._verifier.verify(token)
        except AuthError as exc:
            self._metrics.cdp_requests_rejected.labels(f"auth_{exc.reason}").inc()
            log.warning("proxy_auth_rejected", reason=exc.reason, path=_loggable(request.path))
            self._send(relay, httpio.response_bytes(401, f"unauthorized: {exc.reason}\n".encode()))
            return
        assert token is not None
        route = route_request(request, self._upstream)
        if route is None:
            self._reply(relay, 404, "not_found", "path not allowed", path=_loggable(request.path))
            return
        upgrade = "websocket" in request.headers.get("upgrade", "").lower()
        if route.kind == "websocket":
            if not upgrade:
                self._reply(relay, 400, "not_websocket", "websocket upgrade required")
                return
            await self._relay_websocket(relay, request, route)
            return
        if upgrade:
            self._reply(relay, 404, "not_found", "no websocket here", path=_loggable(request.path))
            return
        if request.method != route.method and not (route.method == "GET" and request.method == "HEAD"):
            self._reply(relay, 405, "method_not_allowed", f"{request.method} not allowed")
            return
        await self._answer_http(relay, request, route, token)

    def _reply(self, relay: _Relay, status: int, reason: str, detail: str, **fields: Any) -> None:
        self._metrics.cdp_requests_rejected.labels(reason).inc()
        log.info("proxy_request_refused", status=status, reason=reason, detail=detail, **fields)
        self._send(relay, httpio.response_bytes(status, f"{detail}\n".encode()))

    def _send(self, relay: _Relay, data: bytes) -> None:
        """Answer the client and close; the proxy's own answers are not counted as relayed bytes."""
        transport = relay.client.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)
            transport.close()

    async def _answer_http(self, relay: _Relay, request: httpio.Request, route: Route, token: str) -> None:
        try:
            response = await httpio.fetch(
                "127.0.0.1", self._upstream.port, route.method, route.upstream_path, timeout=10.0
            )
        except (OSError, TimeoutError, httpio.HttpError) as exc:
            self._reply(relay, 502, "upstream_unavailable", "browser unavailable", error=type(exc).__name__)
            return
        body = response.body
        if route.kind == "discovery" and response.status == 200:
            host = request.header("host") or f"127.0.0.1:{self.port}"
            if not _HOST_RE.match(host):
                self._reply(relay, 400, "bad_host", "invalid Host header")
                return
            proto = request.header("x-forwarded-proto") or ""
            scheme = "wss" if proto.lower() == "https" else "ws"
            body = rewrite_discovery(
                body, host=host, token=token, scheme=scheme, chrome_port=self._upstream.port
            )
        self._metrics.cdp_http_requests.labels(route.endpoint).inc()
        content_type = response.headers.get("content-type", "application/json; charset=UTF-8")
        if request.method == "HEAD":
            body = b""
        answer = httpio.response_bytes(response.status, body, content_type=content_type)
        traffic = self._metrics.traffic
        traffic.bytes_to_browser += len(request.target)
        traffic.bytes_from_browser += len(answer)
        self._send(relay, answer)

    async def _relay_websocket(self, relay: _Relay, request: httpio.Request, route: Route) -> None:
        key = request.header("sec-websocket-key") or ""
        if request.header("sec-websocket-version") != "13" or not _WS_KEY_RE.match(key):
            self._reply(relay, 400, "bad_handshake", "invalid websocket handshake")
            return
        lines = [
            f"GET {route.upstream_path} HTTP/1.1",
            f"Host: 127.0.0.1:{self._upstream.port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
        ]
        # No Origin (Chromium refuses any), no extensions (deflate costs 0.08-0.4x throughput), no cookies.
        handshake = ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")
        loop = asyncio.get_running_loop()
        browser = _Side(relay)
        try:
            with anyio.fail_after(self._config.handshake_timeout):
                await loop.create_connection(lambda: browser, "127.0.0.1", self._upstream.port)
                assert browser.transport is not None
                browser.transport.write(handshake)
                await browser.head_ready.wait()
        except (OSError, TimeoutError) as exc:
            if browser.transport is not None:
                browser.transport.abort()
            self._reply(relay, 502, "upstream_unavailable", "browser unavailable", error=type(exc).__name__)
            return
        head, sep, rest = bytes(browser.buffer).partition(b"\r\n\r\n")
        status = 0
        if sep:
            try:
                status, _headers = httpio.parse_response_head(head)
            except httpio.HttpError:
                status = 0
        if status != 101:
            assert browser.transport is not None
            browser.transport.abort()
            self._reply(
                relay,
                502 if status == 0 else status,
                "upstream_refused",
                "browser refused the connection",
                upstream_status=status,
            )
            return
        client_transport = relay.client.transport
        if client_transport is None or relay.client.lost.is_set():
            assert browser.transport is not None
            browser.transport.abort()
            return
        client_transport.write(head + sep)
        browser.buffer = bytearray(rest)
        relay.splice(browser)
        self._metrics.traffic.bytes_from_browser += len(head) + len(sep)
        await self._track(relay, route)

    async def _track(self, relay: _Relay, route: Route) -> None:
        started = time.monotonic()
        self._active += 1
        self._metrics.cdp_connections_accepted.inc()
        self._metrics.cdp_connections_active.set(self._active)
        target = route.endpoint
        log.info("cdp_connected", target=target, active=self._active)
        self._observer.client_connected(self._active)
        try:
            await relay.done.wait()
        finally:
            self._active -= 1
            self._metrics.cdp_connections_active.set(self._active)
            to_browser = relay.client.tracker.messages
            from_browser = relay.browser.tracker.messages if relay.browser else 0
            log.info(
                "cdp_disconnected",
                target=target,
                active=self._active,
                seconds=round(time.monotonic() - started, 3),
                messages_to_browser=to_browser,
                messages_from_browser=from_browser,
                close_code=relay.closing_code,
            )
            self._observer.client_disconnected(self._active)


def _loggable(path: str) -> str:
    """A request path fit for a log line: bounded, and never a query (tokens travel there)."""
    return path.split("?", 1)[0][:200]
