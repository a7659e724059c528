"""Builders of context archives for the profile tests: well-formed ones and hostile ones.

Hostile archives are built from raw tar headers, as an attacker would, not through a ``tar`` tool
that might refuse to write them. Big ones (the gzip bomb) are generated as a stream, never held
in memory whole.
"""

from __future__ import annotations

import gzip
import tarfile
import zlib
from collections.abc import Iterable
from pathlib import Path

_BLOCK = tarfile.BLOCKSIZE
_MiB = 1024 * 1024


def entry(name: str, data: bytes = b"", *, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> bytes:
    """One tar entry (header and padded data) in GNU format, whatever its name or type."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.linkname = linkname
    info.mtime = 1_700_000_000
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3
    header = info.tobuf(format=tarfile.GNU_FORMAT)
    return header + data + b"\0" * (-len(data) % _BLOCK)


def end() -> bytes:
    """The end-of-archive marker: two zero blocks."""
    return b"\0" * (2 * _BLOCK)


def archive(entries: Iterable[bytes]) -> bytes:
    """A gzip'd tar of the given raw entries, ended properly."""
    return gzip.compress(b"".join(entries) + end(), compresslevel=1, mtime=0)


def regular_profile() -> bytes:
    """A small, well-formed profile archive."""
    return archive(
        [
            entry("Default", kind=tarfile.DIRTYPE),
            entry("Default/Preferences", b'{"profile": {}}'),
            entry("Local State", b"{}"),
        ]
    )


def parent_reference() -> bytes:
    """An entry climbing out of the profile with ``..``."""
    return archive([entry("Default/Preferences", b"{}"), entry("../escaped", b"pwned")])


def absolute_path(target: Path) -> bytes:
    """An entry with an absolute name pointing at ``target``."""
    return archive([entry("Default/Preferences", b"{}"), entry(str(target), b"pwned")])


def symlink_out(outside: Path) -> bytes:
    """A symlink to a directory outside, then a file written through it."""
    return archive(
        [
            entry("Default", kind=tarfile.DIRTYPE),
            entry("Default/link", kind=tarfile.SYMTYPE, linkname=str(outside)),
            entry("Default/link/pwned", b"pwned"),
        ]
    )


def hardlink_out(outside_file: Path) -> bytes:
    """A hard link to a file outside, then data written over the link's name."""
    return archive(
        [
            entry("Default", kind=tarfile.DIRTYPE),
            entry("Default/hard", kind=tarfile.LNKTYPE, linkname=str(outside_file)),
            entry("Default/hard", b"pwned"),
        ]
    )


def device() -> bytes:
    """A character device entry (``/dev/null``'s numbers)."""
    return archive([entry("Default", kind=tarfile.DIRTYPE), entry("Default/null", kind=tarfile.CHRTYPE)])


def fifo() -> bytes:
    """A FIFO entry."""
    return archive([entry("Default", kind=tarfile.DIRTYPE), entry("Default/pipe", kind=tarfile.FIFOTYPE)])


def many_entries(count: int) -> bytes:
    """``count`` empty regular files ``Default/f000000``…, compressed on the fly (512 bytes of tar each).

    Headers are stamped from one template (name digits and checksum patched): ``tobuf`` per entry
    would take seconds.
    """
    template = bytearray(entry("Default/f000000"))
    start = template.index(b"000000")
    # The checksum field: 6 octal digits, NUL, space; it sums the header with itself as spaces.
    base = sum(template[:148]) + 8 * ord(" ") + sum(template[156:]) - 6 * ord("0")
    compressor = zlib.compressobj(1, zlib.DEFLATED, 31)
    chunks = [compressor.compress(entry("Default", kind=tarfile.DIRTYPE))]
    batch = bytearray()
    for index in range(count):
        digits = b"%06d" % index
        template[start : start + 6] = digits
        template[148:156] = b"%06o\0 " % (base + sum(digits))
        batch += template
        if len(batch) >= _MiB:
            chunks.append(compressor.compress(bytes(batch)))
            batch.clear()
    chunks.append(compressor.compress(bytes(batch) + end()))
    chunks.append(compressor.flush())
    return b"".join(chunks)


def _zeros_member(size: int) -> bytes:
    """One gzip member holding ``size`` zero bytes, compressed 1 MiB at a time."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = bytes(_MiB)
    chunks = []
    for _ in range(size // _MiB):
        chunks.append(compressor.compress(block))
    chunks.append(compressor.compress(bytes(size % _MiB)))
    chunks.append(compressor.flush())
    return b"".join(chunks)


def zero_bomb(total: int) -> bytes:
    """``total`` bytes of zeros, gzip'd (about 1000:1) as concatenated members of 64 MiB.

    A gzip file may hold several members; decompressors read them as one stream. Compressing one
    member and repeating it keeps the builder fast and the memory small.
    """
    member = _zeros_member(64 * _MiB)
    count, rest = divmod(total, 64 * _MiB)
    return member * count + _zeros_member(rest)


def declared_bomb(size: int) -> bytes:
    """A tar whose one file honestly declares ``size`` bytes of zeros (the data follows, gzip'd)."""
    info = tarfile.TarInfo("Default/Cookies")
    info.size = size
    header = info.tobuf(format=tarfile.GNU_FORMAT)
    padding = -size % _BLOCK
    return gzip.compress(header, mtime=0) + zero_bomb(size + padding) + gzip.compress(end(), mtime=0)


def pax_header_bomb(size: int) -> bytes:
    """A pax extended header of ``size`` bytes (tarfile would buffer it whole) before a file."""
    record_body = b"comment=" + b"x" * size + b"\n"
    length = len(record_body) + 1
    while len(str(length).encode()) + 1 + len(record_body) != length:
        length = len(str(length).encode()) + 1 + len(record_body)
    record = str(length).encode() + b" " + record_body
    info = tarfile.TarInfo("././@PaxHeader")
    info.type = tarfile.XHDTYPE
    info.size = len(record)
    header = info.tobuf(format=tarfile.USTAR_FORMAT)
    return archive([header + record + b"\0" * (-len(record) % _BLOCK) + entry("Default/Preferences", b"{}")])


def truncated() -> bytes:
    """A well-formed archive cut in the middle of its gzip stream."""
    data = archive([entry("Default/Preferences", bytes(range(256)) * 4096)])
    return data[: len(data) // 2]


def not_gzip() -> bytes:
    """A zip file's first bytes: not gzip at all."""
    return b"PK\x03\x04" + b"\x14\x00" * 64


def garbage_after_end() -> bytes:
    """A valid archive, then a broken header where tarfile would stop silently."""
    body = entry("Default/Preferences", b"{}") + b"\x01" * _BLOCK + entry("Default/Later", b"x")
    return archive([body])
