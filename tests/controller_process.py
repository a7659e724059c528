"""The real controller as a subprocess (``python -m controller``) against the moto server.

Used by the end-to-end tests of the lifecycle, metrics and logs: it seeds what the session API would
have created, starts the controller with a task's environment (ports 0), learns the bound ports from
its JSON log lines, and keeps every stdout line for the tests to inspect.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt

from tests.conftest import boto_client

ROOT = Path(__file__).resolve().parent.parent
TABLE = "wallcrawler-sessions"
PROJECT = "project_test"


def iso(ts: float) -> str:
    """ISO 8601 UTC, as the platform writes timestamps."""
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def create_sessions_table(endpoint: str) -> None:
    """Create the sessions table as the platform's stack does (idempotent)."""
    ddb = boto_client("dynamodb", endpoint)
    if TABLE in ddb.list_tables()["TableNames"]:
        return
    ddb.create_table(
        TableName=TABLE,
        KeySchema=[{"AttributeName": "sessionId", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "sessionId", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )


def seed_session(endpoint: str, session_id: str, *, ttl: float = 3600, keep_alive: bool = False) -> None:
    """Put the session item as sessions-create and ecs-task-processor would have left it."""
    create_sessions_table(endpoint)
    now = time.time()
    boto_client("dynamodb", endpoint).put_item(
        TableName=TABLE,
        Item={
            "sessionId": {"S": session_id},
            "projectId": {"S": PROJECT},
            "status": {"S": "RUNNING"},
            "internalStatus": {"S": "PROVISIONING"},
            "createdAt": {"S": iso(now)},
            "updatedAt": {"S": iso(now)},
            "expiresAt": {"N": str(int(now + ttl))},
            "keepAlive": {"BOOL": keep_alive},
        },
    )


def get_item(endpoint: str, session_id: str) -> dict[str, Any] | None:
    """The session item as DynamoDB holds it now (None when deleted)."""
    response = boto_client("dynamodb", endpoint).get_item(
        TableName=TABLE, Key={"sessionId": {"S": session_id}}, ConsistentRead=True
    )
    item: dict[str, Any] | None = response.get("Item")
    return item


def make_token(key: str, session_id: str, **overrides: Any) -> str:
    """A valid signingKey for ``session_id``; ``overrides`` replace or (with None) drop claims."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": "wallcrawler",
        "aud": ["cdp-access"],
        "sub": session_id,
        "sessionId": session_id,
        "projectId": PROJECT,
        "iat": now,
        "nbf": now,
        "exp": now + 600,
        "jti": uuid.uuid4().hex,
    }
    for name, value in overrides.items():
        if value is None:
            claims.pop(name, None)
        else:
            claims[name] = value
    return jwt.encode(claims, key, algorithm="HS256")


@dataclass
class ControllerProcess:
    """A running controller and what it has printed so far."""

    process: subprocess.Popen[str]
    session_id: str
    key: str
    endpoint: str
    lines: list[str] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._lock:
                self.lines.append(line)
                try:
                    self.events.append(json.loads(line))
                except ValueError:
                    self.events.append({"event": "<not json>", "line": line})

    def wait_event(self, name: str, timeout: float = 30.0, **fields: Any) -> dict[str, Any]:
        """Wait until the controller logs ``name`` (with matching fields) and return that line."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                for event in self.events:
                    if event.get("event") == name and all(event.get(k) == v for k, v in fields.items()):
                        return event
            if self.process.poll() is not None:
                time.sleep(0.2)  # let the pump read the last lines
                with self._lock:
                    for event in self.events:
                        if event.get("event") == name and all(event.get(k) == v for k, v in fields.items()):
                            return event
                raise AssertionError(f"controller exited ({self.process.returncode}) before logging {name}")
            time.sleep(0.05)
        raise AssertionError(f"controller did not log {name} within {timeout} s")

    @property
    def proxy_port(self) -> int:
        """The bound proxy port."""
        return int(self.wait_event("proxy_listening")["port"])

    @property
    def metrics_port(self) -> int:
        """The bound metrics port."""
        return int(self.wait_event("metrics_listening")["port"])

    def token(self, **overrides: Any) -> str:
        """A valid token for this session (see :func:`make_token`)."""
        return make_token(self.key, self.session_id, **overrides)

    def ws_url(self, **overrides: Any) -> str:
        """The connect URL a customer gets."""
        return f"ws://127.0.0.1:{self.proxy_port}?signingKey={self.token(**overrides)}"

    def item(self) -> dict[str, Any] | None:
        """The session item now."""
        return get_item(self.endpoint, self.session_id)

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Send ``sig`` and wait for the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=timeout)


def controller_env(
    endpoint: str, session_id: str, key: str, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """A task's environment for the controller, pointed at moto, every port chosen by the OS."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "WALLCRAWLER_", "CONTEXT"))}
    return {
        **base,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "SESSION_ID": session_id,
        "PROJECT_ID": PROJECT,
        "SESSIONS_TABLE_NAME": TABLE,
        "WALLCRAWLER_JWT_SIGNING_KEY": key,
        "CDP_PROXY_PORT": "0",
        "METRICS_PORT": "0",
        "CHROME_DEBUG_PORT": "0",
        "CDP_HEALTH_CHECK_INTERVAL": "1",
        "PYTHONUNBUFFERED": "1",
        **(extra or {}),
    }


@contextmanager
def run_controller(
    endpoint: str,
    *,
    env: Mapping[str, str] | None = None,
    seed: bool = True,
    ttl: float = 3600,
    keep_alive: bool = False,
    wait_ready: bool = True,
) -> Iterator[ControllerProcess]:
    """Start ``python -m controller``; stop it (SIGTERM, then SIGKILL) when the block ends."""
    session_id = f"sess_{uuid.uuid4().hex[:8]}"
    key = secrets.token_urlsafe(40)
    if seed:
        seed_session(endpoint, session_id, ttl=ttl, keep_alive=keep_alive)
    process = subprocess.Popen(
        [sys.executable, "-m", "controller"],
        cwd=ROOT,
        env=controller_env(endpoint, session_id, key, env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    handle = ControllerProcess(process, session_id, key, endpoint)
    pump = threading.Thread(target=handle._pump, daemon=True)
    pump.start()
    try:
        if wait_ready:
            handle.wait_event("session_ready", timeout=60)
        yield handle
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        pump.join(timeout=5)
        if process.stdout is not None:
            process.stdout.close()
