"""Logs: redaction and the JSON pipeline in-process, then a real controller attacked with the whole token
matrix and every hostile path, whose every output line is checked afterwards."""

from __future__ import annotations

import io
import json
import logging
import secrets
import socket
import sys
import threading
import time
import urllib.request
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import jwt
import pytest
import structlog
from playwright.sync_api import sync_playwright
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from controller.logs import REDACTED, bind_context, configure_logging, get_logger, redact, redact_text
from tests.conftest import boto_client
from tests.controller_process import PROJECT, ControllerProcess, make_token, run_controller

JWT = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJzZXNzX3gifQ.c2lnbmF0dXJlLXNpZ25hdHVyZS1zaWduYXR1cmU"
ALG_NONE = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJzZXNzX3gifQ."


# redact_text


def test_redact_text_signing_key_in_query() -> None:
    """``signingKey=…`` in a URL loses its value, the other parameters stay."""
    assert redact_text("ws://h:9223/?signingKey=abc.def&x=1") == f"ws://h:9223/?signingKey={REDACTED}&x=1"


def test_redact_text_percent_encoded_signing_key() -> None:
    """A percent-encoded ``signingKey%3D…`` (as in devtoolsFrontendUrl) loses its value."""
    text = "/devtools/inspector.html?ws=h:1/devtools/page/A%3FsigningKey%3Dsecret-value%26b%3D2"
    assert (
        redact_text(text)
        == f"/devtools/inspector.html?ws=h:1/devtools/page/A%3FsigningKey%3D{REDACTED}%26b%3D2"
    )


def test_redact_text_authorization_header_line() -> None:
    """An ``Authorization:`` header line loses its value."""
    assert redact_text("Authorization: Bearer abc123\r\nHost: x") == f"Authorization: {REDACTED}\r\nHost: x"


def test_redact_text_bearer_anywhere() -> None:
    """A bearer credential in free text loses its value."""
    assert redact_text("sent bearer abc.def-ghi to upstream") == f"sent bearer {REDACTED} to upstream"


def test_redact_text_x_bb_signing_key() -> None:
    """An ``x-bb-signing-key`` header, in header or JSON form, loses its value."""
    assert redact_text("x-bb-signing-key: s3cr3t") == f"x-bb-signing-key: {REDACTED}"
    assert redact_text('{"X-BB-Signing-Key": "s3cr3t"}') == f'{{"X-BB-Signing-Key": "{REDACTED}"}}'


def test_redact_text_cookie_headers() -> None:
    """``Cookie`` and ``Set-Cookie`` values are removed whole."""
    assert redact_text("cookie: a=1; b=2") == f"cookie: {REDACTED}"
    assert redact_text("Set-Cookie: sid=xyz; Path=/") == f"Set-Cookie: {REDACTED}"


def test_redact_text_jwt_anywhere() -> None:
    """A JWT-shaped blob is removed wherever it appears, unsigned ones too."""
    assert JWT not in redact_text(f"ValueError: bad token {JWT} (line 1)")
    assert redact_text(f"token={ALG_NONE}!") == f"token={REDACTED}!"


def test_redact_text_keeps_ordinary_text() -> None:
    """Text without secrets is unchanged."""
    text = "proxy_auth_rejected reason=wrong_session path=/devtools/browser key_count=2"
    assert redact_text(text) == text


# The redact processor


def test_redact_drops_secret_fields() -> None:
    """Fields named like a secret lose their values, whatever their case or separators."""
    event = {
        "event": "x",
        "Authorization": "Bearer t",
        "x-bb-signing-key": "t",
        "signingKey": "t",
        "cookie": "a=b",
        "Set-Cookie": "a=b",
        "params": {"url": "https://example.test"},
    }
    assert redact(None, "info", event) == {"event": "x", **{k: REDACTED for k in event if k != "event"}}


def test_redact_recurses_into_containers() -> None:
    """Secret keys and token-shaped text are found inside nested mappings and lists."""
    event = {
        "event": "x",
        "request": {"headers": {"Cookie": "sid=1", "Host": "h"}, "urls": [f"/?signingKey={JWT}"]},
    }
    assert redact(None, "info", event)["request"] == {
        "headers": {"Cookie": REDACTED, "Host": "h"},
        "urls": [f"/?signingKey={REDACTED}"],
    }


def test_redact_scrubs_bytes_and_objects() -> None:
    """Bytes and arbitrary objects become scrubbed strings instead of unscrubbed reprs."""
    out = redact(None, "info", {"event": "x", "raw": b"cookie: sid=1", "error": ValueError(f"bad {JWT}")})
    assert out["raw"] == f"cookie: {REDACTED}" and out["error"] == f"bad {REDACTED}"


def test_redact_keeps_numbers_and_formatter_meta() -> None:
    """Numbers, booleans and None pass unchanged; structlog's ``_record`` keeps its object."""
    record = logging.LogRecord("n", logging.INFO, "p", 1, "m", None, None)
    out = redact(None, "info", {"event": "x", "n": 3, "ok": True, "none": None, "_record": record})
    assert out == {"event": "x", "n": 3, "ok": True, "none": None, "_record": record}


# The pipeline, in-process


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """``configure_logging("DEBUG")`` into a buffer; everything it changed is restored afterwards."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    libraries = (
        "websockets",
        "asyncio",
        "anyio",
        "botocore",
        "aiobotocore",
        "boto3",
        "s3transfer",
        "urllib3",
    )
    saved_levels = {name: logging.getLogger(name).level for name in libraries}
    hooks = (sys.excepthook, threading.excepthook, sys.unraisablehook)
    saved_structlog = structlog.get_config()
    buffer = io.StringIO()
    configure_logging("DEBUG", stream=buffer)
    try:
        yield buffer
    finally:
        logging.captureWarnings(False)
        sys.excepthook, threading.excepthook, sys.unraisablehook = hooks
        root.handlers[:], root.level = saved_handlers, saved_level
        for name, level in saved_levels.items():
            logging.getLogger(name).setLevel(level)
        structlog.configure(**saved_structlog)
        structlog.contextvars.clear_contextvars()


def lines_of(buffer: io.StringIO) -> list[dict[str, Any]]:
    """Each line of the buffer, parsed (fails on a line that is not a JSON object)."""
    parsed = [json.loads(line) for line in buffer.getvalue().splitlines()]
    assert all(isinstance(p, dict) for p in parsed)
    return parsed


def test_structlog_line_is_json_with_context(captured: io.StringIO) -> None:
    """A structlog event is one JSON object with level, logger, timestamp and contextvars."""
    bind_context(session_id="sess_log")
    get_logger("controller.test").info("thing_happened", count=2)
    (line,) = lines_of(captured)
    assert line["event"] == "thing_happened" and line["count"] == 2 and line["session_id"] == "sess_log"
    assert line["level"] == "info" and line["logger"] == "controller.test" and line["timestamp"].endswith("Z")


def test_structlog_traceback_is_a_field(captured: io.StringIO) -> None:
    """``log.exception`` puts the traceback, scrubbed, in the ``exception`` field of one line."""
    try:
        raise ValueError(f"token {JWT}")
    except ValueError:
        get_logger("controller.test").exception("it_failed")
    (line,) = lines_of(captured)
    assert line["exception"].startswith("Traceback") and "ValueError" in line["exception"]
    assert JWT not in captured.getvalue()


def test_stdlib_traceback_is_a_field(captured: io.StringIO) -> None:
    """A standard-library record with exc_info becomes one JSON line with an ``exception`` field."""
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("asyncio").exception("Task exception was never retrieved")
    (line,) = lines_of(captured)
    assert line["logger"] == "asyncio" and "RuntimeError: boom" in line["exception"]


def test_library_debug_is_dropped_at_debug_level(captured: io.StringIO) -> None:
    """With the controller at DEBUG, websockets and botocore still log nothing below INFO."""
    logging.getLogger("websockets.server").debug("> GET / HTTP/1.1")
    logging.getLogger("botocore.endpoint").debug("Sending http request")
    logging.getLogger("botocore.credentials").info("Found credentials in environment variables.")
    get_logger("controller.test").debug("own_debug")
    assert [line["event"] for line in lines_of(captured)] == ["own_debug"]


def test_thread_exception_is_a_json_line(captured: io.StringIO) -> None:
    """An exception nobody caught in a thread is logged as JSON, not printed raw."""
    worker = threading.Thread(target=lambda: 1 / 0, name="worker")
    worker.start()
    worker.join()
    (line,) = lines_of(captured)
    assert line["event"] == "thread_exception" and line["thread_name"] == "worker"
    assert "ZeroDivisionError" in line["exception"]


def test_warning_is_a_json_line(captured: io.StringIO) -> None:
    """A warning goes through logging as a JSON line instead of stderr."""
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        logging.captureWarnings(True)  # catch_warnings reset showwarning; configure_logging set this
        warnings.warn("careful", UserWarning, stacklevel=1)
    (line,) = lines_of(captured)
    assert line["logger"] == "py.warnings" and "careful" in line["event"]


# A real controller under attack


HOSTILE_TARGETS = (
    "@evil.example/x",
    "//evil.example/x",
    "http://evil.example/x",
    "/devtools/../json/new",
    "/devtools/%2e%2e/json/new",
)


@dataclass
class Attack:
    """Everything sent to one controller and everything it printed."""

    session_id: str = ""
    key: str = ""
    cookie: str = ""
    tokens: list[str] = field(default_factory=list)
    expected_reasons: Counter[str] = field(default_factory=Counter)
    auth_statuses: list[int] = field(default_factory=list)
    hostile_statuses: dict[str, int] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    exit_code: int | None = None

    @property
    def events(self) -> list[dict[str, Any]]:
        """Every line, parsed."""
        return [json.loads(line) for line in self.lines]


def token_matrix(controller: ControllerProcess) -> dict[str, tuple[str | None, str]]:
    """Every unacceptable token, with the reason the controller must give."""
    now = int(time.time())
    claims = jwt.decode(controller.token(), options={"verify_signature": False})
    other_key = secrets.token_urlsafe(40)
    return {
        "none": (None, "missing_token"),
        "malformed": ("not-a-jwt-" + secrets.token_hex(16), "malformed_token"),
        "alg_none": (jwt.encode(claims, "", algorithm="none"), "algorithm_not_allowed"),
        "hs512": (jwt.encode(claims, controller.key * 2, algorithm="HS512"), "algorithm_not_allowed"),
        "wrong_key": (make_token(other_key, controller.session_id), "bad_signature"),
        "expired": (controller.token(exp=now - 3600, iat=now - 7200, nbf=now - 7200), "expired"),
        "nbf_future": (controller.token(nbf=now + 3600), "not_yet_valid"),
        "wrong_aud": (controller.token(aud=["other-audience"]), "wrong_audience"),
        "wrong_iss": (controller.token(iss="not-wallcrawler"), "wrong_issuer"),
        "other_session": (make_token(controller.key, "sess_someoneelse"), "wrong_session"),
        "missing_claims": (controller.token(exp=None), "missing_claim_exp"),
        "wrong_project": (controller.token(projectId=PROJECT + "_other"), "wrong_project"),
    }


def raw_status(port: int, target: str, headers: dict[str, str] | None = None) -> int:
    """Send one request head over a raw socket and return the answer's status code."""
    head = f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.sendall((head + "\r\n").encode())
        answer = b""
        while b"\r\n" not in answer:
            chunk = client.recv(4096)
            if not chunk:
                break
            answer += chunk
    return int(answer.split(b" ", 2)[1])


UPGRADE = {
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    "Sec-WebSocket-Version": "13",
}


def attack_with_tokens(controller: ControllerProcess, record: Attack) -> None:
    """Every bad token in every place a token is accepted, over HTTP and WebSocket handshakes."""
    port = controller.proxy_port
    for token, reason in token_matrix(controller).values():
        if token is not None:
            record.tokens.append(token)
        query = f"?signingKey={token}" if token is not None else ""
        attempts: list[tuple[str, dict[str, str]]] = [
            (f"/json/version{query}", {}),
            (f"/devtools/browser{query}", UPGRADE),
        ]
        if token is not None:
            attempts += [
                ("/json/version", {"Authorization": f"Bearer {token}"}),
                ("/json/list", {"x-bb-signing-key": token}),
                ("/devtools/browser", {**UPGRADE, "Authorization": f"Bearer {token}"}),
            ]
        for target, headers in attempts:
            record.auth_statuses.append(raw_status(port, target, headers))
            record.expected_reasons[reason] += 1
        # A real WebSocket client, as a customer's library would try it.
        with pytest.raises(InvalidStatus) as refused:
            connect(f"ws://127.0.0.1:{port}/{query}", open_timeout=10).close()
        record.auth_statuses.append(refused.value.response.status_code)
        record.expected_reasons[reason] += 1


def attack_with_paths(controller: ControllerProcess, record: Attack) -> None:
    """Every hostile path with a valid token, in a header and (for the WebSocket form) in the query."""
    port = controller.proxy_port
    for target in HOSTILE_TARGETS:
        token = controller.token()
        record.tokens.append(token)
        record.hostile_statuses[target] = raw_status(port, target, {"Authorization": f"Bearer {token}"})
        query_token = controller.token()
        record.tokens.append(query_token)
        record.hostile_statuses[f"{target} (query, upgrade)"] = raw_status(
            port, f"{target}?signingKey={query_token}", UPGRADE
        )


def use_browser_with_cookie(controller: ControllerProcess, record: Attack) -> None:
    """A good Playwright session through discovery that sets and reads back a cookie."""
    token = controller.token()
    record.tokens.append(token)
    with sync_playwright() as p:
        browser = p.chromium.connect_over_cdp(f"http://127.0.0.1:{controller.proxy_port}?signingKey={token}")
        context = browser.contexts[0]
        context.add_cookies([{"name": "sid", "value": record.cookie, "url": "https://example.test/"}])
        page = context.pages[0] if context.pages else context.new_page()
        page.goto("data:text/html,<title>logs</title>")
        assert [c["value"] for c in context.cookies("https://example.test/")] == [record.cookie]
        browser.close()


@pytest.fixture(scope="module")
def attack(moto_server: str) -> Attack:
    """Run the whole attack against one controller at DEBUG level (context persisted), then stop it."""
    request = urllib.request.Request(f"{moto_server}/moto-api/reset", method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
    bucket = "wallcrawler-contexts-logs"
    boto_client("s3", moto_server).create_bucket(Bucket=bucket)
    env = {
        "LOG_LEVEL": "DEBUG",
        "CONTEXTS_BUCKET_NAME": bucket,
        "CONTEXT_ID": "ctx_logs",
        "CONTEXT_S3_KEY": f"{PROJECT}/ctx_logs/profile.tar.gz",
        "CONTEXT_PERSIST": "true",
    }
    record = Attack(cookie="cookie-" + secrets.token_hex(16))
    with run_controller(moto_server, env=env) as controller:
        record.session_id, record.key = controller.session_id, controller.key
        attack_with_tokens(controller, record)
        attack_with_paths(controller, record)
        use_browser_with_cookie(controller, record)
        controller.wait_event("cdp_disconnected")
        record.exit_code = controller.stop()
        controller.wait_event("controller_exit")
        record.lines = list(controller.lines)
    return record


def secret_fragments(record: Attack) -> set[str]:
    """Every token used, and each of its payload and signature segments on its own."""
    fragments = set(record.tokens)
    for token in record.tokens:
        fragments.update(part for part in token.split(".")[1:] if len(part) >= 16)
    return fragments


@pytest.mark.chromium
def test_attack_stops_cleanly(attack: Attack) -> None:
    """The attacked controller still stops with exit 0 and logs its exit."""
    assert attack.exit_code == 0
    assert attack.events[-1]["event"] == "controller_exit"


@pytest.mark.chromium
def test_every_bad_token_is_refused_with_401(attack: Attack) -> None:
    """Every attempt of the token matrix, HTTP or WebSocket, is answered 401."""
    assert len(attack.auth_statuses) == sum(attack.expected_reasons.values()) > 50
    assert set(attack.auth_statuses) == {401}


@pytest.mark.chromium
def test_every_hostile_path_is_refused(attack: Attack) -> None:
    """Every hostile path is refused with a 4xx even with a valid token."""
    assert len(attack.hostile_statuses) == 2 * len(HOSTILE_TARGETS)
    assert all(400 <= status < 500 for status in attack.hostile_statuses.values()), attack.hostile_statuses


@pytest.mark.chromium
def test_every_line_is_a_json_object(attack: Attack) -> None:
    """Every stdout line, the whole run long, parses as one JSON object with an event name."""
    assert len(attack.lines) > 50
    for line in attack.lines:
        event = json.loads(line)
        assert isinstance(event, dict) and isinstance(event.get("event"), str), line


@pytest.mark.chromium
def test_no_line_contains_a_token(attack: Attack) -> None:
    """No token used, nor any token's payload or signature, appears in any line."""
    fragments = secret_fragments(attack)
    assert len(fragments) > 40
    leaks = [(f[:12], line) for line in attack.lines for f in fragments if f in line]
    assert not leaks


@pytest.mark.chromium
def test_no_line_contains_the_signing_key(attack: Attack) -> None:
    """The signing key appears in no line."""
    assert not [line for line in attack.lines if attack.key in line]


@pytest.mark.chromium
def test_no_line_contains_the_cookie_value(attack: Attack) -> None:
    """The cookie set through the proxy (then exported and persisted) appears in no line."""
    assert any(e["event"] == "cookies_exported" for e in attack.events)
    assert not [line for line in attack.lines if attack.cookie in line]


@pytest.mark.chromium
def test_each_auth_rejection_is_logged_with_its_reason(attack: Attack) -> None:
    """Every refused token has its own ``proxy_auth_rejected`` line carrying the reason."""
    logged = Counter(e["reason"] for e in attack.events if e["event"] == "proxy_auth_rejected")
    assert logged == attack.expected_reasons


@pytest.mark.chromium
def test_refusals_log_paths_without_queries(attack: Attack) -> None:
    """Refusal lines carry the path but never its query string."""
    paths = [
        e["path"] for e in attack.events if e["event"] in {"proxy_auth_rejected", "proxy_request_refused"}
    ]
    assert paths and all("?" not in path and "signingKey" not in path for path in paths)


@pytest.mark.chromium
def test_library_loggers_stay_at_info_or_above(attack: Attack) -> None:
    """With LOG_LEVEL=DEBUG, no line below INFO comes from anything but the controller."""
    events = attack.events
    assert all("level" in e and "logger" in e for e in events)
    assert not [e for e in events if e["level"] == "debug" and not e["logger"].startswith("controller")]


@pytest.mark.chromium
def test_controller_lines_carry_the_session_id(attack: Attack) -> None:
    """Lines logged while the session runs carry its id from contextvars."""
    running = [e for e in attack.events if e["logger"].startswith("controller.")]
    assert running and all(e.get("session_id") == attack.session_id for e in running)


@pytest.mark.chromium
def test_connection_lines_carry_a_connection_id(attack: Attack) -> None:
    """Every proxy line about one connection carries its id."""
    per_connection = {"proxy_auth_rejected", "proxy_request_refused", "cdp_connected", "cdp_disconnected"}
    lines = [e for e in attack.events if e["event"] in per_connection]
    assert lines and all(isinstance(e.get("conn_id"), int) for e in lines)
