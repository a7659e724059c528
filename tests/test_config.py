"""Configuration: defaults, every bad variable named, all problems at once, exit code 2 at start-up."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from controller.config import Config, Secret, load_config
from controller.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
KEY = "k" * 32
SHORT_KEY = "short-but-secret-key-123"
CHROMIUM = "chromium"


def env(**values: str) -> dict[str, str]:
    """A minimal valid environment with ``values`` applied."""
    base = {"SESSION_ID": "sess_abc123", "WALLCRAWLER_JWT_SIGNING_KEY": KEY, "PATH": os.environ["PATH"]}
    base.update(values)
    return base


def problems(**values: str) -> list[str]:
    """The problems ``load_config`` reports for ``env(**values)``."""
    with pytest.raises(ConfigError) as error:
        load_config(env(**values))
    return error.value.problems


def test_defaults_follow_the_contract() -> None:
    """With only the required variables, every setting has CONTRACT.md's default."""
    config = load_config(env())
    assert config.session_id == "sess_abc123"
    assert config.project_id is None
    assert config.sessions_table == "wallcrawler-sessions"
    assert config.context is None
    assert config.proxy.port == 9223
    assert config.proxy.disconnect_timeout == 120
    assert config.health_check_interval == 10
    assert config.metrics_port == 9464
    assert config.chrome.debug_port == 9222
    assert config.shutdown.stop_timeout == 30
    assert config.signing_secret_arn is None
    assert config.signing_key == Secret(KEY)
    assert config.jwt_leeway <= 60


def test_chrome_binary_found_on_path() -> None:
    """Without CHROME_BINARY the first of chromium, chromium-browser, google-chrome on PATH is used."""
    found = shutil.which(CHROMIUM)
    if found is None:
        pytest.skip("Chromium is not installed")
    assert load_config(env()).chrome.binary == Path(found)


def test_every_contract_variable_is_read() -> None:
    """Each variable of the contract's table lands in the configuration."""
    config = load_config(
        env(
            PROJECT_ID="proj_1",
            SESSIONS_TABLE_NAME="sessions-test",
            CONTEXTS_BUCKET_NAME="bucket",
            CONTEXT_ID="ctx_1",
            CONTEXT_S3_KEY="proj_1/ctx_1/profile.tar.gz",
            CONTEXT_PERSIST="true",
            CDP_PROXY_PORT="10001",
            CDP_DISCONNECT_TIMEOUT="45",
            CDP_HEALTH_CHECK_INTERVAL="3",
            WALLCRAWLER_JWT_SIGNING_SECRET_ARN="arn:aws:secretsmanager:us-east-1:123:secret:jwt",
            AWS_REGION="eu-west-1",
            AWS_ENDPOINT_URL="http://127.0.0.1:5000",
            ECS_CONTAINER_METADATA_URI_V4="http://169.254.170.2/v4/abc",
            METRICS_PORT="10002",
            CHROME_DEBUG_PORT="10003",
            CHROME_BINARY=sys.executable,
            STOP_TIMEOUT="60",
        )
    )
    assert config.project_id == "proj_1"
    assert config.sessions_table == "sessions-test"
    assert config.context is not None
    assert (config.context.bucket, config.context.context_id) == ("bucket", "ctx_1")
    assert config.context.s3_key == "proj_1/ctx_1/profile.tar.gz"
    assert config.context.persist is True
    assert (config.proxy.port, config.metrics_port, config.chrome.debug_port) == (10001, 10002, 10003)
    assert config.proxy.disconnect_timeout == 45
    assert config.health_check_interval == 3
    assert config.signing_secret_arn == "arn:aws:secretsmanager:us-east-1:123:secret:jwt"
    assert config.aws_region == "eu-west-1"
    assert config.aws_endpoint_url == "http://127.0.0.1:5000"
    assert config.ecs_metadata_uri == "http://169.254.170.2/v4/abc"
    assert config.chrome.binary == Path(sys.executable)
    assert config.shutdown.stop_timeout == 60


def test_config_is_frozen() -> None:
    """The parsed configuration cannot be changed afterwards."""
    config = load_config(env())
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.session_id = "sess_other"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.proxy.port = 1  # type: ignore[misc]


def test_signing_key_never_shows_itself() -> None:
    """The signing key appears in no repr or str of the configuration."""
    config = load_config(env())
    assert isinstance(config, Config)
    assert KEY not in repr(config)
    assert KEY not in str(config.signing_key)
    assert config.signing_key is not None and config.signing_key.reveal() == KEY


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SESSION_ID", "abc"),
        ("SESSION_ID", "sess_"),
        ("SESSION_ID", "sess_a/../b"),
        ("CDP_PROXY_PORT", "http"),
        ("CDP_PROXY_PORT", "70000"),
        ("CDP_PROXY_PORT", "-1"),
        ("METRICS_PORT", "9464.5"),
        ("CHROME_DEBUG_PORT", "x"),
        ("CDP_DISCONNECT_TIMEOUT", "soon"),
        ("CDP_DISCONNECT_TIMEOUT", "0"),
        ("CDP_HEALTH_CHECK_INTERVAL", "-5"),
        ("STOP_TIMEOUT", "500"),
        ("STOP_TIMEOUT", "thirty"),
        ("CONTEXT_PERSIST", "maybe"),
        ("CHROME_BINARY", "/nonexistent/chromium"),
        ("LOG_LEVEL", "verbose"),
        ("JWT_LEEWAY", "3600"),
        ("CONTEXT_S3_KEY", "../escape"),
    ],
)
def test_bad_variable_is_named(name: str, value: str) -> None:
    """A bad value stops the configuration with a problem naming the variable."""
    extra = {name: value}
    if name == "CONTEXT_S3_KEY":
        extra |= {"CONTEXTS_BUCKET_NAME": "bucket", "CONTEXT_ID": "ctx"}
    found = problems(**extra)
    assert any(name in problem for problem in found), found


def test_session_id_required() -> None:
    """A missing SESSION_ID is named."""
    config_env = env()
    del config_env["SESSION_ID"]
    with pytest.raises(ConfigError) as error:
        load_config(config_env)
    assert any("SESSION_ID" in problem for problem in error.value.problems)


def test_no_signing_key_no_start() -> None:
    """Without a signing key or secret ARN the configuration fails closed, naming both variables."""
    config_env = env()
    del config_env["WALLCRAWLER_JWT_SIGNING_KEY"]
    with pytest.raises(ConfigError) as error:
        load_config(config_env)
    [problem] = error.value.problems
    assert "WALLCRAWLER_JWT_SIGNING_SECRET_ARN" in problem and "WALLCRAWLER_JWT_SIGNING_KEY" in problem


def test_empty_signing_key_counts_as_missing() -> None:
    """An empty WALLCRAWLER_JWT_SIGNING_KEY is no key at all."""
    assert any("WALLCRAWLER_JWT_SIGNING_KEY" in p for p in problems(WALLCRAWLER_JWT_SIGNING_KEY=""))


def test_short_signing_key_refused_without_echoing_it() -> None:
    """A key shorter than 32 bytes is refused; the message names the variable, not the key."""
    found = problems(WALLCRAWLER_JWT_SIGNING_KEY=SHORT_KEY)
    assert any("WALLCRAWLER_JWT_SIGNING_KEY" in problem and "32" in problem for problem in found)
    assert all(SHORT_KEY not in problem for problem in found)


def test_secret_arn_alone_is_enough() -> None:
    """A secret ARN without a literal key is a valid configuration (the key is fetched at start)."""
    config_env = env(WALLCRAWLER_JWT_SIGNING_SECRET_ARN="arn:aws:secretsmanager:us-east-1:1:secret:x")
    del config_env["WALLCRAWLER_JWT_SIGNING_KEY"]
    config = load_config(config_env)
    assert config.signing_key is None
    assert config.signing_secret_arn == "arn:aws:secretsmanager:us-east-1:1:secret:x"


def test_all_problems_listed_at_once() -> None:
    """Several bad variables are all reported by one failure, each named."""
    bad = {
        "SESSION_ID": "nope",
        "CDP_PROXY_PORT": "http",
        "METRICS_PORT": "99999",
        "CDP_DISCONNECT_TIMEOUT": "soon",
        "CONTEXT_PERSIST": "maybe",
    }
    found = problems(**bad)
    for name in bad:
        assert sum(name in problem for problem in found) >= 1, (name, found)
    assert len(found) >= len(bad)
    assert all(name in str(ConfigError(found)) for name in bad)


@pytest.mark.parametrize("name", ["CONTEXTS_BUCKET_NAME", "CONTEXT_ID", "CONTEXT_S3_KEY"])
def test_partial_context_names_the_missing_variables(name: str) -> None:
    """Only one of the three CONTEXT_* variables set: the other two are named as missing."""
    found = problems(**{name: "value"})
    missing = {"CONTEXTS_BUCKET_NAME", "CONTEXT_ID", "CONTEXT_S3_KEY"} - {name}
    assert any(all(other in problem for other in missing) for problem in found), found


def test_persist_without_context_refused() -> None:
    """CONTEXT_PERSIST=true without a context to persist is a configuration error."""
    assert any("CONTEXT_PERSIST" in problem for problem in problems(CONTEXT_PERSIST="true"))


def test_context_persist_defaults_to_false() -> None:
    """All three CONTEXT_* variables enable the context; persisting stays off unless asked."""
    config = load_config(env(CONTEXTS_BUCKET_NAME="b", CONTEXT_ID="c", CONTEXT_S3_KEY="p/c/profile.tar.gz"))
    assert config.context is not None and config.context.persist is False


def test_stop_timeout_too_short_for_the_shutdown_steps() -> None:
    """STOP_TIMEOUT shorter than the sum of the shutdown steps' bounds is refused, naming it."""
    found = problems(STOP_TIMEOUT="5")
    assert any(problem.startswith("STOP_TIMEOUT") for problem in found), found


def test_stop_timeout_budget_counts_the_upload_only_when_persisting() -> None:
    """A budget enough without persisting fails once the profile upload is added to the steps."""
    budget = load_config(env()).shutdown
    just_enough = str(budget.required(persist=False))
    assert load_config(env(STOP_TIMEOUT=just_enough)).shutdown.stop_timeout == float(just_enough)
    context = {"CONTEXTS_BUCKET_NAME": "b", "CONTEXT_ID": "c", "CONTEXT_S3_KEY": "p/c/profile.tar.gz"}
    found = problems(STOP_TIMEOUT=just_enough, CONTEXT_PERSIST="true", **context)
    assert any(
        problem.startswith("STOP_TIMEOUT") and "CONTEXT_UPLOAD_TIMEOUT" in problem for problem in found
    )


def test_default_budget_fits_the_default_stop_timeout() -> None:
    """The default step bounds, upload included, fit ECS's default 30 s stop timeout."""
    budget = load_config(env()).shutdown
    assert budget.required(persist=True) <= budget.stop_timeout == 30


def test_ports_must_differ() -> None:
    """The proxy, metrics and DevTools ports may not collide."""
    found = problems(CDP_PROXY_PORT="9222")
    assert any("CDP_PROXY_PORT" in problem and "CHROME_DEBUG_PORT" in problem for problem in found)


def test_port_zero_allowed_for_tests() -> None:
    """Port 0 (any free port) is accepted for every port, repeated."""
    config = load_config(env(CDP_PROXY_PORT="0", METRICS_PORT="0", CHROME_DEBUG_PORT="0"))
    assert (config.proxy.port, config.metrics_port, config.chrome.debug_port) == (0, 0, 0)


def _run_controller(extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    process_env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root")}
    process_env |= {"SESSION_ID": "sess_abc123", "WALLCRAWLER_JWT_SIGNING_KEY": KEY} | extra
    return subprocess.run(
        [sys.executable, "-m", "controller"],
        env={k: v for k, v in process_env.items() if v},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_bad_environment_exits_2_with_one_json_line() -> None:
    """``python -m controller`` with a bad variable exits 2 and logs one JSON line naming it."""
    done = _run_controller({"CDP_PROXY_PORT": "http"})
    assert done.returncode == 2, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1, done.stdout
    record = json.loads(lines[0])
    assert record["level"] == "error"
    assert any("CDP_PROXY_PORT" in problem for problem in record["problems"])


def test_bad_environment_starts_nothing(tmp_path: Path) -> None:
    """A configuration error stops the process before anything (Chromium first of all) is started."""
    marker = tmp_path / "started"
    fake_chrome = tmp_path / "chrome"
    fake_chrome.write_text(f"#!/bin/sh\ntouch {marker}\nexec sleep 30\n")
    fake_chrome.chmod(0o755)
    done = _run_controller({"CHROME_BINARY": str(fake_chrome), "METRICS_PORT": "nope"})
    assert done.returncode == 2
    assert "METRICS_PORT" in done.stdout
    assert not marker.exists()


def test_short_key_exit_message_hides_the_key() -> None:
    """The start-up failure for a short key names the variable and never prints the key."""
    done = _run_controller({"WALLCRAWLER_JWT_SIGNING_KEY": SHORT_KEY})
    assert done.returncode == 2
    assert "WALLCRAWLER_JWT_SIGNING_KEY" in done.stdout
    assert SHORT_KEY not in done.stdout + done.stderr


def test_missing_everything_lists_all_required() -> None:
    """With no SESSION_ID and no key, the single log line lists both problems."""
    done = _run_controller({"SESSION_ID": "", "WALLCRAWLER_JWT_SIGNING_KEY": ""})
    assert done.returncode == 2
    [line] = done.stdout.splitlines()
    record = json.loads(line)
    assert any("SESSION_ID" in problem for problem in record["problems"])
    assert any("WALLCRAWLER_JWT_SIGNING_KEY" in problem for problem in record["problems"])
