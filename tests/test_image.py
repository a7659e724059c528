"""The image and its deployment files: the ECS task definition, the compose file, the managed policy.

The end-to-end test builds the image and runs it (scripts/test-image.sh). It runs when buildah and podman
are installed and the tests run as root; WALLCRAWLER_IMAGE_TEST=1 requires it (fails instead of skipping),
WALLCRAWLER_IMAGE_TEST=0 skips it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import botocore.session
import pytest
from botocore.validate import ParamValidator

from controller.config import load_config

ROOT = Path(__file__).resolve().parent.parent
TASK_DEFINITION = ROOT / "docker" / "ecs-task-definition.json"
POLICY = ROOT / "chrome" / "policies" / "managed" / "wallcrawler.json"


def _container() -> dict[str, Any]:
    definition = json.loads(TASK_DEFINITION.read_text())
    containers: list[dict[str, Any]] = definition["containerDefinitions"]
    assert len(containers) == 1
    return containers[0]


def _environment() -> dict[str, str]:
    return {pair["name"]: pair["value"] for pair in _container()["environment"]}


def test_task_definition_is_a_valid_register_request() -> None:
    """The task definition validates against ECS's RegisterTaskDefinition input model."""
    ecs = botocore.session.get_session().get_service_model("ecs")
    operation = ecs.operation_model("RegisterTaskDefinition")
    assert operation.input_shape is not None
    report = ParamValidator().validate(json.loads(TASK_DEFINITION.read_text()), operation.input_shape)
    assert not report.has_errors(), report.generate_report()


def test_task_definition_runs_on_fargate_with_its_stop_budget() -> None:
    """Fargate, ECS's init process, and a stopTimeout that the controller's STOP_TIMEOUT matches."""
    definition = json.loads(TASK_DEFINITION.read_text())
    container = _container()
    assert definition["requiresCompatibilities"] == ["FARGATE"]
    assert container["linuxParameters"]["initProcessEnabled"] is True
    assert container["stopTimeout"] == 120
    assert _environment()["STOP_TIMEOUT"] == str(container["stopTimeout"])


def test_task_definition_ports_logs_and_secret() -> None:
    """Both ports mapped, awslogs non-blocking with a buffer, the signing secret passed by ARN."""
    container, env = _container(), _environment()
    assert {m["containerPort"] for m in container["portMappings"]} == {
        int(env["CDP_PROXY_PORT"]),
        int(env["METRICS_PORT"]),
    }
    options = container["logConfiguration"]["options"]
    assert container["logConfiguration"]["logDriver"] == "awslogs"
    assert options["mode"] == "non-blocking"
    assert re.fullmatch(r"\d+[kmg]", options["max-buffer-size"])
    assert env["WALLCRAWLER_JWT_SIGNING_SECRET_ARN"].startswith("arn:aws:secretsmanager:")
    assert "WALLCRAWLER_JWT_SIGNING_KEY" not in env


def test_task_definition_health_check_is_the_images() -> None:
    """ECS's health check runs the same readiness probe as the Dockerfile's HEALTHCHECK."""
    match = re.search(r"^\s+CMD (\[.*\])$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert match, "no exec-form HEALTHCHECK CMD in the Dockerfile"
    command = _container()["healthCheck"]["command"]
    assert command[0] == "CMD"
    assert command[1:] == json.loads(match.group(1))
    assert "/readyz" in command[-1]


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({}, id="no-context"),
        pytest.param(
            {
                "CONTEXTS_BUCKET_NAME": "wallcrawler-contexts",
                "CONTEXT_ID": "ctx_1",
                "CONTEXT_S3_KEY": "proj_1/ctx_1/profile.tar.gz",
                "CONTEXT_PERSIST": "true",
            },
            id="persisted-context",
        ),
    ],
)
def test_task_definition_environment_is_a_valid_config(overrides: dict[str, str]) -> None:
    """The task definition's environment plus RunTask's per-session overrides parse, budget included."""
    env = {
        **_environment(),
        "SESSION_ID": "sess_1",
        "PROJECT_ID": "proj_1",
        "CHROME_BINARY": sys.executable,  # any executable: the browser itself is not under test here
        **overrides,
    }
    config = load_config(env)
    assert config.shutdown.stop_timeout == 120
    assert config.signing_secret_arn == env["WALLCRAWLER_JWT_SIGNING_SECRET_ARN"]


def test_compose_controller_environment_is_a_valid_config() -> None:
    """The compose file's controller settings parse, and its grace period matches STOP_TIMEOUT."""
    yaml = pytest.importorskip("yaml")
    services = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())["services"]
    env = {name: str(value) for name, value in services["controller"]["environment"].items()}
    env["WALLCRAWLER_JWT_SIGNING_KEY"] = "k" * 48
    env["CHROME_BINARY"] = sys.executable
    config = load_config(env)
    assert services["controller"]["stop_grace_period"] == f"{config.shutdown.stop_timeout:g}s"
    assert config.aws_endpoint_url == "http://moto:5000"


def test_managed_policy_blocks_files_and_metadata_addresses() -> None:
    """Chromium's managed policy blocks file:// and the EC2/ECS metadata addresses."""
    blocklist = json.loads(POLICY.read_text())["URLBlocklist"]
    assert {"file://*", "169.254.169.254", "169.254.170.2", "[fd00:ec2::254]"} <= set(blocklist)


def _image_test_skip_reason() -> str | None:
    wanted = os.environ.get("WALLCRAWLER_IMAGE_TEST", "")
    if wanted == "0":
        return "WALLCRAWLER_IMAGE_TEST=0"
    missing = [tool for tool in ("buildah", "podman", "runc", "debootstrap") if shutil.which(tool) is None]
    problem = None
    if missing:
        problem = f"{', '.join(missing)} not installed (apt-get install buildah podman runc debootstrap)"
    elif os.geteuid() != 0:
        problem = "needs root for buildah/podman with runc"
    if problem and wanted == "1":
        pytest.fail(f"WALLCRAWLER_IMAGE_TEST=1 but {problem}")
    return problem


@pytest.mark.timeout(1800)
def test_image_end_to_end() -> None:
    """The image builds, serves Playwright through the proxy, and stops cleanly on SIGTERM."""
    reason = _image_test_skip_reason()
    if reason:
        pytest.skip(f"image test skipped: {reason}")
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "test-image.sh")],
        capture_output=True,
        text=True,
        timeout=1700,
        env={**os.environ, "PYTHON": os.environ.get("PYTHON", sys.executable)},
    )
    assert done.returncode == 0, f"scripts/test-image.sh exited {done.returncode}:\n{done.stderr[-6000:]}"
