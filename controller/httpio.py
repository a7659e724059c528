"""Just enough HTTP/1.1 for the controller: parse a request head, answer it, fetch from loopback.

The controller talks HTTP only to its own clients (the proxy and metrics ports) and to Chromium's
DevTools endpoint on 127.0.0.1; a full HTTP stack would be more code to trust, not less.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import anyio

__all__ = [
    "HttpError",
    "Request",
    "Response",
    "fetch",
    "get_url",
    "parse_request_head",
    "parse_response_head",
    "response_bytes",
]

_TOKEN_RE = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_REASONS = {
    101: "Switching Protocols",
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}
MAX_HEADERS = 100


class HttpError(Exception):
    """A request or response that is not acceptable HTTP/1.1.

    Attributes:
        status: the HTTP status to answer with.
    """

    def __init__(self, status: int, reason: str) -> None:
        self.status = status
        super().__init__(reason)


@dataclass(frozen=True, slots=True)
class Request:
    """A parsed request head. Header names are lower-cased; the target is kept exactly as sent."""

    method: str
    target: str
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def path(self) -> str:
        """The target without its query."""
        return self.target.split("?", 1)[0]

    @property
    def query(self) -> str:
        """The raw query string (without '?'), empty when there is none."""
        return self.target.split("?", 1)[1] if "?" in self.target else ""

    def header(self, name: str) -> str | None:
        """A header's value, or None."""
        return self.headers.get(name)


@dataclass(frozen=True, slots=True)
class Response:
    """A fetched response: status, lower-cased headers and the whole body."""

    status: int
    headers: dict[str, str]
    body: bytes


def _parse_headers(lines: list[bytes]) -> dict[str, str]:
    if len(lines) > MAX_HEADERS:
        raise HttpError(431, "too many headers")
    headers: dict[str, str] = {}
    for line in lines:
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN_RE.match(name):
            raise HttpError(400, "malformed header line")
        key = name.decode("ascii").lower()
        text = value.strip().decode("latin-1")
        if key in headers:
            # Duplicates are joined as RFC 9110 allows; Host and auth headers are refused duplicated.
            if key in {"host", "authorization", "x-bb-signing-key", "content-length"}:
                raise HttpError(400, f"duplicate {key} header")
            headers[key] = f"{headers[key]}, {text}"
        else:
            headers[key] = text
    return headers


def parse_request_head(head: bytes) -> Request:
    """Parse a request head (request line and header lines, without the final blank line).

    Args:
        head: the bytes before ``\\r\\n\\r\\n``.

    Returns:
        The parsed request.

    Raises:
        HttpError: the head is not acceptable HTTP/1.1.
    """
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        raise HttpError(400, "malformed request line")
    method, target, _version = parts
    if not _TOKEN_RE.match(method):
        raise HttpError(400, "malformed method")
    try:
        target_text = target.decode("ascii")
    except UnicodeDecodeError as exc:
        raise HttpError(400, "non-ASCII request target") from exc
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in target_text):
        raise HttpError(400, "control character in request target")
    return Request(method.decode("ascii"), target_text, _parse_headers(lines[1:]))


def parse_response_head(head: bytes) -> tuple[int, dict[str, str]]:
    """Parse a response head into its status and lower-cased headers.

    Raises:
        HttpError: the head is not acceptable HTTP/1.1 (status 502).
    """
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise HttpError(502, "malformed status line")
    try:
        return int(parts[1]), _parse_headers(lines[1:])
    except HttpError as exc:
        raise HttpError(502, str(exc)) from exc


def response_bytes(
    status: int, body: bytes = b"", *, content_type: str = "text/plain; charset=utf-8", extra: str = ""
) -> bytes:
    """Serialise a complete ``Connection: close`` response.

    Args:
        status: the status code.
        body: the body.
        content_type: its media type.
        extra: further header lines, each ending in CRLF.
    """
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        f"Cache-Control: no-store\r\nConnection: close\r\n{extra}\r\n"
    )
    return head.encode("latin-1") + body


async def fetch(
    host: str, port: int, method: str, path: str, *, timeout: float = 5.0, max_bytes: int = 64 * 1024 * 1024
) -> Response:
    """Make one HTTP/1.1 request and read the whole response.

    Args:
        host: the server's address (the controller only passes loopback and link-local addresses).
        port: its port.
        method: the request method.
        path: the origin-form target, starting with '/'.
        timeout: bound on the whole exchange, in seconds.
        max_bytes: largest acceptable response.

    Returns:
        The response, its body de-chunked.

    Raises:
        HttpError: the response is malformed or too large (status 502).
        OSError: the server cannot be reached.
        TimeoutError: the exchange took longer than ``timeout``.
    """
    request = (
        f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: application/json\r\n"
        "Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    received = bytearray()
    with anyio.fail_after(timeout):
        async with await anyio.connect_tcp(host, port) as stream:
            await stream.send(request.encode("ascii"))
            # Connection: close, so the response ends with the connection; Content-Length still rules.
            while True:
                try:
                    received += await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    break
                if len(received) > max_bytes:
                    raise HttpError(502, "response too large")
                if _complete(received):
                    break
    return _parse_response(bytes(received))


async def get_url(url: str, *, timeout: float = 5.0, max_bytes: int = 4 * 1024 * 1024) -> Response:
    """GET a plain ``http://`` URL (the ECS task metadata endpoint) and read the whole response.

    Raises:
        HttpError: not a plain http URL (status 400), or a malformed or oversized response (502).
        OSError: the server cannot be reached.
        TimeoutError: the exchange took longer than ``timeout``.
    """
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise HttpError(400, "not a plain http URL")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return await fetch(parts.hostname, parts.port or 80, "GET", target, timeout=timeout, max_bytes=max_bytes)


def _complete(received: bytearray) -> bool:
    """True once a Content-Length response is whole (servers may keep the connection open anyway)."""
    head, sep, body = bytes(received).partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            return len(body) >= int(value.strip())
    return False


def _parse_response(raw: bytes) -> Response:
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        raise HttpError(502, "incomplete response head")
    status, headers = parse_response_head(head)
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return Response(status, headers, _dechunk(body))
    length = headers.get("content-length")
    if length is not None:
        if not length.isdigit() or len(body) < int(length):
            raise HttpError(502, "truncated body")
        body = body[: int(length)]
    return Response(status, headers, body)


def _dechunk(body: bytes) -> bytes:
    out = bytearray()
    rest = body
    while True:
        size_line, sep, rest = rest.partition(b"\r\n")
        if not sep:
            raise HttpError(502, "truncated chunked body")
        try:
            size = int(size_line.split(b";", 1)[0].strip(), 16)
        except ValueError as exc:
            raise HttpError(502, "bad chunk size") from exc
        if size == 0:
            return bytes(out)
        if len(rest) < size + 2:
            raise HttpError(502, "truncated chunked body")
        out += rest[:size]
        rest = rest[size + 2 :]
