"""Browser contexts: safe restore of the Chrome profile from S3, and a verified, conditional persist.

A context is ``s3://<bucket>/<key>``: a gzip'd tar of the Chrome user-data-dir, without caches,
without ``Singleton*`` lock files, with a manifest at ``wallcrawler/manifest.json`` and the exported
cookies (session cookies too) at ``wallcrawler/cookies.json``. The gzip stream is written as one
member per MiB (compressed on every core, like ``pigz``); any gzip reader, ``tar xzf`` included,
reads it as one stream, and a restore accepts single-member archives (the old controller's) too.

Restore (before Chromium starts)
    The object is streamed to a temp file beside the profile, then extracted into a temp dir beside
    it and renamed into place, so a failed restore never leaves half a profile. Every cap in
    :class:`~controller.config.ProfileLimits` is enforced while streaming, never from headers alone:
    compressed bytes (``ContentLength`` and counted), decompressed bytes of the whole tar stream,
    bytes before each entry (pax and long-name headers are buffered in memory by ``tarfile``), entry
    count, per-file size, depth, name length and wall clock. Only regular files and directories with
    relative names are admitted; Python's ``data`` filter is applied on top of that. Anything else,
    or a corrupt, truncated or non-gzip object, gives a fresh profile and a *rejected* result.

Persist (after ``Browser.close``)
    The profile is packed into a temp file, read back and verified (the same admission rules as a
    restore, and the manifest's digest), then uploaded: one ``PutObject`` below
    ``multipart_threshold``, else a multipart upload that is aborted on any failure or cancellation.
    A multipart upload is invisible until completed and a single ``PutObject`` is atomic, so the
    stored object is only ever replaced by a complete, verified archive.

Two sessions on one context: the later writer loses
    Every upload is conditional on the object the session restored: ``If-Match`` its ETag, or
    ``If-None-Match: *`` when there was none. Whichever session persists first wins; a session
    whose base has changed since its restore (replaced, created or deleted by someone else) gets
    *conflict*: its archive is discarded and logged, never written over the other. A session whose
    restore was rejected or failed never persists (``may_persist`` is false): it ran on a fresh
    profile and would replace a good archive after a transient fault.

Manifest
    ``{"format", "chromium_version", "created_at", "files", "bytes", "sha256"}``: ``files`` and
    ``bytes`` count regular files; ``sha256`` is the SHA-256 of the lines
    ``"<path>\\0<size>\\0<sha256 of the file>\\n"`` of every regular file in archive order.
"""

from __future__ import annotations

import base64
import collections
import concurrent.futures
import contextlib
import datetime
import gzip
import hashlib
import io
import json
import os
import queue
import shutil
import stat
import tarfile
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import anyio
import anyio.from_thread
import anyio.to_thread
from botocore.exceptions import BotoCoreError, ClientError

from controller.config import ContextConfig, ProfileLimits
from controller.errors import UnsafeArchiveError
from controller.logs import get_logger
from controller.metrics import Metrics

if TYPE_CHECKING:
    from aiobotocore.response import StreamingBody
    from types_aiobotocore_s3.client import S3Client
    from types_aiobotocore_s3.type_defs import (
        CompletedPartTypeDef,
        CompleteMultipartUploadRequestTypeDef,
        PutObjectRequestTypeDef,
    )

__all__ = [
    "COOKIES_PATH",
    "FORMAT_VERSION",
    "MANIFEST_PATH",
    "PersistResult",
    "ProfileStore",
    "RestoreResult",
    "load_cookies",
    "save_cookies",
]

log = get_logger(__name__)

FORMAT_VERSION = 1
COOKIES_PATH = "wallcrawler/cookies.json"
MANIFEST_PATH = "wallcrawler/manifest.json"

_KiB = 1024
_MiB = 1024 * _KiB
# Reads and writes move in 1 MiB chunks: few thread hops and Python calls, bounded memory.
_CHUNK = _MiB
# tarfile's read-ahead. Larger is not faster: its stream buffer is re-sliced on every header read.
_TAR_BUFSIZE = 64 * _KiB
# Decompressed bytes allowed between the end of one entry's data and the start of the next one's:
# tarfile buffers pax and GNU long-name headers whole, so this bounds memory per entry. Legitimate
# headers are a few hundred bytes; the read-ahead must fit too.
_HEADER_ALLOWANCE = _MiB
# Zero padding allowed after the tar end marker (GNU tar pads to 10 KiB records; be generous).
_TRAILING_ALLOWANCE = _MiB
# Chunks queued between a gzip thread and its peer, and how often a blocked peer looks up.
_PIPE_DEPTH = 4
_PIPE_POLL = 0.05
# Bytes of recent stream kept by the guard: a few times tarfile's read-ahead.
_RETAINED = 4 * _TAR_BUFSIZE
# Per-entry bytes of tar framing (header blocks, padding) allowed on top of max_unpacked_bytes.
_FRAMING_PER_ENTRY = 2 * _KiB
# gzip -1: decompression speed hardly depends on the level, compression speed does (about twice
# -6's on profile data, for about 4 % more bytes), and persist runs inside the stop budget.
_GZIP_LEVEL = 1
_MAX_MANIFEST_BYTES = _MiB
_MAX_COOKIES_BYTES = 16 * _MiB
# Shielded cleanup at the end of a cancelled operation must itself be bounded.
_CLEANUP_TIMEOUT = 5.0

# Never archived, never restored: lock files naming another host (Chromium exits with code 21),
# the stale DevTools port, caches, crash reports and metrics.
_TOP_LEVEL_EXCLUDED = frozenset(
    {
        "DevToolsActivePort",
        "RunningChromeVersion",
        "GPUPersistentCache",
        "ShaderCache",
        "GrShaderCache",
        "GraphiteDawnCache",
        "component_crx_cache",
        "extensions_crx_cache",
        "Crashpad",
        "Crash Reports",
        "BrowserMetrics",
        "DeferredBrowserMetrics",
        "BrowserMetrics-spare.pma",
        "CrashpadMetrics.pma",
        "CrashpadMetrics-active.pma",
    }
)
# Inside a profile directory (``Default``, ``Profile 1``…).
_PROFILE_EXCLUDED = frozenset(
    {
        "Cache",
        "Code Cache",
        "GPUCache",
        "DawnGraphiteCache",
        "DawnWebGPUCache",
        "GrShaderCache",
        "ShaderCache",
    },
)
_PROFILE_EXCLUDED_NESTED = frozenset({("Service Worker", "CacheStorage"), ("Service Worker", "ScriptCache")})

# Storage.setCookies accepts these fields of a Storage.getCookies cookie; the rest are read-only.
_COOKIE_PARAM_FIELDS = frozenset(
    {
        "name",
        "value",
        "url",
        "domain",
        "path",
        "secure",
        "httpOnly",
        "sameSite",
        "expires",
        "priority",
        "sourceScheme",
        "sourcePort",
        "partitionKey",
    }
)


@dataclass(frozen=True, slots=True)
class RestoreResult:
    """What :meth:`ProfileStore.restore` did.

    Attributes:
        outcome: ``restored``; ``missing`` (no object: fresh profile); ``rejected`` (hostile, corrupt
            or over a cap: fresh profile); ``failed`` (S3, disk or time: fresh profile).
        reason: short log-safe reason for ``rejected`` and ``failed``.
        etag: ETag of the object seen at restore (None when missing or unknown).
        bytes: compressed bytes downloaded.
        may_persist: False after rejected/failed: this session must never replace the stored archive.
    """

    outcome: Literal["restored", "missing", "rejected", "failed"]
    reason: str | None
    etag: str | None
    bytes: int
    may_persist: bool


@dataclass(frozen=True, slots=True)
class PersistResult:
    """What :meth:`ProfileStore.persist` did.

    Attributes:
        outcome: ``uploaded``; ``conflict`` (the stored object changed since the restore: nothing
            written); ``skipped`` (persisting is off or not allowed); ``failed`` (nothing written).
        reason: short log-safe reason for everything but ``uploaded``.
        bytes: size of the packed archive (0 when nothing was packed).
    """

    outcome: Literal["uploaded", "conflict", "skipped", "failed"]
    reason: str | None
    bytes: int


@dataclass(frozen=True, slots=True)
class _Packed:
    """What was packed, as recorded in the manifest."""

    files: int
    bytes: int
    digest: str
    skipped: int


@dataclass(frozen=True, slots=True)
class _Verified:
    """The archive as read back: its size and SHA-256 (base64, as S3 wants it)."""

    size: int
    sha256_b64: str


class _Conflict(Exception):
    """The stored object is not the one this session restored."""


# --------------------------------------------------------------------------------------------------
# gzip in threads of its own: zlib and crc32 release the GIL, so (de)compression overlaps with tar
# parsing, hashing and file IO, like ``gzip -dc | tar x`` and ``tar c | pigz`` do with processes.


class _ReadAhead:
    """Reads a stream from a thread of its own, a few chunks ahead of the consumer."""

    def __init__(self, source: _Readable) -> None:
        self._source = source
        self._queue: queue.Queue[bytes | BaseException] = queue.Queue(maxsize=_PIPE_DEPTH)
        self._stopped = threading.Event()
        self._pending = b""
        self._offset = 0
        self._done = False
        self._thread = threading.Thread(target=self._produce, name="profile-read-ahead", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        try:
            while not self._stopped.is_set():
                chunk = self._source.read(_CHUNK)
                self._hand_over(chunk)
                if not chunk:
                    return
        except BaseException as exc:  # handed to the consumer, which raises it
            self._hand_over(exc)

    def _hand_over(self, item: bytes | BaseException) -> None:
        while not self._stopped.is_set():
            try:
                self._queue.put(item, timeout=_PIPE_POLL)
            except queue.Full:
                continue
            return

    def read(self, size: int = -1) -> bytes:
        """Read up to ``size`` bytes (fewer at a chunk boundary); raise what the source raised."""
        if self._offset >= len(self._pending):
            if self._done:
                return b""
            item = self._queue.get()
            if isinstance(item, BaseException):
                self._done = True
                raise item
            if not item:
                self._done = True
                return b""
            self._pending, self._offset = item, 0
        if self._offset == 0 and (size < 0 or size >= len(self._pending)):
            data = self._pending
        else:
            end = len(self._pending) if size < 0 else self._offset + size
            data = self._pending[self._offset : end]
        self._offset += len(data)
        return data

    def close(self) -> None:
        """Stop the thread and wait for it (within one chunk's work)."""
        self._stopped.set()
        self._thread.join()


class _ParallelGzip:
    """A gzip writer that compresses on every core, like ``pigz``: each chunk is a gzip member.

    A gzip file may hold several members, read back as one stream by every decompressor (GzipFile,
    ``gzip -d``, ``tar xz``). Cutting the stream every MiB costs well under 1 % in size and lets
    zlib, which releases the GIL, run in several threads while tarfile and hashing run in this one.
    """

    def __init__(
        self, sink: _Writable, level: int, executor: concurrent.futures.Executor, workers: int
    ) -> None:
        self._sink = sink
        self._level = level
        self._executor = executor
        self._depth = workers + 1
        self._pending: collections.deque[concurrent.futures.Future[bytes]] = collections.deque()
        self._buffer = bytearray()
        self._written = 0

    def write(self, data: bytes) -> int:
        """Take tarfile's output; compress it a chunk at a time, writing members in order."""
        self._buffer += data
        self._written += len(data)
        if len(self._buffer) >= _CHUNK:
            self._submit()
        return len(data)

    def tell(self) -> int:
        """Uncompressed bytes written so far (tarfile asks when it starts)."""
        return self._written

    def _submit(self) -> None:
        chunk = bytes(self._buffer)
        self._buffer.clear()
        self._pending.append(self._executor.submit(gzip.compress, chunk, self._level, mtime=0))
        # Bounded: one chunk queued per worker beyond the ones compressing, whatever the disk does.
        while len(self._pending) > self._depth:
            self._sink.write(self._pending.popleft().result())

    def finish(self) -> None:
        """Compress what is buffered and write every remaining member."""
        if self._buffer:
            self._submit()
        while self._pending:
            self._sink.write(self._pending.popleft().result())

    def close(self) -> None:
        """Drop what is still queued (after a failure or cancellation)."""
        for future in self._pending:
            future.cancel()
        self._pending.clear()


# --------------------------------------------------------------------------------------------------
# Admission: the rules every entry passes, on restore and when verifying a packed archive.


def _padded(size: int) -> int:
    return (size + tarfile.BLOCKSIZE - 1) // tarfile.BLOCKSIZE * tarfile.BLOCKSIZE


def _excluded(parts: tuple[str, ...]) -> bool:
    """Whether a profile path is never archived nor restored (locks, caches, crash and metrics dirs)."""
    top = parts[0]
    if top.startswith("Singleton") or top in _TOP_LEVEL_EXCLUDED:
        return True
    if len(parts) >= 2 and parts[1] in _PROFILE_EXCLUDED:
        return True
    return len(parts) >= 3 and (parts[1], parts[2]) in _PROFILE_EXCLUDED_NESTED


class _Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class _Writable(Protocol):
    def write(self, data: bytes, /) -> object: ...


class _Guard:
    """The decompressed tar stream, counted: the caps that headers cannot be trusted for.

    ``tarfile`` reads through this object, so decompression never runs further than the current
    limit plus the read-ahead's few chunks: memory and work stay bounded whatever headers claim.
    """

    def __init__(self, raw: _Readable, total_cap: int) -> None:
        self._raw = raw
        self._total_cap = total_cap
        self.position = 0
        self._limit = min(_HEADER_ALLOWANCE, total_cap)
        self._reason = "header_too_large"
        # The last chunks handed out, with their stream offsets: tarfile reads ahead, so what
        # follows its end marker may already sit in its buffer when ``finish`` is called.
        self._recent: collections.deque[tuple[int, bytes]] = collections.deque()
        self._recent_bytes = 0

    def allow_until(self, position: int) -> None:
        """Let the stream run up to ``position`` (the next entry's header budget included)."""
        if position > self._total_cap:
            self._limit, self._reason = self._total_cap, "unpacked_too_large"
        else:
            self._limit, self._reason = position, "header_too_large"

    def read(self, size: int = -1) -> bytes:
        """Read decompressed bytes; raise once a limit is crossed or the host task is cancelled."""
        # Worker threads cannot be interrupted: this is where a cancelled restore (SIGTERM, wall
        # clock) stops the extraction.
        anyio.from_thread.check_cancelled()
        if size < 0:
            size = _CHUNK
        if size == 0:
            return b""
        # One byte past the limit is enough to know it was crossed.
        want = min(size, self._limit - self.position + 1)
        if want <= 0:
            raise UnsafeArchiveError(self._reason)
        data = self._raw.read(want)
        if data:
            self._recent.append((self.position, data))
            self._recent_bytes += len(data)
            while self._recent_bytes - len(self._recent[0][1]) >= _RETAINED:
                self._recent_bytes -= len(self._recent.popleft()[1])
        self.position += len(data)
        if self.position > self._limit:
            raise UnsafeArchiveError(self._reason)
        return data

    def finish(self, tar_end: int) -> None:
        """Check that only zeros follow the tar's end, to the end of the gzip stream (and its CRC).

        tarfile stops silently at a corrupt header after the first entry; this is where the rest of
        such an archive is noticed.

        Args:
            tar_end: stream offset where tarfile found the end of the archive.

        Raises:
            UnsafeArchiveError: non-zero or too many bytes after the end.
        """
        if self._recent and tar_end < self._recent[0][0]:
            raise UnsafeArchiveError("trailing_data")
        for start, data in self._recent:
            tail = data[max(0, tar_end - start) :]
            if tail.count(0) != len(tail):
                raise UnsafeArchiveError("trailing_data")
        self._limit, self._reason = min(tar_end + _TRAILING_ALLOWANCE, self._total_cap), "trailing_data"
        while data := self.read(_CHUNK):
            if data.count(0) != len(data):
                raise UnsafeArchiveError("trailing_data")


class _Admission:
    """Admits entries one by one: only regular files and directories, relative names, within caps."""

    def __init__(self, limits: ProfileLimits, guard: _Guard) -> None:
        self._limits = limits
        self._guard = guard
        self.entries = 0
        self._declared = 0
        # path -> is a directory; catches duplicates and entries below a file.
        self._kinds: dict[str, bool] = {}

    def admit(self, member: tarfile.TarInfo) -> tuple[str, ...] | None:
        """Check one entry.

        Args:
            member: the entry as tarfile parsed it (its data not read yet).

        Returns:
            The entry's path components, or None for an entry that is skipped (the root ``.``, lock
            files, caches).

        Raises:
            UnsafeArchiveError: with a short reason, when the entry is not admitted.
        """
        limits = self._limits
        self.entries += 1
        if self.entries > limits.max_entries:
            raise UnsafeArchiveError("too_many_entries")
        if member.size < 0 or member.size > limits.max_file_bytes:
            raise UnsafeArchiveError("file_too_large")
        self._declared += member.size
        if self._declared > limits.max_unpacked_bytes:
            raise UnsafeArchiveError("unpacked_too_large")
        self._guard.allow_until(member.offset_data + _padded(member.size) + _HEADER_ALLOWANCE)

        parts = _name_parts(member.name, limits)
        if not parts:
            if member.isdir():
                return None
            raise UnsafeArchiveError("bad_name")
        if _excluded(parts):
            # Never extracted, whatever its type: old archives carry SingletonLock symlinks.
            return None
        if member.type == tarfile.DIRTYPE:
            is_dir = True
        elif member.type in (tarfile.REGTYPE, tarfile.AREGTYPE):
            is_dir = False
        elif member.type in (tarfile.SYMTYPE, tarfile.LNKTYPE):
            raise UnsafeArchiveError("link_entry")
        elif member.type in (tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE):
            raise UnsafeArchiveError("special_file")
        else:
            raise UnsafeArchiveError("unsupported_entry")
        path = "/".join(parts)
        if path in self._kinds:
            raise UnsafeArchiveError("duplicate_entry")
        for depth in range(1, len(parts)):
            if self._kinds.get("/".join(parts[:depth])) is False:
                raise UnsafeArchiveError("entry_below_file")
        self._kinds[path] = is_dir
        return parts


def _name_parts(name: str, limits: ProfileLimits) -> tuple[str, ...]:
    """Split an entry name into components; reject absolute names, ``..``, and over-long or deep ones."""
    if name.startswith("/") or "\x00" in name:
        raise UnsafeArchiveError("absolute_or_bad_name")
    parts = tuple(part for part in name.split("/") if part not in ("", "."))
    if ".." in parts:
        raise UnsafeArchiveError("parent_reference")
    if len(parts) > limits.max_depth:
        raise UnsafeArchiveError("too_deep")
    for part in parts:
        if len(part.encode("utf-8", "surrogateescape")) > limits.max_name_length:
            raise UnsafeArchiveError("name_too_long")
    return parts


def _data_filtered(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """Python's ``data`` filter, on top of our own admission (it has had bypasses of its own)."""
    try:
        return tarfile.data_filter(member, dest)
    except tarfile.FilterError as exc:
        raise UnsafeArchiveError("blocked_by_data_filter") from exc


@contextlib.contextmanager
def _open_archive(
    raw: _Readable, limits: ProfileLimits
) -> Iterator[tuple[_Guard, _Admission, tarfile.TarFile]]:
    """Open a context archive for reading through a guard; map gzip/tar errors to UnsafeArchiveError."""
    total_cap = limits.max_unpacked_bytes + limits.max_entries * _FRAMING_PER_ENTRY + _HEADER_ALLOWANCE
    try:
        with gzip.GzipFile(filename="", fileobj=raw, mode="rb") as gz:  # type: ignore[call-overload]
            ahead = _ReadAhead(gz)
            try:
                guard = _Guard(ahead, total_cap)
                # Stream mode: tarfile never seeks, so every byte it sees comes through the guard.
                with tarfile.open(fileobj=guard, mode="r|", bufsize=_TAR_BUFSIZE, errorlevel=2) as tar:  # type: ignore[call-overload]
                    yield guard, _Admission(limits, guard), tar
            finally:
                # Before gz is closed: the thread may be inside gz.read.
                ahead.close()
    except (gzip.BadGzipFile, EOFError, zlib.error, tarfile.TarError) as exc:
        raise UnsafeArchiveError(_archive_error_reason(exc)) from exc


def _archive_error_reason(exc: BaseException) -> str:
    """Map what gzip, zlib and tarfile raise on bad input to a short reason."""
    if isinstance(exc, UnsafeArchiveError):
        return str(exc)
    if isinstance(exc, gzip.BadGzipFile):
        return "not_gzip"
    if isinstance(exc, EOFError):
        return "truncated"
    if isinstance(exc, zlib.error):
        return "corrupt_gzip"
    return "corrupt_tar"


def _members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """Iterate a stream-mode archive without keeping every entry in memory.

    ``TarFile`` remembers each entry it parses (for random access we never use); with 100,000
    entries that alone would be tens of MB.
    """
    while (member := tar.next()) is not None:
        tar.members.clear()  # type: ignore[attr-defined]
        yield member


def _extract(archive: Path, dest: Path, limits: ProfileLimits) -> int:
    """Extract a context archive into the empty directory ``dest`` (worker thread).

    Files are created 0600 and directories 0700 whatever the archive says (a profile holds
    credentials), never following a symlink and never replacing anything.

    Returns:
        The number of entries read.

    Raises:
        UnsafeArchiveError: the archive is hostile, corrupt or over a cap.
        OSError: the disk failed us.
    """
    root = str(dest)
    made: set[tuple[str, ...]] = set()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

    def make_dirs(parts: tuple[str, ...]) -> None:
        # Each level explicitly: os.makedirs would create the intermediate ones 0755.
        for depth in range(1, len(parts) + 1):
            if parts[:depth] not in made:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(os.path.join(root, *parts[:depth]), 0o700)
                made.add(parts[:depth])

    with archive.open("rb") as raw, _open_archive(raw, limits) as (guard, admission, tar):
        for member in _members(tar):
            parts = admission.admit(member)
            if parts is None:
                continue
            safe = _data_filtered(member, root)
            if safe.isdir():
                make_dirs(parts)
                continue
            make_dirs(parts[:-1])
            source = tar.extractfile(member)
            if source is None:
                raise UnsafeArchiveError("unreadable_entry")
            target = os.path.join(root, *parts)
            with source, os.fdopen(os.open(target, flags, 0o600), "wb") as out:
                shutil.copyfileobj(source, out, _CHUNK)
                if 0 <= safe.mtime < 2**33:
                    os.utime(out.fileno(), (safe.mtime, safe.mtime))
        guard.finish(tar.offset)
        return admission.entries


# --------------------------------------------------------------------------------------------------
# Packing and verification.


class _HashingReader:
    """A file read through SHA-256 (tarfile copies file data through ``read``)."""

    def __init__(self, raw: _Readable, *, cancellable: bool = True) -> None:
        self._raw = raw
        self._cancellable = cancellable
        self.sha256 = hashlib.sha256()
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        if self._cancellable:
            anyio.from_thread.check_cancelled()
        data = self._raw.read(size)
        self.sha256.update(data)
        self.count += len(data)
        return data


def _walk(root: Path) -> Iterator[tuple[str, os.DirEntry[str]]]:
    """Yield ``(relative path, entry)`` depth-first in name order, pruning excluded paths."""
    stack: list[tuple[str, str]] = [(str(root), "")]
    while stack:
        directory, prefix = stack.pop()
        try:
            with os.scandir(directory) as scan:
                entries = sorted(scan, key=lambda e: e.name)
        except FileNotFoundError:
            continue
        subdirs: list[tuple[str, str]] = []
        for entry in entries:
            rel = prefix + entry.name
            if _excluded(tuple(rel.split("/"))) or rel == MANIFEST_PATH:
                continue
            yield rel, entry
            if entry.is_dir(follow_symlinks=False):
                subdirs.append((entry.path, rel + "/"))
        stack.extend(reversed(subdirs))


def _tarinfo(name: str, st: os.stat_result, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = stat.S_IMODE(st.st_mode)
    # Integer mtimes: a float makes tarfile write a pax header for every entry.
    info.mtime = int(st.st_mtime)
    info.size = st.st_size if kind == tarfile.REGTYPE else 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _digest_line(name: str, size: int, sha256_hex: str) -> bytes:
    return f"{name}\0{size}\0{sha256_hex}\n".encode("utf-8", "surrogateescape")


def _pack(src: Path, out: Path, chromium_version: str) -> _Packed:
    """Pack the profile at ``src`` into ``out`` with its manifest (worker thread).

    Raises:
        OSError: reading the profile or writing the archive failed.
    """
    if not src.is_dir():
        raise FileNotFoundError(str(src))
    workers = max(2, os.cpu_count() or 2)
    with (
        out.open("wb") as raw,
        concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="profile-gzip") as executor,
        contextlib.closing(_ParallelGzip(raw, _GZIP_LEVEL, executor, workers)) as gz,
    ):
        with tarfile.TarFile(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT, copybufsize=_CHUNK) as tar:  # type: ignore[arg-type]
            packed = _pack_entries(tar, src, chromium_version)
        gz.finish()
    return packed


def _pack_entries(tar: tarfile.TarFile, src: Path, chromium_version: str) -> _Packed:
    """Add the profile's regular files and directories to ``tar``, then the manifest."""
    digest = hashlib.sha256()
    files = total = skipped = 0
    for rel, entry in _walk(src):
        anyio.from_thread.check_cancelled()
        if entry.is_dir(follow_symlinks=False):
            tar.addfile(_tarinfo(rel, entry.stat(follow_symlinks=False), tarfile.DIRTYPE))
            continue
        if not entry.is_file(follow_symlinks=False):
            # Symlinks, sockets, FIFOs: a restore would refuse them.
            skipped += 1
            continue
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            skipped += 1
            continue
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                skipped += 1
                continue
            reader = _HashingReader(f)
            # tarfile copies exactly st_size bytes and raises if the file got shorter.
            tar.addfile(_tarinfo(rel, st, tarfile.REGTYPE), reader)
        files += 1
        total += st.st_size
        digest.update(_digest_line(rel, st.st_size, reader.sha256.hexdigest()))
    manifest = {
        "format": FORMAT_VERSION,
        "chromium_version": chromium_version,
        "created_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "files": files,
        "bytes": total,
        "sha256": digest.hexdigest(),
    }
    body = json.dumps(manifest, indent=1).encode()
    info = tarfile.TarInfo(MANIFEST_PATH)
    info.size, info.mode, info.mtime = len(body), 0o600, int(time.time())
    tar.addfile(info, io.BytesIO(body))
    return _Packed(files=files, bytes=total, digest=digest.hexdigest(), skipped=skipped)


def _verify(archive: Path, packed: _Packed, limits: ProfileLimits) -> _Verified:
    """Read a packed archive back as a restore would, and check it against what was packed (thread).

    Raises:
        UnsafeArchiveError: the archive would be rejected at restore, or does not match.
    """
    digest = hashlib.sha256()
    files = total = 0
    manifest: dict[str, Any] | None = None
    with archive.open("rb") as f:
        # Read by the read-ahead thread, which is not an anyio worker: it cannot check cancellation.
        raw = _HashingReader(f, cancellable=False)
        with _open_archive(raw, limits) as (guard, admission, tar):
            for member in _members(tar):
                parts = admission.admit(member)
                if parts is None:
                    continue
                _data_filtered(member, "/nonexistent-verify-root")
                if not member.isreg():
                    continue
                data = tar.extractfile(member)
                if data is None:
                    raise UnsafeArchiveError("unreadable_entry")
                name = "/".join(parts)
                if name == MANIFEST_PATH:
                    manifest = _parse_manifest(data.read(_MAX_MANIFEST_BYTES + 1))
                    continue
                sha = hashlib.sha256()
                while chunk := data.read(_CHUNK):
                    sha.update(chunk)
                files += 1
                total += member.size
                digest.update(_digest_line(name, member.size, sha.hexdigest()))
            guard.finish(tar.offset)
        # Whatever gzip did not need still belongs to the object: hash it too.
        while raw.read(_CHUNK):
            pass
    if (files, total, digest.hexdigest()) != (packed.files, packed.bytes, packed.digest):
        raise UnsafeArchiveError("verify_mismatch")
    expected = {"files": packed.files, "bytes": packed.bytes, "sha256": packed.digest}
    if manifest is None or {k: manifest.get(k) for k in expected} != expected:
        raise UnsafeArchiveError("manifest_mismatch")
    size = archive.stat().st_size
    if raw.count != size:
        raise UnsafeArchiveError("verify_mismatch")
    return _Verified(size=size, sha256_b64=base64.b64encode(raw.sha256.digest()).decode())


def _parse_manifest(raw: bytes) -> dict[str, Any]:
    if len(raw) > _MAX_MANIFEST_BYTES:
        raise UnsafeArchiveError("manifest_too_large")
    try:
        manifest = json.loads(raw)
    except ValueError as exc:
        raise UnsafeArchiveError("manifest_invalid") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        raise UnsafeArchiveError("manifest_invalid")
    return manifest


def _hash_range(path: Path, offset: int, length: int, whole: hashlib._Hash) -> str:
    """SHA-256 (base64) of a byte range of ``path``; the bytes also go into ``whole``."""
    sha = hashlib.sha256()
    with path.open("rb") as f:
        f.seek(offset)
        while length > 0 and (chunk := f.read(min(_CHUNK, length))):
            sha.update(chunk)
            whole.update(chunk)
            length -= len(chunk)
    return base64.b64encode(sha.digest()).decode()


def _open_slice(path: Path, start: int, length: int) -> io.BufferedReader:
    return io.BufferedReader(_FileSlice(path, start, length), buffer_size=_CHUNK)


class _FileSlice(io.RawIOBase):
    """A byte range of a file as a file of its own: an UploadPart body streamed from disk.

    It has no ``fileno``, so nobody sizes it from the whole file; seeking is relative to the range
    (botocore seeks to measure and to rewind for a retry).
    """

    def __init__(self, path: Path, start: int, length: int) -> None:
        super().__init__()
        self._file = path.open("rb", buffering=0)
        self._start = start
        self._length = length
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        count = min(len(buffer), self._length - self._pos)
        if count <= 0:
            return 0
        self._file.seek(self._start + self._pos)
        got = self._file.readinto(memoryview(buffer)[:count]) or 0
        self._pos += got
        return got

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._length}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        self._file.close()
        super().close()


def _temp_file(directory: Path, prefix: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=directory, prefix=prefix, suffix=".tar.gz")
    os.close(fd)
    return Path(name)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


async def _cleanup(*paths: Path | None) -> None:
    """Remove temp files and dirs, even from a cancelled task, within a bound."""
    with anyio.move_on_after(_CLEANUP_TIMEOUT, shield=True):
        for path in paths:
            if path is not None:
                await anyio.to_thread.run_sync(_remove, path)


def _client_error(exc: ClientError) -> tuple[str, int]:
    error = exc.response.get("Error", {})
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return str(error.get("Code", "unknown")), int(status)


# --------------------------------------------------------------------------------------------------
# The store.


class ProfileStore:
    """Restores and persists one context's Chrome profile.

    Args:
        s3: an aiobotocore S3 client (owned by the caller).
        context: the context's bucket, key and persist flag.
        limits: caps on restore and the upload's shape.
        metrics: where durations, bytes and outcomes are counted.
    """

    def __init__(self, s3: S3Client, context: ContextConfig, limits: ProfileLimits, metrics: Metrics) -> None:
        self._s3 = s3
        self._context = context
        self._limits = limits
        self._metrics = metrics
        self._log = log.bind(context_id=context.context_id, bucket=context.bucket, s3_key=context.s3_key)

    # ---- restore -------------------------------------------------------------------------------

    async def restore(self, user_data_dir: Path) -> RestoreResult:
        """Restore the context into ``user_data_dir``, or leave a fresh (empty) profile there.

        Args:
            user_data_dir: Chromium's user-data-dir; must not exist yet, or be an empty directory.

        Returns:
            The outcome. Bad archives, S3 errors, disk errors and the wall-clock cap all give a fresh
            profile and a result with ``may_persist`` false (except ``missing``, which may persist).

            When ``user_data_dir`` is not an empty directory (a caller bug), it is left untouched
            and the outcome is ``failed`` (``target_not_empty``).

        Raises:
            The backend's cancellation exception: when cancelled; temp files are removed and
                ``user_data_dir`` is left as it was.
        """
        started = time.monotonic()
        problem = await anyio.to_thread.run_sync(_target_problem, user_data_dir)
        if problem is not None:
            return await self._restored(user_data_dir, started, "failed", problem, None, 0, fresh=False)
        archive: Path | None = None
        staging: Path | None = None
        etag: str | None = None
        received = 0
        try:
            with anyio.fail_after(self._limits.restore_timeout):
                try:
                    response = await self._s3.get_object(
                        Bucket=self._context.bucket, Key=self._context.s3_key
                    )
                except ClientError as exc:
                    code, status = _client_error(exc)
                    if code == "NoSuchKey":
                        return await self._restored(user_data_dir, started, "missing", None, None, 0)
                    return await self._restored(
                        user_data_dir, started, "failed", f"s3_{code}" if code else f"s3_{status}", None, 0
                    )
                etag = response.get("ETag")
                async with response["Body"] as body:
                    if response.get("ContentLength", 0) > self._limits.max_archive_bytes:
                        raise UnsafeArchiveError("archive_too_large")
                    archive = await anyio.to_thread.run_sync(_temp_file, user_data_dir.parent, ".restore-")
                    received = await self._download(body, archive)
                staging = await anyio.to_thread.run_sync(_temp_dir, user_data_dir)
                entries = await anyio.to_thread.run_sync(_extract, archive, staging, self._limits)
                await anyio.to_thread.run_sync(_move_into_place, staging, user_data_dir)
                staging = None
            self._log.info("profile_entries", entries=entries)
            return await self._restored(user_data_dir, started, "restored", None, etag, received)
        except UnsafeArchiveError as exc:
            self._log.warning("profile_rejected", reason=str(exc), cause=type(exc.__cause__).__name__)
            return await self._restored(user_data_dir, started, "rejected", str(exc), etag, received)
        except TimeoutError:
            return await self._restored(user_data_dir, started, "failed", "timeout", etag, received)
        except (BotoCoreError, ClientError) as exc:
            return await self._restored(user_data_dir, started, "failed", _s3_reason(exc), etag, received)
        except OSError as exc:
            reason = f"io_{exc.errno}" if exc.errno else "io_error"
            self._log.warning("profile_restore_io_error", error=str(exc))
            return await self._restored(user_data_dir, started, "failed", reason, etag, received)
        except Exception:
            # The contract is a fresh profile whatever the archive or the network did; a bug here
            # must not keep the session from starting. Cancellation is a BaseException and passes.
            self._log.exception("profile_restore_error")
            return await self._restored(user_data_dir, started, "failed", "internal_error", etag, received)
        finally:
            await _cleanup(archive, staging)

    async def _download(self, body: StreamingBody, dest: Path) -> int:
        """Stream the object's body to ``dest``, counting bytes against the compressed cap."""
        received = 0
        cap = self._limits.max_archive_bytes
        async with await anyio.open_file(dest, "wb") as out:
            buffer = bytearray()
            while chunk := await body.read(_CHUNK):
                received += len(chunk)
                if received > cap:
                    raise UnsafeArchiveError("archive_too_large")
                buffer += chunk
                if len(buffer) >= _CHUNK:
                    await out.write(bytes(buffer))
                    buffer.clear()
            await out.write(bytes(buffer))
        return received

    async def _restored(
        self,
        user_data_dir: Path,
        started: float,
        outcome: Literal["restored", "missing", "rejected", "failed"],
        reason: str | None,
        etag: str | None,
        received: int,
        *,
        fresh: bool = True,
    ) -> RestoreResult:
        if outcome != "restored" and fresh:
            # A fresh profile. Shielded: a cancellation here would leave Chromium without a dir.
            with anyio.CancelScope(shield=True):
                try:
                    await anyio.to_thread.run_sync(_make_fresh, user_data_dir)
                except OSError as exc:
                    # Chromium creates its user-data-dir itself; say why it had to.
                    self._log.warning("profile_fresh_dir_failed", error=str(exc))
        result = RestoreResult(
            outcome=outcome,
            reason=reason,
            etag=etag,
            bytes=received,
            may_persist=outcome in ("restored", "missing"),
        )
        elapsed = time.monotonic() - started
        self._metrics.profile_seconds.labels("restore").observe(elapsed)
        self._metrics.profile_bytes.labels("restore").inc(received)
        self._metrics.profile_outcomes.labels("restore", outcome).inc()
        level = "info" if result.may_persist else "warning"
        getattr(self._log, level)(
            "profile_restore",
            outcome=outcome,
            reason=reason,
            etag=result.etag,
            archive_bytes=received,
            seconds=round(elapsed, 3),
        )
        return result

    # ---- persist -------------------------------------------------------------------------------

    async def persist(
        self, user_data_dir: Path, restored: RestoreResult, *, chromium_version: str
    ) -> PersistResult:
        """Pack, verify and conditionally upload the profile (after Chromium has closed).

        Args:
            user_data_dir: Chromium's user-data-dir.
            restored: this session's restore result: its ETag conditions the upload, and
                ``may_persist`` false means nothing is uploaded.
            chromium_version: recorded in the manifest.

        Returns:
            The outcome; S3 and disk errors give ``failed``, a changed object ``conflict``.

        Raises:
            The backend's cancellation exception: when cancelled; a multipart upload is aborted, temp
                files are removed and the stored object is untouched.
        """
        started = time.monotonic()
        if not self._context.persist:
            return self._persisted(started, "skipped", "persist_disabled", 0)
        if not restored.may_persist:
            return self._persisted(started, "skipped", f"restore_{restored.outcome}", 0)
        archive: Path | None = None
        size = 0
        try:
            archive = await anyio.to_thread.run_sync(_temp_file, user_data_dir.parent, ".persist-")
            packed = await anyio.to_thread.run_sync(_pack, user_data_dir, archive, chromium_version)
            verified = await anyio.to_thread.run_sync(_verify, archive, packed, self._limits)
            size = verified.size
            if size > self._limits.max_archive_bytes:
                return self._persisted(started, "failed", "archive_too_large", size)
            await self._check_base(restored)
            if size < self._limits.multipart_threshold:
                await self._put(archive, verified, restored.etag)
            else:
                await self._multipart(archive, verified, restored.etag)
            self._log.info(
                "profile_packed", files=packed.files, unpacked_bytes=packed.bytes, skipped=packed.skipped
            )
            return self._persisted(started, "uploaded", None, size)
        except _Conflict as exc:
            return self._persisted(started, "conflict", str(exc), size)
        except ClientError as exc:
            code, status = _client_error(exc)
            if status == 412 or code in ("PreconditionFailed", "ConditionalRequestConflict"):
                return self._persisted(started, "conflict", "precondition_failed", size)
            if restored.etag is not None and code == "NoSuchKey":
                return self._persisted(started, "conflict", "deleted", size)
            return self._persisted(started, "failed", _s3_reason(exc), size)
        except BotoCoreError as exc:
            return self._persisted(started, "failed", _s3_reason(exc), size)
        except UnsafeArchiveError as exc:
            # The profile would not survive our own restore (over a cap): keep the stored one.
            return self._persisted(started, "failed", f"unrestorable_{exc}", size)
        except FileNotFoundError:
            return self._persisted(started, "failed", "profile_missing", size)
        except OSError as exc:
            self._log.warning("profile_persist_io_error", error=str(exc))
            return self._persisted(started, "failed", f"io_{exc.errno}" if exc.errno else "io_error", size)
        except Exception:
            # Nothing was written (a multipart upload was aborted); shutdown must go on regardless.
            self._log.exception("profile_persist_error")
            return self._persisted(started, "failed", "internal_error", size)
        finally:
            await _cleanup(archive)

    async def _check_base(self, restored: RestoreResult) -> None:
        """Fail fast when the stored object is no longer the restored one (the upload is conditional too)."""
        try:
            head = await self._s3.head_object(Bucket=self._context.bucket, Key=self._context.s3_key)
            current: str | None = head.get("ETag")
        except ClientError as exc:
            _, status = _client_error(exc)
            if status != 404:
                raise
            current = None
        if restored.etag is None and current is not None:
            raise _Conflict("created_by_another_session")
        if restored.etag is not None and current is None:
            raise _Conflict("deleted")
        if restored.etag is not None and current != restored.etag:
            raise _Conflict("changed_by_another_session")

    async def _put(self, archive: Path, verified: _Verified, etag: str | None) -> None:
        """One conditional PutObject, streaming the file; S3 checks the verified SHA-256."""
        f = await anyio.to_thread.run_sync(archive.open, "rb")
        try:
            request: PutObjectRequestTypeDef = {
                "Bucket": self._context.bucket,
                "Key": self._context.s3_key,
                "Body": f,
                "ContentLength": verified.size,
                "ContentType": "application/gzip",
                "ChecksumSHA256": verified.sha256_b64,
            }
            if etag is not None:
                request["IfMatch"] = etag
            else:
                request["IfNoneMatch"] = "*"
            await self._s3.put_object(**request)
        finally:
            await anyio.to_thread.run_sync(f.close)

    async def _multipart(self, archive: Path, verified: _Verified, etag: str | None) -> None:
        """A conditional multipart upload, aborted on any failure or cancellation.

        Parts stream from the file (peak memory stays flat whatever their size) with their own
        SHA-256 for S3 to check; the parts' bytes must also hash to the verified archive's SHA-256.
        """
        bucket, key = self._context.bucket, self._context.s3_key
        created = await self._s3.create_multipart_upload(
            Bucket=bucket, Key=key, ContentType="application/gzip", ChecksumAlgorithm="SHA256"
        )
        upload_id = created["UploadId"]
        try:
            parts: list[CompletedPartTypeDef] = []
            whole = hashlib.sha256()
            part_size = self._limits.multipart_part_size
            for number, offset in enumerate(range(0, verified.size, part_size), start=1):
                length = min(part_size, verified.size - offset)
                checksum = await anyio.to_thread.run_sync(_hash_range, archive, offset, length, whole)
                body = await anyio.to_thread.run_sync(_open_slice, archive, offset, length)
                try:
                    uploaded = await self._s3.upload_part(
                        Bucket=bucket,
                        Key=key,
                        UploadId=upload_id,
                        PartNumber=number,
                        Body=body,
                        ContentLength=length,
                        ChecksumSHA256=checksum,
                    )
                finally:
                    await anyio.to_thread.run_sync(body.close)
                parts.append({"PartNumber": number, "ETag": uploaded["ETag"], "ChecksumSHA256": checksum})
            if base64.b64encode(whole.digest()).decode() != verified.sha256_b64:
                raise UnsafeArchiveError("changed_after_verify")
            request: CompleteMultipartUploadRequestTypeDef = {
                "Bucket": bucket,
                "Key": key,
                "UploadId": upload_id,
                "MultipartUpload": {"Parts": parts},
            }
            if etag is not None:
                request["IfMatch"] = etag
            else:
                request["IfNoneMatch"] = "*"
            await self._s3.complete_multipart_upload(**request)
        except BaseException:
            # Shielded and bounded: a cancelled persist must not leave parts behind (they are billed).
            with anyio.move_on_after(_CLEANUP_TIMEOUT, shield=True):
                try:
                    await self._s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
                except (BotoCoreError, ClientError) as exc:
                    self._log.warning("profile_multipart_abort_failed", reason=_s3_reason(exc))
            raise

    def _persisted(
        self,
        started: float,
        outcome: Literal["uploaded", "conflict", "skipped", "failed"],
        reason: str | None,
        size: int,
    ) -> PersistResult:
        elapsed = time.monotonic() - started
        self._metrics.profile_seconds.labels("persist").observe(elapsed)
        if outcome == "uploaded":
            self._metrics.profile_bytes.labels("persist").inc(size)
        self._metrics.profile_outcomes.labels("persist", outcome).inc()
        level = "info" if outcome in ("uploaded", "skipped") else "warning"
        getattr(self._log, level)(
            "profile_persist", outcome=outcome, reason=reason, archive_bytes=size, seconds=round(elapsed, 3)
        )
        return PersistResult(outcome=outcome, reason=reason, bytes=size)


def _s3_reason(exc: BotoCoreError | ClientError) -> str:
    if isinstance(exc, ClientError):
        code, status = _client_error(exc)
        return f"s3_{code or status}"
    return f"s3_{type(exc).__name__}"


def _target_problem(user_data_dir: Path) -> str | None:
    """Why ``user_data_dir`` cannot receive a restore (None when it is absent or an empty dir)."""
    if user_data_dir.is_symlink() or (user_data_dir.exists() and not user_data_dir.is_dir()):
        return "target_not_a_directory"
    if user_data_dir.is_dir() and any(user_data_dir.iterdir()):
        return "target_not_empty"
    return None


def _temp_dir(user_data_dir: Path) -> Path:
    user_data_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=user_data_dir.parent, prefix=f".{user_data_dir.name}.restore-"))


def _move_into_place(staging: Path, user_data_dir: Path) -> None:
    for lock in staging.glob("Singleton*"):
        _remove(lock)
    staging.chmod(0o700)
    # rename(2) replaces an empty directory atomically; anything else was refused up front.
    staging.rename(user_data_dir)


def _make_fresh(user_data_dir: Path) -> None:
    user_data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)


# --------------------------------------------------------------------------------------------------
# Cookies: session cookies do not survive a restart on their own, so they travel in the archive.


def save_cookies(user_data_dir: Path, cookies: list[dict[str, Any]]) -> None:
    """Write cookies exported with CDP ``Storage.getCookies`` into the profile (mode 0600).

    Args:
        user_data_dir: Chromium's user-data-dir; the file goes to ``wallcrawler/cookies.json``.
        cookies: the ``cookies`` of ``Storage.getCookies``, session cookies included.

    Raises:
        OSError: the file could not be written (the previous one, if any, is left intact).
    """
    path = user_data_dir / COOKIES_PATH
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    body = json.dumps({"format": FORMAT_VERSION, "cookies": cookies}, separators=(",", ":")).encode()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".cookies.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        # Atomic: a crash mid-write leaves the previous export, never half a file.
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def load_cookies(user_data_dir: Path) -> list[dict[str, Any]]:
    """Read the cookies saved by :func:`save_cookies`, shaped for CDP ``Storage.setCookies``.

    Args:
        user_data_dir: Chromium's user-data-dir.

    Returns:
        Cookie parameters (read-only fields dropped, no ``expires`` on session cookies); an empty
        list when the file is absent, too large or invalid.
    """
    path = user_data_dir / COOKIES_PATH
    try:
        with path.open("rb") as f:
            raw = f.read(_MAX_COOKIES_BYTES + 1)
    except OSError:
        return []
    if len(raw) > _MAX_COOKIES_BYTES:
        log.warning("cookies_file_too_large")
        return []
    try:
        document = json.loads(raw)
    except ValueError:
        log.warning("cookies_file_invalid")
        return []
    items = document.get("cookies") if isinstance(document, dict) else None
    if not isinstance(items, list):
        return []
    cookies: list[dict[str, Any]] = []
    for item in items:
        if not isinstance(item, dict):
            continue
        if not isinstance(item.get("name"), str) or not isinstance(item.get("value"), str):
            continue
        if not isinstance(item.get("domain"), str) and not isinstance(item.get("url"), str):
            continue
        cookie = {k: v for k, v in item.items() if k in _COOKIE_PARAM_FIELDS}
        expires = cookie.get("expires")
        if item.get("session") is True or not isinstance(expires, int | float) or expires <= 0:
            # A session cookie has no expiry; -1 would be read as already expired.
            cookie.pop("expires", None)
        cookies.append(cookie)
    return cookies
