"""End to end: real Chromium behind the CDP proxy, driven by real clients (Playwright, Puppeteer, raw CDP).

One Chromium serves the whole module (the ``cdp`` fixture); tests that stop the proxy or kill Chromium
build their own. A counting relay between the proxy and Chromium proves which requests reached it.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import time
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import anyio
import anyio.abc
import pytest
from playwright.async_api import Playwright
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import Close, Frame, Opcode
from websockets.typing import Origin

from controller import httpio
from controller.config import ProxyConfig
from controller.logs import configure_logging
from controller.metrics import Metrics
from controller.proxy import CdpProxy, Upstream
from tests.chromium_fixtures import (
    PREVIOUS_KEY,
    WS_KEY,
    CdpStack,
    CountingRelay,
    RecordingObserver,
    cdp_command,
    cdp_fixture,  # noqa: F401
    claims,
    eventually,
    http_request,
    make_verifier,
    mint,
    playwright_fixture,  # noqa: F401
    process_group_of,
    running_stack,
    short_tempdir,
    ws_connect,
)

pytestmark = [pytest.mark.anyio, pytest.mark.chromium]

JS_DIR = Path(__file__).resolve().parent / "js"
MiB = 1024 * 1024


def bearer(token: str) -> dict[str, str]:
    """An Authorization header carrying ``token``."""
    return {"Authorization": f"Bearer {token}"}


@asynccontextmanager
async def page_socket(cdp: CdpStack) -> AsyncIterator[ClientConnection]:
    """A fresh page target, and a raw CDP connection to it through the proxy's page URL."""
    async with ws_connect(cdp.ws_url()) as browser:
        created = await cdp_command(browser, "Target.createTarget", {"url": "about:blank"})
        target = created["targetId"]
        try:
            async with ws_connect(cdp.ws_url(f"/devtools/page/{target}")) as page:
                yield page
        finally:
            await cdp_command(browser, "Target.closeTarget", {"targetId": target})


async def chromium_targets(cdp: CdpStack) -> set[str]:
    """Target ids as Chromium itself lists them (asked directly, not through the proxy or relay)."""
    response = await httpio.fetch("127.0.0.1", cdp.devtools.port, "GET", "/json/list")
    return {target["id"] for target in json.loads(response.body)}


# --- Playwright ---------------------------------------------------------------------------------------------


async def _use_with_playwright(
    playwright: Playwright, url: str, headers: dict[str, str] | None = None
) -> None:
    browser = await playwright.chromium.connect_over_cdp(url, timeout=30_000, headers=headers)
    try:
        assert browser.contexts, "Playwright sees no browser context"
        context = browser.contexts[0]
        assert len(context.pages) >= 1, "Playwright sees 0 pages: it is attached to a page, not the browser"
        page = await context.new_page()
        await page.goto("data:text/html,<title>through the proxy</title><p>hi</p>")
        assert await page.title() == "through the proxy"
        assert await page.evaluate("6 * 7") == 42
        await page.close()
    finally:
        await browser.close()


async def test_playwright_ws_url(cdp: CdpStack, playwright: Playwright) -> None:
    """Playwright's connect_over_cdp with the ws URL sees the browser's pages and opens a new one."""
    await _use_with_playwright(playwright, cdp.ws_url())


async def test_playwright_http_discovery_url(cdp: CdpStack, playwright: Playwright) -> None:
    """Playwright's connect_over_cdp with http://host:port?signingKey=… works through /json/version."""
    await _use_with_playwright(playwright, cdp.http_url())


async def test_playwright_bearer_header(cdp: CdpStack, playwright: Playwright) -> None:
    """Playwright with the token in an Authorization header (no query) connects."""
    await _use_with_playwright(
        playwright, f"ws://127.0.0.1:{cdp.port}/devtools/browser", headers=bearer(cdp.token())
    )


# --- Puppeteer ----------------------------------------------------------------------------------------------


async def _puppeteer(endpoint: str, *header: str) -> dict[str, object]:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node/npm are not installed: the Puppeteer client cannot run")
    if not (JS_DIR / "node_modules" / "puppeteer-core").is_dir():
        await anyio.run_process(
            [npm, "ci", "--prefix", str(JS_DIR), "--no-audit", "--no-fund", "--loglevel=error"], check=True
        )
    done = await anyio.run_process(
        [node, str(JS_DIR / "puppeteer_client.mjs"), endpoint, *header], check=False
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    result: dict[str, object] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    return result


async def test_puppeteer_browser_ws_endpoint(cdp: CdpStack) -> None:
    """puppeteer-core connects with browserWSEndpoint (token in the query), sees pages, opens one."""
    result = await _puppeteer(cdp.ws_url())
    assert isinstance(result["pagesBefore"], int) and result["pagesBefore"] >= 1
    assert result["title"] == "puppeteer"
    assert result["answer"] == 42


async def test_puppeteer_token_in_header(cdp: CdpStack) -> None:
    """puppeteer-core with the token in x-bb-signing-key (its ``headers`` option) connects."""
    endpoint = f"ws://127.0.0.1:{cdp.port}{cdp.devtools.browser_path}"
    result = await _puppeteer(endpoint, f"x-bb-signing-key: {cdp.token()}")
    assert result["answer"] == 42


# --- raw CDP and large messages -----------------------------------------------------------------------------


async def test_raw_cdp_on_page_url_from_json_list(cdp: CdpStack) -> None:
    """A page's webSocketDebuggerUrl from /json/list works as-is (its signingKey never reaches Chromium)."""
    token = cdp.token()
    listing = await http_request(cdp.port, "/json/list", headers=bearer(token))
    assert listing.status == 200
    pages = [target for target in listing.json() if target["type"] == "page"]
    assert pages
    url = pages[0]["webSocketDebuggerUrl"]
    assert url == f"ws://127.0.0.1:{cdp.port}/devtools/page/{pages[0]['id']}?signingKey={token}"
    async with ws_connect(url) as page:
        result = await cdp_command(page, "Runtime.evaluate", {"expression": "6 * 7"})
    assert result["result"]["value"] == 42


NOISE_PAGE = """(() => {
  document.body.style.margin = "0";
  const canvas = document.createElement("canvas");
  canvas.width = 1280;
  canvas.height = 6000;
  canvas.style.display = "block";
  document.body.appendChild(canvas);
  const context = canvas.getContext("2d");
  const image = context.createImageData(canvas.width, canvas.height);
  let x = 2463534242;
  for (let i = 0; i < image.data.length; i++) {
    x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0;
    image.data[i] = (i & 3) === 3 ? 255 : x & 255;
  }
  context.putImageData(image, 0, 0);
  return document.documentElement.scrollHeight;
})()"""


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height of a PNG whose every chunk CRC and whose pixel data check out."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width, height, channels = 8, bytearray(), 0, 0, 0
    while pos < len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        crc = int.from_bytes(data[pos + 8 + length : pos + 12 + length], "big")
        assert zlib.crc32(kind + body) == crc, f"corrupt {kind!r} chunk at {pos}"
        if kind == b"IHDR":
            width, height = int.from_bytes(body[0:4], "big"), int.from_bytes(body[4:8], "big")
            assert body[8] == 8, "expected 8-bit samples"
            channels = {2: 3, 6: 4}[body[9]]
        elif kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            break
        pos += 12 + length
    assert len(zlib.decompress(idat)) == height * (1 + width * channels)
    return width, height


async def test_full_page_screenshot_over_20mb(cdp: CdpStack) -> None:
    """A ≥ 20 MB full-page screenshot (captureBeyondViewport) arrives whole through the proxy."""
    async with page_socket(cdp) as page:
        height = await cdp_command(page, "Runtime.evaluate", {"expression": NOISE_PAGE})
        assert height["result"]["value"] >= 6000
        shot = await cdp_command(
            page,
            "Page.captureScreenshot",
            {
                "format": "png",
                "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": 1280, "height": 6000, "scale": 1},
            },
            timeout=60,
        )
    assert len(shot["data"]) >= 20_000_000
    assert png_size(base64.b64decode(shot["data"], validate=True)) == (1280, 6000)


# 256 KiB of distinct 4-character hex counters, repeated to 64 MiB: corruption, loss or duplication of
# any chunk changes the hash.
_BLOCK_JS = 'Array.from({length: 65536}, (_, i) => i.toString(16).padStart(4, "0")).join("")'
_BLOCK = "".join(f"{i:04x}" for i in range(65536))


async def test_64mib_evaluate_result_intact(cdp: CdpStack) -> None:
    """A 64 MiB Runtime.evaluate result crosses the proxy intact."""
    async with page_socket(cdp) as page:
        result = await cdp_command(
            page, "Runtime.evaluate", {"expression": f"({_BLOCK_JS}).repeat(256)"}, timeout=60
        )
    value = result["result"]["value"]
    assert len(value) == 64 * MiB
    assert hashlib.sha256(value.encode()).digest() == hashlib.sha256((_BLOCK * 256).encode()).digest()


async def test_64mib_command_intact(cdp: CdpStack) -> None:
    """A 64 MiB command reaches Chromium intact (it compares the literal with its own copy)."""
    expression = f'(s => s === ({_BLOCK_JS}).repeat(256) ? "same" : "differs:" + s.length)("{_BLOCK * 256}")'
    assert len(expression) > 64 * MiB
    async with page_socket(cdp) as page:
        result = await cdp_command(page, "Runtime.evaluate", {"expression": expression}, timeout=60)
    assert result["result"]["value"] == "same"


# --- connections --------------------------------------------------------------------------------------------


async def test_two_clients_closing_one_leaves_the_other(cdp: CdpStack) -> None:
    """Two clients at once; closing one does not disturb the other."""
    async with ws_connect(cdp.ws_url()) as first, ws_connect(cdp.ws_url()) as second:
        assert cdp.proxy.active >= 2
        first_version = await cdp_command(first, "Browser.getVersion")
        second_version = await cdp_command(second, "Browser.getVersion")
        assert first_version == second_version
        await first.close()
        assert first.close_code == 1000
        targets = await cdp_command(second, "Target.getTargets")
        assert targets["targetInfos"]
        await cdp_command(second, "Browser.getVersion")


async def test_connections_are_counted(cdp: CdpStack) -> None:
    """The observer hears every connect and disconnect with the number of open connections."""
    start = len(cdp.observer.events)
    async with ws_connect(cdp.ws_url()) as first, ws_connect(cdp.ws_url()):
        await cdp_command(first, "Browser.getVersion")
        assert cdp.proxy.active == 2
    await cdp.observer.wait_for(("disconnected", 0), after=start)
    assert cdp.observer.events[start:] == [
        ("connected", 1),
        ("connected", 2),
        ("disconnected", 1),
        ("disconnected", 0),
    ]


async def test_many_clients_at_once(cdp: CdpStack) -> None:
    """Sixteen page clients issuing commands concurrently each get their own answers."""

    async def page_client(number: int) -> None:
        async with page_socket(cdp) as page:
            for step in range(10):
                result = await cdp_command(
                    page, "Runtime.evaluate", {"expression": f"{number} * 100 + {step}"}
                )
                assert result["result"]["value"] == number * 100 + step

    async with anyio.create_task_group() as tg:
        for number in range(16):
            tg.start_soon(page_client, number)


async def test_root_path_is_the_browser_target(cdp: CdpStack) -> None:
    """WebSocket / reaches the browser target: browser-only commands work there."""
    async with ws_connect(cdp.ws_url("/")) as ws:
        targets = await cdp_command(ws, "Target.getTargets")
    assert any(target["type"] == "page" for target in targets["targetInfos"])


async def test_origin_header_is_stripped(cdp: CdpStack) -> None:
    """A client sending Origin still connects (Chromium itself refuses any Origin)."""
    direct = f"ws://127.0.0.1:{cdp.devtools.port}{cdp.devtools.browser_path}"
    with pytest.raises(InvalidStatus) as refused:
        async with ws_connect(direct, origin=Origin("https://app.example")):
            pass
    assert refused.value.response.status_code == 403
    async with ws_connect(cdp.ws_url(), origin=Origin("https://app.example")) as ws:
        assert (await cdp_command(ws, "Browser.getVersion"))["product"]


# --- authentication -----------------------------------------------------------------------------------------


def _rejected_tokens() -> list[tuple[str, str | None, str]]:
    now = time.time()
    return [
        ("no token", None, "missing_token"),
        ("garbage", "not-a-jwt", "malformed_token"),
        ("wrong key", mint(key="another-key-entirely-0123456789abcdef0123456789abcdef0123"), "bad_signature"),
        ("other session", mint(claims(sub="sess_other", sessionId="sess_other")), "wrong_session"),
        ("expired", mint(claims(now=now - 3600, exp=int(now) - 60)), "expired"),
        ("other project", mint(claims(projectId="proj_other")), "wrong_project"),
    ]


@pytest.mark.parametrize(("case", "token", "reason"), _rejected_tokens(), ids=lambda v: str(v)[:16])
async def test_discovery_rejects_bad_tokens(cdp: CdpStack, case: str, token: str | None, reason: str) -> None:
    """A bad or missing token gets 401 with a short reason, never the token, and never reaches Chromium."""
    before = cdp.upstream_connections
    target = "/json/version" if token is None else f"/json/version?signingKey={quote(token, safe='')}"
    response = await http_request(cdp.port, target)
    assert response.status == 401, case
    assert reason.encode() in response.body
    assert len(response.body) < 100
    if token is not None:
        assert token.encode() not in response.body
        assert all(part.encode() not in response.body for part in token.split(".") if len(part) > 8)
    assert cdp.upstream_connections == before


@pytest.mark.parametrize(("case", "token", "reason"), _rejected_tokens(), ids=lambda v: str(v)[:16])
async def test_websocket_rejects_bad_tokens(cdp: CdpStack, case: str, token: str | None, reason: str) -> None:
    """A WebSocket upgrade with a bad or missing token is refused with 401 before any upgrade."""
    before = cdp.upstream_connections
    url = f"ws://127.0.0.1:{cdp.port}/devtools/browser"
    if token is not None:
        url += f"?signingKey={quote(token, safe='')}"
    with pytest.raises(InvalidStatus) as refused:
        async with ws_connect(url):
            pass
    assert refused.value.response.status_code == 401, case
    assert reason.encode() in refused.value.response.body
    assert cdp.upstream_connections == before


async def test_rejection_logs_reason_not_token(cdp: CdpStack) -> None:
    """The proxy logs why it refused a token, never the token itself."""
    token = mint(claims(sub="sess_other", sessionId="sess_other"))
    lines = io.StringIO()
    configure_logging("INFO", stream=lines)
    try:
        response = await http_request(cdp.port, f"/json/version?signingKey={token}", headers=bearer(token))
    finally:
        configure_logging("INFO")
    assert response.status == 401
    logged = lines.getvalue()
    assert "proxy_auth_rejected" in logged and "wrong_session" in logged
    assert all(part not in logged for part in token.split("."))


async def test_rejections_are_counted_by_reason(cdp: CdpStack) -> None:
    """Each refused request increments the rejection counter under its reason."""

    def count(reason: str) -> float:
        value = cdp.metrics.registry.get_sample_value(
            "wallcrawler_cdp_requests_rejected_total", {"reason": reason}
        )
        return value or 0.0

    missing, not_found = count("auth_missing_token"), count("not_found")
    await http_request(cdp.port, "/json/version")
    await http_request(cdp.port, "/json/nothing-here", headers=bearer(cdp.token()))
    assert count("auth_missing_token") == missing + 1
    assert count("not_found") == not_found + 1


@pytest.mark.parametrize("header", ["Authorization", "x-bb-signing-key"])
async def test_token_in_header_accepted(cdp: CdpStack, header: str) -> None:
    """The token is accepted from Authorization: Bearer and from x-bb-signing-key, for HTTP and WS."""
    token = cdp.token()
    headers = bearer(token) if header == "Authorization" else {header: token}
    response = await http_request(cdp.port, "/json/version", headers=headers)
    assert response.status == 200
    async with ws_connect(f"ws://127.0.0.1:{cdp.port}/devtools/browser", additional_headers=headers) as ws:
        assert (await cdp_command(ws, "Browser.getVersion"))["product"]


async def test_token_signed_with_previous_key_accepted(cdp: CdpStack) -> None:
    """During a key rotation a token signed with the previous key still connects."""
    async with ws_connect(cdp.ws_url(token=mint(key=PREVIOUS_KEY))) as ws:
        assert (await cdp_command(ws, "Browser.getVersion"))["product"]


# --- hostile paths ------------------------------------------------------------------------------------------

_HOSTILE = [
    "@{evil}/x",
    "//{evil}/x",
    "http://{evil}/x",
    "http://{evil}/json/version",
    "/devtools/../json/new",
    "/devtools/%2e%2e/json/new",
    "/devtools/%2E%2E/json/new?about:blank",
    "/json/new/../../x",
    "/devtools/page/../../json/new",
    "/devtools/browser/..%2f..%2fjson%2fnew",
    "/json/version/../new",
    "/%2e%2e/json/list",
    "/json/unknown",
    "/devtools/page/",
    "*",
]


@pytest.fixture(scope="module", name="canary")
async def canary_fixture() -> AsyncIterator[CountingRelay]:
    """A listener standing in for an attacker's host: it counts whoever reaches it."""
    canary = CountingRelay(None)
    async with anyio.create_task_group() as tg:
        await tg.start(canary.run)
        yield canary
        tg.cancel_scope.cancel()


def _hostile_cases() -> list[tuple[str, str]]:
    cases = []
    for template in _HOSTILE:
        hosts = ["evil.example", "127.0.0.1:{canary}"] if "{evil}" in template else ["-"]
        cases += [(template, host) for host in hosts]
    return cases


@pytest.mark.parametrize("websocket", [False, True], ids=["http", "upgrade"])
@pytest.mark.parametrize(("template", "evil"), _hostile_cases())
async def test_hostile_path_404_without_upstream_connection(
    cdp: CdpStack, canary: CountingRelay, template: str, evil: str, websocket: bool
) -> None:
    """A path off the allow-list gets 404, and no connection is opened to Chromium or anywhere else."""
    target = template.replace("{evil}", evil.replace("{canary}", str(canary.port)))
    targets_before, before = await chromium_targets(cdp), cdp.upstream_connections
    response = await http_request(cdp.port, target, headers=bearer(cdp.token()), websocket=websocket)
    assert response.status == 404, response
    assert cdp.upstream_connections == before
    assert canary.connections == 0
    assert await chromium_targets(cdp) == targets_before


async def test_allowed_path_is_counted_by_the_relay(cdp: CdpStack) -> None:
    """Control for the hostile-path tests: an allowed request does show up at Chromium's side."""
    before = cdp.upstream_connections
    response = await http_request(cdp.port, "/json/version", headers=bearer(cdp.token()))
    assert response.status == 200
    assert cdp.upstream_connections == before + 1


# --- discovery ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host", ["127.0.0.1:{port}", "localhost:{port}", "203.0.113.9:9223", "cdp.example.test"]
)
async def test_json_version_rewritten_to_client_host(cdp: CdpStack, host: str) -> None:
    """/json/version's webSocketDebuggerUrl uses the Host the client used and carries its token."""
    host = host.replace("{port}", str(cdp.port))
    token = cdp.token()
    response = await http_request(cdp.port, f"/json/version/?signingKey={token}", host=host)
    assert response.status == 200
    version = response.json()
    assert version["webSocketDebuggerUrl"] == f"ws://{host}{cdp.devtools.browser_path}?signingKey={token}"
    assert f":{cdp.devtools.port}".encode() not in response.body
    assert cdp.relay is not None and f":{cdp.relay.port}".encode() not in response.body


async def test_json_list_urls_rewritten(cdp: CdpStack) -> None:
    """Every URL of /json/list points at the proxy with the token; none at Chromium's own port."""
    token = cdp.token()
    response = await http_request(cdp.port, "/json/list/", headers={"x-bb-signing-key": token})
    assert response.status == 200
    targets = response.json()
    assert targets
    for target in targets:
        assert target["webSocketDebuggerUrl"] == (
            f"ws://127.0.0.1:{cdp.port}/devtools/page/{target['id']}?signingKey={token}"
        )
    assert cdp.relay is not None
    for port in (cdp.devtools.port, cdp.relay.port):
        assert f"127.0.0.1:{port}".encode() not in response.body


async def test_forwarded_https_gives_wss_urls(cdp: CdpStack) -> None:
    """Behind a TLS-terminating balancer (X-Forwarded-Proto: https) discovery answers wss:// URLs."""
    response = await http_request(
        cdp.port,
        "/json/version",
        host="cdp.example.test",
        headers={**bearer(cdp.token()), "X-Forwarded-Proto": "https"},
    )
    assert response.json()["webSocketDebuggerUrl"].startswith("wss://cdp.example.test/devtools/browser/")


async def test_invalid_host_header_refused(cdp: CdpStack) -> None:
    """A Host that is not a host[:port] is not copied into discovery URLs: 400."""
    response = await http_request(
        cdp.port, "/json/version", host="evil.example/x?y=", headers=bearer(cdp.token())
    )
    assert response.status == 400


async def test_json_protocol_passes_through(cdp: CdpStack) -> None:
    """/json/protocol answers Chromium's protocol description."""
    response = await http_request(cdp.port, "/json/protocol", headers=bearer(cdp.token()))
    assert response.status == 200
    assert any(domain["domain"] == "Page" for domain in response.json()["domains"])


async def test_large_answer_reaches_a_slow_reader_whole(cdp: CdpStack) -> None:
    """/json/protocol (1.6 MB) arrives whole when the client reads it slowly, through small buffers."""
    request = f"GET /json/protocol HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {cdp.token()}\r\n\r\n"

    def slow_reader() -> bytes:
        sock = socket.socket()
        # A small receive window (set before connecting) keeps most of the answer in the proxy.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        with sock:
            sock.settimeout(10)
            sock.connect(("127.0.0.1", cdp.port))
            sock.sendall(request.encode())
            time.sleep(1.0)
            received = bytearray()
            while chunk := sock.recv(65536):
                received += chunk
            return bytes(received)

    head, _, body = (await anyio.to_thread.run_sync(slow_reader)).partition(b"\r\n\r\n")
    status, headers = httpio.parse_response_head(head)
    assert status == 200
    assert len(body) == int(headers["content-length"]) > 100_000
    assert json.loads(body)["domains"]


async def test_json_new_and_close_pass_through(cdp: CdpStack) -> None:
    """PUT /json/new creates a target (URL rewritten); /json/close/<id> closes it; GET /json/new is 405."""
    token = cdp.token()
    refused = await http_request(cdp.port, "/json/new?about:blank", headers=bearer(token))
    assert refused.status == 405
    created = await http_request(cdp.port, "/json/new?about:blank", method="PUT", headers=bearer(token))
    assert created.status == 200
    target = created.json()
    assert target["webSocketDebuggerUrl"].startswith(f"ws://127.0.0.1:{cdp.port}/devtools/page/")
    assert target["id"] in await chromium_targets(cdp)
    closed = await http_request(cdp.port, f"/json/close/{target['id']}", headers=bearer(token))
    assert closed.status == 200

    async def gone() -> bool:
        return target["id"] not in await chromium_targets(cdp)

    await eventually(gone)


async def test_json_activate_passes_through(cdp: CdpStack) -> None:
    """/json/activate/<id> reaches Chromium and answers its result."""
    listing = (await http_request(cdp.port, "/json/list", headers=bearer(cdp.token()))).json()
    page = next(target for target in listing if target["type"] == "page")
    response = await http_request(cdp.port, f"/json/activate/{page['id']}", headers=bearer(cdp.token()))
    assert response.status == 200
    assert b"activated" in response.body.lower()


async def test_health_is_unauthenticated_and_minimal(cdp: CdpStack) -> None:
    """GET /health needs no token, reveals nothing and never touches Chromium."""
    before = cdp.upstream_connections
    response = await http_request(cdp.port, "/health")
    assert response.status == 200
    assert len(response.body) <= 16
    text = (response.body + repr(response.headers).encode()).lower()
    assert cdp.relay is not None
    for leak in (
        b"chrom",
        b"devtools",
        b"version",
        str(cdp.devtools.port).encode(),
        str(cdp.relay.port).encode(),
    ):
        assert leak not in text
    assert "server" not in response.headers
    assert cdp.upstream_connections == before


# --- traffic ------------------------------------------------------------------------------------------------


async def test_traffic_counts_at_least_the_bytes_relayed(cdp: CdpStack) -> None:
    """metrics.traffic grows by at least the bytes and messages relayed in each direction."""
    traffic = cdp.metrics.traffic
    to_before, from_before = traffic.bytes_to_browser, traffic.bytes_from_browser
    messages_to, messages_from = traffic.messages_to_browser, traffic.messages_from_browser
    sent = received = 0
    async with ws_connect(cdp.ws_url()) as ws:
        for number in range(50):
            message = json.dumps({"id": 900_000 + number, "method": "Target.getTargets", "params": {}})
            await ws.send(message)
            sent += len(message)
            while True:
                answer = await ws.recv()
                received += len(answer)
                if json.loads(answer).get("id") == 900_000 + number:
                    break
    assert traffic.bytes_to_browser - to_before >= sent
    assert traffic.bytes_from_browser - from_before >= received
    assert traffic.messages_to_browser - messages_to >= 50
    assert traffic.messages_from_browser - messages_from >= 50
    assert traffic.total_bytes == traffic.bytes_to_browser + traffic.bytes_from_browser


async def test_discovery_bytes_are_counted(cdp: CdpStack) -> None:
    """HTTP discovery answers count toward the relayed bytes too."""
    before = cdp.metrics.traffic.total_bytes
    response = await http_request(cdp.port, "/json/list", headers=bearer(cdp.token()))
    assert cdp.metrics.traffic.total_bytes - before >= len(response.body)


# --- shutdown and failures ----------------------------------------------------------------------------------


async def test_proxy_close_sends_1001(cdp: CdpStack) -> None:
    """Closing the proxy (the SIGTERM path) closes every client with 1001."""
    proxy = CdpProxy(
        ProxyConfig(host="127.0.0.1", port=0),
        make_verifier(),
        Upstream(cdp.devtools.port, cdp.devtools.browser_path),
        Metrics(),
        RecordingObserver(),
        drain_timeout=2.0,
    )
    async with proxy:
        url = f"ws://127.0.0.1:{proxy.port}/?signingKey={cdp.token()}"
        clients = [await ws_connect(url), await ws_connect(url)]
        for client in clients:
            await cdp_command(client, "Browser.getVersion")
        started = time.monotonic()
    assert time.monotonic() - started < 2.0, "clients answered the close; no need to wait for the bound"
    with anyio.fail_after(5):
        for client in clients:
            await client.wait_closed()
    assert [client.close_code for client in clients] == [1001, 1001]
    assert proxy.active == 0
    # Chromium is untouched: the shared proxy still serves.
    async with ws_connect(cdp.ws_url()) as ws:
        await cdp_command(ws, "Browser.getVersion")


async def test_proxy_close_is_bounded_with_a_silent_client(cdp: CdpStack) -> None:
    """A client that never answers the close frame holds up closing only for the drain bound."""
    observer = RecordingObserver()
    proxy = CdpProxy(
        ProxyConfig(host="127.0.0.1", port=0),
        make_verifier(),
        Upstream(cdp.devtools.port, cdp.devtools.browser_path),
        Metrics(),
        observer,
        drain_timeout=0.5,
    )
    async with proxy:
        silent = await anyio.connect_tcp("127.0.0.1", proxy.port)
        handshake = (
            f"GET /?signingKey={cdp.token()} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        await silent.send(handshake.encode())
        assert (await silent.receive()).startswith(b"HTTP/1.1 101")
        await observer.wait_for(("connected", 1))
        started = time.monotonic()
    elapsed = time.monotonic() - started
    await silent.aclose()
    assert 0.4 <= elapsed < 2.0


async def test_chromium_killed_clients_closed_and_proxy_answers() -> None:
    """When Chromium dies, clients get 1011 (or a dropped connection); the proxy still answers: 502."""
    with short_tempdir() as workdir:
        async with running_stack(workdir, relay=False) as stack:
            client = await ws_connect(stack.ws_url())
            await cdp_command(client, "Browser.getVersion")
            _pid, pgid = process_group_of(stack.user_data_dir)
            os.killpg(pgid, signal.SIGKILL)
            with anyio.fail_after(10):
                await client.wait_closed()
            assert client.close_code in {1011, 1006}
            with pytest.raises(ConnectionClosed):
                await client.send("{}")
            health = await http_request(stack.port, "/health")
            assert health.status == 200
            version = await http_request(stack.port, "/json/version", headers=bearer(stack.token()))
            assert version.status == 502
            with pytest.raises(InvalidStatus) as refused:
                async with ws_connect(stack.ws_url()):
                    pass
            assert refused.value.response.status_code == 502
            assert stack.proxy.active == 0
            assert await stack.chrome.wait_exited() == -signal.SIGKILL


async def test_page_closed_by_the_browser_ends_its_client(cdp: CdpStack) -> None:
    """A page target closed in Chromium ends its client's connection with a close frame, not a drop."""
    async with ws_connect(cdp.ws_url()) as browser:
        target = (await cdp_command(browser, "Target.createTarget", {"url": "about:blank"}))["targetId"]
        page = await ws_connect(cdp.ws_url(f"/devtools/page/{target}"))
        await cdp_command(page, "Runtime.evaluate", {"expression": "1"})
        await cdp_command(browser, "Target.closeTarget", {"targetId": target})
        with anyio.fail_after(5):
            await page.wait_closed()
        assert page.close_code in {1000, 1001, 1011}
        # Only the page's connection ended: the browser connection still works.
        await cdp_command(browser, "Browser.getVersion")


@dataclass
class RawClient:
    """A WebSocket client on a bare TCP stream, so a test decides when it reads."""

    stream: anyio.abc.SocketStream
    buffer: bytearray = field(default_factory=bytearray)
    message: bytearray = field(default_factory=bytearray)
    closes: list[Close] = field(default_factory=list)

    @classmethod
    async def connect(cls, port: int, target: str) -> RawClient:
        """Open the connection and complete the upgrade."""
        stream = await anyio.connect_tcp("127.0.0.1", port)
        await stream.send(
            (
                f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        client = cls(stream)
        while b"\r\n\r\n" not in client.buffer:
            client.buffer += await stream.receive()
        head, _, rest = bytes(client.buffer).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        client.buffer[:] = rest
        return client

    async def send_text(self, text: str) -> None:
        """Send one masked text frame."""
        await self.stream.send(Frame(Opcode.TEXT, text.encode()).serialize(mask=True))

    async def read_until_closed(self) -> None:
        """Read data frames into ``message``; answer the server's close frame; stop at EOF."""
        with suppress(anyio.EndOfStream, anyio.BrokenResourceError):
            while True:
                self.buffer += await self.stream.receive()
                with memoryview(self.buffer) as view:
                    frames, used = _server_frames(view)
                del self.buffer[:used]
                for opcode, payload in frames:
                    if opcode in {0, 1, 2}:
                        assert not self.closes, "data after the close frame"
                        self.message += payload
                    elif opcode == 8:
                        self.closes.append(Close.parse(payload))
                        await self.stream.send(Frame(Opcode.CLOSE, payload).serialize(mask=True))


def _server_frames(data: memoryview) -> tuple[list[tuple[int, bytes]], int]:
    """The complete unmasked frames at the start of ``data`` as (opcode, payload), and the bytes used."""
    frames, pos = [], 0
    while len(data) - pos >= 2:
        length, header = data[pos + 1] & 0x7F, 2
        if length == 126:
            length, header = int.from_bytes(data[pos + 2 : pos + 4], "big"), 4
        elif length == 127:
            length, header = int.from_bytes(data[pos + 2 : pos + 10], "big"), 10
        if len(data) - pos < header + length:
            break
        frames.append((data[pos] & 0x0F, bytes(data[pos + header : pos + header + length])))
        pos += header + length
    return frames, pos


async def test_proxy_close_mid_message_delivers_it_whole_then_1001(cdp: CdpStack) -> None:
    """Closing the proxy while a large message is half relayed finishes that message, then sends 1001."""
    metrics, size = Metrics(), 32 * MiB
    proxy = CdpProxy(
        ProxyConfig(host="127.0.0.1", port=0),
        make_verifier(),
        Upstream(cdp.devtools.port, cdp.devtools.browser_path),
        metrics,
        RecordingObserver(),
        drain_timeout=3.0,
    )

    async def stalled() -> bool:
        return metrics.traffic.bytes_from_browser > 2 * MiB

    async with ws_connect(cdp.ws_url()) as browser:
        target = (await cdp_command(browser, "Target.createTarget", {"url": "about:blank"}))["targetId"]
        async with anyio.create_task_group() as tg, proxy:
            client = await RawClient.connect(proxy.port, f"/devtools/page/{target}?signingKey={cdp.token()}")
            expression = f"'x'.repeat({size})"
            await client.send_text(
                json.dumps({"id": 1, "method": "Runtime.evaluate", "params": {"expression": expression}})
            )
            # The client is not reading: the relay fills its buffers and pauses, mid-message.
            await eventually(stalled, timeout=30)
            await anyio.sleep(0.2)
            assert metrics.traffic.bytes_from_browser < size, "the message was not mid-relay"
            tg.start_soon(client.read_until_closed)
            # Leaving the proxy's context (the SIGTERM path) waited for the message and the close.
        await client.stream.aclose()
        await cdp_command(browser, "Target.closeTarget", {"targetId": target})
    assert len(client.message) > size, f"the message was cut: {len(client.message)} bytes arrived"
    answer = json.loads(client.message)
    assert answer["id"] == 1 and len(answer["result"]["result"]["value"]) == size
    assert [close.code for close in client.closes] == [1001]
