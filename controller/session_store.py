"""The session item in DynamoDB: every expression that touches it lives here and nowhere else.

Every write is one ``UpdateItem`` that

- is conditioned on ``attribute_exists(sessionId)``: an item removed by TTL or by the API is never
  recreated (:class:`SessionGoneError` instead);
- returns ``ALL_NEW`` (or ``ALL_OLD`` when its condition fails), so the controller learns what other
  writers did (a release, ``keepAlive``, ``expiresAt``) from its own writes, with no extra reads;
- writes counters as absolute totals with ``SET``: botocore retries a request whose response was lost,
  and a retried ``ADD`` counts twice.

Status rules. ``status`` mirrors ``internalStatus`` (READY/ACTIVE/TERMINATING → RUNNING, STOPPED →
COMPLETED or TIMED_OUT, FAILED → ERROR). The first terminal state wins, whoever writes it: READY,
ACTIVE and TERMINATING are conditioned on the item not being terminal, and a final write that finds
the item terminal (the API released the session) records ``endedAt``, the counters and its history
entry but leaves the API's status alone. A condition that fails on a terminal item is how a release is
seen: the method returns a view with ``released=True`` instead of raising.

``eventHistory`` is rewritten whole on each transition: the store knows the list from the last item
DynamoDB returned, appends one entry, keeps the last ``history_limit`` entries and ``SET``s the list,
conditioned on the list still having the size it knew. DynamoDB cannot append and remove list
elements of one attribute in one expression (the paths overlap), so trimming inside the same write
needs the whole list. The size condition catches another writer's append in between: the failed
write's ``ALL_OLD`` carries the fresh list and the write is redone from it (one extra call, only in
that race). It also makes the write idempotent: when a retried attempt finds the list already equal to
what it would write, its first attempt was applied and only the response was lost.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Final, Protocol, cast

import anyio
from aiobotocore.config import AioConfig
from botocore.exceptions import BotoCoreError, ClientError

from controller.errors import SessionGoneError, SessionStoreError
from controller.logs import get_logger
from controller.metrics import Metrics

if TYPE_CHECKING:
    from types_aiobotocore_dynamodb import DynamoDBClient

__all__ = [
    "EVENT_SOURCE",
    "InternalStatus",
    "SessionStatus",
    "SessionStore",
    "SessionView",
    "UsageFigures",
    "dynamodb_client_config",
]

log = get_logger(__name__)

EVENT_SOURCE: Final = "wallcrawler.controller"
# Rounds of "another writer appended to eventHistory in between"; more than one is already unlikely.
_MAX_CONFLICT_ROUNDS: Final = 3

AttributeValue = dict[str, Any]


class InternalStatus(StrEnum):
    """The controller's lifecycle states, as written to ``internalStatus``."""

    READY = "READY"
    ACTIVE = "ACTIVE"
    TERMINATING = "TERMINATING"
    STOPPED = "STOPPED"
    FAILED = "FAILED"


class SessionStatus(StrEnum):
    """The SDK-visible ``status`` values the controller writes."""

    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    ERROR = "ERROR"
    TIMED_OUT = "TIMED_OUT"


_TERMINAL_INTERNAL: Final = (InternalStatus.STOPPED, InternalStatus.FAILED)
_TERMINAL_STATUS: Final = (SessionStatus.COMPLETED, SessionStatus.ERROR, SessionStatus.TIMED_OUT)


@dataclass(frozen=True, slots=True)
class SessionView:
    """What the controller learns from the item a write returned.

    Attributes:
        internal_status: the item's ``internalStatus``.
        status: the item's ``status``.
        expires_at: the item's ``expiresAt`` (epoch seconds), when present.
        keep_alive: the item's ``keepAlive``; disconnects do not end such a session.
        released: someone else (the API) ended the session while the controller had not written a
            final state itself: the controller should shut down gracefully.
    """

    internal_status: str | None
    status: str | None
    expires_at: float | None
    keep_alive: bool
    released: bool


class UsageFigures(Protocol):
    """The usage figures a write records (``controller.usage.Usage`` has this shape)."""

    @property
    def avg_cpu_percent(self) -> int | None:
        """Average CPU use since start, % of the task's allocation; ``None`` to leave it unwritten."""

    @property
    def peak_memory_mib(self) -> int | None:
        """Peak memory use in MiB; ``None`` to leave it unwritten."""


def dynamodb_client_config(timeout: float) -> AioConfig:
    """The client configuration for the session item's writes.

    botocore's defaults (60 s timeouts, up to 10 legacy-mode attempts) could hold a heartbeat for
    minutes; these bound one call to about ``3 × 2 × timeout`` plus a few seconds of backoff.

    Args:
        timeout: connect and read timeout of one attempt, in seconds (``Config.dynamodb_timeout``).

    Returns:
        An ``AioConfig`` for ``session.create_client("dynamodb", config=...)``.
    """
    return AioConfig(
        connect_timeout=timeout,
        read_timeout=timeout,
        # Standard mode retries throttling, 5xx, timeouts and dropped connections, with jittered backoff.
        retries={"mode": "standard", "total_max_attempts": 3},
    )


def _now() -> str:
    """The current time as ISO 8601 UTC with milliseconds, the way JavaScript's ``toISOString`` writes it."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _s(value: str) -> AttributeValue:
    return {"S": value}


def _n(value: int) -> AttributeValue:
    return {"N": str(value)}


def _string(item: Mapping[str, AttributeValue], name: str) -> str | None:
    value = item.get(name, {}).get("S")
    return value if isinstance(value, str) else None


def _is_terminal(item: Mapping[str, AttributeValue]) -> bool:
    internal, status = _string(item, "internalStatus"), _string(item, "status")
    return internal in _TERMINAL_INTERNAL or status in _TERMINAL_STATUS


def _history(item: Mapping[str, AttributeValue]) -> list[AttributeValue]:
    value = item.get("eventHistory", {}).get("L")
    return list(value) if isinstance(value, list) else []


@dataclass(frozen=True, slots=True)
class _Write:
    """One intended change of the item.

    Attributes:
        fields: attribute name → value to ``SET``.
        event: an ``eventHistory`` entry to append, if any.
        guarded: condition on the item not being terminal.
        sets_terminal: writes a terminal ``internalStatus``/``status`` of our own.
        if_terminal: what to write instead when the guard finds the item terminal; ``None`` writes
            nothing and reports the release.
    """

    fields: dict[str, AttributeValue]
    event: AttributeValue | None = None
    guarded: bool = False
    sets_terminal: bool = False
    if_terminal: _Write | None = None


class SessionStore:
    """Writes this task's session item; one ``UpdateItem`` per call in the normal case.

    Calls may overlap (a heartbeat in flight while a client connects). Writes that append to
    ``eventHistory`` take turns behind a lock, so this store never races itself over the list (the
    conditions still catch other writers); heartbeats and reconnects never wait for them.

    Args:
        client: an aiobotocore DynamoDB client, built with :func:`dynamodb_client_config`.
        table: the sessions table (``Config.sessions_table``).
        session_id: the item's key.
        history_limit: entries of ``eventHistory`` kept (``Config.event_history_limit``).
        metrics: receives call latencies and heartbeat outcomes.

    Raises:
        ValueError: ``history_limit`` is below 1.
    """

    def __init__(
        self,
        client: DynamoDBClient,
        table: str,
        session_id: str,
        *,
        history_limit: int,
        metrics: Metrics,
    ) -> None:
        if history_limit < 1:
            raise ValueError("history_limit must be at least 1")
        self._client = client
        self._table = table
        self._session_id = session_id
        self._history_limit = history_limit
        self._metrics = metrics
        # From the last item DynamoDB returned; None until the first write.
        self._known_history: list[AttributeValue] | None = None
        self._known_internal: str | None = None
        self._known_terminal = False
        # True once one of our writes set a terminal status: from then on a terminal item is ours,
        # not a release.
        self._final_written = False
        self._release_logged = False
        self._consecutive_failures = 0
        self._history_lock = anyio.Lock()

    @property
    def consecutive_heartbeat_failures(self) -> int:
        """Heartbeats that failed in a row (0 after a success)."""
        return self._consecutive_failures

    async def mark_ready(self, *, task_arn: str | None) -> SessionView:
        """Record that Chromium is usable and the proxy listens (``READY``, ``readyAt``, ``ecsTaskArn``).

        Args:
            task_arn: the ECS task's ARN, when the task metadata gave it.

        Returns:
            The item as written, or with ``released=True`` (and unchanged) when it is already terminal.

        Raises:
            SessionGoneError: the item does not exist.
            SessionStoreError: DynamoDB failed after retries.
        """
        now = _now()
        fields = self._status_fields(InternalStatus.READY, SessionStatus.RUNNING, now)
        fields["readyAt"] = _s(now)
        if task_arn:
            fields["ecsTaskArn"] = _s(task_arn)
        return await self._transition(InternalStatus.READY, fields, now, {}, guarded=True)

    async def mark_active(self) -> SessionView:
        """Record a client connection (``ACTIVE``, ``lastActiveAt``).

        The first connection is a transition with a history entry; later ones (reconnects) only move
        ``lastActiveAt``.

        Returns:
            The item as written, or with ``released=True`` (and unchanged) when it is already terminal.

        Raises:
            SessionGoneError: the item does not exist.
            SessionStoreError: DynamoDB failed after retries.
        """
        now = _now()
        fields = self._status_fields(InternalStatus.ACTIVE, SessionStatus.RUNNING, now)
        fields["lastActiveAt"] = _s(now)
        if self._known_internal == InternalStatus.ACTIVE:
            return await self._update(_Write(fields, guarded=True))
        return await self._transition(InternalStatus.ACTIVE, fields, now, {}, guarded=True)

    async def mark_terminating(self, reason: str) -> SessionView:
        """Record that shutdown started (``TERMINATING``).

        Args:
            reason: why (``sigterm``, ``disconnect_timeout``, ``released``…), kept in the history entry.

        Returns:
            The item as written, or with ``released=True`` (and unchanged) when it is already terminal.

        Raises:
            SessionGoneError: the item does not exist.
            SessionStoreError: DynamoDB failed after retries.
        """
        now = _now()
        fields = self._status_fields(InternalStatus.TERMINATING, SessionStatus.RUNNING, now)
        extra = {"reason": reason}
        return await self._transition(InternalStatus.TERMINATING, fields, now, extra, guarded=True)

    async def mark_stopped(
        self, *, reason: str, timed_out: bool, proxy_bytes: int, usage: UsageFigures
    ) -> SessionView:
        """Record the end of a session (``STOPPED``, ``status`` ``COMPLETED`` or ``TIMED_OUT``, ``endedAt``).

        Args:
            reason: why it ended, kept in the history entry.
            timed_out: the session's ``expiresAt`` was reached (``status`` ``TIMED_OUT``).
            proxy_bytes: total bytes relayed by the proxy.
            usage: final CPU and memory figures (``None`` figures are left as they are).

        Returns:
            The item as written. When it was already terminal (released by the API), its status is
            kept and only ``endedAt``, the figures and the history entry are written.

        Raises:
            SessionGoneError: the item does not exist.
            SessionStoreError: DynamoDB failed after retries.
        """
        status = SessionStatus.TIMED_OUT if timed_out else SessionStatus.COMPLETED
        return await self._final(InternalStatus.STOPPED, status, reason, proxy_bytes, usage)

    async def mark_failed(self, *, reason: str, proxy_bytes: int, usage: UsageFigures) -> SessionView:
        """Record an unrecoverable error (``FAILED``/``ERROR``, ``endedAt``).

        Args:
            reason: what failed, kept in the history entry.
            proxy_bytes: total bytes relayed by the proxy.
            usage: final CPU and memory figures (``None`` figures are left as they are).

        Returns:
            The item as written. When it was already terminal, its status is kept.

        Raises:
            SessionGoneError: the item does not exist.
            SessionStoreError: DynamoDB failed after retries.
        """
        return await self._final(InternalStatus.FAILED, SessionStatus.ERROR, reason, proxy_bytes, usage)

    async def record_event(self, event_type: str, detail: dict[str, str]) -> SessionView:
        """Append an event that is not a status change (a rejected profile, a Chromium restart).

        Args:
            event_type: the entry's ``eventType`` (``ProfileRestoreRejected``, ``ChromeRestarted``…).
            detail: string fields of the entry's ``detail`` map.

        Returns:
            The item as written.

        Raises:
            SessionGoneError: the item does not exist.
            SessionStoreError: DynamoDB failed after retries.
        """
        now = _now()
        event = self._event(event_type, now, detail)
        return await self._update(_Write({"updatedAt": _s(now), "lastEventTimestamp": _s(now)}, event=event))

    async def heartbeat(self, *, proxy_bytes: int, usage: UsageFigures) -> SessionView:
        """Write ``lastHeartbeatAt``, ``updatedAt``, ``proxyBytes`` and the usage figures.

        Unconditioned on the status (only on the item existing), so the figures stay current after a
        release too; the returned view says whether a release happened.

        Args:
            proxy_bytes: total bytes relayed by the proxy (written as an absolute value).
            usage: CPU and memory figures; a ``None`` figure is not written.

        Returns:
            The item as written.

        Raises:
            SessionGoneError: the item does not exist.
            SessionStoreError: DynamoDB failed after retries (counted and logged here).
        """
        now = _now()
        fields = {"lastHeartbeatAt": _s(now), "updatedAt": _s(now), **self._figures(proxy_bytes, usage)}
        try:
            view = await self._update(_Write(fields))
        except SessionGoneError:
            raise
        except SessionStoreError as exc:
            self._consecutive_failures += 1
            self._metrics.heartbeat_failures.inc()
            log.warning("heartbeat_failed", consecutive_failures=self._consecutive_failures, error=str(exc))
            raise
        if self._consecutive_failures:
            log.info("heartbeat_recovered", after_failures=self._consecutive_failures)
        self._consecutive_failures = 0
        self._history_lock = anyio.Lock()
        self._metrics.heartbeats.inc()
        return view

    # Building writes

    @staticmethod
    def _status_fields(
        internal: InternalStatus, status: SessionStatus, now: str
    ) -> dict[str, AttributeValue]:
        return {"internalStatus": _s(internal), "status": _s(status), "updatedAt": _s(now)}

    @staticmethod
    def _figures(proxy_bytes: int, usage: UsageFigures) -> dict[str, AttributeValue]:
        fields = {"proxyBytes": _n(int(proxy_bytes))}
        if usage.avg_cpu_percent is not None:
            fields["avgCpuUsage"] = _n(int(usage.avg_cpu_percent))
        if usage.peak_memory_mib is not None:
            fields["memoryUsage"] = _n(int(usage.peak_memory_mib))
        return fields

    def _event(self, event_type: str, now: str, detail: Mapping[str, str]) -> AttributeValue:
        return {
            "M": {
                "eventType": _s(event_type),
                "timestamp": _s(now),
                "source": _s(EVENT_SOURCE),
                "detail": {"M": {key: _s(str(value)) for key, value in detail.items()}},
            }
        }

    def _status_event(self, new: InternalStatus, now: str, extra: Mapping[str, str]) -> AttributeValue:
        # The platform's own StatusChanged shape (reference/sessions-table-v1.md), plus our fields.
        detail = {"sessionId": self._session_id, "newStatus": str(new), **extra}
        if self._known_internal:
            detail["previousStatus"] = self._known_internal
        return self._event("StatusChanged", now, detail)

    async def _transition(
        self,
        new: InternalStatus,
        fields: dict[str, AttributeValue],
        now: str,
        extra: Mapping[str, str],
        *,
        guarded: bool,
    ) -> SessionView:
        fields["lastEventTimestamp"] = _s(now)
        event = self._status_event(new, now, extra)
        return await self._update(_Write(fields, event=event, guarded=guarded))

    async def _final(
        self,
        internal: InternalStatus,
        status: SessionStatus,
        reason: str,
        proxy_bytes: int,
        usage: UsageFigures,
    ) -> SessionView:
        now = _now()
        common = {
            "endedAt": _s(now),
            "updatedAt": _s(now),
            "lastEventTimestamp": _s(now),
            **self._figures(proxy_bytes, usage),
        }
        event = self._status_event(internal, now, {"reason": reason, "sdkStatus": str(status)})
        # If the item is (or turns out to be) terminal already, the first terminal state stays.
        keep_status = _Write(common, event=event)
        if self._known_terminal:
            return await self._update(keep_status)
        own_status = {**common, "internalStatus": _s(internal), "status": _s(status)}
        return await self._update(
            _Write(own_status, event=event, guarded=True, sets_terminal=True, if_terminal=keep_status)
        )

    # Writing

    async def _update(self, write: _Write) -> SessionView:
        if write.event is None:
            return await self._update_unlocked(write)
        async with self._history_lock:
            return await self._update_unlocked(write)

    async def _update_unlocked(self, write: _Write) -> SessionView:
        for _ in range(_MAX_CONFLICT_ROUNDS):
            names: dict[str, str] = {"#sessionId": "sessionId"}
            values: dict[str, AttributeValue] = {}
            assignments: list[str] = []
            conditions = ["attribute_exists(#sessionId)"]
            for name, value in write.fields.items():
                names[f"#{name}"] = name
                values[f":{name}"] = value
                assignments.append(f"#{name} = :{name}")
            expected: list[AttributeValue] | None = None
            if write.event is not None:
                known = self._known_history or []
                expected = [*known, write.event][-self._history_limit :]
                names["#eventHistory"] = "eventHistory"
                values[":eventHistory"] = {"L": expected}
                values[":historySize"] = _n(len(known))
                assignments.append("#eventHistory = :eventHistory")
                if known:
                    conditions.append("size(#eventHistory) = :historySize")
                else:
                    # Missing, or not a list at all (then it is replaced): nothing to keep.
                    values[":list"] = _s("L")
                    conditions.append(
                        "(NOT attribute_type(#eventHistory, :list) OR size(#eventHistory) = :historySize)"
                    )
            if write.guarded:
                names["#internalStatus"] = "internalStatus"
                names["#status"] = "status"
                values.update({f":terminal{i}": _s(v) for i, v in enumerate(_TERMINAL_INTERNAL)})
                values.update({f":final{i}": _s(v) for i, v in enumerate(_TERMINAL_STATUS)})
                internal = ", ".join(f":terminal{i}" for i in range(len(_TERMINAL_INTERNAL)))
                final = ", ".join(f":final{i}" for i in range(len(_TERMINAL_STATUS)))
                conditions.append(f"NOT (#internalStatus IN ({internal}) OR #status IN ({final}))")

            item, failed = await self._call(
                UpdateExpression="SET " + ", ".join(assignments),
                ConditionExpression=" AND ".join(conditions),
                ExpressionAttributeNames=names,
                ExpressionAttributeValues=values,
            )
            if not failed:
                return self._observe(item, wrote_terminal=write.sets_terminal)
            if not item:
                raise SessionGoneError(f"session item {self._session_id} no longer exists")
            if expected is not None and _history(item) == expected:
                # A retried attempt found our own entry already there: the first attempt was applied
                # and only its response was lost. ALL_OLD is the item as that attempt left it.
                return self._observe(item, wrote_terminal=write.sets_terminal)
            self._observe(item, wrote_terminal=False)
            if write.guarded and _is_terminal(item):
                if write.if_terminal is None:
                    log.info("session_write_skipped", internal_status=_string(item, "internalStatus"))
                    return self._view(item)
                write = write.if_terminal
                continue
            # Another writer changed eventHistory since we last saw it: redo from the fresh list.
            log.info("session_history_conflict", known=len(self._known_history or []))
        raise SessionStoreError(f"session item {self._session_id}: eventHistory kept changing under us")

    async def _call(self, **kwargs: Any) -> tuple[dict[str, AttributeValue], bool]:
        """One ``UpdateItem``: (``ALL_NEW``, False), or (``ALL_OLD``, True) when the condition failed."""
        started = time.perf_counter()
        try:
            response = await self._client.update_item(
                TableName=self._table,
                Key={"sessionId": _s(self._session_id)},
                ReturnValues="ALL_NEW",
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
                **kwargs,
            )
        except ClientError as exc:
            error = exc.response.get("Error", {})
            if error.get("Code") == "ConditionalCheckFailedException":
                # botocore's error type does not declare the ALL_OLD item it carries.
                old = cast(Mapping[str, Any], exc.response).get("Item")
                return (dict(old) if isinstance(old, Mapping) else {}), True
            raise SessionStoreError(
                f"UpdateItem on {self._table} failed: {error.get('Code')}: {error.get('Message')}"
            ) from exc
        except BotoCoreError as exc:
            # Connection errors and timeouts that outlived the client's retries.
            raise SessionStoreError(f"UpdateItem on {self._table} failed: {exc}") from exc
        finally:
            self._metrics.dynamodb_seconds.labels("UpdateItem").observe(time.perf_counter() - started)
        return dict(cast(Mapping[str, AttributeValue], response.get("Attributes") or {})), False

    def _observe(self, item: Mapping[str, AttributeValue], *, wrote_terminal: bool) -> SessionView:
        if wrote_terminal:
            self._final_written = True
        self._known_history = _history(item)
        self._known_internal = _string(item, "internalStatus")
        self._known_terminal = _is_terminal(item)
        return self._view(item)

    def _view(self, item: Mapping[str, AttributeValue]) -> SessionView:
        released = _is_terminal(item) and not self._final_written
        if released and not self._release_logged:
            self._release_logged = True
            log.info(
                "session_released_elsewhere",
                internal_status=_string(item, "internalStatus"),
                status=_string(item, "status"),
            )
        expires: float | None = None
        raw = item.get("expiresAt", {}).get("N")
        if isinstance(raw, str):
            try:
                expires = float(raw)
            except ValueError:
                expires = None
        return SessionView(
            internal_status=_string(item, "internalStatus"),
            status=_string(item, "status"),
            expires_at=expires,
            keep_alive=item.get("keepAlive", {}).get("BOOL") is True,
            released=released,
        )
