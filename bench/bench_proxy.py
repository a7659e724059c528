"""Benchmark of the CDP proxy: the real controller vs direct DevTools, on the same Chromium, in one run.

Three processes keep the measurement honest:

* a moto server (``--moto-server``, a hidden mode of this file) that holds the sessions table;
* the real controller (``python -m controller``), which starts Chromium and the proxy; its CPU is read
  from ``/proc/<pid>/task/*/schedstat`` (the controller alone: Chromium is another process tree);
* this driver, the client: one ``websockets`` client configuration (``compression=None``,
  ``max_size=None``) for both paths, so the only difference between them is the proxy.

Each measurement alternates short direct and proxied blocks in ABBA order, which cancels linear drift
(Chromium's heap growing, CPU frequency) and spreads other processes' bursts over both paths; the load
those processes put on the machine is measured and reported. Run ``python bench/bench_proxy.py``
(about 2.5 minutes) or ``--quick`` (about 40 s, a smoke test; its figures are noisy).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gc
import itertools
import json
import os
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import jwt
from websockets.asyncio.client import ClientConnection, connect

REPO = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
SIGNING_KEY = "bench-signing-key-" + "k" * 32
TABLE = "wallcrawler-sessions"
PROJECT = "proj_bench"
# "No heartbeat": the largest interval the controller accepts, far longer than any phase here.
NO_HEARTBEAT = 3600.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
# Commands per latency block; blocks alternate between the paths.
LATENCY_BLOCK = 50
# Other processes' load (in cores) above which the figures are flagged as unreliable.
OTHER_LOAD_WARNING = 0.15
SMALL = '{"id":%d,"method":"Runtime.evaluate","params":{"expression":"1+1","returnByValue":true}}'
# Random bytes made in the page once, base64-encoded: 48 MiB of entropy is a 64 MiB string.
MAKE_BLOB = """(() => {
  const n = 48 * 1024 * 1024, b = new Uint8Array(n);
  for (let i = 0; i < n; i += 65536) crypto.getRandomValues(b.subarray(i, i + 65536));
  let s;
  if (typeof b.toBase64 === "function") { s = b.toBase64(); }
  else {
    const parts = [];
    for (let i = 0; i < n; i += 24576)
      parts.push(btoa(String.fromCharCode.apply(null, b.subarray(i, i + 24576))));
    s = parts.join("");
  }
  globalThis.__bench = s;
  return s.length;
})()"""


@dataclass(frozen=True, slots=True)
class Plan:
    """How much of each measurement one run does."""

    latency_commands: int  # per path
    large_reps: dict[int, int]  # size in bytes -> transfers per path and direction
    clients: int
    concurrent_blocks: int  # per path
    concurrent_block_seconds: float
    heartbeat_seconds: float  # per path and controller


FULL = Plan(
    latency_commands=6000,
    large_reps={16 * MiB: 8, 64 * MiB: 4},
    clients=32,
    concurrent_blocks=8,
    concurrent_block_seconds=1.0,
    heartbeat_seconds=10.0,
)
QUICK = Plan(
    latency_commands=1000,
    large_reps={16 * MiB: 1, 64 * MiB: 1},
    clients=32,
    concurrent_blocks=2,
    concurrent_block_seconds=0.5,
    heartbeat_seconds=2.0,
)


# --------------------------------------------------------------------------------------------------
# The moto server, in its own process so its CPU never lands in the driver or the controller.


def moto_server_main() -> int:
    """Serve moto on a free loopback port; seed session items on request (one command per stdin line).

    Prints ``endpoint <url>`` once listening, then answers ``seed <sessionId>`` with ``ok`` and stops
    at end of input.
    """
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = boto3.client("dynamodb", endpoint_url=endpoint, region_name="us-east-1")
    client.create_table(
        TableName=TABLE,
        KeySchema=[{"AttributeName": "sessionId", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "sessionId", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    print(f"endpoint {endpoint}", flush=True)
    for line in sys.stdin:
        command, _, session_id = line.strip().partition(" ")
        if command == "seed":
            now = time.time()
            client.put_item(
                TableName=TABLE,
                Item={
                    "sessionId": {"S": session_id},
                    "status": {"S": "RUNNING"},
                    "internalStatus": {"S": "PROVISIONING"},
                    "projectId": {"S": PROJECT},
                    "createdAt": {"S": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))},
                    "expiresAt": {"N": str(int(now + 86_400))},
                },
            )
            print("ok", flush=True)
    server.stop()
    return 0


class Moto:
    """The moto server process, seen from the driver."""

    def __init__(self, process: asyncio.subprocess.Process, endpoint: str) -> None:
        self.process, self.endpoint = process, endpoint

    @classmethod
    @contextlib.asynccontextmanager
    async def running(cls) -> AsyncIterator[Moto]:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--moto-server",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            env=aws_environment(),
        )
        try:
            assert process.stdout is not None
            line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode().split()
            if len(line) != 2 or line[0] != "endpoint":
                raise RuntimeError("moto server did not start")
            yield cls(process, line[1])
        finally:
            if process.stdin is not None:
                process.stdin.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), 5)
            if process.returncode is None:
                process.kill()
                await process.wait()

    async def seed(self, session_id: str) -> None:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(f"seed {session_id}\n".encode())
        await self.process.stdin.drain()
        if (await asyncio.wait_for(self.process.stdout.readline(), 10)).strip() != b"ok":
            raise RuntimeError("moto server did not seed the session item")


def aws_environment() -> dict[str, str]:
    """This environment with fake AWS credentials (moto); real ones never reach the controller."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "WALLCRAWLER_"))}
    env.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_REGION="us-east-1",
        AWS_DEFAULT_REGION="us-east-1",
    )
    return env


# --------------------------------------------------------------------------------------------------
# The controller under test.


class Controller:
    """A real ``python -m controller`` process against moto, with its ports read from its log."""

    def __init__(self, process: asyncio.subprocess.Process, session_id: str) -> None:
        self.process = process
        self.session_id = session_id
        self.proxy_port = 0
        self.chrome_port = 0
        self._drain: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    @classmethod
    @contextlib.asynccontextmanager
    async def running(
        cls, moto: Moto, heartbeat_interval: float | None, stderr: TextIO
    ) -> AsyncIterator[Controller]:
        session_id = f"sess_bench_{uuid.uuid4().hex[:12]}"
        await moto.seed(session_id)
        env = aws_environment()
        env.update(
            SESSION_ID=session_id,
            PROJECT_ID=PROJECT,
            SESSIONS_TABLE_NAME=TABLE,
            WALLCRAWLER_JWT_SIGNING_KEY=SIGNING_KEY,
            AWS_ENDPOINT_URL=moto.endpoint,
            CDP_PROXY_HOST="127.0.0.1",
            CDP_PROXY_PORT="0",
            CHROME_DEBUG_PORT="0",
            METRICS_HOST="127.0.0.1",
            METRICS_PORT="0",
            CDP_DISCONNECT_TIMEOUT="3600",
            LOG_LEVEL="INFO",
        )
        if heartbeat_interval is not None:
            env["CDP_HEALTH_CHECK_INTERVAL"] = f"{heartbeat_interval:g}"
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "controller",
            cwd=REPO,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
            start_new_session=True,
        )
        controller = cls(process, session_id)
        try:
            await asyncio.wait_for(controller._wait_ready(), 60)
            yield controller
        finally:
            await controller._stop()

    async def _wait_ready(self) -> None:
        assert self.process.stdout is not None
        while True:
            raw = await self.process.stdout.readline()
            if not raw:
                raise RuntimeError(
                    f"controller exited before it was ready (code {await self.process.wait()})"
                )
            with contextlib.suppress(ValueError):
                event: dict[str, Any] = json.loads(raw)
                if event.get("event") == "chrome_ready":
                    self.chrome_port = int(event["port"])
                elif event.get("event") == "proxy_listening":
                    self.proxy_port = int(event["port"])
                elif event.get("event") == "session_ready":
                    break
        if not (self.proxy_port and self.chrome_port):
            raise RuntimeError("controller log did not name both ports")
        self._drain = asyncio.create_task(self._drain_stdout())

    async def _drain_stdout(self) -> None:
        assert self.process.stdout is not None
        while await self.process.stdout.read(65536):
            pass

    async def _stop(self) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 20)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                await self.process.wait()
        if self._drain is not None:
            self._drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drain

    def token(self) -> str:
        now = int(time.time())
        claims = {
            "iss": "wallcrawler",
            "aud": ["cdp-access"],
            "sub": self.session_id,
            "sessionId": self.session_id,
            "projectId": PROJECT,
            "iat": now,
            "nbf": now,
            "exp": now + 3600,
            "jti": uuid.uuid4().hex,
        }
        return jwt.encode(claims, SIGNING_KEY, algorithm="HS256")

    def cpu_seconds(self) -> float:
        """The controller's own CPU time (user + system), not Chromium's.

        Summed from each thread's ``schedstat`` (nanoseconds on CPU): utime + stime in ``stat`` move
        in 10 ms ticks, too coarse for blocks of 50 commands. Falls back to ``stat`` without schedstats.
        """
        try:
            return cpu_seconds_precise(self.pid)
        except (OSError, ValueError, IndexError):
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_seconds_precise(pid: int) -> float:
    """CPU time of every live thread of ``pid``, from ``/proc/<pid>/task/*/schedstat``."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread that just ended
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


# --------------------------------------------------------------------------------------------------
# The client side.


async def open_ws(url: str) -> ClientConnection:
    """The one client configuration used on both paths."""
    return await connect(
        url, compression=None, max_size=None, max_queue=None, ping_interval=None, open_timeout=30
    )


class Cdp:
    """One CDP connection with sequential commands."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.next_id = 1

    async def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        command_id = self.next_id
        self.next_id += 1
        await self.ws.send(json.dumps({"id": command_id, "method": method, "params": params or {}}))
        while True:
            answer: dict[str, Any] = json.loads(await self.ws.recv())
            if answer.get("id") == command_id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                result: dict[str, Any] = answer["result"]
                return result

    async def small(self) -> int:
        """One ``Runtime.evaluate("1+1")``; returns its round trip in nanoseconds."""
        command_id = self.next_id
        self.next_id += 1
        message = SMALL % command_id
        started = time.perf_counter_ns()
        await self.ws.send(message)
        raw = await self.ws.recv(decode=False)
        elapsed = time.perf_counter_ns() - started
        if not raw.startswith(b'{"id":%d,' % command_id):
            raise RuntimeError(f"unexpected answer {raw[:80]!r}")
        return elapsed

    async def big(self, message_tail: bytes, size: int, direction: str) -> float:
        """Send one prepared command (``{"id":`` + id + tail); return seconds until its answer.

        The answer is checked: a download carries ``size`` characters, an upload's answer says
        Chromium received ``size`` characters.
        """
        command_id = self.next_id
        self.next_id += 1
        message = b'{"id":%d' % command_id + message_tail
        started = time.perf_counter()
        await self.ws.send(message, text=True)
        raw = await self.ws.recv(decode=False)
        elapsed = time.perf_counter() - started
        debug(f"{direction} {size // MiB} MiB: {elapsed:.3f} s")
        if not raw.startswith(b'{"id":%d,' % command_id) or b'"error"' in raw[:200]:
            raise RuntimeError(f"unexpected answer {raw[:200]!r}")
        if len(raw) < size if direction == "download" else b'"value":%d,' % size not in raw:
            raise RuntimeError(f"{direction} of {size} bytes: wrong answer {raw[:200]!r}")
        return elapsed


@dataclass(slots=True)
class Paths:
    """The same page target reached directly and through the proxy."""

    direct_url: str
    proxy_url: str
    direct: Cdp
    proxied: Cdp
    global_objects: dict[str, str]

    def by_name(self, name: str) -> Cdp:
        return self.direct if name == "direct" else self.proxied

    def url(self, name: str) -> str:
        return self.direct_url if name == "direct" else self.proxy_url


@contextlib.asynccontextmanager
async def page_paths(controller: Controller, *, make_blob: bool) -> AsyncIterator[Paths]:
    """Open a page, and one connection to it on each path."""
    token = controller.token()
    browser_ws = await open_ws(f"ws://127.0.0.1:{controller.proxy_port}/?signingKey={token}")
    browser = Cdp(browser_ws)
    target = (await browser.call("Target.createTarget", {"url": "about:blank"}))["targetId"]
    direct_url = f"ws://127.0.0.1:{controller.chrome_port}/devtools/page/{target}"
    proxy_url = f"ws://127.0.0.1:{controller.proxy_port}/devtools/page/{target}?signingKey={token}"
    direct, proxied = Cdp(await open_ws(direct_url)), Cdp(await open_ws(proxy_url))
    try:
        if make_blob:
            made = await direct.call("Runtime.evaluate", {"expression": MAKE_BLOB, "returnByValue": True})
            if made["result"].get("value") != 64 * MiB:
                raise RuntimeError(f"page blob not made: {made}")
        global_objects = {
            name: (await cdp.call("Runtime.evaluate", {"expression": "globalThis"}))["result"]["objectId"]
            for name, cdp in (("direct", direct), ("proxy", proxied))
        }
        yield Paths(direct_url, proxy_url, direct, proxied, global_objects)
    finally:
        for ws in (direct.ws, proxied.ws):
            await ws.close()
        with contextlib.suppress(Exception):
            await browser.call("Target.closeTarget", {"targetId": target})
        await browser_ws.close()


def abba(blocks: int) -> Iterator[str]:
    """Block order direct/proxy/proxy/direct/...: linear drift cancels between the two paths."""
    for i in range(blocks):
        yield from (("direct", "proxy") if i % 2 == 0 else ("proxy", "direct"))


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    """Keep the driver's garbage collector out of timed blocks (it would add to both paths' tails)."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@dataclass(slots=True)
class CpuMeter:
    """Controller CPU seconds spent while each path was being measured."""

    controller: Controller
    seconds: dict[str, float] = field(default_factory=lambda: {"direct": 0.0, "proxy": 0.0})
    wall: dict[str, float] = field(default_factory=lambda: {"direct": 0.0, "proxy": 0.0})

    @contextlib.contextmanager
    def span(self, name: str) -> Iterator[None]:
        """Charge the controller's CPU and the wall time of the ``with`` body to path ``name``."""
        cpu, wall = self.controller.cpu_seconds(), time.perf_counter()
        yield
        self.wall[name] += time.perf_counter() - wall
        self.seconds[name] += self.controller.cpu_seconds() - cpu


def _tree_cpu_seconds(root: int) -> float:
    """CPU seconds of ``root`` and every live descendant (the driver, moto, the controller, Chromium)."""
    children: dict[int, list[int]] = {}
    cpu: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        pid = int(entry.name)
        children.setdefault(int(fields[1]), []).append(pid)
        cpu[pid] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += cpu.get(pid, 0.0)
        todo.extend(children.get(pid, ()))
    return total


def _machine_busy_seconds() -> float:
    """CPU seconds all processes used, from ``/proc/stat`` (user, nice, system, irq, softirq, steal)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(values[:3]) + sum(values[5:8])) / CLK_TCK


@dataclass(slots=True)
class OtherLoad:
    """How busy processes outside this benchmark kept the machine: figures are only as good as this."""

    started: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def start(self) -> None:
        self.started = (time.perf_counter(), _machine_busy_seconds(), _tree_cpu_seconds(os.getpid()))

    def cores(self) -> float:
        """Cores' worth of CPU used by other processes since :meth:`start`."""
        wall = time.perf_counter() - self.started[0]
        busy = _machine_busy_seconds() - self.started[1]
        ours = _tree_cpu_seconds(os.getpid()) - self.started[2]
        return max(0.0, busy - ours) / max(wall, 1e-9)


# --------------------------------------------------------------------------------------------------
# Measurements.


@dataclass(slots=True)
class Latency:
    samples: dict[str, list[int]]
    cpu: CpuMeter

    def pct(self, name: str, q: float) -> float:
        """Percentile ``q`` (0-100) of one path, in microseconds."""
        data = sorted(self.samples[name])
        return data[min(len(data) - 1, int(q / 100 * len(data)))] / 1000

    def commands(self, name: str) -> int:
        return len(self.samples[name])


async def measure_latency(
    paths: Paths, controller: Controller, *, commands: int | None = None, seconds: float | None = None
) -> Latency:
    """Sequential small commands, ``commands`` or ``seconds`` per path, in short ABBA blocks.

    Short blocks put both paths through the same moments of the machine: another process's burst
    lands on both alike instead of on one path's block.
    """
    samples: dict[str, list[int]] = {"direct": [], "proxy": []}
    meter = CpuMeter(controller)
    for _ in range(200):  # warm both paths
        await paths.direct.small()
        await paths.proxied.small()

    def enough() -> bool:
        if commands is not None:
            return min(len(v) for v in samples.values()) >= commands
        assert seconds is not None
        return min(meter.wall.values()) >= seconds

    order = itertools.cycle(("direct", "proxy", "proxy", "direct"))
    with no_gc():
        while not enough():
            name = next(order)
            cdp, out = paths.by_name(name), samples[name]
            with meter.span(name):
                for _ in range(LATENCY_BLOCK):
                    out.append(await cdp.small())
    return Latency(samples, meter)


@dataclass(slots=True)
class Transfer:
    """Payload rates (MiB/s) of one size and direction, per path."""

    size: int
    direction: str
    times: dict[str, list[float]]

    def best(self, name: str) -> float:
        """The best transfer's rate: what the path can do when nothing else disturbs it."""
        return self.size / MiB / min(self.times[name])

    def median(self, name: str) -> float:
        return self.size / MiB / statistics.median(self.times[name])


async def measure_large(
    paths: Paths, controller: Controller, reps: dict[int, int]
) -> tuple[list[Transfer], CpuMeter, int]:
    """Downloads (a slice of the page's random string) and uploads (a string argument) per size.

    Returns the transfers, the CPU meter, and the payload bytes relayed on the proxied path.
    """
    upload_data = base64.b64encode(os.urandom(48 * MiB))
    meter = CpuMeter(controller)
    relayed = 0
    results: list[Transfer] = []
    for size, count in reps.items():
        download_tail = (
            b',"method":"Runtime.evaluate","params":{"expression":"globalThis.__bench.slice(0, %d)",'
            b'"returnByValue":true}}' % size
        )
        # Remote object ids belong to one CDP session: each path calls on its own handle of globalThis.
        upload_tails = {
            name: b',"method":"Runtime.callFunctionOn","params":{"objectId":%s,'
            b'"functionDeclaration":"function (s) { return s.length; }","returnByValue":true,'
            b'"arguments":[{"value":"%s"}]}}'
            % (json.dumps(paths.global_objects[name]).encode(), upload_data[:size])
            for name in ("direct", "proxy")
        }
        download_tails = dict.fromkeys(("direct", "proxy"), download_tail)
        for direction, tails in (("download", download_tails), ("upload", upload_tails)):
            times: dict[str, list[float]] = {"direct": [], "proxy": []}
            if size == min(reps):
                # One untimed transfer per path first: page heap and socket buffers warmed alike.
                await paths.direct.big(tails["direct"], size, direction)
                await paths.proxied.big(tails["proxy"], size, direction)
            for name in abba(count):
                # Same starting point for every transfer: no garbage of the previous one in the page.
                await paths.direct.call("HeapProfiler.collectGarbage")
                gc.collect()
                with meter.span(name):
                    times[name].append(await paths.by_name(name).big(tails[name], size, direction))
                if name == "proxy":
                    relayed += size
            results.append(Transfer(size, direction, times))
    return results, meter, relayed


async def measure_concurrent(
    paths: Paths, controller: Controller, *, clients: int, blocks: int, seconds: float
) -> tuple[dict[str, float], CpuMeter]:
    """``clients`` connections per path, each doing sequential small commands; commands per second."""
    conns = {
        name: [Cdp(ws) for ws in await asyncio.gather(*(open_ws(paths.url(name)) for _ in range(clients)))]
        for name in ("direct", "proxy")
    }
    counts = {"direct": 0, "proxy": 0}
    meter = CpuMeter(controller)
    try:
        for name in ("direct", "proxy"):  # warm-up

            async def warm(cdp: Cdp) -> None:
                for _ in range(3):
                    await cdp.small()

            await asyncio.gather(*(warm(c) for c in conns[name]))

        async def client(cdp: Cdp, deadline: float) -> int:
            done = 0
            while time.perf_counter() < deadline:
                await cdp.small()
                done += 1
            return done

        for name in abba(blocks):
            with no_gc(), meter.span(name):
                deadline = time.perf_counter() + seconds
                counts[name] += sum(await asyncio.gather(*(client(c, deadline) for c in conns[name])))
            debug(f"{name} block: {counts[name]} commands so far, {meter.wall[name]:.2f} s")
    finally:
        await asyncio.gather(*(c.ws.close() for cs in conns.values() for c in cs))
    return {name: counts[name] / meter.wall[name] for name in counts}, meter


# --------------------------------------------------------------------------------------------------
# Report.


@dataclass(slots=True)
class Report:
    rows: list[tuple[str, str, str, str, str, str]] = field(default_factory=list)
    failed: int = 0
    others: list[float] = field(default_factory=list)

    def add(
        self,
        label: str,
        direct: float | None,
        proxy: float,
        unit: str,
        *,
        ratio_max: float | None = None,
        ratio_min: float | None = None,
        proxy_max: float | None = None,
        show_ratio: bool = True,
    ) -> None:
        ratio = proxy / direct if direct and show_ratio else None
        verdict, target = "", ""
        if ratio is not None and ratio_max is not None:
            target, ok = f"≤ {ratio_max:g}×", ratio <= ratio_max
            verdict = "PASS" if ok else "FAIL"
        elif ratio is not None and ratio_min is not None:
            target, ok = f"≥ {ratio_min:g}×", ratio >= ratio_min
            verdict = "PASS" if ok else "FAIL"
        elif proxy_max is not None:
            target, ok = f"≤ {proxy_max:g} {unit}", proxy <= proxy_max
            verdict = "PASS" if ok else "FAIL"
        if verdict == "FAIL":
            self.failed += 1
        self.rows.append(
            (
                label,
                "" if direct is None else f"{direct:,.1f}" if direct >= 10 else f"{direct:.2f}",
                f"{proxy:,.1f}" if proxy >= 10 else f"{proxy:.2f}",
                unit,
                "" if ratio is None else f"{ratio:.3f}×",
                f"{target} {verdict}".strip(),
            )
        )

    def note(self, label: str) -> None:
        self.rows.append((label, "", "", "", "", ""))

    def print(self, out: TextIO) -> None:
        header = ("measurement", "direct", "proxy", "unit", "ratio", "target")
        widths = [max(len(r[i]) for r in [header, *self.rows]) for i in range(6)]
        line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
        print(line, file=out)
        print("-" * len(line), file=out)
        for row in self.rows:
            if not any(row[1:]):
                print(row[0], file=out)
                continue
            cells = [row[0].ljust(widths[0])] + [
                c.rjust(w) for c, w in zip(row[1:5], widths[1:5], strict=True)
            ]
            print("  ".join([*cells, row[5]]), file=out, flush=True)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def debug(message: str) -> None:
    """Progress detail, with ``BENCH_DEBUG=1``."""
    if os.environ.get("BENCH_DEBUG"):
        log(message)


async def main_suite(moto: Moto, plan: Plan, report: Report, stderr: TextIO) -> None:
    load = OtherLoad()
    async with Controller.running(moto, None, stderr) as controller:
        load.start()
        log(
            f"controller pid {controller.pid}: proxy port {controller.proxy_port}, "
            f"chromium port {controller.chrome_port}"
        )
        async with page_paths(controller, make_blob=True) as paths:
            log("small-command latency")
            latency = await measure_latency(
                paths,
                controller,
                commands=plan.latency_commands,
            )
            log("large messages")
            transfers, large_cpu, relayed = await measure_large(paths, controller, plan.large_reps)
            log(f"{plan.clients} concurrent clients")
            rates, concurrent_cpu = await measure_concurrent(
                paths,
                controller,
                clients=plan.clients,
                blocks=plan.concurrent_blocks,
                seconds=plan.concurrent_block_seconds,
            )
        other = load.cores()
    n = latency.commands("proxy")
    report.note(f"small command: Runtime.evaluate('1+1'), {n} sequential per path (µs)")
    report.add("  p50", latency.pct("direct", 50), latency.pct("proxy", 50), "µs", ratio_max=1.15)
    report.add("  p99", latency.pct("direct", 99), latency.pct("proxy", 99), "µs", ratio_max=1.5)
    report.add("  p99.9", latency.pct("direct", 99.9), latency.pct("proxy", 99.9), "µs")
    report.note("large messages: payload MiB/s, median (judged) and best transfer per path")
    for t in transfers:
        label = f"  {t.direction} {t.size // MiB} MiB"
        count = plan.large_reps[t.size]
        report.add(
            f"{label}, median of {count}", t.median("direct"), t.median("proxy"), "MiB/s", ratio_min=0.95
        )
        report.add(f"{label}, best of {count}", t.best("direct"), t.best("proxy"), "MiB/s")
    report.note(f"{plan.clients} concurrent clients, sequential commands each")
    report.add("  throughput", rates["direct"], rates["proxy"], "cmd/s", ratio_min=0.92)
    report.note("controller CPU (the proxy's process, from schedstat)")
    per_1000 = 1000 * 1000 * latency.cpu.seconds["proxy"] / n
    idle_1000 = 1000 * 1000 * latency.cpu.seconds["direct"] / latency.commands("direct")
    report.add("  per 1000 sequential commands", idle_1000, per_1000, "ms", proxy_max=100, show_ratio=False)
    per_100 = 1000 * large_cpu.seconds["proxy"] * 100 * MiB / max(relayed, 1)
    idle_100 = 1000 * large_cpu.seconds["direct"] * 100 * MiB / max(relayed, 1)
    report.add("  per 100 MiB relayed", idle_100, per_100, "ms", proxy_max=100, show_ratio=False)
    concurrent_cmds = rates["proxy"] * concurrent_cpu.wall["proxy"]
    report.add(
        f"  per 1000 commands, {plan.clients} clients",
        1000
        * 1000
        * concurrent_cpu.seconds["direct"]
        / max(1.0, rates["direct"] * concurrent_cpu.wall["direct"]),
        1000 * 1000 * concurrent_cpu.seconds["proxy"] / max(1.0, concurrent_cmds),
        "ms",
        show_ratio=False,
    )
    report.add("other processes' load during this part", None, other, "cores")
    report.others.append(other)


async def heartbeat_suite(moto: Moto, plan: Plan, interval: float, report: Report, stderr: TextIO) -> None:
    """Latency through the proxy with heartbeats every ``interval`` s vs none, each vs direct."""
    results: dict[str, Latency] = {}
    others: dict[str, float] = {}
    for label, value in (("none", NO_HEARTBEAT), (f"every {interval:g} s", interval)):
        load = OtherLoad()
        async with Controller.running(moto, value, stderr) as controller:
            load.start()
            log(f"heartbeat {label}: controller pid {controller.pid}")
            async with page_paths(controller, make_blob=False) as paths:
                results[label] = await measure_latency(
                    paths,
                    controller,
                    seconds=plan.heartbeat_seconds,
                )
            others[label] = load.cores()
    for label, latency in results.items():
        report.note(
            f"heartbeats {label}: small-command latency, {latency.commands('proxy')} proxied commands (µs)"
        )
        for q in (50, 99, 99.9):
            report.add(f"  p{q:g}", latency.pct("direct", q), latency.pct("proxy", q), "µs")
        report.add(
            "  max",
            max(latency.samples["direct"]) / 1000,
            max(latency.samples["proxy"]) / 1000,
            "µs",
        )
        cpu = latency.cpu
        report.add(
            "  controller CPU per second (direct blocks: idle proxy)",
            1000 * cpu.seconds["direct"] / cpu.wall["direct"],
            1000 * cpu.seconds["proxy"] / cpu.wall["proxy"],
            "ms/s",
            show_ratio=False,
        )
        report.add("  other processes' load", None, others[label], "cores")
        report.others.append(others[label])


async def wait_quiet(limit: float) -> None:
    """Wait (at most ``limit`` seconds) until other processes leave the machine nearly idle."""
    deadline = time.perf_counter() + limit
    logged = 0.0
    while True:
        load = OtherLoad()
        load.start()
        await asyncio.sleep(2.0)
        other = load.cores()
        if other <= OTHER_LOAD_WARNING or time.perf_counter() >= deadline:
            return
        if time.perf_counter() - logged >= 10:
            logged = time.perf_counter()
            log(f"waiting for a quiet machine: other processes use {other:.2f} cores")


async def run(args: argparse.Namespace, stderr: TextIO) -> int:
    """The whole benchmark; the controllers' stderr goes to ``stderr``."""
    plan = QUICK if args.quick else FULL
    started = time.perf_counter()
    report = Report()
    async with Moto.running() as moto:
        await wait_quiet(args.wait_quiet)
        await main_suite(moto, plan, report, stderr)
        if args.heartbeat_interval > 0:
            await wait_quiet(args.wait_quiet)
            await heartbeat_suite(moto, plan, args.heartbeat_interval, report, stderr)
    print(
        f"\nCDP proxy benchmark ({'quick' if args.quick else 'full'}), {os.cpu_count()} CPUs, "
        f"{time.perf_counter() - started:.0f} s; ratio = proxy / direct\n"
    )
    report.print(sys.stdout)
    print(f"\n{'all targets met' if not report.failed else f'{report.failed} target(s) missed'}")
    if max(report.others, default=0.0) > OTHER_LOAD_WARNING:
        print(
            f"WARNING: other processes kept up to {max(report.others):.2f} of {os.cpu_count()} cores busy; "
            "these figures measure contention too: rerun on a quiet machine"
        )
    return 1 if report.failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a ~40 s smoke run (noisy figures)")
    parser.add_argument(
        "--heartbeat-interval",
        type=float,
        default=1.0,
        metavar="S",
        help="compare proxy latency with heartbeats every S seconds vs none (0 skips; default 1)",
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="S",
        help="before each part, wait up to S seconds for other processes to leave the machine idle",
    )
    parser.add_argument("--moto-server", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.moto_server:
        return moto_server_main()
    fd, name = tempfile.mkstemp(prefix="bench-controller-", suffix=".log")
    with open(fd, "w") as stderr:
        try:
            code = asyncio.run(run(args, stderr))
        except BaseException:
            log(f"controller stderr kept in {name}")
            raise
    os.unlink(name)
    return code


if __name__ == "__main__":
    sys.exit(main())
