"""Benchmark: context restore and persist through ProfileStore against ``tar`` plus a raw S3 transfer.

For synthetic 50 MB and 200 MB profiles (many small files, a few large SQLite-like ones, some
incompressible LevelDB-like ones), on one moto server on loopback, in one run:

* persist: ``ProfileStore.persist`` vs ``tar czf`` + a raw ``PutObject`` of its output;
* restore: ``ProfileStore.restore`` vs a raw ``GetObject`` to a file + ``tar xzf``;
* peak RSS of a process doing only our restore or persist (``VmHWM``), to show it does not grow with
  the profile;
* whether a 200 MB persist fits the default stop budget's upload step.

Every timed operation (ours, the raw S3 transfers, tar) runs in a child process, so its peak RSS
and CPU time are its own; moto runs in this process. Each figure is the best of ``--repeat`` runs,
interleaved. Wall-clock ratios are the target; CPU ratios are printed beside them because, on a
shared machine, other load moves wall-clock times by tens of percent and CPU times much less.
Gzip levels differ on purpose: ``tar czf`` uses gzip -6, ours -1 (archive sizes are printed).

Run: ``.venv/bin/python bench/bench_profile.py [--sizes 50,200] [--repeat 3] [--workdir DIR]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiobotocore.session import get_session

from controller.config import ContextConfig, ProfileLimits, ShutdownBudget
from controller.metrics import Metrics
from controller.profile import ProfileStore, RestoreResult

_MiB = 1024 * 1024
BUCKET = "bench-contexts"
TARGET_RATIO = 1.2
RSS_LIMIT_MB = 100.0


# --------------------------------------------------------------------------------------------------
# Synthetic profiles.


def _text_block(rng: random.Random) -> bytes:
    """4 MiB of word-like text: compresses about 2.5:1, like JSON, HTML and JS in a profile."""
    words = [
        bytes(rng.choice(b'abcdefghijklmnopqrstuvwxyz_{}:,"') for _ in range(rng.randint(2, 12)))
        for _ in range(4000)
    ]
    return b" ".join(rng.choice(words) for _ in range(700_000))[: 4 * _MiB]


def _sqlite_like(rng: random.Random, text: bytes, size: int) -> bytes:
    """4 KiB pages partly filled with text, the rest zeros: about 5:1, like Chromium's SQLite files."""
    page = bytearray(size)
    for offset in range(0, size, 4096):
        used = rng.randint(300, 3500)
        start = rng.randrange(0, len(text) - used)
        page[offset : offset + used] = text[start : start + used][: size - offset]
    return bytes(page)


def make_profile(root: Path, total: int, seed: int = 7) -> tuple[int, int]:
    """Write a synthetic profile of about ``total`` bytes under ``root``.

    Mix by bytes: 30 % small text files (1–32 KiB, in nested dirs), 45 % large SQLite-like files,
    25 % incompressible (random, like LevelDB ``.ldb`` files and blobs).

    Returns:
        (files written, bytes written).
    """
    rng = random.Random(seed)
    text = _text_block(rng)
    files = written = 0

    def put(rel: str, data: bytes) -> None:
        nonlocal files, written
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        files += 1
        written += len(data)

    small_budget = int(total * 0.30)
    dirs = [
        "Default/Local Storage/leveldb",
        "Default/IndexedDB/https_example.com_0.indexeddb.leveldb",
        "Default/Session Storage",
        "Default/Extensions/abcdefghijklmnop/1.0_0/js",
        "Default/Extensions/abcdefghijklmnop/1.0_0/img",
        "Default/Service Worker/Database",
        "Default/File System/000/p",
        "Default/shared_proto_db",
    ]
    index = 0
    while small_budget > 0:
        size = min(small_budget, rng.randint(1024, 32 * 1024))
        start = rng.randrange(0, len(text) - size)
        put(f"{rng.choice(dirs)}/f{index:05d}.txt", text[start : start + size])
        small_budget -= size
        index += 1

    large_budget = int(total * 0.45)
    names = ["History", "Cookies", "Web Data", "Favicons", "Login Data", "Top Sites", "Shortcuts"]
    index = 0
    while large_budget > 0:
        size = min(large_budget, rng.randint(2 * _MiB, 24 * _MiB))
        put(f"Default/{names[index % len(names)]}{index // len(names) or ''}", _sqlite_like(rng, text, size))
        large_budget -= size
        index += 1

    random_budget = total - written
    index = 0
    while random_budget > 0:
        size = min(random_budget, rng.randint(_MiB, 8 * _MiB))
        put(f"Default/IndexedDB/https_example.com_0.indexeddb.blob/{index:06d}.ldb", rng.randbytes(size))
        random_budget -= size
        index += 1
    put("Local State", b'{"profile": {"info_cache": {}}}')
    return files, written


# --------------------------------------------------------------------------------------------------
# Measurements. Every timed operation runs in a process of its own (ours, the raw S3 transfers,
# tar), so its CPU time and peak RSS are its own: the moto server lives in the parent process and
# other work on the machine shows in wall-clock time but not in CPU time.


@dataclass(frozen=True)
class Run:
    """One measured operation."""

    seconds: float
    cpu: float
    hwm_mb: float = 0.0
    rss_before_mb: float = 0.0
    bytes: int = 0


def _vm(field: str) -> float:
    """A ``/proc/self/status`` memory field in MB (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def _cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _child(op: str, endpoint: str, key: str, path: Path) -> dict[str, Any]:
    """One operation in this (child) process: persist, restore, raw-put or raw-get."""
    async with get_session().create_client("s3", endpoint_url=endpoint, region_name="us-east-1") as s3:
        store = ProfileStore(
            s3, ContextConfig(BUCKET, "bench", key, persist=True), ProfileLimits(), Metrics()
        )
        rss_before, cpu_before = _vm("VmRSS"), _cpu_self()
        started = time.perf_counter()
        size = 0
        if op == "persist":
            missing = RestoreResult(outcome="missing", reason=None, etag=None, bytes=0, may_persist=True)
            persisted = await store.persist(path, missing, chromium_version="bench")
            assert persisted.outcome == "uploaded", persisted
            size = persisted.bytes
        elif op == "restore":
            restored = await store.restore(path)
            assert restored.outcome == "restored", restored
            size = restored.bytes
        elif op == "raw-put":
            with path.open("rb") as body:
                await s3.put_object(Bucket=BUCKET, Key=key, Body=body)
        else:
            response = await s3.get_object(Bucket=BUCKET, Key=key)
            with path.open("wb") as out:
                async with response["Body"] as stream:
                    while chunk := await stream.read(_MiB):
                        out.write(chunk)
        seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "cpu": _cpu_self() - cpu_before,
        "bytes": size,
        "rss_before_mb": rss_before,
        "hwm_mb": _vm("VmHWM"),
    }


def _run_child(op: str, endpoint: str, key: str, path: Path) -> Run:
    completed = subprocess.run(
        [sys.executable, __file__, "--child", op, endpoint, key, str(path)],
        check=True,
        capture_output=True,
        text=True,
    )
    return Run(**json.loads(completed.stdout.strip().splitlines()[-1]))


def _run_tar(*args: str) -> Run:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(["tar", *args], check=True)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # tar waits for its gzip child, so both are in RUSAGE_CHILDREN.
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return Run(seconds=seconds, cpu=cpu)


@dataclass
class Figures:
    """Best wall and CPU times over the repeats, ours against the baseline."""

    ours: list[Run] = field(default_factory=list)
    tar: list[Run] = field(default_factory=list)
    raw: list[Run] = field(default_factory=list)

    def best(self, runs: list[Run], attr: str) -> float:
        return min(float(getattr(run, attr)) for run in runs)

    def ratio(self, attr: str) -> float:
        base = self.best(self.tar, attr) + self.best(self.raw, attr)
        return self.best(self.ours, attr) / base

    def line(self, what: str, tar_label: str, raw_label: str) -> str:
        tar_s, raw_s = self.best(self.tar, "seconds"), self.best(self.raw, "seconds")
        tar_c, raw_c = self.best(self.tar, "cpu"), self.best(self.raw, "cpu")
        return (
            f"{what:8s} wall: {tar_label} {tar_s:5.2f} + {raw_label} {raw_s:4.2f} = {tar_s + raw_s:5.2f} s, "
            f"ours {self.best(self.ours, 'seconds'):5.2f} s, ratio {self.ratio('seconds'):.2f}x | "
            f"cpu: {tar_c + raw_c:5.2f} s vs ours {self.best(self.ours, 'cpu'):5.2f} s, "
            f"ratio {self.ratio('cpu'):.2f}x"
        )


def bench_size(endpoint: str, work: Path, total: int, repeat: int) -> dict[str, float]:
    """Persist and restore one synthetic profile both ways, best of ``repeat``; return the figures."""
    label = f"{total // _MiB}MB"
    profile = work / f"profile-{label}"
    files, written = make_profile(profile, total)
    print(f"\n== {label} profile: {files} files, {written / _MiB:.0f} MiB (best of {repeat})", flush=True)
    tarball = work / f"baseline-{label}.tar.gz"
    fetched = work / f"fetched-{label}.tar.gz"
    persist, restore = Figures(), Figures()
    for run in range(repeat):
        # Persist: tar czf + raw put, then ours (into a key of its own: the upload is If-None-Match).
        persist.tar.append(_run_tar("czf", str(tarball), "-C", str(profile), "."))
        persist.raw.append(_run_child("raw-put", endpoint, f"raw-{label}", tarball))
        persist.ours.append(_run_child("persist", endpoint, f"ours-{label}-{run}", profile))
        # Restore: raw get + tar xzf of tar's archive, then ours of the archive we uploaded.
        restore.raw.append(_run_child("raw-get", endpoint, f"raw-{label}", fetched))
        unpacked = work / f"tar-restored-{label}"
        unpacked.mkdir()
        restore.tar.append(_run_tar("xzf", str(fetched), "-C", str(unpacked)))
        restored = work / f"restored-{label}"
        restore.ours.append(_run_child("restore", endpoint, f"ours-{label}-{run}", restored / "profile"))
        shutil.rmtree(unpacked)
        shutil.rmtree(restored)

    print(
        f"archives: tar czf {tarball.stat().st_size / _MiB:.1f} MiB, "
        f"ours {persist.ours[0].bytes / _MiB:.1f} MiB"
    )
    print(persist.line("persist", "tar czf", "put"))
    print(restore.line("restore", "tar xzf", "get"))
    persist_hwm = max(r.hwm_mb for r in persist.ours)
    restore_hwm = max(r.hwm_mb for r in restore.ours)
    start_rss = min(r.rss_before_mb for r in persist.ours + restore.ours)
    print(
        f"peak RSS persist {persist_hwm:.0f} MB, restore {restore_hwm:.0f} MB "
        f"(the process holds {start_rss:.0f} MB before the operation starts)"
    )
    tarball.unlink()
    fetched.unlink()
    shutil.rmtree(profile)
    return {
        "persist_ratio": persist.ratio("seconds"),
        "restore_ratio": restore.ratio("seconds"),
        "persist_cpu_ratio": persist.ratio("cpu"),
        "restore_cpu_ratio": restore.ratio("cpu"),
        "persist_seconds": persist.best(persist.ours, "seconds"),
        "persist_hwm": persist_hwm,
        "restore_hwm": restore_hwm,
    }


def main() -> int:
    """Run the benchmark (or one child operation); print figures; exit 1 if a target is missed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--child", nargs=4, metavar=("OP", "ENDPOINT", "KEY", "DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default="50,200", help="profile sizes in MB (default: 50,200)")
    parser.add_argument("--workdir", default=None, help="where profiles are written (default: a temp dir)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; the best counts")
    args = parser.parse_args()
    for name, value in {
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        os.environ.setdefault(name, value)
    if args.child:
        op, endpoint, key, path = args.child
        print(json.dumps(asyncio.run(_child(op, endpoint, key, Path(path)))))
        return 0

    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=BUCKET)
    results: dict[int, dict[str, float]] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="bench-profile-", dir=args.workdir) as tmp:
            for size in (int(s) for s in args.sizes.split(",")):
                results[size] = bench_size(endpoint, Path(tmp), size * _MiB, args.repeat)
    finally:
        server.stop()

    budget = ShutdownBudget()
    print("\n== summary")
    ok = True
    for size, figures in results.items():
        for what in ("persist", "restore"):
            ratio = figures[f"{what}_ratio"]
            hwm = figures[f"{what}_hwm"]
            verdict = "ok" if ratio <= TARGET_RATIO and hwm <= RSS_LIMIT_MB else "MISSED"
            ok = ok and verdict == "ok"
            print(
                f"{size:4d} MB {what:8s} wall ratio {ratio:.2f}x (target <= {TARGET_RATIO}x; "
                f"cpu {figures[f'{what}_cpu_ratio']:.2f}x), "
                f"peak RSS {hwm:.0f} MB (target <= {RSS_LIMIT_MB:.0f} MB): {verdict}"
            )
    if 200 in results:
        seconds = results[200]["persist_seconds"]
        fits = seconds <= budget.profile_upload
        ok = ok and fits
        print(
            f"200 MB persist {seconds:.1f} s vs upload step {budget.profile_upload:g} s of the "
            f"{budget.stop_timeout:g} s stop budget: {'fits' if fits else 'DOES NOT FIT'}"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
