"""A fake ECS task metadata endpoint v4 on loopback: the only fake in the tests, since ECS cannot run here.

It serves the documented paths and JSON shapes (AWS's "task metadata v4 examples for tasks on
Fargate"): ``${ECS_CONTAINER_METADATA_URI_V4}`` (this container), ``/task`` (``TaskARN``, ``Limits``,
``Containers``) and ``/task/stats`` (container id → Docker stats, ``null`` for a stopped container).
Tests change what it answers between requests::

    async with FakeTaskMetadata(cpu_limit=0.5) as metadata:
        metadata.stats = {"abc": docker_stats(total_usage=..., system_cpu_usage=...)}
        sampler = UsageSampler(metadata.uri, Metrics())
"""

from __future__ import annotations

import contextlib
import json
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any, Self

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream

__all__ = ["CONTAINER_ID", "TASK_ARN", "FakeTaskMetadata", "docker_stats", "task_document"]

TASK_ARN = "arn:aws:ecs:us-east-1:111122223333:task/wallcrawler/158d1c8083dd49d6b527399fd6414f5c"
CONTAINER_ID = "158d1c8083dd49d6b527399fd6414f5c-3822082590"
_READ = "2026-01-01T00:00:01.000000000Z"
_PREREAD = "2026-01-01T00:00:00.000000000Z"


def task_document(
    *, task_arn: str = TASK_ARN, cpu_limit: float | None = 0.25, memory_limit: int = 512
) -> dict[str, Any]:
    """A ``/task`` answer as Fargate gives it; ``cpu_limit=None`` leaves ``Limits.CPU`` out (as on EC2).

    Args:
        task_arn: ``TaskARN``.
        cpu_limit: task-level ``Limits.CPU`` in vCPUs.
        memory_limit: task-level ``Limits.Memory`` in MiB.

    Returns:
        The JSON document as a dict.
    """
    limits: dict[str, Any] = {"Memory": memory_limit}
    if cpu_limit is not None:
        limits["CPU"] = cpu_limit
    return {
        "Cluster": "arn:aws:ecs:us-east-1:111122223333:cluster/wallcrawler",
        "TaskARN": task_arn,
        "Family": "wallcrawler-browser",
        "Revision": "7",
        "DesiredStatus": "RUNNING",
        "KnownStatus": "RUNNING",
        "Limits": limits,
        "PullStartedAt": "2026-01-01T00:00:00.0Z",
        "PullStoppedAt": "2026-01-01T00:00:05.0Z",
        "AvailabilityZone": "us-east-1a",
        "LaunchType": "FARGATE",
        "Containers": [
            {
                "DockerId": CONTAINER_ID,
                "Name": "controller",
                "DockerName": "controller",
                "Image": "111122223333.dkr.ecr.us-east-1.amazonaws.com/wallcrawler-browser:latest",
                "Labels": {"com.amazonaws.ecs.task-arn": task_arn},
                "DesiredStatus": "RUNNING",
                "KnownStatus": "RUNNING",
                "Limits": {"CPU": 2},
                "Type": "NORMAL",
            }
        ],
        "ClockDrift": {
            "ClockErrorBound": 0.5,
            "ReferenceTimestamp": _PREREAD,
            "ClockSynchronizationStatus": "SYNCHRONIZED",
        },
        "EphemeralStorageMetrics": {"Utilized": 261, "Reserved": 20496},
    }


def docker_stats(
    *,
    total_usage: int,
    system_cpu_usage: int,
    pre_total_usage: int = 0,
    pre_system_cpu_usage: int = 0,
    online_cpus: int = 2,
    memory_usage: int = 0,
    inactive_file: int = 0,
    name: str = "controller",
) -> dict[str, Any]:
    """One container's Docker stats (API v1.30 ``ContainerStats``) as ``/task/stats`` nests them.

    CPU counters are nanoseconds; ``system_cpu_usage`` counts every CPU of the host. Zero ``pre_*``
    values are what the first read of a container looks like.

    Args:
        total_usage: ``cpu_stats.cpu_usage.total_usage``.
        system_cpu_usage: ``cpu_stats.system_cpu_usage``.
        pre_total_usage: ``precpu_stats.cpu_usage.total_usage``.
        pre_system_cpu_usage: ``precpu_stats.system_cpu_usage``.
        online_cpus: ``cpu_stats.online_cpus`` (and ``precpu_stats``).
        memory_usage: ``memory_stats.usage`` in bytes.
        inactive_file: ``memory_stats.stats.total_inactive_file`` (cgroup v1 naming) in bytes.
        name: the container's name.

    Returns:
        The stats document as a dict.
    """

    def cpu(total: int, system: int) -> dict[str, Any]:
        per_cpu = [total // online_cpus] * online_cpus
        return {
            "cpu_usage": {
                "total_usage": total,
                "percpu_usage": per_cpu,
                "usage_in_kernelmode": total // 4,
                "usage_in_usermode": total - total // 4,
            },
            "system_cpu_usage": system,
            "online_cpus": online_cpus,
            "throttling_data": {"periods": 0, "throttled_periods": 0, "throttled_time": 0},
        }

    return {
        "read": _READ,
        "preread": _PREREAD,
        "pids_stats": {},
        "blkio_stats": {"io_service_bytes_recursive": [], "io_serviced_recursive": []},
        "num_procs": 0,
        "storage_stats": {},
        "cpu_stats": cpu(total_usage, system_cpu_usage),
        "precpu_stats": cpu(pre_total_usage, pre_system_cpu_usage),
        "memory_stats": {
            "usage": memory_usage,
            "max_usage": memory_usage,
            "stats": {
                "cache": inactive_file,
                "rss": max(0, memory_usage - inactive_file),
                "total_inactive_file": inactive_file,
            },
            "limit": 4 * 1024**3,
        },
        "name": name,
        "id": CONTAINER_ID,
        "networks": {"eth1": {"rx_bytes": 0, "tx_bytes": 0}},
    }


class FakeTaskMetadata:
    """A task metadata v4 server on ``127.0.0.1``; an async context manager.

    Attributes:
        task: the ``/task`` document.
        stats: the ``/task/stats`` document (container id → Docker stats or ``None``).
        overrides: path suffix (``"/task"``, ``"/task/stats"``) → (status, body) served instead.
        raw: path suffix → bytes sent as they are, without HTTP framing (a broken server).
        chunked: answer with ``Transfer-Encoding: chunked`` (as Go's server does for large bodies).
        requests: the paths requested so far.
        uri: the value ``ECS_CONTAINER_METADATA_URI_V4`` would have; set on entry.
    """

    def __init__(self, *, task_arn: str = TASK_ARN, cpu_limit: float | None = 0.25) -> None:
        self.task: dict[str, Any] = task_document(task_arn=task_arn, cpu_limit=cpu_limit)
        self.stats: dict[str, Any] = {}
        self.overrides: dict[str, tuple[int, bytes]] = {}
        self.raw: dict[str, bytes] = {}
        self.chunked = False
        self.requests: list[str] = []
        self.uri = ""
        self._prefix = "/v4/" + CONTAINER_ID
        self._stack = AsyncExitStack()

    async def __aenter__(self) -> Self:
        stack = await self._stack.__aenter__()
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        await stack.enter_async_context(listener)
        group = await stack.enter_async_context(anyio.create_task_group())
        # Runs first on exit: stop serving, then the task group and the listener close.
        stack.callback(group.cancel_scope.cancel)
        group.start_soon(listener.serve, self._handle)
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        self.uri = f"http://127.0.0.1:{port}{self._prefix}"
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        return await self._stack.__aexit__(exc_type, exc, tb)

    def _answer(self, path: str) -> tuple[int, bytes]:
        suffix = path[len(self._prefix) :] if path.startswith(self._prefix) else None
        if suffix is None:
            return 404, b'{"error":"not found"}'
        if suffix in self.overrides:
            return self.overrides[suffix]
        if suffix == "/task":
            return 200, json.dumps(self.task).encode()
        if suffix == "/task/stats":
            return 200, json.dumps(self.stats).encode()
        if suffix == "":
            return 200, json.dumps(self.task["Containers"][0]).encode()
        return 404, b'{"error":"not found"}'

    async def _handle(self, stream: anyio.abc.SocketStream) -> None:
        async with stream:
            try:
                head = await BufferedByteReceiveStream(stream).receive_until(b"\r\n\r\n", 16384)
            except (anyio.IncompleteRead, anyio.DelimiterNotFound, anyio.BrokenResourceError, OSError):
                return
            path = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")[1]
            self.requests.append(path)
            suffix = path.removeprefix(self._prefix)
            if suffix in self.raw:
                with contextlib.suppress(anyio.BrokenResourceError, OSError):
                    await stream.send(self.raw[suffix])
                return
            status, body = self._answer(path)
            reason = {200: "OK", 404: "Not Found"}.get(status, "Error")
            if self.chunked:
                framing = "Transfer-Encoding: chunked\r\n"
                half = len(body) // 2
                parts = [part for part in (body[:half], body[half:]) if part]
                payload = b"".join(f"{len(part):x}\r\n".encode() + part + b"\r\n" for part in parts)
                payload += b"0\r\n\r\n"
            else:
                framing = f"Content-Length: {len(body)}\r\n"
                payload = body
            head_out = f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n{framing}"
            response = (head_out + "Connection: close\r\n\r\n").encode() + payload
            try:
                await stream.send(response)
            except (anyio.BrokenResourceError, OSError):
                return
