"""The whole controller as ECS runs it: real Chromium, moto server, real clients, real signals."""

from __future__ import annotations

import os
import signal
import socket
import time
from typing import Any

import pytest
from playwright.sync_api import sync_playwright

from tests.conftest import boto_client
from tests.controller_process import TABLE, ControllerProcess, run_controller

pytestmark = pytest.mark.chromium


def _status(item: dict[str, Any] | None) -> tuple[str | None, str | None]:
    assert item is not None
    return item.get("internalStatus", {}).get("S"), item.get("status", {}).get("S")


def _wait_item(controller: ControllerProcess, predicate: Any, timeout: float = 15.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    item = controller.item()
    while time.monotonic() < deadline:
        item = controller.item()
        if item is not None and predicate(item):
            return item
        time.sleep(0.2)
    raise AssertionError(f"item never matched; last: {item}")


def _use_browser(url: str) -> None:
    with sync_playwright() as p:
        browser = p.chromium.connect_over_cdp(url)
        page = browser.contexts[0].pages[0]
        page.goto("data:text/html,<title>t</title><p>hello</p>")
        assert page.title() == "t"
        browser.close()


def test_ready_item_after_start(aws_endpoint: str) -> None:
    """After start the item says READY/RUNNING with readyAt and a heartbeat follows."""
    with run_controller(aws_endpoint) as controller:
        item = _wait_item(controller, lambda i: "lastHeartbeatAt" in i)
        assert _status(item) == ("READY", "RUNNING")
        assert item["readyAt"]["S"].endswith("Z")


def test_client_marks_active_and_counts_bytes(aws_endpoint: str) -> None:
    """A Playwright client makes the item ACTIVE and proxyBytes grows past what was relayed."""
    with run_controller(aws_endpoint) as controller:
        _use_browser(controller.ws_url())
        item = _wait_item(controller, lambda i: int(i.get("proxyBytes", {"N": "0"})["N"]) > 1000)
        assert _status(item) == ("ACTIVE", "RUNNING")
        assert "lastActiveAt" in item


def test_sigterm_stops_cleanly(aws_endpoint: str) -> None:
    """SIGTERM ends with exit 0 and the item STOPPED/COMPLETED with endedAt and totals."""
    with run_controller(aws_endpoint) as controller:
        _use_browser(controller.ws_url())
        started = time.monotonic()
        assert controller.stop(signal.SIGTERM) == 0
        assert time.monotonic() - started < 30
        item = controller.item()
        assert _status(item) == ("STOPPED", "COMPLETED")
        assert item is not None and "endedAt" in item and int(item["proxyBytes"]["N"]) > 1000
        events = [e["M"]["eventType"]["S"] for e in item["eventHistory"]["L"]]
        assert events, "transitions are recorded in eventHistory"


def test_release_from_api_is_noticed(aws_endpoint: str) -> None:
    """The API setting STOPPED makes the controller shut down gracefully within an interval."""
    with run_controller(aws_endpoint) as controller:
        boto_client("dynamodb", aws_endpoint).update_item(
            TableName=TABLE,
            Key={"sessionId": {"S": controller.session_id}},
            UpdateExpression="SET internalStatus = :s, #st = :c",
            ExpressionAttributeNames={"#st": "status"},
            ExpressionAttributeValues={":s": {"S": "STOPPED"}, ":c": {"S": "COMPLETED"}},
        )
        assert controller.process.wait(timeout=20) == 0
        controller.wait_event("shutdown_requested", reason="released")
        assert _status(controller.item()) == ("STOPPED", "COMPLETED")


def test_deleted_item_is_not_recreated(aws_endpoint: str) -> None:
    """An item deleted mid-session stops the controller and is never written again."""
    with run_controller(aws_endpoint) as controller:
        boto_client("dynamodb", aws_endpoint).delete_item(
            TableName=TABLE, Key={"sessionId": {"S": controller.session_id}}
        )
        assert controller.process.wait(timeout=20) == 0
        controller.wait_event("shutdown_requested", reason="item_gone")
        assert controller.item() is None


def test_deadline_times_out(aws_endpoint: str) -> None:
    """At expiresAt the session ends as TIMED_OUT."""
    with run_controller(aws_endpoint, ttl=6) as controller:
        assert controller.process.wait(timeout=30) == 0
        assert _status(controller.item()) == ("STOPPED", "TIMED_OUT")


def test_idle_timeout_after_last_client(aws_endpoint: str) -> None:
    """With no client for CDP_DISCONNECT_TIMEOUT the session ends itself."""
    env = {"CDP_DISCONNECT_TIMEOUT": "2", "CDP_FIRST_CONNECT_TIMEOUT": "30"}
    with run_controller(aws_endpoint, env=env) as controller:
        _use_browser(controller.ws_url())
        assert controller.process.wait(timeout=20) == 0
        controller.wait_event("shutdown_requested", reason="idle_timeout")
        assert _status(controller.item()) == ("STOPPED", "COMPLETED")


def test_keep_alive_ignores_idle(aws_endpoint: str) -> None:
    """A keepAlive session is not ended by the disconnect timeout."""
    env = {"CDP_DISCONNECT_TIMEOUT": "1", "CDP_FIRST_CONNECT_TIMEOUT": "1"}
    with run_controller(aws_endpoint, env=env, keep_alive=True) as controller:
        controller.wait_event("idle_ignored_keep_alive", timeout=30)
        assert controller.process.poll() is None
        assert controller.stop() == 0


def test_chrome_death_fails_the_session(aws_endpoint: str) -> None:
    """Chromium killed mid-session: item FAILED/ERROR and a non-zero exit."""
    with run_controller(aws_endpoint) as controller:
        pid = int(controller.wait_event("chrome_starting")["pid"])
        os.kill(pid, signal.SIGKILL)
        assert controller.process.wait(timeout=30) == 1
        assert _status(controller.item()) == ("FAILED", "ERROR")


def test_second_signal_hurries_the_shutdown(aws_endpoint: str) -> None:
    """A second SIGTERM stops waiting for a client that never answers the close, and still exits 0."""
    env = {"CDP_DRAIN_TIMEOUT": "30", "STOP_TIMEOUT": "60"}
    with run_controller(aws_endpoint, env=env) as controller:
        with socket.create_connection(("127.0.0.1", controller.proxy_port)) as silent:
            silent.sendall(
                f"GET /?signingKey={controller.token()} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n".encode()
            )
            assert silent.recv(4096).startswith(b"HTTP/1.1 101")
            controller.wait_event("cdp_connected")
            started = time.monotonic()
            controller.process.send_signal(signal.SIGTERM)
            controller.wait_event("shutdown_started")
            time.sleep(0.5)
            controller.process.send_signal(signal.SIGTERM)
            assert controller.process.wait(timeout=20) == 0
            assert time.monotonic() - started < 15
        controller.wait_event("shutdown_hurried")
        assert _status(controller.item()) == ("STOPPED", "COMPLETED")
