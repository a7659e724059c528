"""Prometheus metrics around the controller's own registry, and the metrics/health HTTP endpoint.

Names follow Prometheus conventions: one prefix (``wallcrawler_``), base units in names (seconds,
bytes), ``_total`` on counters. Nothing here is registered in prometheus-client's global registry,
so tests can build as many controllers as they like in one process.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from controller.logs import get_logger

__all__ = ["Health", "Metrics", "Traffic", "serve_metrics"]

log = get_logger(__name__)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
SESSION_STATES = ("STARTING", "READY", "ACTIVE", "TERMINATING", "STOPPED", "FAILED")
# How often the metrics server measures how late the event loop wakes up.
_LAG_INTERVAL = 1.0


class Traffic:
    """What the CDP proxy relayed, as plain integers.

    The relay adds to these on every chunk; Prometheus reads them only when scraped, so the hot path
    pays for an integer addition, not a locked metric update.
    """

    __slots__ = ("bytes_from_browser", "bytes_to_browser", "messages_from_browser", "messages_to_browser")

    def __init__(self) -> None:
        self.bytes_to_browser = 0
        self.bytes_from_browser = 0
        self.messages_to_browser = 0
        self.messages_from_browser = 0

    @property
    def total_bytes(self) -> int:
        """Bytes relayed in both directions (the session item's ``proxyBytes``)."""
        return self.bytes_to_browser + self.bytes_from_browser


class _TrafficCollector(Collector):
    def __init__(self, traffic: Traffic) -> None:
        self._traffic = traffic

    def collect(self) -> Iterable[Metric]:
        t = self._traffic
        relayed = CounterMetricFamily(
            "wallcrawler_proxy_bytes",
            "Bytes relayed by the CDP proxy (WebSocket and HTTP).",
            labels=["direction"],
        )
        relayed.add_metric(["to_browser"], t.bytes_to_browser)
        relayed.add_metric(["from_browser"], t.bytes_from_browser)
        messages = CounterMetricFamily(
            "wallcrawler_cdp_messages", "Complete WebSocket messages relayed.", labels=["direction"]
        )
        messages.add_metric(["to_browser"], t.messages_to_browser)
        messages.add_metric(["from_browser"], t.messages_from_browser)
        return [relayed, messages]


class Metrics:
    """Every metric the controller exports, in one registry of its own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # No `*_created` series: they double the series count of every counter and histogram across
        # thousands of tasks, and `wallcrawler_start_time_seconds` already says when counting began.
        # (A process-wide switch; this process exports nothing else.)
        disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in prometheus-client
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        p = "wallcrawler_"
        self.traffic = Traffic()
        r.register(_TrafficCollector(self.traffic))
        # CDP proxy
        self.cdp_connections_active = Gauge(
            p + "cdp_connections_active", "CDP WebSocket connections currently relayed.", registry=r
        )
        self.cdp_connections_accepted = Counter(
            p + "cdp_connections_accepted_total", "CDP WebSocket connections accepted.", registry=r
        )
        self.cdp_requests_rejected = Counter(
            p + "cdp_requests_rejected_total",
            "Proxy requests refused, by reason (auth reasons are prefixed auth_).",
            ["reason"],
            registry=r,
        )
        self.cdp_http_requests = Counter(
            p + "cdp_http_requests_total",
            "Discovery and control HTTP requests answered.",
            ["endpoint"],
            registry=r,
        )
        # Chromium
        self.chrome_up = Gauge(p + "chrome_up", "1 while Chromium is usable.", registry=r)
        self.chrome_start_seconds = Histogram(
            p + "chrome_start_duration_seconds",
            "Time from launch until Chromium answered CDP.",
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        # Chromium is never restarted in place (its death fails the session): 0 unless that changes.
        self.chrome_restarts = Counter(p + "chrome_restarts_total", "Chromium restarts.", registry=r)
        self.chrome_exits = Counter(
            p + "chrome_unexpected_exits_total", "Chromium exits that nobody asked for.", registry=r
        )
        # Session item
        self.session_state = Gauge(
            p + "session_state", "1 for the session's current internal state.", ["state"], registry=r
        )
        self.heartbeats = Counter(p + "heartbeat_writes_total", "Heartbeats written.", registry=r)
        self.heartbeat_failures = Counter(
            p + "heartbeat_failures_total", "Heartbeats that could not be written.", registry=r
        )
        self.dynamodb_seconds = Histogram(
            p + "dynamodb_request_duration_seconds",
            "DynamoDB call latency, retries included.",
            ["operation"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        # Profile (context) archive
        self.profile_seconds = Histogram(
            p + "profile_duration_seconds",
            "Context restore and persist duration.",
            ["operation"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.profile_bytes = Counter(
            p + "profile_bytes_total", "Archive bytes downloaded or uploaded.", ["operation"], registry=r
        )
        self.profile_outcomes = Counter(
            p + "profile_operations_total",
            "Context restores and persists by outcome.",
            ["operation", "outcome"],
            registry=r,
        )
        # Task usage
        self.task_cpu_percent = Gauge(
            p + "task_cpu_usage_ratio",
            "Task CPU use since start, as a fraction of its allocation.",
            registry=r,
        )
        self.task_memory_bytes = Gauge(p + "task_memory_peak_bytes", "Peak task memory use.", registry=r)
        # Shutdown
        self.shutdown_step_seconds = Gauge(
            p + "shutdown_step_duration_seconds", "Duration of each shutdown step.", ["step"], registry=r
        )
        self.shutdown_seconds = Gauge(
            p + "shutdown_duration_seconds",
            "Time from the decision to stop until the last shutdown step ended.",
            registry=r,
        )
        # Process
        self.event_loop_lag_seconds = Gauge(
            p + "event_loop_lag_seconds",
            "How late the event loop last woke a timer (a blocked loop delays every client).",
            registry=r,
        )
        self.started_at = Gauge(p + "start_time_seconds", "Unix time the controller started.", registry=r)
        self.started_at.set(time.time())

    def set_state(self, state: str) -> None:
        """Mark ``state`` as the session's current internal state."""
        for candidate in SESSION_STATES:
            self.session_state.labels(candidate).set(1 if candidate == state else 0)

    @contextmanager
    def shutdown_step(self, step: str) -> Iterator[None]:
        """Time the enclosed block (awaits included) as the shutdown step ``step``.

        Example: ``with metrics.shutdown_step("chrome_close"): await chrome.close()``.
        """
        started = time.monotonic()
        try:
            yield
        finally:
            self.shutdown_step_seconds.labels(step).set(time.monotonic() - started)

    def exposition(self) -> bytes:
        """The registry in Prometheus's text format."""
        return generate_latest(self.registry)


class Health:
    """Readiness as plain flags the app sets; the endpoint never calls Chromium per request."""

    def __init__(self) -> None:
        self.chrome_ready = False
        self.proxy_listening = False
        self.heartbeat_written = False
        self.stopping = False

    @property
    def ready(self) -> bool:
        """True when a client can use this session."""
        return not self.failing

    @property
    def failing(self) -> list[str]:
        """Names of the readiness checks that do not pass (empty when ready), e.g. ``["stopping"]``."""
        checks = {
            "chrome": self.chrome_ready,
            "proxy": self.proxy_listening,
            "heartbeat": self.heartbeat_written,
            "stopping": not self.stopping,
        }
        return [name for name, passed in checks.items() if not passed]


def _response(status: str, body: bytes, content_type: str = "text/plain; charset=utf-8") -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


def _route(metrics: Metrics, health: Health, method: str, path: str) -> bytes:
    """The whole answer to one request. Nothing here reveals an address, a version or a token."""
    if method not in {"GET", "HEAD"}:
        return _response("405 Method Not Allowed", b"method not allowed\n")
    if path == "/metrics":
        return _response("200 OK", metrics.exposition(), CONTENT_TYPE_LATEST)
    if path in {"/livez", "/healthz", "/health"}:
        # Answering at all is the check: the event loop is running.
        return _response("200 OK", b"ok\n")
    if path == "/readyz":
        failing = health.failing
        if not failing:
            return _response("200 OK", b"ready\n")
        return _response("503 Service Unavailable", f"not ready: {','.join(failing)}\n".encode())
    return _response("404 Not Found", b"not found\n")


async def _handle(stream: anyio.abc.ByteStream, route: Callable[[str, str], bytes]) -> None:
    async with stream:
        try:
            with anyio.fail_after(5):
                head = await BufferedByteReceiveStream(stream).receive_until(b"\r\n\r\n", 8192)
            method, target, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
        except (anyio.IncompleteRead, anyio.DelimiterNotFound, TimeoutError, ValueError, OSError):
            return
        try:
            response = route(method, target.split("?", 1)[0])
        except Exception:
            # A failing collector must cost one scrape, never the controller.
            log.exception("metrics_request_failed", method=method)
            response = _response("500 Internal Server Error", b"internal error\n")
        if method == "HEAD":
            response = response.partition(b"\r\n\r\n")[0] + b"\r\n\r\n"
        try:
            await stream.send(response)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            return


async def _watch_loop_lag(metrics: Metrics, interval: float) -> None:
    """Record how late each timer fires; a blocked event loop shows up here before anywhere else."""
    while True:
        started = time.monotonic()
        await anyio.sleep(interval)
        metrics.event_loop_lag_seconds.set(max(0.0, time.monotonic() - started - interval))


async def serve_metrics(
    metrics: Metrics,
    health: Health,
    host: str,
    port: int,
    *,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``/metrics``, ``/livez`` and ``/readyz`` until cancelled.

    ``/livez`` (also ``/healthz``) answers 200 whenever the event loop runs; ``/readyz`` answers 200 when
    Chromium is usable, the proxy listens and the first heartbeat is written, else 503 naming the
    checks that fail. Only ``GET`` and ``HEAD`` are answered.

    Args:
        metrics: whose registry ``/metrics`` exposes.
        health: flags behind ``/readyz``.
        host: address to listen on.
        port: port to listen on (0 picks one).
        task_status: receives the bound port once listening.

    Raises:
        OSError: the port cannot be bound.
    """

    def route(method: str, path: str) -> bytes:
        return _route(metrics, health, method, path)

    listener = await anyio.create_tcp_listener(local_host=host, local_port=port, reuse_port=False)
    async with listener, anyio.create_task_group() as tg:
        bound = listener.extra(anyio.abc.SocketAttribute.local_port)
        log.info("metrics_listening", port=bound)
        tg.start_soon(_watch_loop_lag, metrics, _LAG_INTERVAL)
        task_status.started(bound)

        async def handler(stream: anyio.abc.SocketStream) -> None:
            await _handle(stream, route)

        await listener.serve(handler)
