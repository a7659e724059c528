"""SessionStore against a real moto server: item contents, releases, deletion, faults, write counts."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, cast
from urllib.parse import urlsplit

import anyio
import anyio.abc
import pytest
from aiobotocore.awsrequest import AioAWSResponse
from aiobotocore.session import get_session

from controller.errors import SessionGoneError, SessionStoreError
from controller.metrics import Metrics
from controller.session_store import EVENT_SOURCE, SessionStore, SessionView, dynamodb_client_config
from controller.usage import Usage
from tests.conftest import boto_client

if TYPE_CHECKING:
    from types_aiobotocore_dynamodb import DynamoDBClient

pytestmark = pytest.mark.anyio

TABLE = "wallcrawler-sessions"
SESSION_ID = "sess_a1b2c3d4"
EXPIRES_AT = 1_900_000_000
NO_USAGE = Usage(avg_cpu_percent=None, peak_memory_mib=None)


def create_table(endpoint: str, *, seed: dict[str, Any] | None = None) -> Any:
    """Create the sessions table and seed the item the way the session API does; return a boto3 client."""
    ddb = boto_client("dynamodb", endpoint)
    ddb.create_table(
        TableName=TABLE,
        KeySchema=[{"AttributeName": "sessionId", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "sessionId", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    item: dict[str, Any] = {
        "sessionId": {"S": SESSION_ID},
        "status": {"S": "RUNNING"},
        "internalStatus": {"S": "PROVISIONING"},
        "projectId": {"S": "project_default"},
        "createdAt": {"S": "2026-01-01T00:00:00.000Z"},
        "expiresAt": {"N": str(EXPIRES_AT)},
        **(seed or {}),
    }
    ddb.put_item(TableName=TABLE, Item=item)
    return ddb


def get_item(ddb: Any) -> dict[str, Any] | None:
    response = ddb.get_item(TableName=TABLE, Key={"sessionId": {"S": SESSION_ID}}, ConsistentRead=True)
    item: dict[str, Any] | None = response.get("Item")
    return item


def s(item: dict[str, Any], name: str) -> str:
    value: str = item[name]["S"]
    return value


def figures(item: dict[str, Any]) -> tuple[str, str, str]:
    """proxyBytes, avgCpuUsage and memoryUsage as DynamoDB holds them."""
    return (item["proxyBytes"]["N"], item["avgCpuUsage"]["N"], item["memoryUsage"]["N"])


def is_iso_utc(text: str) -> bool:
    return datetime.fromisoformat(text).utcoffset() == UTC.utcoffset(None)


def history(item: dict[str, Any]) -> list[dict[str, Any]]:
    """eventHistory as plain dicts: eventType, timestamp, source, detail."""
    entries = []
    for entry in item.get("eventHistory", {}).get("L", []):
        m = entry["M"]
        entries.append(
            {
                "eventType": m["eventType"]["S"],
                "timestamp": m["timestamp"]["S"],
                "source": m["source"]["S"],
                "detail": {k: v["S"] for k, v in m["detail"]["M"].items()},
            }
        )
    return entries


class Calls:
    """Counts UpdateItem API calls (before-call) and HTTP attempts (before-send) of one client."""

    def __init__(self, client: DynamoDBClient) -> None:
        self.calls = 0
        self.attempts = 0
        client.meta.events.register("before-call.dynamodb.UpdateItem", self._call)
        client.meta.events.register("before-send.dynamodb.UpdateItem", self._send)

    def _call(self, **_: Any) -> None:
        self.calls += 1

    def _send(self, **_: Any) -> None:
        self.attempts += 1


class _Body:
    """The raw body of an injected response, as aiobotocore reads it."""

    def __init__(self, body: bytes) -> None:
        self._body = body

    async def read(self) -> bytes:
        return self._body


def inject_errors(client: DynamoDBClient, status: int, code: str, times: int) -> list[int]:
    """Answer the first ``times`` UpdateItem attempts with a DynamoDB error; returns a one-item counter."""
    injected = [0]

    def before_send(request: Any, **_: Any) -> AioAWSResponse | None:
        if injected[0] >= times:
            return None
        injected[0] += 1
        body = json.dumps({"__type": f"com.amazonaws.dynamodb.v20120810#{code}", "message": "injected"})
        headers = {"content-type": "application/x-amz-json-1.0", "x-amzn-requestid": "injected"}
        # botocore wraps any mapping of headers; its stubs ask for its own class.
        return AioAWSResponse(request.url, status, cast(Any, headers), _Body(body.encode()))

    # Returning a response from before-send short-circuits the HTTP request (the stubs say None only).
    client.meta.events.register_first("before-send.dynamodb.UpdateItem", cast(Any, before_send))
    return injected


class DroppingRelay:
    """A TCP relay in front of moto that forwards requests and drops the first ``drop`` responses.

    A dropped response's request was applied by moto; the client sees the connection close and retries.
    """

    def __init__(self, upstream: str, *, drop: int = 1) -> None:
        parts = urlsplit(upstream)
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 80
        self.drop = drop
        self.dropped = 0
        self.url = ""
        self._stack = AsyncExitStack()

    async def __aenter__(self) -> Self:
        stack = await self._stack.__aenter__()
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        await stack.enter_async_context(listener)
        group = await stack.enter_async_context(anyio.create_task_group())
        stack.callback(group.cancel_scope.cancel)
        group.start_soon(listener.serve, self._relay)
        self.url = f"http://127.0.0.1:{listener.extra(anyio.abc.SocketAttribute.local_port)}"
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        return await self._stack.__aexit__(exc_type, exc, tb)

    async def _relay(self, client: anyio.abc.SocketStream) -> None:
        async with (
            client,
            await anyio.connect_tcp(self._host, self._port) as upstream,
            anyio.create_task_group() as group,
        ):

            async def requests() -> None:
                async for chunk in client:
                    await upstream.send(chunk)

            group.start_soon(requests)
            async for chunk in upstream:
                if self.drop > 0:
                    # moto has answered, so it applied the request; the client never hears of it.
                    self.drop -= 1
                    self.dropped += 1
                    break
                await client.send(chunk)
            group.cancel_scope.cancel()


@pytest.fixture
async def dynamodb(aws_endpoint: str) -> AsyncIterator[DynamoDBClient]:
    """An aiobotocore DynamoDB client on moto, configured as the controller configures it."""
    session = get_session()
    async with session.create_client(
        "dynamodb", endpoint_url=aws_endpoint, region_name="us-east-1", config=dynamodb_client_config(2.0)
    ) as client:
        yield client


@pytest.fixture
def ddb(aws_endpoint: str) -> Any:
    """A boto3 client on a table holding the seeded session item."""
    return create_table(aws_endpoint)


def make_store(client: DynamoDBClient, *, limit: int = 50, metrics: Metrics | None = None) -> SessionStore:
    return SessionStore(client, TABLE, SESSION_ID, history_limit=limit, metrics=metrics or Metrics())


# Transitions


async def test_mark_ready_item(dynamodb: DynamoDBClient, ddb: Any) -> None:
    """READY writes internalStatus, status RUNNING, readyAt, updatedAt, ecsTaskArn and one history entry."""
    view = await make_store(dynamodb).mark_ready(task_arn="arn:aws:ecs:us-east-1:1:task/c/abc")
    item = get_item(ddb)
    assert item is not None
    assert (s(item, "internalStatus"), s(item, "status")) == ("READY", "RUNNING")
    assert s(item, "ecsTaskArn") == "arn:aws:ecs:us-east-1:1:task/c/abc"
    assert is_iso_utc(s(item, "readyAt"))
    assert s(item, "updatedAt") == s(item, "readyAt") == s(item, "lastEventTimestamp")
    [entry] = history(item)
    assert entry["eventType"] == "StatusChanged"
    assert entry["source"] == EVENT_SOURCE
    assert entry["detail"] == {"sessionId": SESSION_ID, "newStatus": "READY"}
    assert view == SessionView("READY", "RUNNING", float(EXPIRES_AT), keep_alive=False, released=False)


async def test_mark_ready_without_task_arn(dynamodb: DynamoDBClient, ddb: Any) -> None:
    """Without a task ARN, ecsTaskArn is left unwritten."""
    await make_store(dynamodb).mark_ready(task_arn=None)
    item = get_item(ddb)
    assert item is not None
    assert "ecsTaskArn" not in item


async def test_mark_active_item(dynamodb: DynamoDBClient, ddb: Any) -> None:
    """ACTIVE writes lastActiveAt and a history entry naming the previous status."""
    store = make_store(dynamodb)
    await store.mark_ready(task_arn=None)
    view = await store.mark_active()
    item = get_item(ddb)
    assert item is not None
    assert (s(item, "internalStatus"), s(item, "status")) == ("ACTIVE", "RUNNING")
    assert is_iso_utc(s(item, "lastActiveAt"))
    expected = {"sessionId": SESSION_ID, "newStatus": "ACTIVE", "previousStatus": "READY"}
    assert history(item)[-1]["detail"] == expected
    assert view.internal_status == "ACTIVE"


async def test_reconnect_moves_last_active_without_history(dynamodb: DynamoDBClient, ddb: Any) -> None:
    """A second mark_active (a reconnect) updates lastActiveAt but adds no history entry."""
    store = make_store(dynamodb)
    await store.mark_active()
    first = get_item(ddb)
    await anyio.sleep(0.01)
    await store.mark_active()
    second = get_item(ddb)
    assert first is not None
    assert second is not None
    assert s(second, "lastActiveAt") > s(first, "lastActiveAt")
    assert len(history(second)) == 1


async def test_mark_terminating_item(dynamodb: DynamoDBClient, ddb: Any) -> None:
    """TERMINATING keeps status RUNNING and records the reason."""
    store = make_store(dynamodb)
    await store.mark_active()
    await store.mark_terminating("sigterm")
    item = get_item(ddb)
    assert item is not None
    assert (s(item, "internalStatus"), s(item, "status")) == ("TERMINATING", "RUNNING")
    assert history(item)[-1]["detail"]["reason"] == "sigterm"


async def test_mark_stopped_item(dynamodb: DynamoDBClient, ddb: Any) -> None:
    """STOPPED writes COMPLETED, endedAt, proxyBytes and usage, and is not mistaken for a release."""
    store = make_store(dynamodb)
    await store.mark_terminating("sigterm")
    view = await store.mark_stopped(
        reason="sigterm",
        timed_out=False,
        proxy_bytes=12345,
        usage=Usage(avg_cpu_percent=37, peak_memory_mib=812),
    )
    item = get_item(ddb)
    assert item is not None
    assert (s(item, "internalStatus"), s(item, "status")) == ("STOPPED", "COMPLETED")
    assert is_iso_utc(s(item, "endedAt"))
    assert figures(item) == ("12345", "37", "812")
    assert history(item)[-1]["detail"]["previousStatus"] == "TERMINATING"
    assert view.released is False


async def test_mark_stopped_timed_out(dynamodb: DynamoDBClient, ddb: Any) -> None:
    """A deadline stop writes internalStatus STOPPED with status TIMED_OUT."""
    await make_store(dynamodb).mark_stopped(
        reason="expires_at", timed_out=True, proxy_bytes=0, usage=NO_USAGE
    )
    item = get_item(ddb)
    assert item is not None
    assert (s(item, "internalStatus"), s(item, "status")) == ("STOPPED", "TIMED_OUT")


async def test_mark_failed_item(dynamodb: DynamoDBClient, ddb: Any) -> None:
    """FAILED writes status ERROR, endedAt, the figures and the reason."""
    view = await make_store(dynamodb).mark_failed(
        reason="chrome_exited", proxy_bytes=99, usage=Usage(avg_cpu_percent=5, peak_memory_mib=None)
    )
    item = get_item(ddb)
    assert item is not None
    assert (s(item, "internalStatus"), s(item, "status")) == ("FAILED", "ERROR")
    assert "endedAt" in item
    assert "memoryUsage" not in item
    assert item["avgCpuUsage"]["N"] == "5"
    assert history(item)[-1]["detail"]["reason"] == "chrome_exited"
    assert view.released is False


async def test_record_event(dynamodb: DynamoDBClient, ddb: Any) -> None:
    """record_event appends its own eventType and detail without changing the status."""
    await make_store(dynamodb).record_event("ChromeRestarted", {"exitCode": "-9", "restarts": "1"})
    item = get_item(ddb)
    assert item is not None
    assert s(item, "internalStatus") == "PROVISIONING"
    [entry] = history(item)
    assert (entry["eventType"], entry["detail"]) == ("ChromeRestarted", {"exitCode": "-9", "restarts": "1"})


# Heartbeats


async def test_heartbeat_item(dynamodb: DynamoDBClient, ddb: Any) -> None:
    """A heartbeat writes lastHeartbeatAt, updatedAt, proxyBytes, avgCpuUsage and memoryUsage."""
    await make_store(dynamodb).heartbeat(
        proxy_bytes=4096, usage=Usage(avg_cpu_percent=12, peak_memory_mib=300)
    )
    item = get_item(ddb)
    assert item is not None
    assert is_iso_utc(s(item, "lastHeartbeatAt"))
    assert s(item, "updatedAt") == s(item, "lastHeartbeatAt")
    assert figures(item) == ("4096", "12", "300")
    assert "eventHistory" not in item


async def test_heartbeat_skips_unknown_figures(dynamodb: DynamoDBClient, ddb: Any) -> None:
    """A None usage figure leaves the item's previous value in place."""
    store = make_store(dynamodb)
    await store.heartbeat(proxy_bytes=1, usage=Usage(avg_cpu_percent=40, peak_memory_mib=512))
    await store.heartbeat(proxy_bytes=2, usage=NO_USAGE)
    item = get_item(ddb)
    assert item is not None
    assert figures(item) == ("2", "40", "512")


async def test_view_reports_keep_alive_and_expiry(dynamodb: DynamoDBClient, aws_endpoint: str) -> None:
    """The view carries the item's keepAlive and expiresAt as the API wrote them."""
    create_table(aws_endpoint, seed={"keepAlive": {"BOOL": True}, "expiresAt": {"N": "1800000000.5"}})
    view = await make_store(dynamodb).heartbeat(proxy_bytes=0, usage=NO_USAGE)
    assert (view.keep_alive, view.expires_at) == (True, 1800000000.5)


async def test_heartbeat_metrics(dynamodb: DynamoDBClient, ddb: Any) -> None:
    """A written heartbeat is counted and its latency observed."""
    metrics = Metrics()
    await make_store(dynamodb, metrics=metrics).heartbeat(proxy_bytes=0, usage=NO_USAGE)
    assert metrics.registry.get_sample_value("wallcrawler_heartbeat_writes_total") == 1
    count = metrics.registry.get_sample_value(
        "wallcrawler_dynamodb_request_duration_seconds_count", {"operation": "UpdateItem"}
    )
    assert count == 1


# eventHistory


async def test_event_history_keeps_last_entries(dynamodb: DynamoDBClient, ddb: Any) -> None:
    """eventHistory keeps only the last history_limit entries, oldest first."""
    store = make_store(dynamodb, limit=3)
    for index in range(5):
        await store.record_event("Tick", {"index": str(index)})
    item = get_item(ddb)
    assert item is not None
    assert [entry["detail"]["index"] for entry in history(item)] == ["2", "3", "4"]


async def test_event_history_keeps_entries_seeded_by_api(dynamodb: DynamoDBClient, aws_endpoint: str) -> None:
    """Entries the API wrote before the controller started are kept, then ours appended."""
    seeded = {"M": {"eventType": {"S": "SessionCreated"}, "timestamp": {"S": "2026-01-01T00:00:00.000Z"}}}
    ddb = create_table(aws_endpoint, seed={"eventHistory": {"L": [seeded]}})
    await make_store(dynamodb).mark_ready(task_arn=None)
    item = get_item(ddb)
    assert item is not None
    kinds = [entry["M"]["eventType"]["S"] for entry in item["eventHistory"]["L"]]
    assert kinds == ["SessionCreated", "StatusChanged"]


async def test_event_history_that_is_not_a_list_is_replaced(
    dynamodb: DynamoDBClient, aws_endpoint: str
) -> None:
    """An eventHistory of the wrong type is replaced by a list with our entry, in one call."""
    ddb = create_table(aws_endpoint, seed={"eventHistory": {"S": "corrupt"}})
    calls = Calls(dynamodb)
    await make_store(dynamodb).mark_ready(task_arn=None)
    item = get_item(ddb)
    assert item is not None
    assert len(history(item)) == 1
    assert calls.calls == 1


async def test_event_history_keeps_concurrent_append(dynamodb: DynamoDBClient, ddb: Any) -> None:
    """An entry another writer appended between two of our writes survives our next transition."""
    store = make_store(dynamodb)
    await store.mark_ready(task_arn=None)
    theirs = {"M": {"eventType": {"S": "TaskStateChange"}, "timestamp": {"S": "2026-01-01T00:00:01.000Z"}}}
    ddb.update_item(
        TableName=TABLE,
        Key={"sessionId": {"S": SESSION_ID}},
        UpdateExpression="SET eventHistory = list_append(eventHistory, :e)",
        ExpressionAttributeValues={":e": {"L": [theirs]}},
    )
    calls = Calls(dynamodb)
    await store.mark_active()
    item = get_item(ddb)
    assert item is not None
    kinds = [entry["M"]["eventType"]["S"] for entry in item["eventHistory"]["L"]]
    assert kinds == ["StatusChanged", "TaskStateChange", "StatusChanged"]
    assert calls.calls == 2  # the write that met the changed list, and its redo


async def test_overlapping_calls_keep_every_entry(dynamodb: DynamoDBClient, ddb: Any) -> None:
    """A transition, an event and a heartbeat issued at once all land, with both history entries."""
    store = make_store(dynamodb)
    await store.mark_ready(task_arn=None)
    async with anyio.create_task_group() as group:
        group.start_soon(store.mark_active)
        group.start_soon(store.record_event, "ProfileRestoreRejected", {"reason": "too_large"})
        group.start_soon(lambda: store.heartbeat(proxy_bytes=9, usage=NO_USAGE))
    item = get_item(ddb)
    assert item is not None
    assert s(item, "internalStatus") == "ACTIVE"
    assert item["proxyBytes"]["N"] == "9"
    kinds = sorted(entry["eventType"] for entry in history(item)[1:])
    assert kinds == ["ProfileRestoreRejected", "StatusChanged"]


# Release, deletion


async def release(ddb: Any) -> None:
    """Do what the API's sessions-update does on REQUEST_RELEASE."""
    ddb.update_item(
        TableName=TABLE,
        Key={"sessionId": {"S": SESSION_ID}},
        UpdateExpression="SET internalStatus = :s, #st = :c",
        ExpressionAttributeNames={"#st": "status"},
        ExpressionAttributeValues={":s": {"S": "STOPPED"}, ":c": {"S": "COMPLETED"}},
    )


async def test_heartbeat_notices_release(dynamodb: DynamoDBClient, ddb: Any) -> None:
    """A release set from outside shows in the next heartbeat's view."""
    store = make_store(dynamodb)
    await store.mark_active()
    await release(ddb)
    view = await store.heartbeat(proxy_bytes=10, usage=NO_USAGE)
    assert view.released is True
    assert view.internal_status == "STOPPED"


async def test_mark_active_does_not_overwrite_release(dynamodb: DynamoDBClient, ddb: Any) -> None:
    """After a release, mark_active writes nothing and reports the release."""
    store = make_store(dynamodb)
    await store.mark_ready(task_arn=None)
    await release(ddb)
    view = await store.mark_active()
    item = get_item(ddb)
    assert item is not None
    assert view.released is True
    assert (s(item, "internalStatus"), s(item, "status")) == ("STOPPED", "COMPLETED")
    assert "lastActiveAt" not in item
    assert len(history(item)) == 1


async def test_mark_terminating_does_not_overwrite_release(dynamodb: DynamoDBClient, ddb: Any) -> None:
    """After a release, TERMINATING is not written over STOPPED."""
    store = make_store(dynamodb)
    await release(ddb)
    view = await store.mark_terminating("released")
    item = get_item(ddb)
    assert item is not None
    assert view.released is True
    assert s(item, "internalStatus") == "STOPPED"


async def test_final_write_after_release_keeps_api_status(dynamodb: DynamoDBClient, ddb: Any) -> None:
    """A final write after a release keeps the API's status but records endedAt, figures and history."""
    store = make_store(dynamodb)
    await store.mark_active()
    await release(ddb)
    calls = Calls(dynamodb)
    view = await store.mark_failed(reason="late_error", proxy_bytes=77, usage=NO_USAGE)
    item = get_item(ddb)
    assert item is not None
    assert (s(item, "internalStatus"), s(item, "status")) == ("STOPPED", "COMPLETED")
    assert item["proxyBytes"]["N"] == "77"
    assert "endedAt" in item
    assert history(item)[-1]["detail"]["reason"] == "late_error"
    assert view.released is True
    assert calls.calls == 2  # the guarded write found the release, then the status-keeping one


async def test_own_stop_is_not_a_release(dynamodb: DynamoDBClient, ddb: Any) -> None:
    """Heartbeats after our own STOPPED do not report a release."""
    store = make_store(dynamodb)
    await store.mark_stopped(reason="sigterm", timed_out=False, proxy_bytes=0, usage=NO_USAGE)
    view = await store.heartbeat(proxy_bytes=0, usage=NO_USAGE)
    assert view.released is False


async def test_deleted_item_raises_gone_and_is_not_recreated(dynamodb: DynamoDBClient, ddb: Any) -> None:
    """An item deleted mid-session makes every write raise SessionGoneError and nothing is recreated."""
    store = make_store(dynamodb)
    await store.mark_active()
    ddb.delete_item(TableName=TABLE, Key={"sessionId": {"S": SESSION_ID}})
    with pytest.raises(SessionGoneError):
        await store.heartbeat(proxy_bytes=1, usage=NO_USAGE)
    with pytest.raises(SessionGoneError):
        await store.mark_stopped(reason="gone", timed_out=False, proxy_bytes=1, usage=NO_USAGE)
    assert ddb.scan(TableName=TABLE)["Items"] == []


async def test_missing_item_at_start_raises_gone(dynamodb: DynamoDBClient, aws_endpoint: str) -> None:
    """mark_ready on an item that never existed raises SessionGoneError and creates nothing."""
    ddb = create_table(aws_endpoint)
    ddb.delete_item(TableName=TABLE, Key={"sessionId": {"S": SESSION_ID}})
    with pytest.raises(SessionGoneError):
        await make_store(dynamodb).mark_ready(task_arn=None)
    assert ddb.scan(TableName=TABLE)["Items"] == []


# Faults and call counts


async def test_throttling_is_retried(dynamodb: DynamoDBClient, ddb: Any) -> None:
    """Two throttled attempts are retried and the heartbeat lands in one API call."""
    calls = Calls(dynamodb)
    injected = inject_errors(dynamodb, 400, "ProvisionedThroughputExceededException", times=2)
    await make_store(dynamodb).heartbeat(proxy_bytes=5, usage=NO_USAGE)
    item = get_item(ddb)
    assert item is not None
    assert item["proxyBytes"]["N"] == "5"
    assert (injected[0], calls.calls, calls.attempts) == (2, 1, 3)


async def test_server_error_is_retried(dynamodb: DynamoDBClient, ddb: Any) -> None:
    """A 500 from DynamoDB is retried."""
    inject_errors(dynamodb, 500, "InternalServerError", times=1)
    view = await make_store(dynamodb).mark_ready(task_arn=None)
    assert view.internal_status == "READY"


async def test_persistent_failure_raises_store_error(dynamodb: DynamoDBClient, ddb: Any) -> None:
    """Failures beyond the bounded retries raise SessionStoreError and count as heartbeat failures."""
    metrics = Metrics()
    calls = Calls(dynamodb)
    inject_errors(dynamodb, 500, "InternalServerError", times=100)
    store = make_store(dynamodb, metrics=metrics)
    with pytest.raises(SessionStoreError) as caught:
        await store.heartbeat(proxy_bytes=5, usage=NO_USAGE)
    assert not isinstance(caught.value, SessionGoneError)
    assert calls.attempts == 3
    assert store.consecutive_heartbeat_failures == 1
    assert metrics.registry.get_sample_value("wallcrawler_heartbeat_failures_total") == 1


async def test_unreachable_endpoint_fails_within_bound(ddb: Any) -> None:
    """With nothing listening, a write fails with SessionStoreError within a few seconds."""
    session = get_session()
    async with session.create_client(
        "dynamodb",
        endpoint_url="http://127.0.0.1:9",
        region_name="us-east-1",
        config=dynamodb_client_config(0.5),
    ) as client:
        with anyio.fail_after(10), pytest.raises(SessionStoreError):
            await make_store(client).heartbeat(proxy_bytes=0, usage=NO_USAGE)


async def test_dropped_response_does_not_double_count(aws_endpoint: str, ddb: Any) -> None:
    """A heartbeat whose first response is lost is retried; proxyBytes is set, not added, twice."""
    async with DroppingRelay(aws_endpoint) as relay:
        session = get_session()
        async with session.create_client(
            "dynamodb", endpoint_url=relay.url, region_name="us-east-1", config=dynamodb_client_config(2.0)
        ) as client:
            calls = Calls(client)
            await make_store(client).heartbeat(proxy_bytes=100, usage=NO_USAGE)
    item = get_item(ddb)
    assert item is not None
    assert item["proxyBytes"]["N"] == "100"
    assert (relay.dropped, calls.attempts) == (1, 2)


async def test_dropped_response_does_not_duplicate_history(aws_endpoint: str, ddb: Any) -> None:
    """A transition whose first response is lost leaves exactly one history entry."""
    async with DroppingRelay(aws_endpoint) as relay:
        session = get_session()
        async with session.create_client(
            "dynamodb", endpoint_url=relay.url, region_name="us-east-1", config=dynamodb_client_config(2.0)
        ) as client:
            view = await make_store(client).mark_ready(task_arn=None)
    item = get_item(ddb)
    assert item is not None
    assert relay.dropped == 1
    assert len(history(item)) == 1
    assert view.internal_status == "READY"


async def test_one_update_item_per_call(dynamodb: DynamoDBClient, ddb: Any) -> None:
    """A whole session writes exactly one UpdateItem per transition and per heartbeat."""
    calls = Calls(dynamodb)
    store = make_store(dynamodb)
    steps: list[Callable[[], Any]] = [
        lambda: store.mark_ready(task_arn="arn"),
        store.mark_active,
        lambda: store.heartbeat(proxy_bytes=1, usage=NO_USAGE),
        lambda: store.heartbeat(proxy_bytes=2, usage=NO_USAGE),
        store.mark_active,
        lambda: store.record_event("ChromeRestarted", {}),
        lambda: store.heartbeat(proxy_bytes=3, usage=NO_USAGE),
        lambda: store.mark_terminating("sigterm"),
        lambda: store.mark_stopped(reason="sigterm", timed_out=False, proxy_bytes=3, usage=NO_USAGE),
    ]
    for step in steps:
        await step()
    assert (calls.calls, calls.attempts) == (len(steps), len(steps))


def test_client_config_is_bounded() -> None:
    """The client config has short timeouts and standard-mode retries with few attempts."""
    config: Any = dynamodb_client_config(2.0)
    assert (config.connect_timeout, config.read_timeout) == (2.0, 2.0)
    assert config.retries == {"mode": "standard", "total_max_attempts": 3}
