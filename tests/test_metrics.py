"""Metrics, liveness and readiness: the registry and endpoint in-process, then a real controller scraped
by ``promtool`` and by a real Prometheus, and readiness followed through a controller's whole life."""

from __future__ import annotations

import http.client
import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
from playwright.sync_api import sync_playwright
from prometheus_client import REGISTRY
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from controller.metrics import Health, Metrics, serve_metrics
from tests.controller_process import ControllerProcess, run_controller

# The exported families, as the README lists them (counters without their `_total` suffix, as
# prometheus_client names families).
METRIC_FAMILIES = {
    "wallcrawler_cdp_connections_active",
    "wallcrawler_cdp_connections_accepted",
    "wallcrawler_cdp_requests_rejected",
    "wallcrawler_cdp_http_requests",
    "wallcrawler_proxy_bytes",
    "wallcrawler_cdp_messages",
    "wallcrawler_chrome_up",
    "wallcrawler_chrome_start_duration_seconds",
    "wallcrawler_chrome_restarts",
    "wallcrawler_chrome_unexpected_exits",
    "wallcrawler_session_state",
    "wallcrawler_heartbeat_writes",
    "wallcrawler_heartbeat_failures",
    "wallcrawler_dynamodb_request_duration_seconds",
    "wallcrawler_profile_duration_seconds",
    "wallcrawler_profile_bytes",
    "wallcrawler_profile_operations",
    "wallcrawler_task_cpu_usage_ratio",
    "wallcrawler_task_memory_peak_bytes",
    "wallcrawler_shutdown_step_duration_seconds",
    "wallcrawler_shutdown_duration_seconds",
    "wallcrawler_event_loop_lag_seconds",
    "wallcrawler_start_time_seconds",
}


# Helpers


@dataclass
class Reply:
    """One HTTP answer."""

    status: int
    headers: dict[str, str]
    body: bytes


def http_get(port: int, path: str, *, method: str = "GET", headers: dict[str, str] | None = None) -> Reply:
    """One request to a loopback port."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        connection.close()


def samples(exposition: str, name: str, **labels: str) -> list[float]:
    """Values of the samples called ``name`` whose labels include ``labels``."""
    return [
        sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    ]


def value(exposition: str, name: str, **labels: str) -> float:
    """The one value of a sample (fails when absent or ambiguous)."""
    found = samples(exposition, name, **labels)
    assert len(found) == 1, f"{name}{labels}: {found}"
    return found[0]


def scrape(port: int) -> str:
    """The controller's /metrics text."""
    reply = http_get(port, "/metrics")
    assert reply.status == 200
    return reply.body.decode()


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def reset_moto(endpoint: str) -> None:
    """Clear every service's state in the shared moto server."""
    request = urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


async def raw_request(port: int, request: bytes) -> bytes:
    """Send ``request`` to a loopback port and read the answer until the server closes."""
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(request)
        chunks = []
        with anyio.fail_after(5):
            while True:
                try:
                    chunks.append(await stream.receive())
                except anyio.EndOfStream:
                    break
    return b"".join(chunks)


def status_of(response: bytes) -> int:
    """The status code of a raw HTTP response."""
    return int(response.split(b" ", 2)[1])


# The registry and the endpoint, in-process


class _Failing(Collector):
    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        raise RuntimeError("collector bug")


@pytest.fixture
async def served() -> Any:
    """``serve_metrics`` on a loopback port; yields (metrics, health, port)."""
    metrics, health = Metrics(), Health()
    async with anyio.create_task_group() as tg:
        port = await tg.start(serve_metrics, metrics, health, "127.0.0.1", 0)
        yield metrics, health, port
        tg.cancel_scope.cancel()


def test_registry_exports_the_documented_families() -> None:
    """The registry holds exactly the families the README documents."""
    names = {family.name for family in Metrics().registry.collect()}
    assert names == METRIC_FAMILIES


def test_registry_is_private() -> None:
    """Two Metrics coexist and nothing lands in prometheus-client's global registry."""
    Metrics(), Metrics()
    assert not [f for f in REGISTRY.collect() if f.name.startswith("wallcrawler_")]


def test_counters_have_no_created_series() -> None:
    """Counters and histograms export no ``*_created`` series."""
    metrics = Metrics()
    metrics.cdp_connections_accepted.inc()
    metrics.chrome_start_seconds.observe(1.0)
    assert b"_created" not in metrics.exposition()


def test_set_state_marks_exactly_one_state() -> None:
    """``set_state`` leaves one state at 1 and every other at 0."""
    metrics = Metrics()
    metrics.set_state("ACTIVE")
    exposition = metrics.exposition().decode()
    assert value(exposition, "wallcrawler_session_state", state="ACTIVE") == 1
    assert sum(samples(exposition, "wallcrawler_session_state")) == 1


def test_shutdown_step_times_the_block() -> None:
    """``shutdown_step`` records the block's duration under its step label."""
    metrics = Metrics()
    with metrics.shutdown_step("chrome_close"):
        time.sleep(0.05)
    seconds = value(
        metrics.exposition().decode(), "wallcrawler_shutdown_step_duration_seconds", step="chrome_close"
    )
    assert 0.05 <= seconds < 1


def test_readiness_names_failing_checks() -> None:
    """Health lists every failing check and is ready only when none fails."""
    health = Health()
    assert health.failing == ["chrome", "proxy", "heartbeat"]
    health.chrome_ready = health.proxy_listening = health.heartbeat_written = True
    assert health.ready
    health.stopping = True
    assert health.failing == ["stopping"] and not health.ready


@pytest.mark.anyio
async def test_readyz_follows_health(served: Any) -> None:
    """/readyz answers 503 naming what is missing, then 200 once every check passes."""
    _, health, port = served
    request = b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n"
    before = await raw_request(port, request)
    assert status_of(before) == 503 and before.endswith(b"not ready: chrome,proxy,heartbeat\n")
    health.chrome_ready = health.proxy_listening = health.heartbeat_written = True
    assert status_of(await raw_request(port, request)) == 200


@pytest.mark.anyio
async def test_head_has_no_body(served: Any) -> None:
    """HEAD /metrics answers the headers only."""
    _, _, port = served
    response = await raw_request(port, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = response.partition(b"\r\n\r\n")
    assert status_of(response) == 200 and b"Content-Length: " in head and body == b""


@pytest.mark.anyio
async def test_other_methods_are_refused(served: Any) -> None:
    """POST is answered 405."""
    _, _, port = served
    response = await raw_request(port, b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    assert status_of(response) == 405


@pytest.mark.anyio
async def test_unknown_path_is_404(served: Any) -> None:
    """A path the endpoint does not serve is 404."""
    _, _, port = served
    assert status_of(await raw_request(port, b"GET /debug/pprof HTTP/1.1\r\nHost: x\r\n\r\n")) == 404


@pytest.mark.anyio
async def test_failing_collector_costs_one_scrape(served: Any) -> None:
    """A collector that raises turns one scrape into a 500; the endpoint keeps serving."""
    metrics, _, port = served
    metrics.registry.register(_Failing())
    assert status_of(await raw_request(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")) == 500
    assert status_of(await raw_request(port, b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")) == 200


# A real controller, with traffic


@pytest.fixture(scope="module")
def controller(moto_server: str) -> Iterator[ControllerProcess]:
    """One controller for the module's end-to-end tests."""
    reset_moto(moto_server)
    with run_controller(moto_server) as handle:
        yield handle


@pytest.fixture(scope="module")
def traffic(controller: ControllerProcess) -> ControllerProcess:
    """The controller after a Playwright session, two refused requests and a heartbeat."""
    with sync_playwright() as p:
        browser = p.chromium.connect_over_cdp(controller.ws_url())
        page = browser.contexts[0].pages[0]
        page.goto("data:text/html,<title>m</title>")
        assert page.title() == "m"
        browser.close()
    assert http_get(controller.proxy_port, "/json/version").status == 401
    bearer = {"Authorization": f"Bearer {controller.token()}"}
    assert http_get(controller.proxy_port, "/nowhere", headers=bearer).status == 404
    deadline = time.monotonic() + 10
    while not value(scrape(controller.metrics_port), "wallcrawler_heartbeat_writes_total") >= 1:
        assert time.monotonic() < deadline, "no heartbeat counted"
        time.sleep(0.2)
    return controller


@pytest.mark.chromium
def test_exposition_passes_promtool(traffic: ControllerProcess) -> None:
    """``promtool check metrics`` finds nothing to say about the real exposition."""
    exposition = scrape(traffic.metrics_port)
    checked = subprocess.run(
        ["promtool", "check", "metrics"], input=exposition, capture_output=True, text=True, timeout=30
    )
    assert checked.returncode == 0 and not checked.stdout.strip() and not checked.stderr.strip(), checked


@pytest.mark.chromium
def test_exposition_uses_one_prefix(traffic: ControllerProcess) -> None:
    """Every sample is named ``wallcrawler_*`` and the prefix is never repeated."""
    names = {
        s.name
        for family in text_string_to_metric_families(scrape(traffic.metrics_port))
        for s in family.samples
    }
    assert names and all(n.startswith("wallcrawler_") and n.count("wallcrawler") == 1 for n in names)


@pytest.mark.chromium
def test_exposition_uses_base_units(traffic: ControllerProcess) -> None:
    """No metric name carries a scaled unit (milliseconds, kilobytes, MiB, percent)."""
    exposition = scrape(traffic.metrics_port)
    names = {family.name for family in text_string_to_metric_families(exposition)}
    scaled = ("milli", "micro", "kilo", "mega", "_kb", "_mb", "_mib", "percent", "_ms")
    assert not [n for n in names if any(unit in n for unit in scaled)]


@pytest.mark.chromium
def test_accepted_connection_is_counted(traffic: ControllerProcess) -> None:
    """The Playwright connection is counted as accepted and is no longer active."""
    exposition = scrape(traffic.metrics_port)
    assert value(exposition, "wallcrawler_cdp_connections_accepted_total") >= 1
    assert value(exposition, "wallcrawler_cdp_connections_active") == 0


@pytest.mark.chromium
def test_bytes_are_counted_per_direction(traffic: ControllerProcess) -> None:
    """Relayed bytes are counted in both directions."""
    exposition = scrape(traffic.metrics_port)
    assert value(exposition, "wallcrawler_proxy_bytes_total", direction="to_browser") > 100
    assert value(exposition, "wallcrawler_proxy_bytes_total", direction="from_browser") > 100


@pytest.mark.chromium
def test_messages_are_counted_per_direction(traffic: ControllerProcess) -> None:
    """Relayed CDP messages are counted in both directions."""
    exposition = scrape(traffic.metrics_port)
    assert value(exposition, "wallcrawler_cdp_messages_total", direction="to_browser") >= 1
    assert value(exposition, "wallcrawler_cdp_messages_total", direction="from_browser") >= 1


@pytest.mark.chromium
def test_auth_rejection_is_counted_by_reason(traffic: ControllerProcess) -> None:
    """A request without a token is counted under ``auth_missing_token``."""
    exposition = scrape(traffic.metrics_port)
    assert value(exposition, "wallcrawler_cdp_requests_rejected_total", reason="auth_missing_token") >= 1


@pytest.mark.chromium
def test_other_rejection_is_counted_by_reason(traffic: ControllerProcess) -> None:
    """An authenticated request for an unknown path is counted under ``not_found``."""
    exposition = scrape(traffic.metrics_port)
    assert value(exposition, "wallcrawler_cdp_requests_rejected_total", reason="not_found") >= 1


@pytest.mark.chromium
def test_session_state_is_active(traffic: ControllerProcess) -> None:
    """After a client connected the state gauge says ACTIVE."""
    assert value(scrape(traffic.metrics_port), "wallcrawler_session_state", state="ACTIVE") == 1


@pytest.mark.chromium
def test_chrome_is_up_after_one_start(traffic: ControllerProcess) -> None:
    """Chromium is up, started once, never restarted."""
    exposition = scrape(traffic.metrics_port)
    assert value(exposition, "wallcrawler_chrome_up") == 1
    assert value(exposition, "wallcrawler_chrome_start_duration_seconds_count") == 1
    assert value(exposition, "wallcrawler_chrome_restarts_total") == 0


@pytest.mark.chromium
def test_dynamodb_latency_is_observed(traffic: ControllerProcess) -> None:
    """Every session write shows up in the DynamoDB latency histogram."""
    exposition = scrape(traffic.metrics_port)
    count = value(exposition, "wallcrawler_dynamodb_request_duration_seconds_count", operation="UpdateItem")
    assert count >= 2  # READY, then at least one heartbeat


@pytest.mark.chromium
def test_task_usage_is_sampled(traffic: ControllerProcess) -> None:
    """The heartbeat's usage sample is exported as a peak memory in bytes."""
    assert value(scrape(traffic.metrics_port), "wallcrawler_task_memory_peak_bytes") > 1024 * 1024


@pytest.mark.chromium
def test_event_loop_lag_is_measured(traffic: ControllerProcess) -> None:
    """The event loop's timer lag is measured and small."""
    assert 0 < value(scrape(traffic.metrics_port), "wallcrawler_event_loop_lag_seconds") < 1


@pytest.mark.chromium
def test_proxy_port_does_not_serve_metrics(traffic: ControllerProcess) -> None:
    """/metrics on the proxy port is 401 without a token and 404 with one."""
    assert http_get(traffic.proxy_port, "/metrics").status == 401
    bearer = {"Authorization": f"Bearer {traffic.token()}"}
    assert http_get(traffic.proxy_port, "/metrics", headers=bearer).status == 404


@pytest.mark.chromium
def test_metrics_port_is_not_the_proxy_port(controller: ControllerProcess) -> None:
    """The metrics and proxy listeners are distinct ports."""
    assert controller.metrics_port != controller.proxy_port


@pytest.mark.chromium
def test_livez_answers_while_running(controller: ControllerProcess) -> None:
    """/livez is 200 with a body that says nothing more than ok."""
    reply = http_get(controller.metrics_port, "/livez")
    assert (reply.status, reply.body) == (200, b"ok\n")


@pytest.mark.chromium
def test_readyz_answers_200_when_ready(controller: ControllerProcess) -> None:
    """/readyz is 200 once the session is ready."""
    reply = http_get(controller.metrics_port, "/readyz")
    assert (reply.status, reply.body) == (200, b"ready\n")


@pytest.mark.chromium
def test_proxy_health_is_minimal(controller: ControllerProcess) -> None:
    """The proxy's /health answers ok without a token and reveals no address, version or server."""
    reply = http_get(controller.proxy_port, "/health")
    assert (reply.status, reply.body) == (200, b"ok\n")
    assert set(reply.headers) <= {"content-type", "content-length", "cache-control", "connection"}


# A real Prometheus scraping the controller


@pytest.fixture(scope="module")
def prometheus(traffic: ControllerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """Debian's Prometheus on loopback, scraping the controller every second; yields its port."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed (apt-get install -y prometheus)")
    home = tmp_path_factory.mktemp("prometheus")
    config = home / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: wallcrawler-controller\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{traffic.metrics_port}']}}]\n"
    )
    port = free_port()
    log_path = home / "prometheus.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={home / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_prometheus_ready(port, process, log_path)
        yield port
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_prometheus_ready(port: int, process: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, log_path.read_text()
        try:
            if http_get(port, "/-/ready").status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"prometheus not ready: {log_path.read_text()}")


def query_until(port: int, promql: str, predicate: Any, timeout: float = 20.0) -> float:
    """Ask Prometheus's HTTP API until the single result's value satisfies ``predicate``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        reply = http_get(port, "/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
        last = json.loads(reply.body)
        results = last.get("data", {}).get("result", [])
        if last.get("status") == "success" and len(results) == 1:
            number = float(results[0]["value"][1])
            if predicate(number):
                return number
        time.sleep(0.25)
    raise AssertionError(f"{promql}: last answer {last}")


@pytest.mark.chromium
def test_prometheus_reads_accepted_connections(prometheus: int) -> None:
    """A real Prometheus scrapes the controller and reports the accepted connection."""
    query_until(
        prometheus,
        'wallcrawler_cdp_connections_accepted_total{job="wallcrawler-controller"}',
        lambda v: v >= 1,
    )


@pytest.mark.chromium
def test_prometheus_reads_proxy_bytes(prometheus: int) -> None:
    """A real Prometheus reports the bytes relayed in both directions."""
    query_until(prometheus, "sum(wallcrawler_proxy_bytes_total)", lambda v: v > 200)


# Readiness through a controller's whole life


@dataclass
class Timeline:
    """What /readyz and /metrics said at each stage of one controller's life."""

    before_ready: Reply | None = None
    when_ready: Reply | None = None
    during_shutdown: Reply | None = None
    last_scrape: str = ""
    exit_code: int | None = None
    events: list[dict[str, Any]] = field(default_factory=list)


def _hold_websocket(controller: ControllerProcess) -> socket.socket:
    """A raw client that opens the browser WebSocket and will never answer a close frame."""
    client = socket.create_connection(("127.0.0.1", controller.proxy_port), timeout=10)
    client.sendall(
        (
            f"GET /devtools/browser?signingKey={controller.token()} HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{controller.proxy_port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    assert client.recv(4096).startswith(b"HTTP/1.1 101")
    return client


@pytest.fixture(scope="module")
def timeline(moto_server: str) -> Timeline:
    """Watch /readyz from the metrics port's first moment to the end of a SIGTERM shutdown.

    A client that never answers the proxy's close frame keeps the drain step (2 s) open, so the
    shutdown lasts long enough to be observed.
    """
    reset_moto(moto_server)
    record = Timeline()
    with run_controller(moto_server, wait_ready=False) as controller:
        record.before_ready = http_get(controller.metrics_port, "/readyz")
        controller.wait_event("session_ready", timeout=60)
        record.when_ready = http_get(controller.metrics_port, "/readyz")
        held = _hold_websocket(controller)
        try:
            controller.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 20
            while controller.process.poll() is None and time.monotonic() < deadline:
                try:
                    reply = http_get(controller.metrics_port, "/readyz")
                    if reply.status != 200 and record.during_shutdown is None:
                        record.during_shutdown = reply
                    record.last_scrape = scrape(controller.metrics_port)
                except (OSError, AssertionError, http.client.HTTPException):
                    pass  # the port closes as the process ends
                time.sleep(0.02)
        finally:
            held.close()
        record.exit_code = controller.stop()
        record.events = list(controller.events)
    return record


@pytest.mark.chromium
def test_readyz_is_503_before_ready(timeline: Timeline) -> None:
    """Before Chromium, the proxy and the first heartbeat, /readyz is 503."""
    assert timeline.before_ready is not None
    assert timeline.before_ready.status == 503
    assert timeline.before_ready.body.startswith(b"not ready: chrome")


@pytest.mark.chromium
def test_readyz_is_200_once_ready(timeline: Timeline) -> None:
    """Once the session is ready, /readyz is 200."""
    assert timeline.when_ready is not None and timeline.when_ready.status == 200


@pytest.mark.chromium
def test_readyz_is_503_once_shutdown_started(timeline: Timeline) -> None:
    """After SIGTERM, /readyz is 503 saying the controller is stopping."""
    assert timeline.during_shutdown is not None
    assert (timeline.during_shutdown.status, timeline.during_shutdown.body) == (503, b"not ready: stopping\n")


@pytest.mark.chromium
def test_shutdown_state_and_steps_are_exported(timeline: Timeline) -> None:
    """The last scrape before exit shows TERMINATING and the proxy drain's duration."""
    assert value(timeline.last_scrape, "wallcrawler_session_state", state="TERMINATING") == 1
    drain = value(timeline.last_scrape, "wallcrawler_shutdown_step_duration_seconds", step="proxy_drain")
    assert 1.5 < drain < 5


@pytest.mark.chromium
def test_shutdown_with_a_silent_client_is_clean(timeline: Timeline) -> None:
    """A client that ignores the close frame does not keep the controller from exiting 0."""
    assert timeline.exit_code == 0
