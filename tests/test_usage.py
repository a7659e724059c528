"""UsageSampler: ECS task metadata (a fake v4 server on loopback), cgroup v2/v1 and /proc fallbacks."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from controller.metrics import Metrics
from controller.usage import Usage, UsageSampler
from tests.fake_task_metadata import TASK_ARN, FakeTaskMetadata, docker_stats

pytestmark = pytest.mark.anyio

MiB = 1024 * 1024
SECOND = 1_000_000_000


def closed_port_uri() -> str:
    """A metadata URI on a loopback port nobody listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v4/gone"


class FakeClock:
    """Monotonic seconds the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def cgroup2(
    root: Path, *, usage_usec: int, current: int, inactive: int = 0, cpu_max: str = "max 100000"
) -> None:
    """Lay out the files of a cgroup v2 directory."""
    write(root / "cgroup.controllers", "cpuset cpu io memory pids\n")
    write(root / "cpu.stat", f"usage_usec {usage_usec}\nuser_usec {usage_usec}\nsystem_usec 0\n")
    write(root / "cpu.max", cpu_max + "\n")
    write(root / "memory.current", f"{current}\n")
    write(root / "memory.stat", f"anon {current - inactive}\nfile {inactive}\ninactive_file {inactive}\n")


def proc_self_cgroup(proc: Path, text: str) -> None:
    write(proc / "self" / "cgroup", text)


# ECS task metadata


async def test_task_arn_from_metadata() -> None:
    """task_arn() returns /task's TaskARN."""
    async with FakeTaskMetadata() as metadata:
        assert await UsageSampler(metadata.uri, Metrics()).task_arn() == TASK_ARN


async def test_task_arn_none_without_metadata(tmp_path: Path) -> None:
    """Without a metadata URI there is no task ARN."""
    sampler = UsageSampler(None, Metrics(), cgroup_root=tmp_path, proc_root=tmp_path)
    assert await sampler.task_arn() is None


async def test_task_arn_none_when_endpoint_down() -> None:
    """A metadata endpoint that refuses connections gives no ARN and no exception."""
    assert await UsageSampler(closed_port_uri(), Metrics()).task_arn() is None


async def test_cpu_percent_of_task_allocation_first_sample() -> None:
    """The first sample uses Docker's precpu_stats: 0.25 CPU used of a 0.5 vCPU task is 50 %."""
    async with FakeTaskMetadata(cpu_limit=0.5) as metadata:
        # One second of wall time on a 2-CPU host (system counts both CPUs), 0.25 s of CPU used.
        metadata.stats = {
            "c1": docker_stats(
                total_usage=SECOND + SECOND // 4,
                system_cpu_usage=12 * SECOND,
                pre_total_usage=SECOND,
                pre_system_cpu_usage=10 * SECOND,
                online_cpus=2,
            )
        }
        usage = await UsageSampler(metadata.uri, Metrics()).sample()
    assert usage.avg_cpu_percent == 50


async def test_cpu_percent_is_time_weighted_average() -> None:
    """Later samples use the sampler's own previous read; the figure averages over all the time seen."""
    async with FakeTaskMetadata(cpu_limit=0.5) as metadata:
        sampler = UsageSampler(metadata.uri, Metrics())
        metadata.stats = {
            "c1": docker_stats(
                total_usage=SECOND // 4, system_cpu_usage=12 * SECOND, pre_system_cpu_usage=10 * SECOND
            )
        }
        assert (await sampler.sample()).avg_cpu_percent == 50
        # Three more seconds at 0.05 CPU: (0.25 + 0.15) CPU·s over 4 s × 0.5 vCPU = 20 %.
        metadata.stats = {
            "c1": docker_stats(total_usage=SECOND // 4 + 150_000_000, system_cpu_usage=18 * SECOND)
        }
        assert (await sampler.sample()).avg_cpu_percent == 20


async def test_cpu_summed_over_containers() -> None:
    """CPU time of every container in /task/stats counts toward the task's figure."""
    async with FakeTaskMetadata(cpu_limit=1.0) as metadata:
        metadata.stats = {
            "c1": docker_stats(
                total_usage=SECOND // 5, system_cpu_usage=4 * SECOND, pre_system_cpu_usage=2 * SECOND
            ),
            "c2": docker_stats(
                total_usage=SECOND // 10, system_cpu_usage=4 * SECOND, pre_system_cpu_usage=2 * SECOND
            ),
            "stopped": None,
        }
        usage = await UsageSampler(metadata.uri, Metrics()).sample()
    assert usage.avg_cpu_percent == 30


async def test_memory_is_peak_without_cache() -> None:
    """Memory is usage minus inactive file cache, summed over containers, and the peak is kept."""
    async with FakeTaskMetadata() as metadata:
        sampler = UsageSampler(metadata.uri, Metrics())
        metadata.stats = {
            "c1": docker_stats(
                total_usage=0, system_cpu_usage=0, memory_usage=400 * MiB, inactive_file=100 * MiB
            ),
            "c2": docker_stats(total_usage=0, system_cpu_usage=0, memory_usage=20 * MiB),
        }
        assert (await sampler.sample()).peak_memory_mib == 320
        metadata.stats = {"c1": docker_stats(total_usage=0, system_cpu_usage=0, memory_usage=200 * MiB)}
        assert (await sampler.sample()).peak_memory_mib == 320


async def test_first_sample_without_precpu_has_no_cpu() -> None:
    """A first read whose precpu_stats are zero gives no CPU figure but does give memory."""
    async with FakeTaskMetadata() as metadata:
        metadata.stats = {
            "c1": docker_stats(total_usage=SECOND, system_cpu_usage=10 * SECOND, memory_usage=MiB)
        }
        usage = await UsageSampler(metadata.uri, Metrics()).sample()
    assert usage == Usage(avg_cpu_percent=None, peak_memory_mib=1)


async def test_zero_deltas_give_no_cpu() -> None:
    """Stats that did not move between two reads give no CPU figure."""
    async with FakeTaskMetadata() as metadata:
        sampler = UsageSampler(metadata.uri, Metrics())
        metadata.stats = {"c1": docker_stats(total_usage=SECOND, system_cpu_usage=10 * SECOND)}
        await sampler.sample()
        usage = await sampler.sample()
    assert usage.avg_cpu_percent is None


async def test_non_json_stats_give_no_figures() -> None:
    """A /task/stats body that is not JSON gives None figures, no exception."""
    async with FakeTaskMetadata() as metadata:
        metadata.overrides["/task/stats"] = (200, b"<html>oops</html>")
        assert await UsageSampler(metadata.uri, Metrics()).sample() == Usage(None, None)


async def test_misshapen_stats_give_no_figures() -> None:
    """JSON of the wrong shape (strings, lists, negative counters) gives None figures."""
    async with FakeTaskMetadata() as metadata:
        metadata.stats = {
            "c1": {"cpu_stats": "busy", "precpu_stats": [], "memory_stats": {"usage": "lots"}},
            "c2": {"cpu_stats": {"cpu_usage": {"total_usage": -5}, "system_cpu_usage": True}},
            "c3": 42,
        }
        assert await UsageSampler(metadata.uri, Metrics()).sample() == Usage(None, None)


async def test_non_http_answer_gives_no_figures() -> None:
    """A server that answers bytes that are not HTTP gives None figures."""
    async with FakeTaskMetadata() as metadata:
        metadata.raw["/task/stats"] = b"\x00\x01garbage without a header end"
        assert await UsageSampler(metadata.uri, Metrics()).sample() == Usage(None, None)


async def test_error_status_gives_no_figures() -> None:
    """An HTTP 500 from the endpoint gives None figures."""
    async with FakeTaskMetadata() as metadata:
        metadata.overrides["/task/stats"] = (500, b'{"error":"internal"}')
        assert await UsageSampler(metadata.uri, Metrics()).sample() == Usage(None, None)


async def test_endpoint_down_gives_no_figures() -> None:
    """A metadata endpoint that refuses connections gives None figures, no exception."""
    assert await UsageSampler(closed_port_uri(), Metrics()).sample() == Usage(None, None)


async def test_figures_kept_when_endpoint_goes_down() -> None:
    """Once measured, the figures stay as they were while the endpoint is down."""
    async with FakeTaskMetadata(cpu_limit=1.0) as metadata:
        sampler = UsageSampler(metadata.uri, Metrics())
        metadata.stats = {
            "c1": docker_stats(
                total_usage=SECOND,
                system_cpu_usage=4 * SECOND,
                pre_system_cpu_usage=2 * SECOND,
                memory_usage=64 * MiB,
            )
        }
        measured = await sampler.sample()
        metadata.raw["/task/stats"] = b""
        assert await sampler.sample() == measured == Usage(avg_cpu_percent=100, peak_memory_mib=64)


async def test_missing_cpu_limit_uses_cgroup_quota(tmp_path: Path) -> None:
    """Without Limits.CPU in /task, the allocation is the local cgroup's cpu.max quota."""
    cgroup2(tmp_path / "cg", usage_usec=0, current=0, cpu_max="200000 100000")
    proc_self_cgroup(tmp_path / "proc", "0::/\n")
    async with FakeTaskMetadata(cpu_limit=None) as metadata:
        metadata.stats = {
            "c1": docker_stats(
                total_usage=SECOND, system_cpu_usage=4 * SECOND, pre_system_cpu_usage=2 * SECOND
            )
        }
        sampler = UsageSampler(
            metadata.uri, Metrics(), cgroup_root=tmp_path / "cg", proc_root=tmp_path / "proc"
        )
        assert (await sampler.sample()).avg_cpu_percent == 50


async def test_chunked_response_is_decoded() -> None:
    """A chunked answer (Go's server for large bodies) is decoded."""
    async with FakeTaskMetadata() as metadata:
        metadata.chunked = True
        assert await UsageSampler(metadata.uri, Metrics()).task_arn() == TASK_ARN


async def test_metrics_gauges_set() -> None:
    """sample() sets the CPU ratio and peak memory gauges."""
    metrics = Metrics()
    async with FakeTaskMetadata(cpu_limit=0.5) as metadata:
        metadata.stats = {
            "c1": docker_stats(
                total_usage=SECOND // 4,
                system_cpu_usage=4 * SECOND,
                pre_system_cpu_usage=2 * SECOND,
                memory_usage=100 * MiB,
            )
        }
        await UsageSampler(metadata.uri, metrics).sample()
    assert metrics.registry.get_sample_value("wallcrawler_task_cpu_usage_ratio") == pytest.approx(0.5)
    assert metrics.registry.get_sample_value("wallcrawler_task_memory_peak_bytes") == 100 * MiB


# Without metadata: cgroup v2, cgroup v1, /proc


async def test_cgroup2_cpu_and_memory(tmp_path: Path) -> None:
    """cgroup v2: usage_usec over wall time × cpu.max quota; peak of memory.current minus inactive_file."""
    cg, proc, clock = tmp_path / "cg", tmp_path / "proc", FakeClock()
    proc_self_cgroup(proc, "0::/\n")
    cgroup2(cg, usage_usec=1_000_000, current=300 * MiB, inactive=100 * MiB, cpu_max="50000 100000")
    sampler = UsageSampler(None, Metrics(), cgroup_root=cg, proc_root=proc, clock=clock)
    assert await sampler.sample() == Usage(avg_cpu_percent=None, peak_memory_mib=200)
    # Ten seconds later, 2.5 s more CPU of a 0.5-CPU quota: 2.5 / (10 × 0.5) = 50 %.
    clock.now += 10
    cgroup2(cg, usage_usec=3_500_000, current=150 * MiB, cpu_max="50000 100000")
    assert await sampler.sample() == Usage(avg_cpu_percent=50, peak_memory_mib=200)


async def test_cgroup2_nested_path_from_proc_self_cgroup(tmp_path: Path) -> None:
    """On a host (no cgroup namespace) the process's own cgroup directory is found via /proc/self/cgroup."""
    cg, proc, clock = tmp_path / "cg", tmp_path / "proc", FakeClock()
    proc_self_cgroup(proc, "0::/system.slice/task.scope\n")
    write(cg / "cgroup.controllers", "cpu memory\n")
    write(cg / "cpu.stat", "usage_usec 999999999\n")
    cgroup2(cg / "system.slice" / "task.scope", usage_usec=0, current=10 * MiB, cpu_max="100000 100000")
    sampler = UsageSampler(None, Metrics(), cgroup_root=cg, proc_root=proc, clock=clock)
    await sampler.sample()
    clock.now += 4
    cgroup2(
        cg / "system.slice" / "task.scope", usage_usec=1_000_000, current=10 * MiB, cpu_max="100000 100000"
    )
    assert await sampler.sample() == Usage(avg_cpu_percent=25, peak_memory_mib=10)


async def test_cgroup2_without_quota_uses_machine_cpus(tmp_path: Path) -> None:
    """cpu.max 'max' means no quota: the allocation is the CPUs this process may run on."""
    cg, proc, clock = tmp_path / "cg", tmp_path / "proc", FakeClock()
    proc_self_cgroup(proc, "0::/\n")
    cgroup2(cg, usage_usec=0, current=MiB)
    sampler = UsageSampler(None, Metrics(), cgroup_root=cg, proc_root=proc, clock=clock)
    await sampler.sample()
    cpus = len(os.sched_getaffinity(0))
    clock.now += 10
    cgroup2(cg, usage_usec=10_000_000, current=MiB)
    assert (await sampler.sample()).avg_cpu_percent == round(100 / cpus)


async def test_cgroup1_cpu_and_memory(tmp_path: Path) -> None:
    """cgroup v1: cpuacct.usage over wall time × CFS quota; memory.usage_in_bytes minus inactive file."""
    cg, proc, clock = tmp_path / "cg", tmp_path / "proc", FakeClock()
    proc_self_cgroup(proc, "4:memory:/\n3:cpu,cpuacct:/\n0::/\n")
    write(cg / "cpu,cpuacct" / "cpuacct.usage", "0\n")
    write(cg / "cpu,cpuacct" / "cpu.cfs_quota_us", "25000\n")
    write(cg / "cpu,cpuacct" / "cpu.cfs_period_us", "100000\n")
    write(cg / "memory" / "memory.usage_in_bytes", f"{80 * MiB}\n")
    write(cg / "memory" / "memory.stat", f"cache {40 * MiB}\ntotal_inactive_file {30 * MiB}\n")
    sampler = UsageSampler(None, Metrics(), cgroup_root=cg, proc_root=proc, clock=clock)
    assert await sampler.sample() == Usage(avg_cpu_percent=None, peak_memory_mib=50)
    clock.now += 8
    write(cg / "cpu,cpuacct" / "cpuacct.usage", f"{SECOND}\n")
    # 1 s of CPU over 8 s × 0.25 CPU = 50 %.
    assert (await sampler.sample()).avg_cpu_percent == 50


async def test_proc_fallback(tmp_path: Path) -> None:
    """Without cgroup files, /proc/stat and /proc/meminfo describe the whole machine."""
    cg, proc = tmp_path / "cg", tmp_path / "proc"
    cg.mkdir()
    write(
        proc / "stat",
        "cpu  100 0 100 800 0 0 0 0 0 0\ncpu0 50 0 50 400 0 0 0 0 0 0\ncpu1 50 0 50 400 0 0 0 0 0 0\n",
    )
    write(proc / "meminfo", "MemTotal:       4000000 kB\nMemFree:  1000000 kB\nMemAvailable:   3000000 kB\n")
    sampler = UsageSampler(None, Metrics(), cgroup_root=cg, proc_root=proc)
    assert await sampler.sample() == Usage(avg_cpu_percent=None, peak_memory_mib=round(1_000_000 / 1024))
    # 300 busy of 1000 more ticks: 30 % of the machine.
    write(
        proc / "stat", "cpu  250 0 250 1500 0 0 0 0 0 0\ncpu0 1 0 1 1 0 0 0 0 0 0\ncpu1 1 0 1 1 0 0 0 0 0 0\n"
    )
    assert (await sampler.sample()).avg_cpu_percent == 30


async def test_no_local_source_gives_no_figures(tmp_path: Path) -> None:
    """With no metadata, no cgroup files and no /proc, the figures are None and nothing raises."""
    sampler = UsageSampler(None, Metrics(), cgroup_root=tmp_path / "cg", proc_root=tmp_path / "proc")
    assert await sampler.sample() == Usage(None, None)
    assert await sampler.sample() == Usage(None, None)


async def test_this_machine_gives_memory() -> None:
    """On this machine's real cgroup or /proc files, sampling yields a memory figure."""
    usage = await UsageSampler(None, Metrics()).sample()
    assert usage.peak_memory_mib is not None
    assert usage.peak_memory_mib > 0
