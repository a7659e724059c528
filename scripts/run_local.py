"""Run the controller locally against an embedded moto server, as the platform would start it.

Creates what the session API would have created (the sessions table and a session item, a contexts
bucket, the signing secret), starts ``python -m controller`` with the task's environment, waits for
readiness and prints a connect URL that Playwright uses as-is. Ctrl-C stops the controller with
SIGTERM (as ECS does) and prints the session item's final state.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from datetime import UTC, datetime
from typing import Any

import boto3
import jwt
from moto.server import ThreadedMotoServer

TABLE = "wallcrawler-sessions"
BUCKET = "wallcrawler-contexts-local"
PROJECT = "project_local"


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def _seed(endpoint: str, session_id: str, context_id: str, key: str, ttl: int) -> str:
    """Create the table, the item, the bucket and the secret; return the secret's ARN."""
    kw: dict[str, Any] = {"endpoint_url": endpoint, "region_name": "us-east-1"}
    ddb = boto3.client("dynamodb", **kw)
    ddb.create_table(
        TableName=TABLE,
        KeySchema=[{"AttributeName": "sessionId", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "sessionId", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    now = time.time()
    ddb.put_item(
        TableName=TABLE,
        Item={
            "sessionId": {"S": session_id},
            "projectId": {"S": PROJECT},
            "status": {"S": "RUNNING"},
            "internalStatus": {"S": "PROVISIONING"},
            "createdAt": {"S": _iso(now)},
            "updatedAt": {"S": _iso(now)},
            "expiresAt": {"N": str(int(now + ttl))},
            "keepAlive": {"BOOL": False},
            "contextId": {"S": context_id},
            "contextPersist": {"BOOL": True},
        },
    )
    boto3.client("s3", **kw).create_bucket(Bucket=BUCKET)
    secret = boto3.client("secretsmanager", **kw).create_secret(
        Name="wallcrawler/jwt-signing-key",
        SecretString=json.dumps({"algorithm": "HS256", "signingKey": key}),
    )
    return str(secret["ARN"])


def _token(key: str, session_id: str, ttl: int) -> str:
    now = int(time.time())
    claims = {
        "iss": "wallcrawler",
        "aud": ["cdp-access"],
        "sub": session_id,
        "sessionId": session_id,
        "projectId": PROJECT,
        "iat": now,
        "nbf": now,
        "exp": now + ttl,
        "jti": uuid.uuid4().hex,
    }
    return jwt.encode(claims, key, algorithm="HS256")


def _wait_ready(metrics_port: int, controller: subprocess.Popen[bytes], deadline: float) -> bool:
    while time.monotonic() < deadline:
        if controller.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/readyz", timeout=1) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


def main() -> int:
    """Start moto and the controller; print the connect URL; stop on Ctrl-C."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--proxy-port", type=int, default=9223)
    parser.add_argument("--metrics-port", type=int, default=9464)
    parser.add_argument("--ttl", type=int, default=3600, help="session lifetime (expiresAt) in seconds")
    parser.add_argument("--idle", type=int, default=600, help="CDP_DISCONNECT_TIMEOUT in seconds")
    args = parser.parse_args()
    # SIGTERM to the runner (a supervisor, `timeout`) stops the controller like Ctrl-C does.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's access log

    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    session_id = f"sess_{uuid.uuid4().hex[:8]}"
    context_id = f"ctx_{uuid.uuid4().hex[:8]}"
    key = secrets.token_urlsafe(48)
    fake_aws = {
        "AWS_ACCESS_KEY_ID": "local",
        "AWS_SECRET_ACCESS_KEY": "local",
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }
    os.environ.update({k: v for k, v in fake_aws.items() if k != "AWS_ENDPOINT_URL"})
    secret_arn = _seed(endpoint, session_id, context_id, key, args.ttl)

    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "WALLCRAWLER_"))},
        **fake_aws,
        "SESSION_ID": session_id,
        "PROJECT_ID": PROJECT,
        "SESSIONS_TABLE_NAME": TABLE,
        "CONTEXTS_BUCKET_NAME": BUCKET,
        "CONTEXT_ID": context_id,
        "CONTEXT_S3_KEY": f"{PROJECT}/{context_id}/profile.tar.gz",
        "CONTEXT_PERSIST": "true",
        "WALLCRAWLER_JWT_SIGNING_SECRET_ARN": secret_arn,
        "CDP_PROXY_PORT": str(args.proxy_port),
        "METRICS_PORT": str(args.metrics_port),
        "CDP_DISCONNECT_TIMEOUT": str(args.idle),
        "CDP_FIRST_CONNECT_TIMEOUT": str(args.idle),
    }
    # Its own session: Ctrl-C reaches only this runner, which then sends SIGTERM as ECS would.
    controller = subprocess.Popen([sys.executable, "-m", "controller"], env=env, start_new_session=True)
    try:
        if not _wait_ready(args.metrics_port, controller, time.monotonic() + 60):
            sys.stderr.write("controller did not become ready; see its log lines above\n")
            controller.terminate()
            return controller.wait(timeout=40) or 1
        token = _token(key, session_id, args.ttl)
        url = f"ws://127.0.0.1:{args.proxy_port}?signingKey={token}"
        sys.stderr.write(
            f"\nwallcrawler-controller is ready (session {session_id}).\n\n"
            f"Connect URL:\n{url}\n\n"
            "Playwright (pip install playwright; no browser download needed):\n"
            "  import asyncio\n"
            "  from playwright.async_api import async_playwright\n"
            "  async def main():\n"
            "      async with async_playwright() as p:\n"
            f'          browser = await p.chromium.connect_over_cdp("{url}")\n'
            "          page = browser.contexts[0].pages[0]\n"
            '          await page.goto("https://example.com")\n'
            "          print(await page.title())\n"
            "  asyncio.run(main())\n\n"
            f"Metrics: http://127.0.0.1:{args.metrics_port}/metrics\n"
            "Ctrl-C stops it (SIGTERM, as ECS does).\n\n"
        )
        return controller.wait()
    except KeyboardInterrupt:
        controller.send_signal(signal.SIGTERM)
        code = controller.wait(timeout=60)
        item = boto3.client("dynamodb", endpoint_url=endpoint, region_name="us-east-1").get_item(
            TableName=TABLE, Key={"sessionId": {"S": session_id}}
        )
        final = {k: v for k, v in item.get("Item", {}).items() if k != "eventHistory"}
        sys.stderr.write(
            f"\ncontroller exited with {code}; session item now:\n{json.dumps(final, indent=2)}\n"
        )
        return code
    finally:
        if controller.poll() is None:
            controller.kill()
        moto.stop()


if __name__ == "__main__":
    sys.exit(main())
