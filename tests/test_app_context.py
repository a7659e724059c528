"""Contexts and session writes through the whole controller: two real sessions, one real context."""

from __future__ import annotations

import http.server
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from datetime import datetime

import pytest
from playwright.sync_api import sync_playwright

from tests.conftest import boto_client
from tests.controller_process import PROJECT, run_controller

pytestmark = pytest.mark.chromium

BUCKET = "wallcrawler-contexts-test"
PAGE = b"""<!doctype html><title>ctx</title><script>
function save() {
  document.cookie = "persistent=p-value; max-age=86400; path=/";
  document.cookie = "session=s-value; path=/";
  localStorage.setItem("ls-key", "ls-value");
  return new Promise((resolve, reject) => {
    const open = indexedDB.open("wc-db", 1);
    open.onupgradeneeded = () => open.result.createObjectStore("kv");
    open.onsuccess = () => {
      const tx = open.result.transaction("kv", "readwrite");
      tx.objectStore("kv").put("idb-value", "k");
      tx.oncomplete = () => resolve(true);
      tx.onerror = () => reject(tx.error);
    };
  });
}
function load() {
  return new Promise((resolve) => {
    const open = indexedDB.open("wc-db", 1);
    open.onupgradeneeded = () => open.result.createObjectStore("kv");
    open.onsuccess = () => {
      const get = open.result.transaction("kv").objectStore("kv").get("k");
      get.onsuccess = () => resolve({cookies: document.cookie, local: localStorage.getItem("ls-key"),
                                     idb: get.result ?? null});
    };
  });
}
</script>"""


class _Page(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)

    def log_message(self, format: str, *args: object) -> None:
        return


@pytest.fixture
def page_url() -> Iterator[str]:
    """A page on loopback that stores and reads back browser state."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def _context_env(context_id: str) -> dict[str, str]:
    return {
        "CONTEXTS_BUCKET_NAME": BUCKET,
        "CONTEXT_ID": context_id,
        "CONTEXT_S3_KEY": f"{PROJECT}/{context_id}/profile.tar.gz",
        "CONTEXT_PERSIST": "true",
    }


def test_browser_state_survives_to_the_next_session(aws_endpoint: str, page_url: str) -> None:
    """Cookies (persistent and session), localStorage and IndexedDB set 1 s before SIGTERM come back."""
    boto_client("s3", aws_endpoint).create_bucket(Bucket=BUCKET)
    env = _context_env("ctx_roundtrip")
    with run_controller(aws_endpoint, env=env) as first:
        with sync_playwright() as p:
            browser = p.chromium.connect_over_cdp(first.ws_url())
            page = browser.contexts[0].pages[0]
            page.goto(page_url)
            assert page.evaluate("save()") is True
            time.sleep(1)
            assert first.stop(signal.SIGTERM) == 0
        first.wait_event("profile_persisted", outcome="uploaded")
    with run_controller(aws_endpoint, env=env) as second:
        second.wait_event("profile_restored", outcome="restored")
        with sync_playwright() as p:
            browser = p.chromium.connect_over_cdp(second.ws_url())
            page = browser.contexts[0].pages[0]
            page.goto(page_url)
            state = page.evaluate("load()")
            browser.close()
    assert "persistent=p-value" in state["cookies"]
    assert "session=s-value" in state["cookies"]
    assert state["local"] == "ls-value"
    assert state["idb"] == "idb-value"


def test_upload_failure_keeps_stop_budget(aws_endpoint: str) -> None:
    """With the bucket gone at shutdown the controller still exits cleanly inside STOP_TIMEOUT."""
    s3 = boto_client("s3", aws_endpoint)
    s3.create_bucket(Bucket=BUCKET)
    with run_controller(aws_endpoint, env=_context_env("ctx_nobucket")) as controller:
        s3.delete_bucket(Bucket=BUCKET)
        started = time.monotonic()
        assert controller.stop(signal.SIGTERM) == 0
        assert time.monotonic() - started < 30
        controller.wait_event("profile_persisted", outcome="failed")


class _MotoRelay:
    """A TCP relay in front of moto: counts UpdateItem requests, optionally slows responses.

    Args:
        endpoint: moto's URL.
        rate: bytes per second for responses (0: as fast as they come).
    """

    def __init__(self, endpoint: str, *, rate: int = 0) -> None:
        self.upstream_port = int(endpoint.rsplit(":", 1)[1])
        self.rate = rate
        self.update_items = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def __enter__(self) -> _MotoRelay:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, requests: bool) -> None:
        with source, sink:
            while True:
                try:
                    data = source.recv(16384)
                    if not data:
                        return
                    sink.sendall(data)
                except OSError:
                    return
                if requests:
                    with self._lock:
                        self.update_items += data.count(b"DynamoDB_20120810.UpdateItem")
                elif self.rate:
                    time.sleep(len(data) / self.rate)


def test_one_update_per_heartbeat_and_transition(aws_endpoint: str) -> None:
    """Over a session: one UpdateItem per heartbeat interval plus one per transition, nothing more."""
    with _MotoRelay(aws_endpoint) as relay:
        env = {"AWS_ENDPOINT_URL": relay.url, "CDP_HEALTH_CHECK_INTERVAL": "1"}
        with run_controller(aws_endpoint, env=env) as controller:
            time.sleep(5.2)
            assert controller.stop(signal.SIGTERM) == 0
        assert not any(e.get("event") == "heartbeat_failed" for e in controller.events)
        # The serving time by the controller's own clock, from READY to the stop decision.
        ready = datetime.fromisoformat(controller.wait_event("session_ready")["timestamp"])
        stopped = datetime.fromisoformat(controller.wait_event("shutdown_requested")["timestamp"])
        heartbeats = int((stopped - ready).total_seconds())
        # READY, TERMINATING and STOPPED, plus one heartbeat a second while serving.
        assert 3 + heartbeats - 1 <= relay.update_items <= 3 + heartbeats + 1


def test_sigterm_during_restore_aborts_cleanly(aws_endpoint: str) -> None:
    """SIGTERM mid-download: Chromium never starts, nothing is uploaded, the stored object is intact."""
    s3 = boto_client("s3", aws_endpoint)
    s3.create_bucket(Bucket=BUCKET)
    env = _context_env("ctx_slow")
    stored = os.urandom(8 * 1024 * 1024)
    s3.put_object(Bucket=BUCKET, Key=env["CONTEXT_S3_KEY"], Body=stored)
    with _MotoRelay(aws_endpoint, rate=1024 * 1024) as relay:
        env["AWS_ENDPOINT_URL"] = relay.url
        with run_controller(aws_endpoint, env=env, wait_ready=False) as controller:
            controller.wait_event("metrics_listening")
            time.sleep(2)  # well inside the ~8 s download
            started = time.monotonic()
            assert controller.stop(signal.SIGTERM) == 0
            assert time.monotonic() - started < 10
        events = {e.get("event") for e in controller.events}
        assert "profile_restored" not in events, "the stop landed after the download"
        assert "chrome_starting" not in events
        assert "profile_persisted" not in events
        assert s3.get_object(Bucket=BUCKET, Key=env["CONTEXT_S3_KEY"])["Body"].read() == stored
        item = controller.item()
        assert item is not None and item["internalStatus"]["S"] == "STOPPED"
