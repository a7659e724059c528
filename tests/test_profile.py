"""Tests of controller.profile against a moto S3 server, with real archives and a real Chromium."""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat
import subprocess
import tarfile
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.abc
import pytest
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import ConnectionClosedError
from websockets.asyncio.client import ClientConnection, connect

from controller.config import ContextConfig, ProfileLimits
from controller.metrics import Metrics
from controller.profile import (
    COOKIES_PATH,
    MANIFEST_PATH,
    ProfileStore,
    RestoreResult,
    load_cookies,
    save_cookies,
)
from tests import profile_archives as archives
from tests.conftest import boto_client

if TYPE_CHECKING:
    from types_aiobotocore_s3.client import S3Client

BUCKET = "wallcrawler-contexts"
KEY = "proj_1/ctx_1/profile.tar.gz"
CHROMIUM = Path("/usr/bin/chromium")
_MiB = 1024 * 1024
# Small parts so the multipart path runs on a profile of a few MB (S3's minimum part is 5 MiB).
MULTIPART = ProfileLimits(multipart_threshold=5 * _MiB, multipart_part_size=5 * _MiB)
T = TypeVar("T")
MISSING = RestoreResult(outcome="missing", reason=None, etag=None, bytes=0, may_persist=True)


# --------------------------------------------------------------------------------------------------
# Fixtures and helpers.


@pytest.fixture
def bucket(aws_endpoint: str) -> Any:
    """A fresh bucket in moto; yields a boto3 client to arrange and inspect it."""
    client = boto_client("s3", aws_endpoint)
    client.create_bucket(Bucket=BUCKET)
    return client


@pytest.fixture
async def s3(aws_endpoint: str) -> AsyncIterator[S3Client]:
    """An aiobotocore client on moto, retrying once (injected faults fail fast)."""
    config = AioConfig(
        retries={"mode": "standard", "total_max_attempts": 2}, connect_timeout=5, read_timeout=30
    )
    session = get_session()
    async with session.create_client(
        "s3", endpoint_url=aws_endpoint, region_name="us-east-1", config=config
    ) as client:
        yield client


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """The directory holding the profile: temp files appear (and must vanish) here."""
    path = tmp_path / "work"
    path.mkdir()
    return path


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory outside the profile with a marker file that hostile archives aim at."""
    path = tmp_path / "outside"
    path.mkdir()
    (path / "marker").write_bytes(b"original")
    return path


def make_store(s3: S3Client, limits: ProfileLimits | None = None, *, persist: bool = True) -> ProfileStore:
    """A ProfileStore on the test bucket and key."""
    context = ContextConfig(bucket=BUCKET, context_id="ctx_1", s3_key=KEY, persist=persist)
    return ProfileStore(s3, context, limits or ProfileLimits(), Metrics())


def stored(bucket: Any) -> bytes | None:
    """The stored archive's bytes (None when absent)."""
    try:
        body: bytes = bucket.get_object(Bucket=BUCKET, Key=KEY)["Body"].read()
    except bucket.exceptions.NoSuchKey:
        return None
    return body


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root``: file contents, None for directories, ``-> target`` for symlinks."""
    found: dict[str, bytes | None] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            found[rel] = b"-> " + os.fsencode(os.readlink(path))
        else:
            found[rel] = None if path.is_dir() else path.read_bytes()
    return found


def write_profile(root: Path) -> None:
    """A small but realistic profile: data to keep, caches, locks and a port file to leave behind."""
    files = {
        "Local State": b'{"profile": {}}',
        "Default/Preferences": b'{"homepage": "https://example.com"}',
        "Default/Cookies": os.urandom(64 * 1024),
        "Default/Local Storage/leveldb/000003.log": b"local storage" * 100,
        "Default/IndexedDB/http_127.0.0.1_0.indexeddb.leveldb/CURRENT": b"MANIFEST-000001\n",
        "Default/Cache/Cache_Data/data_0": b"cached" * 1000,
        "Default/Code Cache/js/index": b"code cache",
        "Default/GPUCache/data_1": b"gpu",
        "Default/Service Worker/CacheStorage/abc/index": b"sw cache",
        "Default/Service Worker/Database/CURRENT": b"keep me",
        "GPUPersistentCache/data": b"gpu persistent",
        "ShaderCache/data": b"shader",
        "component_crx_cache/abc.crx": b"crx",
        "Crashpad/settings.dat": b"crashpad",
        "DevToolsActivePort": b"9222\n/devtools/browser/x\n",
    }
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (root / "Default/blob_storage").mkdir()
    os.symlink("other-host-4242", root / "SingletonLock")
    os.symlink("/tmp/org.chromium.Chromium.x/SingletonSocket", root / "SingletonSocket")
    os.symlink("123456", root / "SingletonCookie")


KEPT = {
    "Local State",
    "Default",
    "Default/Preferences",
    "Default/Cookies",
    "Default/Local Storage",
    "Default/Local Storage/leveldb",
    "Default/Local Storage/leveldb/000003.log",
    "Default/IndexedDB",
    "Default/IndexedDB/http_127.0.0.1_0.indexeddb.leveldb",
    "Default/IndexedDB/http_127.0.0.1_0.indexeddb.leveldb/CURRENT",
    "Default/Service Worker",
    "Default/Service Worker/Database",
    "Default/Service Worker/Database/CURRENT",
    "Default/blob_storage",
}


def archive_names(data: bytes) -> list[str]:
    """Entry names of a gzip'd tar."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        return tar.getnames()


def archive_member(data: bytes, name: str) -> bytes:
    """One regular file's bytes from a gzip'd tar."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        member = tar.extractfile(name)
        assert member is not None
        return member.read()


def leftovers(work: Path) -> list[str]:
    """Anything in the work directory besides the profile (temp files, temp dirs, escapes)."""
    return sorted(p.name for p in work.iterdir() if p.name != "profile")


def fill(path: Path, size: int) -> None:
    """An incompressible file of ``size`` bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))


# --------------------------------------------------------------------------------------------------
# Restore.


@pytest.mark.anyio
async def test_missing_object_gives_fresh_profile(bucket: Any, s3: S3Client, work: Path) -> None:
    """No stored object: an empty profile, recorded as missing, and persisting stays allowed."""
    result = await make_store(s3).restore(work / "profile")
    assert result == RestoreResult(outcome="missing", reason=None, etag=None, bytes=0, may_persist=True)
    assert tree(work) == {"profile": None}


@pytest.mark.anyio
async def test_round_trip_restores_every_kept_file(
    bucket: Any, s3: S3Client, work: Path, tmp_path: Path
) -> None:
    """A persisted profile restores byte for byte (caches and locks aside) with the object's ETag."""
    source = tmp_path / "source" / "profile"
    write_profile(source)
    persisted = await make_store(s3).persist(source, MISSING, chromium_version="156.0")
    assert persisted.outcome == "uploaded"

    result = await make_store(s3).restore(work / "profile")

    assert result.outcome == "restored"
    assert result.may_persist
    assert result.etag == bucket.head_object(Bucket=BUCKET, Key=KEY)["ETag"]
    assert result.bytes == persisted.bytes
    restored = tree(work / "profile")
    original = tree(source)
    assert set(restored) == KEPT | {"wallcrawler", MANIFEST_PATH}
    assert all(restored[name] == original[name] for name in KEPT)


@pytest.mark.anyio
async def test_archive_holds_no_caches_locks_or_port_file(bucket: Any, s3: S3Client, tmp_path: Path) -> None:
    """The uploaded archive has no cache, crash or metrics dirs, no Singleton* and no DevToolsActivePort."""
    source = tmp_path / "profile"
    write_profile(source)
    await make_store(s3).persist(source, MISSING, chromium_version="156.0")
    data = stored(bucket)
    assert data is not None
    assert set(archive_names(data)) == KEPT | {MANIFEST_PATH}


@pytest.mark.anyio
async def test_manifest_describes_the_archive(bucket: Any, s3: S3Client, tmp_path: Path) -> None:
    """The manifest records the format, Chromium's version, the files, their bytes and a digest."""
    source = tmp_path / "profile"
    write_profile(source)
    await make_store(s3).persist(source, MISSING, chromium_version="Chrome/156.0.8078.79")
    data = stored(bucket)
    assert data is not None
    manifest = json.loads(archive_member(data, MANIFEST_PATH))
    kept_files = {name: body for name, body in tree(source).items() if name in KEPT and body is not None}
    assert manifest["format"] == 1
    assert manifest["chromium_version"] == "Chrome/156.0.8078.79"
    assert manifest["files"] == len(kept_files)
    assert manifest["bytes"] == sum(len(body) for body in kept_files.values())
    assert len(manifest["sha256"]) == 64


@pytest.mark.anyio
async def test_restore_skips_locks_of_old_archives(bucket: Any, s3: S3Client, work: Path) -> None:
    """An archive from the old controller ("./" names, Singleton* symlinks, caches) restores without them."""
    bucket.put_object(
        Bucket=BUCKET,
        Key=KEY,
        Body=archives.archive(
            [
                archives.entry(".", kind=tarfile.DIRTYPE),
                archives.entry("./SingletonLock", kind=tarfile.SYMTYPE, linkname="other-host-4242"),
                archives.entry("./SingletonSocket", kind=tarfile.SYMTYPE, linkname="/tmp/x/SingletonSocket"),
                archives.entry("./DevToolsActivePort", b"9222\n"),
                archives.entry("./Default", kind=tarfile.DIRTYPE),
                archives.entry("./Default/Cache/data_0", b"cache"),
                archives.entry("./Default/Preferences", b"{}"),
            ]
        ),
    )
    result = await make_store(s3).restore(work / "profile")
    assert result.outcome == "restored"
    assert tree(work / "profile") == {"Default": None, "Default/Preferences": b"{}"}


@pytest.mark.anyio
async def test_restored_files_are_private(bucket: Any, s3: S3Client, work: Path) -> None:
    """Restored files are 0600 and directories 0700, whatever modes the archive carries."""
    bucket.put_object(Bucket=BUCKET, Key=KEY, Body=archives.regular_profile())
    await make_store(s3).restore(work / "profile")
    modes = {
        p.name: stat.S_IMODE(p.stat().st_mode) for p in [work / "profile", *(work / "profile").rglob("*")]
    }
    assert modes == {"profile": 0o700, "Default": 0o700, "Preferences": 0o600, "Local State": 0o600}


HOSTILE: dict[str, tuple[Callable[[Path], bytes], str, ProfileLimits | None]] = {
    "parent_reference": (lambda _: archives.parent_reference(), "parent_reference", None),
    "absolute_path": (lambda out: archives.absolute_path(out / "abs"), "absolute_or_bad_name", None),
    "symlink_out": (archives.symlink_out, "link_entry", None),
    "hardlink_out": (lambda out: archives.hardlink_out(out / "marker"), "link_entry", None),
    "device": (lambda _: archives.device(), "special_file", None),
    "fifo": (lambda _: archives.fifo(), "special_file", None),
    # 2 GB of zeros: tarfile reads an empty archive from the first zero block; the rest is caught
    # while streaming, after about 1 MiB.
    "gzip_bomb": (lambda _: archives.zero_bomb(2_000_000_000), "trailing_data", None),
    # A file honestly declaring 2 GB of zeros: over the per-file cap before a byte is written.
    "declared_bomb": (lambda _: archives.declared_bomb(2_000_000_000), "file_too_large", None),
    # The same with a per-file cap above it: the unpacked total stops it.
    "unpacked_bomb": (
        lambda _: archives.declared_bomb(2_000_000_000),
        "unpacked_too_large",
        ProfileLimits(max_file_bytes=4 * 1024 * _MiB, max_unpacked_bytes=64 * _MiB),
    ),
    # 200,000 entries; the cap is lowered from 100,000 so the test does not spend half a minute
    # creating the first 100,000 files before the cap trips (the mechanism is the same).
    "many_entries": (
        lambda _: archives.many_entries(200_000),
        "too_many_entries",
        ProfileLimits(max_entries=5_000),
    ),
    "pax_header_bomb": (lambda _: archives.pax_header_bomb(16 * _MiB), "header_too_large", None),
    "truncated_gzip": (lambda _: archives.truncated(), "truncated", None),
    "not_gzip": (lambda _: archives.not_gzip(), "not_gzip", None),
    "garbage_after_end": (lambda _: archives.garbage_after_end(), "trailing_data", None),
    "too_deep": (
        lambda _: archives.archive([archives.entry("/".join(["d"] * 40) + "/f", b"x")]),
        "too_deep",
        None,
    ),
    "name_too_long": (
        lambda _: archives.archive([archives.entry("Default/" + "n" * 300, b"x")]),
        "name_too_long",
        None,
    ),
    "duplicate_entry": (
        lambda _: archives.archive([archives.entry("Default/a", b"1"), archives.entry("Default/a", b"2")]),
        "duplicate_entry",
        None,
    ),
}


@pytest.mark.anyio
@pytest.mark.parametrize("case", sorted(HOSTILE))
async def test_hostile_archive_is_rejected(
    case: str, bucket: Any, s3: S3Client, work: Path, outside: Path, tmp_path: Path
) -> None:
    """A hostile archive gives a fresh profile, writes nothing outside it, and is never overwritten."""
    build, reason, limits = HOSTILE[case]
    data = build(outside)
    bucket.put_object(Bucket=BUCKET, Key=KEY, Body=data)
    store = make_store(s3, limits)

    result = await store.restore(work / "profile")

    assert (result.outcome, result.reason, result.may_persist) == ("rejected", reason, False)
    assert tree(work) == {"profile": None}
    assert tree(outside) == {"marker": b"original"}
    assert sorted(tree(tmp_path)) == ["outside", "outside/marker", "work", "work/profile"]
    # The session runs on the fresh profile; at shutdown it must not replace the stored archive.
    (work / "profile" / "Local State").write_bytes(b"{}")
    persisted = await store.persist(work / "profile", result, chromium_version="156.0")
    assert (persisted.outcome, persisted.reason) == ("skipped", "restore_rejected")
    assert stored(bucket) == data


@pytest.mark.anyio
async def test_archive_over_compressed_cap_is_rejected_before_download(
    bucket: Any, s3: S3Client, work: Path
) -> None:
    """An object larger than max_archive_bytes is refused from its ContentLength."""
    bucket.put_object(Bucket=BUCKET, Key=KEY, Body=archives.regular_profile())
    result = await make_store(s3, ProfileLimits(max_archive_bytes=64)).restore(work / "profile")
    assert (result.outcome, result.reason, result.bytes) == ("rejected", "archive_too_large", 0)
    assert tree(work) == {"profile": None}


@pytest.mark.anyio
async def test_restore_over_wall_clock_fails_fresh(bucket: Any, s3: S3Client, work: Path) -> None:
    """A restore exceeding restore_timeout gives a fresh profile and forbids persisting."""
    bucket.put_object(Bucket=BUCKET, Key=KEY, Body=archives.many_entries(50_000))
    result = await make_store(s3, ProfileLimits(restore_timeout=0.3)).restore(work / "profile")
    assert (result.outcome, result.reason, result.may_persist) == ("failed", "timeout", False)
    assert tree(work) == {"profile": None}


@pytest.mark.anyio
async def test_cancelled_restore_leaves_nothing(bucket: Any, s3: S3Client, work: Path) -> None:
    """Cancelling a restore mid-extraction removes its temp files and creates no profile."""
    bucket.put_object(Bucket=BUCKET, Key=KEY, Body=archives.many_entries(50_000))
    with anyio.move_on_after(0.5) as scope:
        await make_store(s3).restore(work / "profile")
    assert scope.cancelled_caught
    assert tree(work) == {}


@pytest.mark.anyio
async def test_non_empty_target_is_left_alone(bucket: Any, s3: S3Client, work: Path) -> None:
    """A user-data-dir that already holds files is neither touched nor allowed to persist."""
    bucket.put_object(Bucket=BUCKET, Key=KEY, Body=archives.regular_profile())
    (work / "profile").mkdir()
    (work / "profile" / "mine").write_bytes(b"x")
    result = await make_store(s3).restore(work / "profile")
    assert (result.outcome, result.reason, result.may_persist) == ("failed", "target_not_empty", False)
    assert tree(work) == {"profile": None, "profile/mine": b"x"}


# --------------------------------------------------------------------------------------------------
# Persist.


async def _restored_session(s3: S3Client, work: Path, limits: ProfileLimits | None = None) -> RestoreResult:
    """Restore the stored profile into ``work/profile`` and change something in it."""
    result = await make_store(s3, limits).restore(work / "profile")
    assert result.outcome == "restored"
    (work / "profile" / "Default" / "Preferences").write_bytes(b'{"changed": true}')
    return result


@pytest.mark.anyio
async def test_persist_is_skipped_when_context_does_not_persist(
    bucket: Any, s3: S3Client, tmp_path: Path
) -> None:
    """With CONTEXT_PERSIST=false nothing is packed or uploaded."""
    write_profile(tmp_path / "profile")
    result = await make_store(s3, persist=False).persist(tmp_path / "profile", MISSING, chromium_version="1")
    assert (result.outcome, result.reason, result.bytes) == ("skipped", "persist_disabled", 0)
    assert stored(bucket) is None


@pytest.mark.anyio
async def test_multipart_upload_round_trips(bucket: Any, s3: S3Client, work: Path, tmp_path: Path) -> None:
    """Above the threshold the archive goes up in parts and restores intact."""
    source = tmp_path / "source"
    fill(source / "Default" / "Cookies", 12 * _MiB)
    result = await make_store(s3, MULTIPART).persist(source, MISSING, chromium_version="156.0")
    assert result.outcome == "uploaded"
    assert bucket.head_object(Bucket=BUCKET, Key=KEY)["ETag"].endswith('-3"')

    restored = await make_store(s3, MULTIPART).restore(work / "profile")
    assert restored.outcome == "restored"
    assert (work / "profile/Default/Cookies").read_bytes() == (source / "Default/Cookies").read_bytes()


@pytest.mark.anyio
async def test_later_writer_loses_when_object_changed(bucket: Any, s3: S3Client, tmp_path: Path) -> None:
    """Two sessions restore one object; the second to persist gets a conflict and writes nothing."""
    bucket.put_object(Bucket=BUCKET, Key=KEY, Body=archives.regular_profile())
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    seen_first = await _restored_session(s3, first)
    seen_second = await _restored_session(s3, second)
    assert (
        await make_store(s3).persist(first / "profile", seen_first, chromium_version="1")
    ).outcome == "uploaded"
    winner = stored(bucket)

    result = await make_store(s3).persist(second / "profile", seen_second, chromium_version="1")

    assert (result.outcome, result.reason) == ("conflict", "changed_by_another_session")
    assert stored(bucket) == winner


@pytest.mark.anyio
async def test_later_writer_loses_when_both_started_fresh(bucket: Any, s3: S3Client, tmp_path: Path) -> None:
    """Two sessions start without an object; the second upload does not overwrite the first."""
    write_profile(tmp_path / "a")
    write_profile(tmp_path / "b")
    assert (await make_store(s3).persist(tmp_path / "a", MISSING, chromium_version="1")).outcome == "uploaded"
    winner = stored(bucket)
    result = await make_store(s3).persist(tmp_path / "b", MISSING, chromium_version="1")
    assert (result.outcome, result.reason) == ("conflict", "created_by_another_session")
    assert stored(bucket) == winner


@pytest.mark.anyio
async def test_conditional_put_guards_against_a_race(bucket: Any, s3: S3Client, work: Path) -> None:
    """An object replaced between the pre-check and the PutObject still gives a conflict (If-Match)."""
    bucket.put_object(Bucket=BUCKET, Key=KEY, Body=archives.regular_profile())
    seen = await _restored_session(s3, work)
    racer = archives.archive([archives.entry("Default/Preferences", b'{"racer": 1}')])

    def replace_first(**_: Any) -> None:
        bucket.put_object(Bucket=BUCKET, Key=KEY, Body=racer)

    s3.meta.events.register("before-send.s3.PutObject", replace_first)
    result = await make_store(s3).persist(work / "profile", seen, chromium_version="1")

    assert (result.outcome, result.reason) == ("conflict", "precondition_failed")
    assert stored(bucket) == racer


@pytest.mark.anyio
async def test_removed_bucket_fails_cleanly(bucket: Any, s3: S3Client, work: Path) -> None:
    """With the bucket gone, persist reports failed, raises nothing and leaves no temp files."""
    result = await make_store(s3).restore(work / "profile")
    write_profile(work / "profile")
    bucket.delete_bucket(Bucket=BUCKET)
    started = time.monotonic()

    persisted = await make_store(s3).persist(work / "profile", result, chromium_version="1")

    assert (persisted.outcome, persisted.reason) == ("failed", "s3_NoSuchBucket")
    assert time.monotonic() - started < 10
    assert leftovers(work) == []


@pytest.mark.anyio
async def test_failed_put_keeps_previous_object(bucket: Any, s3: S3Client, work: Path) -> None:
    """A connection lost on the final PutObject leaves the stored archive byte-identical."""
    bucket.put_object(Bucket=BUCKET, Key=KEY, Body=archives.regular_profile())
    seen = await _restored_session(s3, work)

    def drop(**_: Any) -> None:
        raise ConnectionClosedError(endpoint_url="http://moto/put")

    s3.meta.events.register("before-send.s3.PutObject", drop)
    result = await make_store(s3).persist(work / "profile", seen, chromium_version="1")

    assert (result.outcome, result.reason) == ("failed", "s3_ConnectionClosedError")
    assert stored(bucket) == archives.regular_profile()
    assert leftovers(work) == []


@pytest.mark.anyio
async def test_failed_multipart_completion_is_aborted(bucket: Any, s3: S3Client, work: Path) -> None:
    """A failure on CompleteMultipartUpload aborts the upload and keeps the previous object."""
    bucket.put_object(Bucket=BUCKET, Key=KEY, Body=archives.regular_profile())
    seen = await _restored_session(s3, work, MULTIPART)
    fill(work / "profile" / "Default" / "Cookies", 12 * _MiB)

    def drop(**_: Any) -> None:
        raise ConnectionClosedError(endpoint_url="http://moto/complete")

    s3.meta.events.register("before-send.s3.CompleteMultipartUpload", drop)
    result = await make_store(s3, MULTIPART).persist(work / "profile", seen, chromium_version="1")

    assert (result.outcome, result.reason) == ("failed", "s3_ConnectionClosedError")
    assert stored(bucket) == archives.regular_profile()
    assert bucket.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) == []
    assert leftovers(work) == []


@pytest.mark.anyio
async def test_cancelled_multipart_leaves_no_partial_object(bucket: Any, s3: S3Client, work: Path) -> None:
    """Cancellation between parts aborts the upload: no partial object, no parts, no temp files."""
    bucket.put_object(Bucket=BUCKET, Key=KEY, Body=archives.regular_profile())
    seen = await _restored_session(s3, work, MULTIPART)
    fill(work / "profile" / "Default" / "Cookies", 12 * _MiB)
    parts = 0

    with anyio.CancelScope() as scope:

        def cancel_on_second_part(**_: Any) -> None:
            nonlocal parts
            parts += 1
            if parts == 2:
                scope.cancel()

        s3.meta.events.register("before-send.s3.UploadPart", cancel_on_second_part)
        await make_store(s3, MULTIPART).persist(work / "profile", seen, chromium_version="1")

    assert scope.cancelled_caught
    assert parts == 2
    assert stored(bucket) == archives.regular_profile()
    assert bucket.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) == []
    assert leftovers(work) == []


@pytest.mark.anyio
async def test_cancelled_packing_removes_temp_files(bucket: Any, s3: S3Client, work: Path) -> None:
    """Cancellation while the archive is being written stops the worker and removes the temp file."""
    (work / "profile").mkdir()
    for index in range(8):
        fill(work / "profile" / "Default" / f"blob{index}", 8 * _MiB)
    with anyio.move_on_after(0.2) as scope:
        await make_store(s3).persist(work / "profile", MISSING, chromium_version="1")
    assert scope.cancelled_caught
    assert stored(bucket) is None
    assert leftovers(work) == []


@pytest.mark.anyio
async def test_profile_that_restore_would_reject_is_not_uploaded(
    bucket: Any, s3: S3Client, work: Path
) -> None:
    """A profile over a restore cap (here, entries) fails verification instead of replacing the object."""
    bucket.put_object(Bucket=BUCKET, Key=KEY, Body=archives.regular_profile())
    limits = ProfileLimits(max_entries=20)
    seen = await _restored_session(s3, work, limits)
    for index in range(30):
        (work / "profile" / f"file{index}").write_bytes(b"x")
    result = await make_store(s3, limits).persist(work / "profile", seen, chromium_version="1")
    assert (result.outcome, result.reason) == ("failed", "unrestorable_too_many_entries")
    assert stored(bucket) == archives.regular_profile()


@pytest.mark.anyio
async def test_outcomes_are_counted(bucket: Any, s3: S3Client, work: Path) -> None:
    """Restore and persist outcomes and bytes reach the metrics."""
    metrics = Metrics()
    store = ProfileStore(s3, ContextConfig(BUCKET, "ctx_1", KEY, persist=True), ProfileLimits(), metrics)
    result = await store.restore(work / "profile")
    write_profile(work / "profile")
    persisted = await store.persist(work / "profile", result, chromium_version="1")
    sample = metrics.registry.get_sample_value
    assert sample("wallcrawler_profile_operations_total", {"operation": "restore", "outcome": "missing"}) == 1
    assert (
        sample("wallcrawler_profile_operations_total", {"operation": "persist", "outcome": "uploaded"}) == 1
    )
    assert sample("wallcrawler_profile_bytes_total", {"operation": "persist"}) == persisted.bytes


# --------------------------------------------------------------------------------------------------
# Cookies.


COOKIES: list[dict[str, Any]] = [
    {
        "name": "persist",
        "value": "p1",
        "domain": "example.com",
        "path": "/",
        "expires": 4102444800.5,
        "size": 9,
        "httpOnly": True,
        "secure": True,
        "session": False,
        "sameSite": "Lax",
        "priority": "Medium",
        "sourceScheme": "Secure",
        "sourcePort": 443,
    },
    {
        "name": "sess",
        "value": "s1",
        "domain": "example.com",
        "path": "/",
        "expires": -1,
        "size": 6,
        "httpOnly": False,
        "secure": False,
        "session": True,
        "priority": "Medium",
        "sourceScheme": "NonSecure",
        "sourcePort": 80,
    },
]


def test_cookies_round_trip_as_set_cookie_params(tmp_path: Path) -> None:
    """Saved cookies load back without read-only fields, session cookies without an expiry."""
    save_cookies(tmp_path, COOKIES)
    loaded = load_cookies(tmp_path)
    assert [cookie["name"] for cookie in loaded] == ["persist", "sess"]
    assert loaded[0]["expires"] == 4102444800.5
    assert "expires" not in loaded[1]
    assert all("size" not in cookie and "session" not in cookie for cookie in loaded)
    assert loaded[1]["sourcePort"] == 80


def test_cookies_file_is_private(tmp_path: Path) -> None:
    """The cookies file is written 0600 inside the profile."""
    save_cookies(tmp_path, COOKIES)
    assert stat.S_IMODE((tmp_path / COOKIES_PATH).stat().st_mode) == 0o600


@pytest.mark.parametrize(
    "content", [None, b"not json", b'{"cookies": 3}', b'[{"name": 1}]', b'{"cookies": [1]}']
)
def test_missing_or_invalid_cookies_load_empty(tmp_path: Path, content: bytes | None) -> None:
    """An absent or malformed cookies file loads as no cookies."""
    if content is not None:
        (tmp_path / COOKIES_PATH).parent.mkdir(parents=True)
        (tmp_path / COOKIES_PATH).write_bytes(content)
    assert load_cookies(tmp_path) == []


# --------------------------------------------------------------------------------------------------
# Real Chromium: cookies (persistent and session), localStorage and IndexedDB survive a round trip.

PAGE = b"<!doctype html><title>wallcrawler</title><p>ok</p>"


async def poll(check: Callable[[], Awaitable[T | None]], timeout: float) -> T:
    """Call ``check`` until it returns something other than None, for at most ``timeout`` seconds."""
    with anyio.fail_after(timeout):
        while True:
            value = await check()
            if value is not None:
                return value
            await anyio.sleep(0.05)


async def _serve_page(listener: anyio.abc.Listener[anyio.abc.SocketStream]) -> None:
    async def handle(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            request = b""
            head = (
                f"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {len(PAGE)}\r\n"
                "Connection: close\r\n\r\n"
            )
            # Chromium opens speculative connections and closes some without a request.
            with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError), anyio.move_on_after(5):
                while b"\r\n\r\n" not in request:
                    request += await stream.receive()
                await stream.send(head.encode() + PAGE)

    await listener.serve(handle)


class Cdp:
    """A minimal CDP client over one browser WebSocket (flattened sessions)."""

    def __init__(self, ws: ClientConnection) -> None:
        self._ws = ws
        self._next = 0

    async def call(
        self, method: str, params: dict[str, Any] | None = None, session: str | None = None
    ) -> Any:
        """Send one command and return its result, skipping events."""
        self._next += 1
        message: dict[str, Any] = {"id": self._next, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        await self._ws.send(json.dumps(message))
        with anyio.fail_after(20):
            while True:
                reply = json.loads(await self._ws.recv())
                if reply.get("id") == self._next:
                    if "error" in reply:
                        raise AssertionError(f"{method}: {reply['error']}")
                    return reply["result"]

    async def evaluate(self, session: str, expression: str) -> Any:
        """Evaluate ``expression`` in a page, awaiting a promise; return its value."""
        result = await self.call(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": True, "returnByValue": True},
            session,
        )
        if "exceptionDetails" in result:
            raise AssertionError(result["exceptionDetails"])
        return result["result"].get("value")

    async def open_page(self, url: str) -> str:
        """Open ``url`` in a new tab once it has loaded; return the flattened session id."""
        target = await self.call("Target.createTarget", {"url": "about:blank"})
        attached = await self.call("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})
        session: str = attached["sessionId"]
        await self.call("Page.enable", {}, session)
        await self.call("Page.navigate", {"url": url}, session)

        async def loaded() -> bool | None:
            state = await self.evaluate(session, "location.href + ' ' + document.readyState")
            return True if state == f"{url} complete" else None

        await poll(loaded, 20)
        return session


def _devtools_port(user_data_dir: Path) -> tuple[int, str] | None:
    try:
        lines = (user_data_dir / "DevToolsActivePort").read_text().split()
    except FileNotFoundError:
        return None
    return (int(lines[0]), lines[1]) if len(lines) == 2 else None


@asynccontextmanager
async def chromium(user_data_dir: Path, tmp: Path) -> AsyncIterator[tuple[Cdp, anyio.abc.Process]]:
    """Run headless Chromium on ``user_data_dir``; yield a CDP client on its browser target."""
    process = await anyio.open_process(
        [
            str(CHROMIUM),
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--remote-debugging-port=0",
            f"--user-data-dir={user_data_dir}",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "TMPDIR": str(tmp)},
    )
    try:
        # Chromium announces its port only in this file; there is nothing to wait on but the file.
        port, path = await poll(lambda: anyio.to_thread.run_sync(_devtools_port, user_data_dir), 30)
        async with connect(f"ws://127.0.0.1:{port}{path}", compression=None, max_size=None) as ws:
            yield Cdp(ws), process
    finally:
        if process.returncode is None:
            process.kill()
        with anyio.move_on_after(10, shield=True):
            await process.wait()


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short private directory for Chromium's TMPDIR and profiles."""
    # Chromium's lock socket lives under TMPDIR and its path must stay under ~108 bytes.
    with tempfile.TemporaryDirectory(prefix="wc-", dir="/tmp") as path:
        yield Path(path)


SET_STORAGE = """
new Promise((resolve, reject) => {
  localStorage.setItem("ls-key", "ls-value");
  const open = indexedDB.open("wc-db", 1);
  open.onupgradeneeded = () => open.result.createObjectStore("store");
  open.onerror = () => reject(open.error);
  open.onsuccess = () => {
    const tx = open.result.transaction("store", "readwrite");
    tx.objectStore("store").put("idb-value", "idb-key");
    tx.oncomplete = () => { open.result.close(); resolve(true); };
    tx.onerror = () => reject(tx.error);
  };
})
"""

GET_STORAGE = """
new Promise((resolve, reject) => {
  const open = indexedDB.open("wc-db", 1);
  open.onupgradeneeded = () => open.result.createObjectStore("store");
  open.onerror = () => reject(open.error);
  open.onsuccess = () => {
    const get = open.result.transaction("store").objectStore("store").get("idb-key");
    get.onsuccess = () => resolve({
      cookies: document.cookie, local: localStorage.getItem("ls-key"), idb: get.result ?? null,
    });
    get.onerror = () => reject(get.error);
  };
})
"""


@pytest.mark.anyio
@pytest.mark.chromium
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium")
async def test_chromium_state_survives_persist_and_restore(
    bucket: Any, s3: S3Client, short_tmp: Path
) -> None:
    """A persistent cookie, a session cookie, localStorage and IndexedDB are all there next session."""
    first, second = short_tmp / "p1", short_tmp / "p2"
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    origin = f"http://127.0.0.1:{port}/"
    store = make_store(s3)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(_serve_page, listener)

        restored = await store.restore(first)
        async with chromium(first, short_tmp) as (cdp, process):
            page = await cdp.open_page(origin)
            cookies = [
                {"name": "persist", "value": "p1", "url": origin, "expires": time.time() + 3600},
                {"name": "sess", "value": "s1", "url": origin},
            ]
            await cdp.call("Storage.setCookies", {"cookies": cookies})
            assert await cdp.evaluate(page, SET_STORAGE) is True
            await anyio.sleep(1)
            exported = (await cdp.call("Storage.getCookies"))["cookies"]
            await anyio.to_thread.run_sync(save_cookies, first, exported)
            await cdp.call("Browser.close")
            with anyio.fail_after(10):
                assert await process.wait() == 0
        persisted = await store.persist(first, restored, chromium_version="156")
        assert persisted.outcome == "uploaded"

        assert (await store.restore(second)).outcome == "restored"
        async with chromium(second, short_tmp) as (cdp, _):
            reinjected = await anyio.to_thread.run_sync(load_cookies, second)
            await cdp.call("Storage.setCookies", {"cookies": reinjected})
            page = await cdp.open_page(origin)
            state = await cdp.evaluate(page, GET_STORAGE)
        tg.cancel_scope.cancel()

    assert sorted(state["cookies"].split("; ")) == ["persist=p1", "sess=s1"]
    assert (state["local"], state["idb"]) == ("ls-value", "idb-value")
