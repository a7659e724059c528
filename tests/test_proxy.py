"""The proxy's parts: routing, token extraction, discovery rewriting, frame tracking, and its handshakes.

The last section runs the proxy in front of a fake DevTools endpoint that records exactly what reaches
it, to pin down what the proxy sends toward Chromium and how it answers malformed requests.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import suppress
from dataclasses import dataclass, field

import anyio
import anyio.abc
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream
from websockets.exceptions import InvalidStatus
from websockets.frames import Close, Frame, Opcode
from websockets.typing import Origin
from websockets.utils import accept_key

from controller import httpio
from controller.config import ProxyConfig
from controller.metrics import Metrics
from controller.proxy import (
    CdpProxy,
    FrameTracker,
    Upstream,
    close_frame,
    rewrite_discovery,
    route_request,
    signing_key_removed,
    token_from,
)
from tests.chromium_fixtures import RecordingObserver, http_request, make_verifier, mint, ws_connect

UPSTREAM = Upstream(9222, "/devtools/browser/1b2c3d4e-aaaa-bbbb-cccc-0123456789ab")
PAGE_ID = "8E1A0B6C2D4F4A3B9C7D6E5F4A3B2C1D"


def request(target: str, method: str = "GET", **headers: str) -> httpio.Request:
    """A parsed request with ``target`` exactly as given."""
    return httpio.Request(method, target, {k.lower().replace("_", "-"): v for k, v in headers.items()})


# --- routing ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "kind", "upstream_path", "method"),
    [
        ("/", "websocket", UPSTREAM.browser_path, "GET"),
        ("/?signingKey=abc", "websocket", UPSTREAM.browser_path, "GET"),
        ("/devtools/browser", "websocket", UPSTREAM.browser_path, "GET"),
        (f"/devtools/browser/{PAGE_ID}", "websocket", f"/devtools/browser/{PAGE_ID}", "GET"),
        (f"/devtools/page/{PAGE_ID}", "websocket", f"/devtools/page/{PAGE_ID}", "GET"),
        (f"/devtools/page/{PAGE_ID}?signingKey=abc", "websocket", f"/devtools/page/{PAGE_ID}", "GET"),
        ("/json/version", "discovery", "/json/version", "GET"),
        ("/json/version/?signingKey=abc", "discovery", "/json/version", "GET"),
        ("/json", "discovery", "/json", "GET"),
        ("/json/", "discovery", "/json", "GET"),
        ("/json/list", "discovery", "/json/list", "GET"),
        ("/json/list/", "discovery", "/json/list", "GET"),
        ("/json/protocol", "passthrough", "/json/protocol", "GET"),
        ("/json/new?about:blank", "discovery", "/json/new?about:blank", "PUT"),
        ("/json/new", "discovery", "/json/new", "PUT"),
        (f"/json/activate/{PAGE_ID}", "passthrough", f"/json/activate/{PAGE_ID}", "GET"),
        (f"/json/close/{PAGE_ID}", "passthrough", f"/json/close/{PAGE_ID}", "GET"),
    ],
)
def test_allowed_routes(target: str, kind: str, upstream_path: str, method: str) -> None:
    """Each path of the CDP surface maps to its upstream path, without the client's query."""
    route = route_request(request(target), UPSTREAM)
    assert route is not None
    assert (route.kind, route.upstream_path, route.method) == (kind, upstream_path, method)
    assert "signingKey" not in route.upstream_path


@pytest.mark.parametrize(
    "target",
    [
        "@evil.example/x",
        "@127.0.0.1:1/x",
        "//evil.example/x",
        "//127.0.0.1:1/json/version",
        "http://evil.example/x",
        "http://127.0.0.1:9222/json/version",
        "ws://evil.example/devtools/browser",
        "/devtools/../json/new",
        "/devtools/%2e%2e/json/new",
        "/devtools/%2E%2E/json/new",
        "/json/new/../../x",
        "/json/version/..",
        "/json/version/../new",
        "/devtools/page/../../json/new",
        "/devtools/page/%2e%2e%2f%2e%2e%2fjson%2fnew",
        "/devtools/page/a/b",
        "/devtools/page/",
        "/devtools/page",
        "/devtools/browser/a/../../json/new",
        "/devtools/inspector.html",
        "/json/close",
        "/json/activate/",
        "/json/unknown",
        "/JSON/VERSION",
        "/json//version",
        "/./json/version",
        "/%6Ason/version",
        "/health/../json/new",
        "*",
        "",
        "/devtools/page/" + "a" * 129,
    ],
)
def test_hostile_and_unknown_paths_not_routed(target: str) -> None:
    """Off-list, traversing, encoded or host-bearing targets match nothing."""
    for method in ("GET", "PUT"):
        assert route_request(request(target, method), UPSTREAM) is None


def test_json_new_keeps_its_url_but_not_the_token() -> None:
    """/json/new passes the page URL on and drops signingKey, wherever it sits in the query."""
    for query in ("https://example.com/a?b=c&signingKey=T", "signingKey=T&https://example.com/a?b=c"):
        route = route_request(request(f"/json/new?{query}", "PUT"), UPSTREAM)
        assert route is not None
        assert route.upstream_path in {
            "/json/new?https://example.com/a?b=c",
            "/json/new?https://example.com/a",
        }
        assert "signingKey" not in route.upstream_path


@pytest.mark.parametrize("query", ["<script>", "a b", 'x"y', "a\\b", "x" * 5000])
def test_json_new_refuses_odd_urls(query: str) -> None:
    """/json/new with characters no URL needs (or an absurd length) is not routed."""
    assert route_request(request(f"/json/new?{query}", "PUT"), UPSTREAM) is None


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("", ""),
        ("signingKey=T", ""),
        ("a=1&signingKey=T&b=2", "a=1&b=2"),
        ("signingKeyX=1", "signingKeyX=1"),
        ("xsigningKey=1&y=2", "xsigningKey=1&y=2"),
        ("a=%20x&signingKey=T", "a=%20x"),
    ],
)
def test_signing_key_removed(query: str, expected: str) -> None:
    """Only the signingKey parameter is removed; the rest stays byte for byte."""
    assert signing_key_removed(query) == expected


# --- token extraction ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "headers", "expected"),
    [
        ("/", {"authorization": "Bearer tok1"}, "tok1"),
        ("/", {"authorization": "bearer  tok1 "}, "tok1"),
        ("/", {"x-bb-signing-key": "tok2"}, "tok2"),
        ("/?signingKey=tok3", {}, "tok3"),
        ("/?a=1&signingKey=tok%2E3&b=2", {}, "tok.3"),
        ("/?signingKey=q", {"authorization": "Bearer h"}, "h"),
        ("/?signingKey=q", {"x-bb-signing-key": "x"}, "x"),
        ("/", {"authorization": "Bearer a", "x-bb-signing-key": "b"}, "a"),
        ("/", {"authorization": "Basic dXNlcjpwYXNz"}, None),
        ("/", {"authorization": "Basic dXNlcjpwYXNz", "x-bb-signing-key": "b"}, "b"),
        ("/", {"authorization": "Bearer "}, None),
        ("/?signingKeyX=1", {}, None),
        ("/", {}, None),
    ],
)
def test_token_from(target: str, headers: dict[str, str], expected: str | None) -> None:
    """The token comes from Authorization: Bearer, then x-bb-signing-key, then the signingKey parameter."""
    assert token_from(httpio.Request("GET", target, headers)) == expected


# --- discovery rewriting ------------------------------------------------------------------------------------

VERSION = {
    "Browser": "Chrome/156.0.8078.79",
    "Protocol-Version": "1.3",
    "webSocketDebuggerUrl": f"ws://127.0.0.1:9222{UPSTREAM.browser_path}",
}
TARGETS = [
    {
        "id": PAGE_ID,
        "type": "page",
        "url": "about:blank",
        "devtoolsFrontendUrl": f"/devtools/inspector.html?ws=127.0.0.1:9222/devtools/page/{PAGE_ID}",
        "webSocketDebuggerUrl": f"ws://127.0.0.1:9222/devtools/page/{PAGE_ID}",
    },
    {"id": "W1", "type": "service_worker", "url": "https://example.com/sw.js"},
]


def test_rewrite_version() -> None:
    """/json/version's browser URL points at the client's host and carries its token; the rest stays."""
    body = rewrite_discovery(
        json.dumps(VERSION).encode(), host="proxy.example:9223", token="t.k-n_", scheme="ws", chrome_port=9222
    )
    rewritten = json.loads(body)
    assert (
        rewritten["webSocketDebuggerUrl"]
        == f"ws://proxy.example:9223{UPSTREAM.browser_path}?signingKey=t.k-n_"
    )
    assert rewritten["Browser"] == VERSION["Browser"]
    assert rewritten["Protocol-Version"] == "1.3"


def test_rewrite_list_every_url() -> None:
    """Every target's debugger and frontend URLs are rewritten; targets without URLs are left alone."""
    body = rewrite_discovery(
        json.dumps(TARGETS).encode(), host="10.0.0.5:9223", token="TOK", scheme="ws", chrome_port=9222
    )
    page, worker = json.loads(body)
    assert page["webSocketDebuggerUrl"] == f"ws://10.0.0.5:9223/devtools/page/{PAGE_ID}?signingKey=TOK"
    assert page["devtoolsFrontendUrl"].startswith("/devtools/inspector.html?ws=10.0.0.5:9223/devtools/page/")
    assert "signingKey%3DTOK" in page["devtoolsFrontendUrl"]
    assert worker == TARGETS[1]
    assert b"127.0.0.1:9222" not in body


def test_rewrite_frontend_url_with_full_origin() -> None:
    """A frontend URL hosted elsewhere keeps its origin; only its ws= target moves to the proxy."""
    target = dict(TARGETS[0])
    target["devtoolsFrontendUrl"] = (
        f"https://chrome-devtools-frontend.appspot.com/serve_rev/@abc/inspector.html"
        f"?ws=127.0.0.1:9222/devtools/page/{PAGE_ID}"
    )
    body = rewrite_discovery(
        json.dumps([target]).encode(), host="h:1", token="T", scheme="ws", chrome_port=9222
    )
    [page] = json.loads(body)
    assert page["devtoolsFrontendUrl"].startswith(
        "https://chrome-devtools-frontend.appspot.com/serve_rev/@abc/inspector.html?ws=h:1/devtools/page/"
    )
    assert "127.0.0.1:9222" not in page["devtoolsFrontendUrl"]


def test_rewrite_wss_scheme() -> None:
    """With scheme wss the debugger URL is wss://."""
    body = rewrite_discovery(
        json.dumps(VERSION).encode(), host="h", token="T", scheme="wss", chrome_port=9222
    )
    assert json.loads(body)["webSocketDebuggerUrl"].startswith("wss://h/devtools/browser/")


def test_rewrite_quotes_the_token() -> None:
    """A token with URL-special characters is percent-encoded in the URL it is put in."""
    body = rewrite_discovery(
        json.dumps(VERSION).encode(), host="h", token="a&b=c d", scheme="ws", chrome_port=9222
    )
    assert json.loads(body)["webSocketDebuggerUrl"].endswith("?signingKey=a%26b%3Dc%20d")


def test_rewrite_leaves_foreign_urls() -> None:
    """A URL that does not point at Chromium's own port is not touched."""
    document = {"webSocketDebuggerUrl": "ws://10.1.1.1:9222/devtools/browser/x"}
    body = rewrite_discovery(
        json.dumps(document).encode(), host="h", token="T", scheme="ws", chrome_port=9222
    )
    assert json.loads(body) == document


def test_rewrite_localhost_urls() -> None:
    """URLs Chromium builds with localhost are rewritten like 127.0.0.1 ones."""
    document = {"webSocketDebuggerUrl": f"ws://localhost:9222{UPSTREAM.browser_path}"}
    body = rewrite_discovery(
        json.dumps(document).encode(), host="h:2", token="T", scheme="ws", chrome_port=9222
    )
    assert json.loads(body)["webSocketDebuggerUrl"] == f"ws://h:2{UPSTREAM.browser_path}?signingKey=T"


@pytest.mark.parametrize("body", [b"", b"not json", b"<html>500</html>"])
def test_rewrite_non_json_unchanged(body: bytes) -> None:
    """A body that is not JSON passes unchanged."""
    assert rewrite_discovery(body, host="h", token="T", scheme="ws", chrome_port=9222) == body


# --- frame tracking -----------------------------------------------------------------------------------------


def frame(opcode: Opcode, data: bytes, *, fin: bool = True, mask: bool = False) -> bytes:
    """One serialized WebSocket frame, as websockets writes it."""
    return Frame(opcode, data, fin=fin).serialize(mask=mask)


@pytest.mark.parametrize("mask", [False, True], ids=["from-server", "from-client"])
@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 200_000])
def test_tracker_counts_messages_of_every_length_encoding(size: int, mask: bool) -> None:
    """7-bit, 16-bit and 64-bit payload lengths, masked or not, are each one message."""
    stream = frame(Opcode.TEXT, b"x" * size, mask=mask) + frame(Opcode.BINARY, b"y", mask=mask)
    tracker = FrameTracker()
    assert tracker.feed(stream) == len(stream)
    assert tracker.messages == 2
    assert tracker.at_boundary


def test_tracker_byte_by_byte_equals_whole() -> None:
    """Feeding one byte at a time gives the same counts as feeding everything at once."""
    stream = b"".join(
        [
            frame(Opcode.TEXT, b"a" * 300, mask=True),
            frame(Opcode.PING, b"p", mask=True),
            frame(Opcode.TEXT, b"b" * 70_000, mask=True),
            frame(Opcode.CLOSE, Close(1000, "bye").serialize(), mask=True),
        ]
    )
    tracker = FrameTracker()
    for index in range(len(stream)):
        assert tracker.feed(stream[index : index + 1]) == 1
    assert (tracker.messages, tracker.close_seen, tracker.at_boundary) == (2, True, True)


def test_tracker_fragmented_message_counts_once() -> None:
    """A message split into a first frame and continuations is one message."""
    stream = (
        frame(Opcode.TEXT, b"part1", fin=False)
        + frame(Opcode.PING, b"")  # control frames may interleave
        + frame(Opcode.CONT, b"part2", fin=False)
        + frame(Opcode.CONT, b"part3")
    )
    tracker = FrameTracker()
    tracker.feed(stream)
    assert tracker.messages == 1


def test_tracker_control_frames_are_not_messages() -> None:
    """Ping and pong are not counted; a close frame is noticed."""
    tracker = FrameTracker()
    tracker.feed(frame(Opcode.PING, b"1") + frame(Opcode.PONG, b"1"))
    assert (tracker.messages, tracker.close_seen) == (0, False)
    tracker.feed(frame(Opcode.CLOSE, Close(1001, "").serialize()))
    assert tracker.close_seen


def test_tracker_knows_when_it_is_mid_frame() -> None:
    """Inside a frame's header or payload the tracker is not at a boundary."""
    data = frame(Opcode.TEXT, b"z" * 1000)
    tracker = FrameTracker()
    tracker.feed(data[:1])
    assert not tracker.at_boundary
    tracker.feed(data[1:500])
    assert not tracker.at_boundary
    tracker.feed(data[500:])
    assert tracker.at_boundary


def test_tracker_stop_at_boundary() -> None:
    """With stop_at_boundary, consumption ends where the current frame ends."""
    first, second = frame(Opcode.TEXT, b"a" * 10), frame(Opcode.TEXT, b"b" * 10)
    tracker = FrameTracker()
    tracker.feed(first[:5])
    assert tracker.feed(first[5:] + second, stop_at_boundary=True) == len(first) - 5
    assert tracker.at_boundary and tracker.messages == 1
    assert tracker.feed(second, stop_at_boundary=True) == 0


def test_close_frame_is_a_valid_server_close() -> None:
    """close_frame() builds an unmasked close frame with the code and reason."""
    data = close_frame(1001, "controller shutting down")
    assert data[0] == 0x88 and not data[1] & 0x80
    assert Close.parse(data[2:]) == Close(1001, "controller shutting down")


def test_close_frame_reason_bounded() -> None:
    """A long reason is cut so the frame stays a valid control frame (payload ≤ 125 bytes)."""
    data = close_frame(1011, "x" * 500)
    assert data[1] <= 125 and len(data) == 2 + data[1]


# --- the proxy in front of a recording fake DevTools endpoint -----------------------------------------------


@dataclass
class FakeDevTools:
    """A stand-in for Chromium's DevTools port that records every request head it receives."""

    upgrade_status: int = 101
    heads: list[bytes] = field(default_factory=list)
    port: int = 0

    async def run(self, *, task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        """Listen on a free loopback port until cancelled."""
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        async with listener:
            self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
            task_status.started(self.port)
            await listener.serve(self._handle)

    async def _handle(self, stream: anyio.abc.SocketStream) -> None:
        async with stream:
            reader = BufferedByteReceiveStream(stream)
            try:
                head = await reader.receive_until(b"\r\n\r\n", 65536)
            except (anyio.IncompleteRead, anyio.DelimiterNotFound):
                return
            self.heads.append(head)
            parsed = httpio.parse_request_head(head)
            if parsed.header("upgrade") is None:
                body = json.dumps({**VERSION, "webSocketDebuggerUrl": f"ws://127.0.0.1:{self.port}/x/y"})
                await stream.send(httpio.response_bytes(200, body.encode(), content_type="application/json"))
                return
            if self.upgrade_status != 101:
                await stream.send(httpio.response_bytes(self.upgrade_status, b"refused"))
                return
            key = parsed.header("sec-websocket-key") or ""
            accept = accept_key(key)
            await stream.send(
                (
                    "HTTP/1.1 101 WebSocket Protocol Handshake\r\nUpgrade: WebSocket\r\n"
                    f"Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
                ).encode()
            )
            # Hang up on the first frame (the client's close): enough for a handshake test.
            with suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                await stream.receive()


@dataclass
class FakeStack:
    """The proxy and the fake endpoint behind it."""

    devtools: FakeDevTools
    proxy: CdpProxy

    @property
    def last_head(self) -> httpio.Request:
        """The last request head the fake endpoint received, parsed."""
        return httpio.parse_request_head(self.devtools.heads[-1])


@pytest.fixture(name="fake")
async def fake_fixture() -> AsyncIterator[FakeStack]:
    """A proxy (1 s handshake bound) in front of a recording fake DevTools endpoint."""
    devtools = FakeDevTools()
    async with anyio.create_task_group() as tg:
        port = await tg.start(devtools.run)
        proxy = CdpProxy(
            ProxyConfig(host="127.0.0.1", port=0, handshake_timeout=1.0),
            make_verifier(),
            Upstream(port, "/devtools/browser/fake"),
            Metrics(),
            RecordingObserver(),
            drain_timeout=0.5,
        )
        async with proxy:
            yield FakeStack(devtools, proxy)
        tg.cancel_scope.cancel()


def auth() -> dict[str, str]:
    """A valid Authorization header."""
    return {"Authorization": f"Bearer {mint()}"}


@pytest.mark.anyio
async def test_upstream_handshake_is_rebuilt(fake: FakeStack) -> None:
    """Toward Chromium: fixed Host, the bare path, no Origin, no cookies, no extensions, no token."""
    token = mint()
    url = f"ws://127.0.0.1:{fake.proxy.port}/devtools/page/{PAGE_ID}?signingKey={token}"
    async with ws_connect(
        url,
        compression="deflate",
        origin=Origin("https://app.example"),
        additional_headers={"Cookie": "a=b", "X-Custom": "1", "Authorization": f"Bearer {token}"},
    ):
        pass
    head = fake.last_head
    assert head.target == f"/devtools/page/{PAGE_ID}"
    assert head.header("host") == f"127.0.0.1:{fake.devtools.port}"
    assert set(head.headers) == {
        "host",
        "upgrade",
        "connection",
        "sec-websocket-key",
        "sec-websocket-version",
    }
    assert token.encode() not in fake.devtools.heads[-1]


@pytest.mark.anyio
async def test_upstream_discovery_request_is_bare(fake: FakeStack) -> None:
    """A discovery request reaches Chromium with its fixed Host and without the client's query or headers."""
    response = await http_request(
        fake.proxy.port,
        f"/json/version?signingKey={mint()}",
        host="client.example:9223",
        headers={"Origin": "https://app.example", "Cookie": "a=b"},
    )
    assert response.status == 200
    head = fake.last_head
    assert head.target == "/json/version"
    assert head.header("host") == f"127.0.0.1:{fake.devtools.port}"
    assert head.header("origin") is None and head.header("cookie") is None
    assert response.json()["webSocketDebuggerUrl"].startswith("ws://client.example:9223/x/y?signingKey=")


@pytest.mark.anyio
async def test_upstream_refusing_upgrade_is_passed_on(fake: FakeStack) -> None:
    """When Chromium refuses an upgrade, the client is refused too and nothing is relayed."""
    fake.devtools.upgrade_status = 500
    with pytest.raises(InvalidStatus) as refused:
        async with ws_connect(f"ws://127.0.0.1:{fake.proxy.port}/?signingKey={mint()}"):
            pass
    assert refused.value.response.status_code in {500, 502}
    assert fake.proxy.active == 0


@pytest.mark.anyio
async def test_incomplete_head_times_out_with_408(fake: FakeStack) -> None:
    """A client that never finishes its request head gets 408 after the handshake bound."""
    async with await anyio.connect_tcp("127.0.0.1", fake.proxy.port) as stream:
        await stream.send(b"GET /json/version HTTP/1.1\r\nHost: x\r\n")
        with anyio.fail_after(5):
            answer = await stream.receive()
    assert answer.startswith(b"HTTP/1.1 408")
    assert fake.devtools.heads == []


@pytest.mark.anyio
async def test_head_growing_past_the_bound_gets_431(fake: FakeStack) -> None:
    """A request head that passes the bound without ending is refused with 431 and never forwarded."""
    async with await anyio.connect_tcp("127.0.0.1", fake.proxy.port) as stream:
        await stream.send(b"GET /json/version HTTP/1.1\r\nX-Big: " + b"a" * 20_000)
        with anyio.fail_after(5):
            answer = await stream.receive()
    assert answer.startswith(b"HTTP/1.1 431")
    assert fake.devtools.heads == []


@pytest.mark.anyio
async def test_oversized_complete_head_gets_431(fake: FakeStack) -> None:
    """A complete request head larger than the bound (16 KiB) is refused with 431, however it arrives."""
    async with await anyio.connect_tcp("127.0.0.1", fake.proxy.port) as stream:
        await stream.send(f"GET /json/version HTTP/1.1\r\nAuthorization: Bearer {mint()}\r\n".encode())
        await stream.send(b"X-Big-1: " + b"a" * 12_000 + b"\r\n")
        await anyio.sleep(0.2)  # the proxy has read 12 KB: under the bound, not yet a whole head
        await stream.send(b"X-Big-2: " + b"b" * 12_000 + b"\r\n\r\n")
        with anyio.fail_after(5):
            answer = await stream.receive()
    assert answer.startswith(b"HTTP/1.1 431"), answer[:40]
    assert fake.devtools.heads == []


@pytest.mark.anyio
@pytest.mark.parametrize(
    "raw",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /json/version HTTP/2\r\nHost: x\r\n\r\n",
        b"GET /json/version HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET /json/version HTTP/1.1\r\nBad Header: x\r\n\r\n",
        b"GET /json/\xffversion HTTP/1.1\r\nHost: x\r\n\r\n",
    ],
    ids=["no-request-line", "http2", "duplicate-host", "bad-header-name", "non-ascii"],
)
async def test_malformed_requests_get_400(fake: FakeStack, raw: bytes) -> None:
    """A malformed request head is answered 400 and never forwarded."""
    async with await anyio.connect_tcp("127.0.0.1", fake.proxy.port) as stream:
        await stream.send(raw)
        with anyio.fail_after(5):
            answer = await stream.receive()
    assert answer.startswith(b"HTTP/1.1 400")
    assert fake.devtools.heads == []


@pytest.mark.anyio
async def test_websocket_path_without_upgrade_gets_400(fake: FakeStack) -> None:
    """A plain GET on a WebSocket path is refused with 400."""
    response = await http_request(fake.proxy.port, "/devtools/browser", headers=auth())
    assert response.status == 400
    assert fake.devtools.heads == []


@pytest.mark.anyio
async def test_upgrade_on_discovery_path_gets_404(fake: FakeStack) -> None:
    """A WebSocket upgrade on /json/version is not a WebSocket endpoint: 404."""
    response = await http_request(fake.proxy.port, "/json/version", headers=auth(), websocket=True)
    assert response.status == 404
    assert fake.devtools.heads == []


@pytest.mark.anyio
async def test_bad_websocket_key_gets_400(fake: FakeStack) -> None:
    """An upgrade with an invalid Sec-WebSocket-Key is refused before reaching Chromium."""
    response = await http_request(
        fake.proxy.port,
        "/devtools/browser",
        headers={
            **auth(),
            "Upgrade": "websocket",
            "Sec-WebSocket-Key": "short",
            "Sec-WebSocket-Version": "13",
        },
    )
    assert response.status == 400
    assert fake.devtools.heads == []


@pytest.mark.anyio
@pytest.mark.parametrize("method", ["POST", "DELETE", "PUT"])
async def test_wrong_method_gets_405(fake: FakeStack, method: str) -> None:
    """Discovery endpoints answer GET (and HEAD) only."""
    response = await http_request(fake.proxy.port, "/json/version", method=method, headers=auth())
    assert response.status == 405
    assert fake.devtools.heads == []


@pytest.mark.anyio
async def test_head_request_has_no_body(fake: FakeStack) -> None:
    """HEAD /json/version answers 200 with headers only."""
    response = await http_request(fake.proxy.port, "/json/version", method="HEAD", headers=auth())
    assert response.status == 200
    assert response.body == b""


@pytest.mark.anyio
async def test_health_needs_no_upstream(fake: FakeStack) -> None:
    """/health answers without a token and without asking Chromium."""
    response = await http_request(fake.proxy.port, "/health")
    assert response.status == 200
    assert fake.devtools.heads == []
