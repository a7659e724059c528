"""Chromium as an async context manager: launch, wait until usable, close gracefully.

Entering :class:`Chrome` starts Chromium in its own process group with a scrubbed environment and
returns its :class:`DevTools` address once ``/json/version`` answers and ``Browser.getVersion`` works
over CDP. Leaving it (or :meth:`Chrome.close`) stops Chromium the way that keeps the profile intact:
``Browser.close`` over CDP first (Chromium flushes cookies and removes its ``Singleton*`` files), a
bounded wait, then SIGTERM to the process group, then SIGKILL.
"""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Mapping
from contextlib import AsyncExitStack, suppress
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectSendStream
from anyio.streams.text import TextReceiveStream
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import WebSocketException

from controller import httpio
from controller.config import ChromeConfig
from controller.errors import ChromeError
from controller.logs import get_logger, redact_text
from controller.metrics import Metrics

__all__ = ["Chrome", "DevTools", "load_switches", "scrubbed_environment"]

log = get_logger(__name__)

# Switches the controller owns; a data file that sets them is refused.
_OWNED = ("--remote-debugging-", "--user-data-dir", "--remote-allow-origins", "--remote-debugging-pipe")
_MERGED = ("--enable-features", "--disable-features", "--disable-blink-features", "--enable-blink-features")
_SWITCH_RE = re.compile(r"^--[a-z0-9][a-z0-9-]*(=.+)?$")
_LISTENING_RE = re.compile(r"DevTools listening on ws://127\.0\.0\.1:(\d+)(/devtools/browser/[A-Za-z0-9-]+)")
# Variables Chromium may inherit; everything else (AWS_*, ECS_*, WALLCRAWLER_*, ...) is dropped.
_ENV_ALLOWED = frozenset({"PATH", "HOME", "LANG", "LANGUAGE", "TZ", "FONTCONFIG_PATH", "FONTCONFIG_FILE"})
_ENV_ALLOWED_PREFIXES = ("LC_", "XDG_")


def load_switches(config_dir: Path) -> list[str]:
    """Read Chromium's switches from ``switches.txt`` in ``config_dir``.

    Repeated feature lists are merged into one switch each (Chromium silently keeps only the last).

    Args:
        config_dir: the ``chrome/`` data directory.

    Returns:
        The switches, in file order, feature lists merged at the position of their first use.

    Raises:
        ChromeError: the file is missing, a line is not a switch, or it sets a switch the controller owns.
    """
    path = config_dir / "switches.txt"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ChromeError(f"cannot read {path}: {exc.strerror}") from exc
    switches: list[str] = []
    merged: dict[str, list[str]] = {}
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not _SWITCH_RE.match(line):
            raise ChromeError(f"{path}:{number}: {line!r} is not a --switch")
        name, _, value = line.partition("=")
        if name.startswith(_OWNED):
            raise ChromeError(f"{path}:{number}: {name} is set by the controller, not by data")
        if name in _MERGED:
            if name not in merged:
                merged[name] = []
                switches.append(name)
            merged[name].extend(v for v in value.split(",") if v and v not in merged[name])
            continue
        switches.append(line)
    return [f"{s}={','.join(merged[s])}" if s in merged else s for s in switches]


def scrubbed_environment(environ: Mapping[str, str], tmp_dir: Path) -> dict[str, str]:
    """The environment Chromium gets: locale and paths only, never credentials.

    Args:
        environ: the controller's own environment.
        tmp_dir: a short private temp dir (Chromium's lock socket path must stay under ~108 bytes).
    """
    env = {
        key: value
        for key, value in environ.items()
        if key in _ENV_ALLOWED or key.startswith(_ENV_ALLOWED_PREFIXES)
    }
    env["TMPDIR"] = str(tmp_dir)
    return env


@dataclass(frozen=True, slots=True)
class DevTools:
    """Where Chromium's DevTools endpoint listens (always loopback) and what it is."""

    port: int
    browser_path: str
    product: str

    @property
    def browser_url(self) -> str:
        """The browser target's WebSocket URL, for the controller's own CDP calls."""
        return f"ws://127.0.0.1:{self.port}{self.browser_path}"


async def cdp_call(
    url: str, method: str, params: dict[str, Any] | None = None, *, timeout: float
) -> dict[str, Any]:
    """Send one CDP command on a fresh connection and return its result.

    Raises:
        ChromeError: no connection, a CDP error, or no answer within ``timeout``.
    """
    message = json.dumps({"id": 1, "method": method, "params": params or {}})
    try:
        with anyio.fail_after(timeout):
            async with ws_connect(
                url, compression=None, max_size=None, open_timeout=None, ping_interval=None
            ) as ws:
                await ws.send(message)
                async for raw in ws:
                    answer = json.loads(raw)
                    if answer.get("id") != 1:
                        continue  # an event, not our answer
                    if "error" in answer:
                        raise ChromeError(f"{method} failed: {answer['error'].get('message', 'error')}")
                    result: dict[str, Any] = answer.get("result", {})
                    return result
    except TimeoutError as exc:
        raise ChromeError(f"{method} got no answer within {timeout:g} s") from exc
    except (OSError, WebSocketException) as exc:
        raise ChromeError(f"{method} failed: {type(exc).__name__}") from exc
    raise ChromeError(f"{method}: connection closed before the answer")


class Chrome:
    """One Chromium process and its lifecycle."""

    def __init__(
        self,
        config: ChromeConfig,
        user_data_dir: Path,
        tmp_dir: Path,
        metrics: Metrics,
        *,
        environ: Mapping[str, str],
        close_timeout: float,
    ) -> None:
        """Prepare (but do not start) Chromium.

        Args:
            config: binary, DevTools port, data directory, start bound.
            user_data_dir: the profile directory (restored or fresh).
            tmp_dir: Chromium's private TMPDIR.
            metrics: where start duration and liveness go.
            environ: the environment to scrub for Chromium.
            close_timeout: bound on a graceful close before signals are used.
        """
        self._config = config
        self._user_data_dir = user_data_dir
        self._tmp_dir = tmp_dir
        self._metrics = metrics
        self._environ = environ
        self._close_timeout = close_timeout
        self._process: anyio.abc.Process | None = None
        self._stack = AsyncExitStack()
        self._exited = anyio.Event()
        self._closing = False
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=20)
        self.devtools: DevTools | None = None

    @property
    def returncode(self) -> int | None:
        """Chromium's exit code once it has exited."""
        return None if self._process is None else self._process.returncode

    @property
    def closing(self) -> bool:
        """True once a close was asked for (an exit then is expected)."""
        return self._closing

    async def wait_exited(self) -> int:
        """Wait until Chromium exits, for whatever reason, and return its exit code."""
        await self._exited.wait()
        return self.returncode if self.returncode is not None else -1

    async def __aenter__(self) -> DevTools:
        await self._stack.__aenter__()
        try:
            return await self._start()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._shutdown_process()
            # Outside the shield: a task group's scope must be exited as the current one.
            await self._stack.aclose()
            if self._process is not None:
                await self._process.aclose()
            raise

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with anyio.CancelScope(shield=True):
            await self.close()
        # Outside the shield: a task group's scope must be exited as the current one. The stderr reader
        # ends by itself once the whole process group is gone.
        await self._stack.aclose()
        if self._process is not None:
            await self._process.aclose()

    def _command(self) -> list[str]:
        switches = load_switches(self._config.config_dir)
        return [
            str(self._config.binary),
            *switches,
            "--remote-debugging-address=127.0.0.1",
            f"--remote-debugging-port={self._config.debug_port}",
            f"--user-data-dir={self._user_data_dir}",
            "about:blank",
        ]

    async def _start(self) -> DevTools:
        command = self._command()
        started = time.perf_counter()
        try:
            process = await anyio.open_process(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env=scrubbed_environment(self._environ, self._tmp_dir),
                start_new_session=True,  # its own process group: signals reach every child
            )
        except OSError as exc:
            raise ChromeError(f"cannot start {command[0]}: {exc.strerror or exc}") from exc
        self._process = process
        log.info("chrome_starting", pid=process.pid, binary=command[0])
        tg = await self._stack.enter_async_context(anyio.create_task_group())
        listening: MemoryObjectSendStream[tuple[int, str]]
        listening, announced = anyio.create_memory_object_stream[tuple[int, str]](1)
        tg.start_soon(self._read_stderr, listening)
        tg.start_soon(self._watch_exit)
        try:
            with anyio.fail_after(self._config.start_timeout):
                async with announced:
                    try:
                        port, browser_path = await announced.receive()
                    except anyio.EndOfStream:
                        await self._exited.wait()
                        raise ChromeError(
                            f"chromium exited with code {self.returncode} before DevTools listened: "
                            + redact_text(" | ".join(self._stderr_tail))
                        ) from None
                devtools = await self._check_usable(port, browser_path)
        except TimeoutError as exc:
            raise ChromeError(f"chromium was not usable within {self._config.start_timeout:g} s") from exc
        self.devtools = devtools
        elapsed = time.perf_counter() - started
        self._metrics.chrome_start_seconds.observe(elapsed)
        self._metrics.chrome_up.set(1)
        log.info(
            "chrome_ready", pid=process.pid, port=port, product=devtools.product, seconds=round(elapsed, 3)
        )
        return devtools

    async def _check_usable(self, port: int, browser_path: str) -> DevTools:
        response = await httpio.fetch("127.0.0.1", port, "GET", "/json/version")
        if response.status != 200:
            raise ChromeError(f"/json/version answered {response.status}")
        version = await cdp_call(f"ws://127.0.0.1:{port}{browser_path}", "Browser.getVersion", timeout=5.0)
        return DevTools(port=port, browser_path=browser_path, product=str(version.get("product", "unknown")))

    async def _read_stderr(self, listening: MemoryObjectSendStream[tuple[int, str]]) -> None:
        assert self._process is not None and self._process.stderr is not None
        # Draining stderr for Chromium's whole life matters: a full pipe would block it.
        async with listening:
            buffer = ""
            try:
                async for text in TextReceiveStream(self._process.stderr, errors="replace"):
                    buffer += text
                    *lines, buffer = buffer.split("\n")
                    for line in lines:
                        self._stderr_tail.append(line[:300])
                        match = _LISTENING_RE.search(line)
                        if match and self.devtools is None:
                            listening.send_nowait((int(match.group(1)), match.group(2)))
                    if len(buffer) > 65536:
                        buffer = buffer[-4096:]
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                return

    async def _watch_exit(self) -> None:
        assert self._process is not None
        code = await self._process.wait()
        self._metrics.chrome_up.set(0)
        self._exited.set()
        if not self._closing:
            self._metrics.chrome_exits.inc()
            log.error(
                "chrome_exited_unexpectedly",
                code=code,
                stderr_tail=redact_text(" | ".join(self._stderr_tail)),
            )

    async def call(
        self, method: str, params: dict[str, Any] | None = None, *, timeout: float = 5.0
    ) -> dict[str, Any]:
        """Send one CDP command to the browser target.

        Raises:
            ChromeError: Chromium is not running, or the command failed.
        """
        if self.devtools is None or self._exited.is_set():
            raise ChromeError("chromium is not running")
        return await cdp_call(self.devtools.browser_url, method, params, timeout=timeout)

    async def close(self) -> None:
        """Stop Chromium gracefully, within the close bound, then by signals. Safe to call twice."""
        self._closing = True
        if self._process is None or self._exited.is_set():
            await self._shutdown_process()
            return
        started = time.perf_counter()
        method = "browser_close"
        with anyio.move_on_after(self._close_timeout, shield=True):
            try:
                await self.call("Browser.close", timeout=self._close_timeout)
            except ChromeError as exc:
                # Browser.close often loses its answer as Chromium exits; only a failed send matters.
                log.debug("chrome_close_cdp", error=str(exc))
            await self._exited.wait()
        if not self._exited.is_set():
            method = "signals"
        await self._shutdown_process()
        log.info(
            "chrome_stopped",
            method=method,
            code=self.returncode,
            seconds=round(time.perf_counter() - started, 3),
        )

    async def _shutdown_process(self) -> None:
        """SIGTERM, bounded wait, SIGKILL, on the whole process group; reap everything."""
        process = self._process
        if process is None:
            return
        with anyio.CancelScope(shield=True):
            for sig, wait in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0)):
                if process.returncode is not None:
                    break
                self._signal_group(sig)
                with anyio.move_on_after(wait):
                    await process.wait()
            # Children (renderers, zygote) may outlive the browser process: the group goes too.
            self._signal_group(signal.SIGKILL)
            if process.returncode is None:
                await process.wait()

    def _signal_group(self, sig: signal.Signals) -> None:
        assert self._process is not None
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self._process.pid, sig)
