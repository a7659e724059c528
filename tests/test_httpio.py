"""The loopback HTTP helpers: request parsing and the small client, against a real server on port 0."""

from __future__ import annotations

import anyio
import anyio.abc
import pytest

from controller import httpio

pytestmark = pytest.mark.anyio


async def _answering(
    answer: bytes, *, task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED
) -> None:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    async with listener:
        task_status.started(listener.extra(anyio.abc.SocketAttribute.local_port))

        async def handle(stream: anyio.abc.SocketStream) -> None:
            async with stream:
                await stream.receive()
                await stream.send(answer)

        await listener.serve(handle)


async def _fetch(answer: bytes) -> httpio.Response:
    outcome: httpio.Response | httpio.HttpError
    async with anyio.create_task_group() as tg:
        port = await tg.start(_answering, answer)
        try:
            outcome = await httpio.fetch("127.0.0.1", port, "GET", "/x", timeout=5)
        except httpio.HttpError as exc:
            outcome = exc
        tg.cancel_scope.cancel()
    if isinstance(outcome, httpio.HttpError):
        raise outcome
    return outcome


def test_request_head_parsed_exactly() -> None:
    """The target is kept as sent and header names are lower-cased."""
    request = httpio.parse_request_head(b"GET /json/version/?signingKey=a HTTP/1.1\r\nHost: h:1\r\nX-A: b")
    assert (request.method, request.path, request.query) == ("GET", "/json/version/", "signingKey=a")
    assert request.header("host") == "h:1"
    assert request.header("x-a") == "b"


@pytest.mark.parametrize(
    "head",
    [
        b"GET /x",
        b"GET /x HTTP/2\r\nHost: a",
        b"GET /x HTTP/1.1\r\nHost: a\r\nHost: b",
        b"GET /x HTTP/1.1\r\nbad header",
        b"GET /\x01x HTTP/1.1\r\nHost: a",
    ],
)
def test_malformed_request_heads_rejected(head: bytes) -> None:
    """Malformed request lines, duplicate Host headers and control characters are refused."""
    with pytest.raises(httpio.HttpError):
        httpio.parse_request_head(head)


async def test_fetch_content_length() -> None:
    """A Content-Length response is read whole."""
    response = await _fetch(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
    assert (response.status, response.body) == (200, b"hello")


async def test_fetch_chunked() -> None:
    """A chunked response (Go's server for large bodies) is de-chunked."""
    response = await _fetch(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    assert response.body == b"abcde"


async def test_fetch_truncated_body_is_an_error() -> None:
    """A body shorter than its Content-Length is refused."""
    with pytest.raises(httpio.HttpError):
        await _fetch(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\nshort")


async def test_get_url_refuses_https() -> None:
    """get_url speaks plain http only."""
    with pytest.raises(httpio.HttpError):
        await httpio.get_url("https://169.254.170.2/v4/x/task")
