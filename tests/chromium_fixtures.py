"""Shared pieces for tests with real Chromium: tokens, a running Chromium behind the CDP proxy, raw HTTP.

The stack a test gets is the one the app builds (``Chrome`` then ``CdpProxy``), composed directly so no
AWS is needed. Between the proxy and Chromium sits a :class:`CountingRelay`: a transparent TCP relay
that counts every connection the proxy opens toward Chromium, so a test can prove that a refused
request never reached the browser.

Test modules import the fixtures they use by their registered names, e.g.
``from tests.chromium_fixtures import cdp_fixture  # noqa: F401`` makes the ``cdp`` fixture available.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio
import anyio.abc
import jwt
import pytest
from playwright.async_api import Playwright, async_playwright
from websockets.asyncio.client import ClientConnection, connect

from controller.auth import TokenVerifier
from controller.chrome import Chrome, DevTools
from controller.config import ChromeConfig, ProxyConfig
from controller.httpio import parse_response_head
from controller.metrics import Metrics
from controller.proxy import CdpProxy, Upstream

__all__ = [
    "KEY",
    "PREVIOUS_KEY",
    "PROJECT_ID",
    "SESSION_ID",
    "CdpStack",
    "CountingRelay",
    "RawResponse",
    "RecordingObserver",
    "cdp_command",
    "cdp_fixture",
    "chromium_binary",
    "claims",
    "eventually",
    "group_members",
    "http_request",
    "listening_addresses",
    "make_verifier",
    "mint",
    "playwright_fixture",
    "process_argv",
    "process_environ",
    "process_group_of",
    "running_stack",
    "short_tempdir",
    "ws_connect",
]

# 64 bytes: long enough for HS512 too, so PyJWT's short-key warning (an error here) never fires.
KEY = "current-test-signing-key-0123456789abcdef0123456789abcdef01234567"
PREVIOUS_KEY = "previous-test-signing-key-0123456789abcdef0123456789abcdef012345"
SESSION_ID = "sess_e2etest01"
PROJECT_ID = "proj_e2e"
WS_KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def chromium_binary() -> Path:
    """The Chromium the tests launch (``CHROME_BINARY`` or Debian's ``chromium``); skip when absent."""
    found = shutil.which(os.environ.get("CHROME_BINARY", "chromium"))
    if found is None:
        pytest.skip("Chromium is not installed")
    return Path(found)


def claims(*, now: float | None = None, **overrides: Any) -> dict[str, Any]:
    """A valid claim set for :data:`SESSION_ID`, with ``overrides`` applied."""
    issued = int(time.time() if now is None else now)
    payload: dict[str, Any] = {
        "iss": "wallcrawler",
        "aud": ["cdp-access"],
        "sub": SESSION_ID,
        "sessionId": SESSION_ID,
        "projectId": PROJECT_ID,
        "iat": issued,
        "nbf": issued,
        "exp": issued + 600,
        "jti": "jti-test-1",
    }
    payload.update(overrides)
    return payload


def mint(payload: Mapping[str, Any] | None = None, *, key: str = KEY, algorithm: str = "HS256") -> str:
    """Sign ``payload`` (default: :func:`claims`) as the session API would."""
    return jwt.encode(dict(claims() if payload is None else payload), key, algorithm=algorithm)


@contextlib.contextmanager
def short_tempdir() -> Iterator[Path]:
    """A private temp dir with a short path (Chromium's lock socket path must stay under ~108 bytes)."""
    with tempfile.TemporaryDirectory(prefix="wc-", dir="/tmp", ignore_cleanup_errors=True) as name:
        yield Path(name)


# --- processes ----------------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may contain spaces and parentheses: fields start after the last ')'.
    return text[text.rindex(")") + 2 :].split()


def process_group_of(user_data_dir: Path) -> tuple[int, int]:
    """The browser process started with ``user_data_dir`` and its process group id.

    Raises:
        AssertionError: no such process.
    """
    wanted = f"--user-data-dir={user_data_dir}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if wanted in argv:
            fields = _stat_fields(int(entry.name))
            if fields is not None and fields[0] != "Z":
                return int(entry.name), int(fields[2])
    raise AssertionError(f"no process runs with {wanted.decode()}")


def group_members(pgid: int, *, include_zombies: bool = False) -> list[int]:
    """Process ids of the processes in group ``pgid``."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is None or int(fields[2]) != pgid:
            continue
        if fields[0] == "Z" and not include_zombies:
            continue
        members.append(int(entry.name))
    return members


def process_argv(pid: int) -> list[str]:
    """The command line process ``pid`` runs with."""
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").rstrip("\0").split("\0")


def listening_addresses(port: int) -> list[str]:
    """The local addresses (IPv4 and IPv6, as dotted or hex text) of TCP sockets listening on ``port``."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, _, hex_port = fields[1].partition(":")
            if fields[3] == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                if len(address) == 8:
                    address = ".".join(str(b) for b in reversed(bytes.fromhex(address)))
                found.append(address)
    return found


def process_environ(pid: int) -> dict[str, str]:
    """The environment process ``pid`` was started with."""
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (item.decode(errors="replace").partition("=") for item in raw.split(b"\0") if item)
    return {name: value for name, _, value in pairs}


# --- a counting relay in front of Chromium -----------------------------------------------------------------


class CountingRelay:
    """A transparent TCP relay that counts the connections it accepts.

    With ``target_port`` None it accepts, counts and hangs up: a stand-in for a host nobody should reach.
    """

    def __init__(self, target_port: int | None) -> None:
        self.target_port = target_port
        self.connections = 0
        self.port = 0

    async def run(self, *, task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        """Listen on a free loopback port until cancelled; report the port once listening."""
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        async with listener:
            self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
            task_status.started(self.port)
            await listener.serve(self._handle)

    async def _handle(self, client: anyio.abc.SocketStream) -> None:
        self.connections += 1
        async with client:
            if self.target_port is None:
                return
            try:
                upstream = await anyio.connect_tcp("127.0.0.1", self.target_port)
            except OSError:
                return
            async with upstream, anyio.create_task_group() as tg:
                tg.start_soon(_pump, client, upstream)
                tg.start_soon(_pump, upstream, client)


async def _pump(source: anyio.abc.SocketStream, sink: anyio.abc.SocketStream) -> None:
    with suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        async for chunk in source:
            await sink.send(chunk)
    # Pass the end on as a half-close, as a direct connection would see it.
    with suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        await sink.send_eof()


# --- the stack -----------------------------------------------------------------------------------------


@dataclass
class RecordingObserver:
    """A ConnectionObserver that records the ``active`` counts it is told."""

    events: list[tuple[str, int]] = field(default_factory=list)
    _changed: anyio.Event = field(default_factory=anyio.Event)

    def client_connected(self, active: int) -> None:
        """Record a connect."""
        self._record(("connected", active))

    def client_disconnected(self, active: int) -> None:
        """Record a disconnect."""
        self._record(("disconnected", active))

    def _record(self, event: tuple[str, int]) -> None:
        self.events.append(event)
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_for(self, event: tuple[str, int], *, after: int = 0, timeout: float = 5.0) -> None:
        """Wait until ``event`` is recorded at index ``after`` or later."""
        with anyio.fail_after(timeout):
            while event not in self.events[after:]:
                await self._changed.wait()


@dataclass
class CdpStack:
    """A running Chromium, the counting relay in front of it, and the proxy in front of both."""

    chrome: Chrome
    devtools: DevTools
    proxy: CdpProxy
    relay: CountingRelay | None
    metrics: Metrics
    observer: RecordingObserver
    user_data_dir: Path

    @property
    def port(self) -> int:
        """The proxy's port."""
        return self.proxy.port

    def token(self, **overrides: Any) -> str:
        """A valid token for this stack's session (claims overridden as given)."""
        return mint(claims(**overrides))

    def ws_url(self, path: str = "/", token: str | None = None) -> str:
        """A WebSocket URL on the proxy carrying a valid token (or ``token``)."""
        return f"ws://127.0.0.1:{self.port}{path}?signingKey={quote(token or self.token(), safe='')}"

    def http_url(self, token: str | None = None) -> str:
        """The discovery URL Playwright's ``connect_over_cdp`` accepts."""
        return f"http://127.0.0.1:{self.port}?signingKey={quote(token or self.token(), safe='')}"

    @property
    def upstream_connections(self) -> int:
        """Connections the proxy opened toward Chromium so far."""
        assert self.relay is not None
        return self.relay.connections


def make_verifier() -> TokenVerifier:
    """The verifier the stacks use: current and previous key, bound to SESSION_ID and PROJECT_ID."""
    return TokenVerifier(
        [KEY.encode(), PREVIOUS_KEY.encode()], session_id=SESSION_ID, project_id=PROJECT_ID, leeway=5.0
    )


@asynccontextmanager
async def running_stack(
    workdir: Path,
    *,
    relay: bool = True,
    drain_timeout: float = 2.0,
    environ: Mapping[str, str] | None = None,
) -> AsyncIterator[CdpStack]:
    """Start Chromium, (maybe) the counting relay and the proxy; stop them in reverse order.

    Args:
        workdir: a short directory for the profile and Chromium's TMPDIR.
        relay: put a :class:`CountingRelay` between the proxy and Chromium.
        drain_timeout: the proxy's bound on waiting for clients to answer its 1001 close.
        environ: the environment handed to Chrome (scrubbed by it); default the test's own.
    """
    user_data_dir, tmp_dir = workdir / "profile", workdir / "tmp"
    tmp_dir.mkdir(exist_ok=True)
    metrics = Metrics()
    observer = RecordingObserver()
    chrome = Chrome(
        ChromeConfig(binary=chromium_binary(), debug_port=0, start_timeout=30.0),
        user_data_dir,
        tmp_dir,
        metrics,
        environ=os.environ if environ is None else environ,
        close_timeout=5.0,
    )
    verifier = make_verifier()
    async with chrome as devtools, anyio.create_task_group() as tg:
        counting = CountingRelay(devtools.port) if relay else None
        upstream_port = await tg.start(counting.run) if counting is not None else devtools.port
        proxy = CdpProxy(
            ProxyConfig(host="127.0.0.1", port=0, handshake_timeout=5.0),
            verifier,
            Upstream(upstream_port, devtools.browser_path),
            metrics,
            observer,
            drain_timeout=drain_timeout,
        )
        async with proxy:
            yield CdpStack(chrome, devtools, proxy, counting, metrics, observer, user_data_dir)
        tg.cancel_scope.cancel()


@pytest.fixture(scope="module", name="cdp")
async def cdp_fixture() -> AsyncIterator[CdpStack]:
    """One Chromium behind the proxy (through a counting relay) for a whole test module."""
    with short_tempdir() as workdir:
        async with running_stack(workdir) as stack:
            yield stack


@pytest.fixture(scope="module", name="playwright")
async def playwright_fixture() -> AsyncIterator[Playwright]:
    """One Playwright driver for a whole test module (starting one costs about a second)."""
    async with async_playwright() as playwright:
        yield playwright


# --- raw HTTP and CDP ----------------------------------------------------------------------------------

_command_ids = itertools.count(1)


@dataclass(frozen=True)
class RawResponse:
    """A response as read off the socket."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)


async def http_request(
    port: int,
    target: str,
    *,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    host: str | None = None,
    websocket: bool = False,
    timeout: float = 15.0,
) -> RawResponse:
    """Send one request with the target exactly as given and read the response to the end.

    Args:
        port: the loopback port.
        target: the request target, sent verbatim (absolute-form, ``//x``, ``@x`` all allowed).
        method: the request method.
        headers: extra header lines.
        host: the ``Host`` header (default ``127.0.0.1:<port>``).
        websocket: add the headers of a WebSocket upgrade.
        timeout: bound on the exchange.
    """
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host or f'127.0.0.1:{port}'}"]
    if websocket:
        lines += [
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {WS_KEY}",
            "Sec-WebSocket-Version: 13",
        ]
    else:
        lines.append("Connection: close")
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    with anyio.fail_after(timeout):
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(request)
            data = bytearray()
            with suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                while True:
                    data += await stream.receive()
                    head, sep, body = bytes(data).partition(b"\r\n\r\n")
                    if sep and websocket and head.startswith(b"HTTP/1.1 101"):
                        break  # an upgrade never ends by itself; the head is what we wanted
    head, sep, body = bytes(data).partition(b"\r\n\r\n")
    assert sep, f"no complete response head: {bytes(data)[:200]!r}"
    status, response_headers = parse_response_head(head)
    return RawResponse(status, response_headers, body)


async def eventually(check: Callable[[], Awaitable[bool]], *, timeout: float = 5.0) -> None:
    """Poll ``check`` until it holds (for state only an outside process knows, like Chromium's targets)."""
    with anyio.fail_after(timeout):
        for _attempt in itertools.count():
            if await check():
                return
            await anyio.sleep(0.02)


def ws_connect(url: str, **options: Any) -> connect:
    """A WebSocket client as CDP needs it: no deflate, no size limit, no keepalive pings."""
    defaults: dict[str, Any] = {
        "compression": None,
        "max_size": None,
        "ping_interval": None,
        "open_timeout": 10,
    }
    return connect(url, **(defaults | options))


async def cdp_command(
    ws: ClientConnection, method: str, params: Mapping[str, Any] | None = None, *, timeout: float = 30.0
) -> dict[str, Any]:
    """Send one CDP command on ``ws`` and return its result (events in between are skipped).

    Raises:
        AssertionError: Chromium answered with an error.
    """
    command_id = next(_command_ids)
    await ws.send(json.dumps({"id": command_id, "method": method, "params": dict(params or {})}))
    with anyio.fail_after(timeout):
        while True:
            answer = json.loads(await ws.recv())
            if answer.get("id") == command_id:
                assert "error" not in answer, f"{method}: {answer['error']}"
                result: dict[str, Any] = answer["result"]
                return result
