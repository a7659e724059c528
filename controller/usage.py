"""CPU and memory use of the task: ECS task metadata when it is there, cgroup files or ``/proc`` when not.

Two figures end up in the session item: ``avgCpuUsage``, the task's average CPU use since the sampler's
first reading in % of the task's CPU allocation, and ``memoryUsage``, the peak memory use in MiB.

Sources, in order:

1. ``${ECS_CONTAINER_METADATA_URI_V4}`` (ECS sets it). ``/task`` gives the ARN and ``Limits.CPU`` (vCPUs);
   ``/task/stats`` maps each container id to Docker stats. CPU is computed as ``docker stats`` does,
   ``Δtotal_usage / Δsystem_cpu_usage × online_cpus``, summed over the containers; memory is Docker's
   "usage without cache" (``usage − inactive_file``), summed over the containers.
2. Without metadata (local runs, tests): the process's cgroup v2 (``cpu.stat`` ``usage_usec``,
   ``memory.current − inactive_file``, ``cpu.max``), else cgroup v1 (``cpuacct.usage``,
   ``memory.usage_in_bytes − total_inactive_file``, ``cpu.cfs_quota_us``).
3. Else ``/proc/stat`` and ``/proc/meminfo``, i.e. the whole machine. On Fargate each task has its own
   micro-VM, so the machine is the task; elsewhere this over-counts, which is why it is the last resort.

The average is weighted by time: every sample adds its CPU time used and its wall time × allocation,
and the figure is their ratio. The peak is the highest value seen at a sample, so a spike shorter than
the interval can be missed; the kernel's own peak counters include page cache, which Chromium's disk
cache inflates, and would not compare with what ``docker stats`` shows.

A figure that cannot be computed yet (first sample, zero deltas, a source that is down or returns
garbage) is ``None``; :meth:`UsageSampler.sample` never raises for those.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from controller import httpio
from controller.errors import UsageError
from controller.logs import get_logger
from controller.metrics import Metrics

__all__ = ["Usage", "UsageSampler"]

log = get_logger(__name__)

_MiB = 1024 * 1024
# /task/stats holds one Docker stats document per container; a few KiB each.
_NS_PER_S = 1_000_000_000


@dataclass(frozen=True, slots=True)
class Usage:
    """The task's usage figures; ``None`` where nothing could be measured yet.

    Attributes:
        avg_cpu_percent: average CPU use since the first sample, in % of the task's CPU allocation.
        peak_memory_mib: highest memory use seen, in MiB.
    """

    avg_cpu_percent: int | None
    peak_memory_mib: int | None


@dataclass(frozen=True, slots=True)
class _CpuDelta:
    """CPU time used and wall time elapsed between two readings, and the allocation over that time."""

    busy_ns: float
    wall_ns: float
    alloc_cpus: float


@dataclass(frozen=True, slots=True)
class _Reading:
    """One local (cgroup or /proc) reading: cumulative CPU time and its clock, and current memory."""

    busy_ns: float | None
    wall_ns: float
    alloc_cpus: float | None
    memory_bytes: int | None


def _at(value: Any, *path: str) -> Any:
    """The value at ``path`` inside nested JSON objects, or ``None`` where the shape is different."""
    for key in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value


def _number(value: Any, *path: str) -> float | None:
    """The non-negative finite number at ``path`` inside nested JSON objects, or ``None``."""
    value = _at(value, *path)
    # bool is an int subclass; a JSON true is not a counter.
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not math.isfinite(value) or value < 0:
        return None
    return float(value)


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="replace")
    except OSError:
        return None


def _read_int(path: Path) -> int | None:
    text = _read_text(path)
    if text is None:
        return None
    try:
        return int(text.strip())
    except ValueError:
        return None


def _keyed_ints(text: str | None) -> dict[str, int]:
    """Parse ``key value`` lines (``cpu.stat``, ``memory.stat``); unparsable lines are skipped."""
    values: dict[str, int] = {}
    for line in (text or "").splitlines():
        fields = line.split()
        if len(fields) >= 2:
            try:
                values[fields[0].rstrip(":")] = int(fields[1])
            except ValueError:
                continue
    return values


def _without_cache(usage: float, stats: Mapping[str, float | int]) -> float:
    """Memory use without reclaimable page cache, as ``docker stats`` shows it."""
    for key in ("total_inactive_file", "inactive_file"):
        inactive = stats.get(key)
        if isinstance(inactive, int | float) and not isinstance(inactive, bool) and 0 <= inactive < usage:
            return usage - inactive
    return usage


class UsageSampler:
    """Samples the task's CPU and memory use; call :meth:`sample` periodically (every heartbeat).

    Args:
        metadata_uri: ``ECS_CONTAINER_METADATA_URI_V4``, or ``None`` to read cgroup files / ``/proc``.
        metrics: receives the figures as gauges.
        cgroup_root: where the cgroup file system is mounted.
        proc_root: where ``/proc`` is mounted.
        timeout: seconds allowed for one metadata request.
        clock: monotonic seconds, the wall time for cgroup CPU counters (injectable for tests).
    """

    def __init__(
        self,
        metadata_uri: str | None,
        metrics: Metrics,
        *,
        cgroup_root: Path = Path("/sys/fs/cgroup"),
        proc_root: Path = Path("/proc"),
        timeout: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._uri = metadata_uri.rstrip("/") if metadata_uri else None
        self._metrics = metrics
        self._cgroup_root = cgroup_root
        self._proc_root = proc_root
        self._timeout = timeout
        self._clock = clock
        self._task: Mapping[str, Any] | None = None
        # Time-weighted average: CPU time used over (wall time × allocated CPUs), both in ns.
        self._busy_ns = 0.0
        self._capacity_ns = 0.0
        self._peak_bytes: int | None = None
        # Previous (total_usage, system_cpu_usage) per container, from our own last read.
        self._previous_containers: dict[str, tuple[float, float]] = {}
        self._previous_local: _Reading | None = None
        self._local_source: str | None = None
        self._failing = False

    async def task_arn(self) -> str | None:
        """Return the task's ARN from ``${uri}/task``.

        Returns:
            The ``TaskARN``, or ``None`` without metadata, on any failure, or when it is absent.
        """
        task = await self._task_metadata()
        arn = task.get("TaskARN") if task is not None else None
        return arn if isinstance(arn, str) and arn else None

    async def sample(self) -> Usage:
        """Take one sample and return the figures known so far.

        Returns:
            The average CPU % since the first sample and the peak memory in MiB; each is ``None`` until it
            could be measured at least once. A failed sample leaves the figures as they were.
        """
        if self._uri is not None:
            delta, memory = await self._sample_metadata()
        else:
            # cgroup and /proc files are in-memory kernel files: reading them never blocks the loop.
            delta, memory = self._sample_local()
        if delta is not None and delta.wall_ns > 0 and delta.alloc_cpus > 0:
            self._busy_ns += delta.busy_ns
            self._capacity_ns += delta.wall_ns * delta.alloc_cpus
        if memory is not None:
            self._peak_bytes = max(self._peak_bytes or 0, memory)
        usage = self.current()
        if usage.avg_cpu_percent is not None:
            self._metrics.task_cpu_percent.set(self._busy_ns / self._capacity_ns)
        if self._peak_bytes is not None:
            self._metrics.task_memory_bytes.set(self._peak_bytes)
        return usage

    def current(self) -> Usage:
        """Return the figures from the samples taken so far, without sampling.

        Returns:
            The same figures :meth:`sample` last returned.
        """
        cpu = round(self._busy_ns / self._capacity_ns * 100) if self._capacity_ns > 0 else None
        memory = round(self._peak_bytes / _MiB) if self._peak_bytes is not None else None
        return Usage(avg_cpu_percent=cpu, peak_memory_mib=memory)

    # ECS task metadata

    async def _fetch_json(self, path: str) -> Any:
        assert self._uri is not None
        url = self._uri + path
        try:
            with anyio.fail_after(self._timeout):
                response = await httpio.get_url(url)
            if response.status != 200:
                raise UsageError(f"answered {response.status}")
            document = json.loads(response.body)
        except (UsageError, httpio.HttpError, OSError, ValueError, RecursionError, TimeoutError) as exc:
            # Logged once per outage: a down endpoint would otherwise log every interval.
            if not self._failing:
                log.warning("task_metadata_unavailable", url=url, error=str(exc))
            self._failing = True
            return None
        if self._failing:
            log.info("task_metadata_recovered", url=url)
        self._failing = False
        return document

    async def _task_metadata(self) -> Mapping[str, Any] | None:
        if self._uri is None:
            return None
        if self._task is None:
            document = await self._fetch_json("/task")
            # Cached once it is a JSON object: the ARN and the limits never change in a task's life.
            if isinstance(document, Mapping):
                self._task = document
        return self._task

    async def _allocation(self) -> float | None:
        task = await self._task_metadata()
        limit = _number(task, "Limits", "CPU") if task is not None else None
        if limit:
            return limit
        # EC2 tasks may have no task-level CPU limit: use what this container may use instead.
        return self._local_allocation()

    async def _sample_metadata(self) -> tuple[_CpuDelta | None, int | None]:
        stats = await self._fetch_json("/task/stats")
        if not isinstance(stats, Mapping):
            if stats is not None:
                log.warning("task_stats_malformed", kind=type(stats).__name__)
            return None, None
        busy = 0.0
        wall = 0.0
        memory = 0.0
        memory_seen = False
        for container_id, container in stats.items():
            # A stopped container's entry is null.
            if not isinstance(container, Mapping):
                continue
            total = _number(container, "cpu_stats", "cpu_usage", "total_usage")
            system = _number(container, "cpu_stats", "system_cpu_usage")
            online = _number(container, "cpu_stats", "online_cpus")
            if not online:
                percpu = _at(container, "cpu_stats", "cpu_usage", "percpu_usage")
                online = float(len(percpu)) if isinstance(percpu, list) and percpu else None
            if total is not None and system is not None:
                previous = self._previous_containers.get(str(container_id))
                if previous is None:
                    # The first read of a container: Docker's own previous read, when it has one.
                    pre_total = _number(container, "precpu_stats", "cpu_usage", "total_usage")
                    pre_system = _number(container, "precpu_stats", "system_cpu_usage")
                    if pre_total is not None and pre_system:
                        previous = (pre_total, pre_system)
                self._previous_containers[str(container_id)] = (total, system)
                if previous is not None and online:
                    d_total, d_system = total - previous[0], system - previous[1]
                    # A counter that went backwards (container restarted) gives no usable delta.
                    if d_total >= 0 and d_system > 0:
                        busy += d_total
                        # system_cpu_usage counts every CPU of the host: / online_cpus is wall time.
                        wall = max(wall, d_system / online)
            usage = _number(container, "memory_stats", "usage")
            if usage is not None:
                inner = _at(container, "memory_stats", "stats")
                memory += _without_cache(usage, inner if isinstance(inner, Mapping) else {})
                memory_seen = True
        delta = None
        if wall > 0:
            alloc = await self._allocation()
            if alloc:
                delta = _CpuDelta(busy_ns=busy, wall_ns=wall, alloc_cpus=alloc)
        return delta, int(memory) if memory_seen else None

    # Local files: cgroup v2, cgroup v1, /proc

    def _sample_local(self) -> tuple[_CpuDelta | None, int | None]:
        reading = self._read_local()
        if reading is None:
            return None, None
        previous, self._previous_local = self._previous_local, reading
        delta = None
        if (
            previous is not None
            and previous.busy_ns is not None
            and reading.busy_ns is not None
            and reading.alloc_cpus
            and reading.busy_ns >= previous.busy_ns
        ):
            delta = _CpuDelta(
                busy_ns=reading.busy_ns - previous.busy_ns,
                wall_ns=reading.wall_ns - previous.wall_ns,
                alloc_cpus=reading.alloc_cpus,
            )
        return delta, reading.memory_bytes

    def _read_local(self) -> _Reading | None:
        readers: dict[str, Callable[[], _Reading | None]] = {
            "cgroup2": self._read_cgroup2,
            "cgroup1": self._read_cgroup1,
            "proc": self._read_proc,
        }
        if self._local_source is not None:
            # Stick to one source: deltas between two different counters mean nothing.
            return readers[self._local_source]()
        for name, reader in readers.items():
            reading = reader()
            if reading is not None and (reading.busy_ns is not None or reading.memory_bytes is not None):
                self._local_source = name
                log.info("usage_source", source=name)
                return reading
        if not self._failing:
            log.warning("usage_source_unavailable", cgroup_root=str(self._cgroup_root))
        self._failing = True
        return None

    def _own_cgroups(self) -> dict[str, str]:
        """Controller (``""`` for cgroup v2) → this process's cgroup path, from ``/proc/self/cgroup``."""
        paths: dict[str, str] = {}
        for line in (_read_text(self._proc_root / "self" / "cgroup") or "").splitlines():
            fields = line.split(":", 2)
            if len(fields) == 3:
                for controller in fields[1].split(","):
                    paths[controller] = fields[2]
        return paths

    def _cgroup_dir(self, mounts: list[Path], own_path: str | None, probe: str) -> Path | None:
        """This process's cgroup directory under one of ``mounts``, or the mount itself.

        Inside a container (cgroup namespace) the process's path is ``/`` and the mount is its own
        cgroup; on a host the path names a sub-directory.
        """
        for mount in mounts:
            if own_path and own_path != "/":
                nested = mount / own_path.lstrip("/")
                if (nested / probe).is_file():
                    return nested
            if (mount / probe).is_file():
                return mount
        return None

    def _read_cgroup2(self) -> _Reading | None:
        if not (self._cgroup_root / "cgroup.controllers").is_file():
            return None
        directory = self._cgroup_dir([self._cgroup_root], self._own_cgroups().get(""), "cpu.stat")
        if directory is None:
            return None
        wall_ns = self._clock() * _NS_PER_S
        usage_usec = _keyed_ints(_read_text(directory / "cpu.stat")).get("usage_usec")
        current = _read_int(directory / "memory.current")
        memory = None
        if current is not None:
            memory = int(_without_cache(current, _keyed_ints(_read_text(directory / "memory.stat"))))
        return _Reading(
            busy_ns=usage_usec * 1000 if usage_usec is not None else None,
            wall_ns=wall_ns,
            alloc_cpus=self._cgroup2_quota(directory) or self._machine_cpus(),
            memory_bytes=memory,
        )

    def _cgroup2_quota(self, directory: Path) -> float | None:
        fields = (_read_text(directory / "cpu.max") or "").split()
        if len(fields) == 2 and fields[0] != "max":
            try:
                quota, period = int(fields[0]), int(fields[1])
            except ValueError:
                return None
            return quota / period if quota > 0 and period > 0 else None
        return None

    def _cgroup1_dirs(self) -> tuple[Path | None, Path | None, Path | None]:
        own = self._own_cgroups()
        root = self._cgroup_root
        combined = [root / "cpu,cpuacct", root / "cpuacct,cpu"]
        cpuacct = self._cgroup_dir([root / "cpuacct", *combined], own.get("cpuacct"), "cpuacct.usage")
        cpu = self._cgroup_dir([root / "cpu", *combined], own.get("cpu"), "cpu.cfs_quota_us")
        memory = self._cgroup_dir([root / "memory"], own.get("memory"), "memory.usage_in_bytes")
        return cpuacct, cpu, memory

    def _read_cgroup1(self) -> _Reading | None:
        cpuacct, cpu, memory_dir = self._cgroup1_dirs()
        if cpuacct is None and memory_dir is None:
            return None
        wall_ns = self._clock() * _NS_PER_S
        usage_ns = _read_int(cpuacct / "cpuacct.usage") if cpuacct is not None else None
        memory = None
        if memory_dir is not None:
            usage = _read_int(memory_dir / "memory.usage_in_bytes")
            if usage is not None:
                memory = int(_without_cache(usage, _keyed_ints(_read_text(memory_dir / "memory.stat"))))
        return _Reading(
            busy_ns=float(usage_ns) if usage_ns is not None else None,
            wall_ns=wall_ns,
            alloc_cpus=(self._cgroup1_quota(cpu) if cpu is not None else None) or self._machine_cpus(),
            memory_bytes=memory,
        )

    @staticmethod
    def _cgroup1_quota(directory: Path) -> float | None:
        quota = _read_int(directory / "cpu.cfs_quota_us")
        period = _read_int(directory / "cpu.cfs_period_us")
        if quota is None or period is None or quota <= 0 or period <= 0:
            return None  # -1: no quota
        return quota / period

    def _read_proc(self) -> _Reading | None:
        text = _read_text(self._proc_root / "stat")
        if text is None:
            return None
        busy_ns: float | None = None
        wall_ns = 0.0
        cpus = sum(1 for line in text.splitlines() if line.startswith("cpu") and line[3:4].isdigit())
        fields = text.splitlines()[0].split() if text else []
        if fields and fields[0] == "cpu" and cpus > 0:
            try:
                # user nice system idle iowait irq softirq steal (guest time is already in user).
                ticks = [int(value) for value in fields[1:9]]
            except ValueError:
                ticks = []
            if len(ticks) == 8:
                tick_ns = _NS_PER_S / os.sysconf("SC_CLK_TCK")
                busy_ns = (sum(ticks) - ticks[3] - ticks[4]) * tick_ns
                # The jiffies of every CPU add up to wall time × CPUs.
                wall_ns = sum(ticks) * tick_ns / cpus
        meminfo = _keyed_ints(_read_text(self._proc_root / "meminfo"))
        memory = None
        if "MemTotal" in meminfo and "MemAvailable" in meminfo:
            memory = max(0, meminfo["MemTotal"] - meminfo["MemAvailable"]) * 1024
        return _Reading(busy_ns=busy_ns, wall_ns=wall_ns, alloc_cpus=float(cpus) or None, memory_bytes=memory)

    def _local_allocation(self) -> float | None:
        own = self._own_cgroups()
        if (self._cgroup_root / "cgroup.controllers").is_file():
            directory = self._cgroup_dir([self._cgroup_root], own.get(""), "cpu.max")
            if directory is not None and (quota := self._cgroup2_quota(directory)):
                return quota
        else:
            _, cpu, _ = self._cgroup1_dirs()
            if cpu is not None and (quota := self._cgroup1_quota(cpu)):
                return quota
        return self._machine_cpus()

    @staticmethod
    def _machine_cpus() -> float:
        try:
            return float(len(os.sched_getaffinity(0)))
        except (AttributeError, OSError):
            return float(os.cpu_count() or 1)
