"""The composition root: builds every part, wires them, and runs the session's lifecycle.

Only this module knows every other one. The nesting of :func:`_session`'s resources is the shutdown
order, unwound by one ``AsyncExitStack``:

    final session write  <- entered first, runs last (STOPPED/FAILED, totals)
    profile persist      <- after Chromium has exited and flushed its profile
    Chromium             <- Browser.close, bounded, then signals
    cookie export        <- while Chromium still runs, after the last client is gone
    CDP proxy            <- clients closed with 1001 first
    background tasks     <- heartbeat, timers, watchdog: cancelled as soon as a stop is decided
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import anyio
import anyio.abc
from aiobotocore.session import get_session

from controller.auth import TokenVerifier, fetch_signing_keys
from controller.chrome import Chrome
from controller.config import Config
from controller.errors import ConfigError, ControllerError, SessionGoneError, SessionStoreError
from controller.logs import bind_context, get_logger
from controller.metrics import Health, Metrics, serve_metrics
from controller.profile import PersistResult, ProfileStore, RestoreResult, load_cookies, save_cookies
from controller.proxy import CdpProxy, Upstream
from controller.session_store import SessionStore, SessionView, dynamodb_client_config
from controller.usage import UsageSampler

if TYPE_CHECKING:
    from types_aiobotocore_dynamodb import DynamoDBClient
    from types_aiobotocore_s3 import S3Client

__all__ = ["AppStatus", "run"]

log = get_logger(__name__)

ShutdownTrigger = Callable[[], Awaitable[str]]
T = TypeVar("T")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
# Bound on the TERMINATING write; it comes out of the budget's margin.
_TERMINATING_WRITE_TIMEOUT = 1.0


@dataclass(slots=True)
class AppStatus:
    """What a running controller tells its caller (tests, the local runner) once it serves."""

    proxy_port: int = 0
    metrics_port: int = 0
    chrome_port: int = 0
    ready: anyio.Event = field(default_factory=anyio.Event)


class _Stop:
    """The first reason to stop wins; a later signal only hurries the steps."""

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.reason = ""
        self.failed = False
        self.timed_out = False
        self._hurry_callbacks: list[Callable[[], None]] = []

    def on_hurry(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` if a second signal asks to hurry the shutdown."""
        self._hurry_callbacks.append(callback)

    def hurry(self) -> None:
        log.warning("shutdown_hurried")
        for callback in self._hurry_callbacks:
            callback()

    def set(self, reason: str, *, failed: bool = False, timed_out: bool = False) -> None:
        if self.event.is_set():
            return
        self.reason, self.failed, self.timed_out = reason, failed, timed_out
        log.info("shutdown_requested", reason=reason, failed=failed)
        self.event.set()


class _Activity:
    """Counts the proxy's WebSocket clients for the timers; implements ConnectionObserver."""

    def __init__(self) -> None:
        self.active = 0
        self.ever_connected = False
        self._changed = anyio.Event()

    def client_connected(self, active: int) -> None:
        self.active = active
        self.ever_connected = True
        self._wake()

    def client_disconnected(self, active: int) -> None:
        self.active = active
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def changed(self) -> None:
        await self._changed.wait()


@dataclass(slots=True)
class _ItemState:
    """What the controller knows of its session item, from the values its own writes returned."""

    expires_at: float | None = None
    keep_alive: bool = False

    def update(self, view: SessionView) -> None:
        self.expires_at = view.expires_at
        self.keep_alive = view.keep_alive


async def run(
    config: Config,
    *,
    shutdown_trigger: ShutdownTrigger,
    environ: Mapping[str, str],
    status: AppStatus | None = None,
) -> int:
    """Run one session from start to a clean stop.

    Args:
        config: the parsed configuration.
        shutdown_trigger: awaited repeatedly; its first return starts the shutdown, the second hurries it.
        environ: the process environment (Chromium gets a scrubbed copy).
        status: filled in with the bound ports, its ``ready`` event set once the session serves.

    Returns:
        The process exit code: 0 after a clean stop, 1 after a failure, 2 for a bad configuration
        found at start (a secret that cannot be read).
    """
    status = status or AppStatus()
    metrics, health = Metrics(), Health()
    stop = _Stop()
    bind_context(session_id=config.session_id)
    started = time.monotonic()
    metrics.set_state("STARTING")
    async with anyio.create_task_group() as outer:
        status.metrics_port = await outer.start(
            serve_metrics, metrics, health, config.metrics_host, config.metrics_port
        )
        outer.start_soon(_follow_trigger, shutdown_trigger, stop)
        try:
            code = await _session(_Run(config, environ, metrics, health, stop, status))
        finally:
            outer.cancel_scope.cancel()
    log.info("controller_exit", code=code, reason=stop.reason, seconds=round(time.monotonic() - started, 3))
    return code


async def _follow_trigger(trigger: ShutdownTrigger, stop: _Stop) -> None:
    # Lives in the outer task group, so a second signal is heard during the shutdown steps too.
    stop.set(await trigger())
    await trigger()
    stop.hurry()


def _aws_kwargs(config: Config) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"region_name": config.aws_region}
    if config.aws_endpoint_url:
        kwargs["endpoint_url"] = config.aws_endpoint_url
    return kwargs


async def _signing_keys(config: Config) -> list[bytes]:
    if config.signing_key is not None:
        return [config.signing_key.reveal().encode()]
    assert config.signing_secret_arn is not None
    async with get_session().create_client("secretsmanager", **_aws_kwargs(config)) as client:
        return await fetch_signing_keys(client, config.signing_secret_arn)


@dataclass(frozen=True, slots=True)
class _Run:
    """What every step of one run shares."""

    config: Config
    environ: Mapping[str, str]
    metrics: Metrics
    health: Health
    stop: _Stop
    status: AppStatus


async def _session(run: _Run) -> int:
    """Start everything in order, serve until a stop is decided, then unwind in reverse order."""
    config, metrics, health, stop = run.config, run.metrics, run.health, run.stop
    budget = config.shutdown
    code = EXIT_OK
    async with AsyncExitStack() as stack:
        aws = get_session()
        dynamodb: DynamoDBClient = await stack.enter_async_context(
            aws.create_client(
                "dynamodb", config=dynamodb_client_config(config.dynamodb_timeout), **_aws_kwargs(config)
            )
        )
        store = SessionStore(
            dynamodb,
            config.sessions_table,
            config.session_id,
            history_limit=config.event_history_limit,
            metrics=metrics,
        )
        sampler = UsageSampler(config.ecs_metadata_uri, metrics)
        final = _Final(store, sampler, metrics, stop, budget.final_write)
        stack.push_async_callback(final.write)
        try:
            await _serve(run, stack, store, sampler)
        except ConfigError as exc:
            log.error("config_invalid", problems=exc.problems)
            stop.set("config_invalid", failed=True)
            code = EXIT_CONFIG
        except ControllerError as exc:
            log.error("session_failed", error=str(exc), error_type=type(exc).__name__)
            stop.set(type(exc).__name__, failed=True)
        except Exception:
            log.exception("session_crashed")
            stop.set("internal_error", failed=True)
        health.stopping = True
        metrics.set_state("TERMINATING")
        log.info("shutdown_started", reason=stop.reason)
        shutdown_started = time.monotonic()
        if not final.gone:
            with metrics.shutdown_step("terminating_write"):
                await final.terminating()
    metrics.shutdown_seconds.set(time.monotonic() - shutdown_started)
    if stop.failed and code == EXIT_OK:
        code = EXIT_FAILED
    metrics.set_state("FAILED" if stop.failed else "STOPPED")
    return code


class _Final:
    """The session item's last writes: TERMINATING at the start of shutdown, the end state last."""

    def __init__(
        self, store: SessionStore, sampler: UsageSampler, metrics: Metrics, stop: _Stop, bound: float
    ):
        self.store, self.sampler, self.metrics, self.stop, self.bound = store, sampler, metrics, stop, bound
        self.gone = False

    async def terminating(self) -> None:
        with anyio.move_on_after(_TERMINATING_WRITE_TIMEOUT, shield=True):
            try:
                await self.store.mark_terminating(self.stop.reason)
            except SessionGoneError:
                self.gone = True
            except SessionStoreError as exc:
                log.warning("session_write_failed", step="terminating", error=str(exc))

    async def write(self) -> None:
        if self.gone or self.stop.reason == "item_gone":
            log.info("session_item_gone", detail="final state not written")
            return
        proxy_bytes = self.metrics.traffic.total_bytes
        with self.metrics.shutdown_step("final_write"), anyio.move_on_after(self.bound, shield=True) as scope:
            try:
                usage = await self.sampler.sample()
                if self.stop.failed:
                    await self.store.mark_failed(
                        reason=self.stop.reason, proxy_bytes=proxy_bytes, usage=usage
                    )
                else:
                    await self.store.mark_stopped(
                        reason=self.stop.reason,
                        timed_out=self.stop.timed_out,
                        proxy_bytes=proxy_bytes,
                        usage=usage,
                    )
            except SessionGoneError:
                log.info("session_item_gone", detail="final state not written")
            except SessionStoreError as exc:
                log.error("session_write_failed", step="final", error=str(exc))
        if scope.cancelled_caught:
            log.error("session_write_failed", step="final", error="timeout")


async def _serve(run: _Run, stack: AsyncExitStack, store: SessionStore, sampler: UsageSampler) -> None:
    """Start the parts in order (each registered on ``stack``), then serve until a stop is decided."""
    config, metrics, health, stop, status = run.config, run.metrics, run.health, run.stop, run.status
    budget = config.shutdown
    keys = await _signing_keys(config)
    verifier = TokenVerifier(
        keys,
        session_id=config.session_id,
        project_id=config.project_id,
        leeway=config.jwt_leeway,
        max_lifetime=config.jwt_max_lifetime,
    )
    # A short private directory: Chromium's lock socket path must stay under ~108 bytes.
    workdir = Path(tempfile.mkdtemp(prefix="wc-", dir="/tmp"))
    stack.callback(shutil.rmtree, workdir, ignore_errors=True)
    (workdir / "tmp").mkdir()
    user_data_dir = config.chrome.user_data_dir or workdir / "profile"

    restored: RestoreResult | None = None
    profiles: ProfileStore | None = None
    if config.context is not None:
        s3: S3Client = await stack.enter_async_context(
            get_session().create_client("s3", **_aws_kwargs(config))
        )
        profiles = ProfileStore(s3, config.context, config.profile_limits, metrics)
        # A stop during the download aborts it: nothing is started, nothing uploaded.
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_cancel_on, stop.event, scope)
                restored = await profiles.restore(user_data_dir)
                tg.cancel_scope.cancel()
        if restored is None or stop.event.is_set():
            return
        log.info("profile_restored", outcome=restored.outcome, reason=restored.reason, bytes=restored.bytes)
        # Every outcome is recorded: a fresh profile (missing, rejected, failed) is news to the customer.
        await _record(
            store, "ContextRestored", {"outcome": restored.outcome, "reason": restored.reason or ""}
        )
    else:
        user_data_dir.mkdir(parents=True, exist_ok=True)

    chrome = Chrome(
        config.chrome,
        user_data_dir,
        workdir / "tmp",
        metrics,
        environ=run.environ,
        close_timeout=budget.chrome_close,
    )
    persist = config.context is not None and config.context.persist
    if profiles is not None and restored is not None and persist:
        # Registered before Chromium is entered so it runs after Chromium has exited and flushed.
        stack.push_async_callback(
            _persist, profiles, user_data_dir, restored, chrome, stop, metrics, budget.profile_upload
        )
    devtools = await stack.enter_async_context(_Timed(chrome, "chrome_close", metrics))
    status.chrome_port = devtools.port
    health.chrome_ready = True
    if profiles is not None:
        cookies = load_cookies(user_data_dir)
        if cookies:
            await chrome.call("Storage.setCookies", {"cookies": cookies})
            log.info("cookies_restored", count=len(cookies))
        if persist:
            stack.push_async_callback(_export_cookies, chrome, user_data_dir, stop, metrics)

    activity = _Activity()
    proxy = CdpProxy(
        config.proxy,
        verifier,
        Upstream(port=devtools.port, browser_path=devtools.browser_path),
        metrics,
        activity,
        drain_timeout=budget.proxy_drain,
    )
    await stack.enter_async_context(_Timed(proxy, "proxy_drain", metrics))
    stop.on_hurry(proxy.abort_all)  # a second signal: stop waiting for clients' close replies
    status.proxy_port = proxy.port
    health.proxy_listening = True

    item = _ItemState()
    task_arn = await sampler.task_arn()
    try:
        view = await store.mark_ready(task_arn=task_arn)
    except SessionGoneError:
        stop.set("item_gone")
        return
    item.update(view)
    health.heartbeat_written = True
    metrics.set_state("READY")
    log.info("session_ready", proxy_port=proxy.port, expires_at=item.expires_at, keep_alive=item.keep_alive)
    status.ready.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(_heartbeat, store, sampler, metrics, item, stop, config.health_check_interval)
        tg.start_soon(_watch_chrome, chrome, health, stop)
        tg.start_soon(_idle_timer, activity, item, stop, config)
        tg.start_soon(_deadline, item, stop)
        tg.start_soon(_mark_active, activity, store, metrics, item, stop)
        await stop.event.wait()
        tg.cancel_scope.cancel()


async def _cancel_on(event: anyio.Event, scope: anyio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


class _Timed(Generic[T]):
    """Enter a resource; time its exit as the shutdown step ``step``."""

    def __init__(self, resource: AbstractAsyncContextManager[T], step: str, metrics: Metrics) -> None:
        self.resource, self.step, self.metrics = resource, step, metrics

    async def __aenter__(self) -> T:
        return await self.resource.__aenter__()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        with self.metrics.shutdown_step(self.step):
            return await self.resource.__aexit__(exc_type, exc, tb)


async def _record(store: SessionStore, event_type: str, detail: dict[str, str]) -> None:
    try:
        await store.record_event(event_type, detail)
    except SessionStoreError as exc:
        log.warning("session_write_failed", step="event", event_type=event_type, error=str(exc))


async def _export_cookies(chrome: Chrome, user_data_dir: Path, stop: _Stop, metrics: Metrics) -> None:
    """Save every cookie (session cookies too) into the profile before Chromium closes."""
    if chrome.returncode is not None or stop.failed:
        return
    with metrics.shutdown_step("cookie_export"), anyio.move_on_after(2.0, shield=True):
        try:
            result = await chrome.call("Storage.getCookies", timeout=2.0)
            cookies = result.get("cookies", [])
            await anyio.to_thread.run_sync(save_cookies, user_data_dir, cookies)
            log.info("cookies_exported", count=len(cookies))
        except ControllerError as exc:
            log.warning("cookies_export_failed", error=str(exc))


async def _persist(
    profiles: ProfileStore,
    user_data_dir: Path,
    restored: RestoreResult,
    chrome: Chrome,
    stop: _Stop,
    metrics: Metrics,
    bound: float,
) -> None:
    """Upload the profile back when the context asks for it and nothing went wrong."""
    if not restored.may_persist or stop.failed or chrome.devtools is None:
        log.info("profile_persist_skipped", may_persist=restored.may_persist, failed=stop.failed)
        return
    result: PersistResult | None = None
    with metrics.shutdown_step("profile_persist"), anyio.move_on_after(bound, shield=True):
        product = chrome.devtools.product
        result = await profiles.persist(user_data_dir, restored, chromium_version=product)
    if result is None:
        log.error("profile_persist_timeout", seconds=bound)
    else:
        log.info("profile_persisted", outcome=result.outcome, reason=result.reason, bytes=result.bytes)


async def _heartbeat(
    store: SessionStore,
    sampler: UsageSampler,
    metrics: Metrics,
    item: _ItemState,
    stop: _Stop,
    interval: float,
) -> None:
    """One UpdateItem per interval; its returned values tell whether someone released the session."""
    next_at = time.monotonic()
    while True:
        next_at += interval
        await anyio.sleep(max(0.0, next_at - time.monotonic()))
        usage = await sampler.sample()
        try:
            with anyio.fail_after(max(interval, 1.0)):
                view = await store.heartbeat(proxy_bytes=metrics.traffic.total_bytes, usage=usage)
        except SessionGoneError:
            stop.set("item_gone")
            return
        except SessionStoreError:
            continue  # logged and counted by the store; the session keeps serving
        except TimeoutError:
            log.warning("heartbeat_failed", error="timeout")
            continue
        item.update(view)
        if view.released:
            stop.set("released")
            return


async def _watch_chrome(chrome: Chrome, health: Health, stop: _Stop) -> None:
    """Chromium exiting on its own ends the session as FAILED (see the README's choice)."""
    code = await chrome.wait_exited()
    health.chrome_ready = False
    if not chrome.closing:
        stop.set("chrome_exited", failed=True)
        log.error("chrome_died", code=code)


async def _idle_timer(activity: _Activity, item: _ItemState, stop: _Stop, config: Config) -> None:
    """End the session after the disconnect timeout with no client (unless keepAlive)."""
    while True:
        if activity.active > 0:
            await activity.changed()
            continue
        limit = (
            config.proxy.disconnect_timeout if activity.ever_connected else config.proxy.first_connect_timeout
        )
        with anyio.move_on_after(limit) as scope:
            await activity.changed()
        if scope.cancelled_caught and activity.active == 0:
            if item.keep_alive:
                log.info("idle_ignored_keep_alive", seconds=limit)
                continue
            stop.set("idle_timeout")
            return


async def _deadline(item: _ItemState, stop: _Stop) -> None:
    """End the session as TIMED_OUT at the item's expiresAt."""
    while True:
        if item.expires_at is None:
            await anyio.sleep(5.0)
            continue
        remaining = item.expires_at - time.time()
        if remaining <= 0:
            stop.set("deadline", timed_out=True)
            return
        # Re-read the deadline now and then: a heartbeat may bring a new expiresAt.
        await anyio.sleep(min(remaining, 5.0))


async def _mark_active(
    activity: _Activity, store: SessionStore, metrics: Metrics, item: _ItemState, stop: _Stop
) -> None:
    """Write ACTIVE each time the session goes from no client to some client."""
    was_active = False
    while True:
        await activity.changed()
        now_active = activity.active > 0
        if now_active and not was_active:
            metrics.set_state("ACTIVE")
            try:
                view = await store.mark_active()
            except SessionGoneError:
                stop.set("item_gone")
                return
            except SessionStoreError as exc:
                log.warning("session_write_failed", step="active", error=str(exc))
            else:
                item.update(view)
                if view.released:
                    stop.set("released")
                    return
        was_active = now_active
