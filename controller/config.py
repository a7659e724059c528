"""The controller's configuration: parsed once from the environment, frozen, validated at the edge.

Only this module reads the environment (through the mapping handed to :func:`load_config`). Every
problem is collected before failing, so one start-up shows the operator every wrong variable at once.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from controller.errors import ConfigError

__all__ = [
    "ChromeConfig",
    "Config",
    "ContextConfig",
    "ProfileLimits",
    "ProxyConfig",
    "Secret",
    "ShutdownBudget",
    "load_config",
]

T = TypeVar("T")

SESSION_ID_RE = re.compile(r"^sess_[A-Za-z0-9_-]{1,64}$")
_REPO_CHROME_DIR = Path(__file__).resolve().parent.parent / "chrome"
_MiB = 1024 * 1024


class Secret:
    """A string that never shows itself in ``repr``, ``str`` or logs."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """Return the secret value; call only where it is used, never to log it."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True, slots=True)
class ContextConfig:
    """The browser context to restore (and maybe persist)."""

    bucket: str
    context_id: str
    s3_key: str
    persist: bool


@dataclass(frozen=True, slots=True)
class ProfileLimits:
    """Caps applied while restoring a context archive, and the upload's shape."""

    max_archive_bytes: int = 512 * _MiB
    max_unpacked_bytes: int = 2048 * _MiB
    max_entries: int = 100_000
    max_file_bytes: int = 1024 * _MiB
    max_depth: int = 32
    max_name_length: int = 255
    restore_timeout: float = 60.0
    multipart_threshold: int = 64 * _MiB
    multipart_part_size: int = 16 * _MiB


@dataclass(frozen=True, slots=True)
class ShutdownBudget:
    """Time bounds of each shutdown step; their sum must fit ECS's stop budget."""

    stop_timeout: float = 30.0
    proxy_drain: float = 2.0
    chrome_close: float = 5.0
    profile_upload: float = 15.0
    final_write: float = 3.0
    # Python's own exit, flushing logs and ECS's signal delivery need a moment too.
    margin: float = 2.0

    def required(self, *, persist: bool) -> float:
        """Seconds the shutdown may take at most with these bounds."""
        upload = self.profile_upload if persist else 0.0
        return self.proxy_drain + self.chrome_close + upload + self.final_write + self.margin


@dataclass(frozen=True, slots=True)
class ChromeConfig:
    """How Chromium is started and stopped."""

    binary: Path
    debug_port: int = 9222
    config_dir: Path = _REPO_CHROME_DIR
    user_data_dir: Path | None = None
    start_timeout: float = 30.0


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """The public CDP proxy."""

    host: str = "0.0.0.0"
    port: int = 9223
    disconnect_timeout: float = 120.0
    first_connect_timeout: float = 120.0
    max_head_bytes: int = 16 * 1024
    handshake_timeout: float = 10.0


@dataclass(frozen=True, slots=True)
class Config:
    """Everything the controller needs, parsed once at start-up."""

    session_id: str
    chrome: ChromeConfig
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    project_id: str | None = None
    sessions_table: str = "wallcrawler-sessions"
    context: ContextConfig | None = None
    profile_limits: ProfileLimits = field(default_factory=ProfileLimits)
    health_check_interval: float = 10.0
    signing_secret_arn: str | None = None
    signing_key: Secret | None = None
    jwt_leeway: float = 30.0
    jwt_max_lifetime: float = 86_400.0
    aws_region: str = "us-east-1"
    aws_endpoint_url: str | None = None
    ecs_metadata_uri: str | None = None
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 9464
    shutdown: ShutdownBudget = field(default_factory=ShutdownBudget)
    dynamodb_timeout: float = 2.0
    event_history_limit: int = 50
    log_level: str = "INFO"


class _Reader:
    """Reads typed values out of the environment, collecting one message per bad variable."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.problems: list[str] = []

    def raw(self, name: str) -> str | None:
        value = self.env.get(name)
        if value is None or value.strip() == "":
            return None
        return value.strip()

    def _parse(self, name: str, default: T, parse: Callable[[str], T], what: str) -> T:
        value = self.raw(name)
        if value is None:
            return default
        try:
            return parse(value)
        except ValueError:
            self.problems.append(f"{name}={value!r} is not {what}")
            return default

    def string(self, name: str, default: str) -> str:
        return self.raw(name) or default

    def number(self, name: str, default: float, *, low: float, high: float) -> float:
        value = self._parse(name, default, float, "a number")
        if not low <= value <= high:
            self.problems.append(f"{name}={value:g} is out of range [{low:g}, {high:g}]")
        return value

    def integer(self, name: str, default: int, *, low: int, high: int) -> int:
        value = self._parse(name, default, int, "an integer")
        if not low <= value <= high:
            self.problems.append(f"{name}={value} is out of range [{low}, {high}]")
        return value

    def port(self, name: str, default: int) -> int:
        # 0 asks the OS for a free port (tests and local runs side by side).
        return self.integer(name, default, low=0, high=65535)

    def boolean(self, name: str, default: bool) -> bool:
        def parse(value: str) -> bool:
            lowered = value.lower()
            if lowered in {"true", "1", "yes"}:
                return True
            if lowered in {"false", "0", "no"}:
                return False
            raise ValueError(value)

        return self._parse(name, default, parse, "a boolean (true/false)")


def _find_chrome(reader: _Reader) -> Path:
    explicit = reader.raw("CHROME_BINARY")
    candidates = [explicit] if explicit else ["chromium", "chromium-browser", "google-chrome"]
    for candidate in candidates:
        found = shutil.which(candidate, path=reader.env.get("PATH"))
        if found:
            return Path(found)
    if explicit:
        reader.problems.append(f"CHROME_BINARY={explicit!r} is not an executable file")
    else:
        reader.problems.append(
            "CHROME_BINARY is unset and none of chromium, chromium-browser, google-chrome is on PATH"
        )
    return Path(explicit or "chromium")


def _context(reader: _Reader) -> ContextConfig | None:
    names = ("CONTEXTS_BUCKET_NAME", "CONTEXT_ID", "CONTEXT_S3_KEY")
    values = {name: reader.raw(name) for name in names}
    persist = reader.boolean("CONTEXT_PERSIST", False)
    present = [name for name, value in values.items() if value is not None]
    if not present:
        if persist:
            reader.problems.append(
                "CONTEXT_PERSIST=true needs CONTEXTS_BUCKET_NAME, CONTEXT_ID, CONTEXT_S3_KEY"
            )
        return None
    if len(present) != len(names):
        missing = ", ".join(name for name in names if values[name] is None)
        reader.problems.append(f"{missing} must be set too: a context needs all of {', '.join(names)}")
        return None
    key = values["CONTEXT_S3_KEY"] or ""
    if key.startswith("/") or ".." in key.split("/"):
        reader.problems.append(f"CONTEXT_S3_KEY={key!r} is not a relative object key")
    return ContextConfig(
        bucket=values["CONTEXTS_BUCKET_NAME"] or "",
        context_id=values["CONTEXT_ID"] or "",
        s3_key=key,
        persist=persist,
    )


def _signing(reader: _Reader) -> tuple[str | None, Secret | None]:
    arn = reader.raw("WALLCRAWLER_JWT_SIGNING_SECRET_ARN")
    key = reader.env.get("WALLCRAWLER_JWT_SIGNING_KEY") or None
    if arn is None and key is None:
        reader.problems.append(
            "WALLCRAWLER_JWT_SIGNING_SECRET_ARN or WALLCRAWLER_JWT_SIGNING_KEY is required (no key, no start)"
        )
    if key is not None and len(key.encode()) < 32:
        # HS256 with a key shorter than its 32-byte output is brute-forceable; fail closed.
        reader.problems.append("WALLCRAWLER_JWT_SIGNING_KEY must be at least 32 bytes long")
    return arn, Secret(key) if key is not None else None


def load_config(env: Mapping[str, str]) -> Config:
    """Parse and validate the controller's configuration.

    Args:
        env: the process environment (``os.environ``) or a test's mapping.

    Returns:
        The frozen configuration.

    Raises:
        ConfigError: listing every invalid or missing variable by name.
    """
    r = _Reader(env)

    session_id = r.raw("SESSION_ID")
    if session_id is None:
        r.problems.append("SESSION_ID is required")
    elif not SESSION_ID_RE.match(session_id):
        r.problems.append(f"SESSION_ID={session_id!r} is not of the form sess_<id>")

    chrome = ChromeConfig(
        binary=_find_chrome(r),
        debug_port=r.port("CHROME_DEBUG_PORT", 9222),
        config_dir=Path(r.string("CHROME_CONFIG_DIR", str(_REPO_CHROME_DIR))),
        user_data_dir=Path(p) if (p := r.raw("CHROME_USER_DATA_DIR")) else None,
        start_timeout=r.number("CHROME_START_TIMEOUT", 30.0, low=1, high=300),
    )
    if not chrome.config_dir.is_dir():
        r.problems.append(f"CHROME_CONFIG_DIR={str(chrome.config_dir)!r} is not a directory")

    disconnect = r.number("CDP_DISCONNECT_TIMEOUT", 120.0, low=1, high=86_400)
    proxy = ProxyConfig(
        host=r.string("CDP_PROXY_HOST", "0.0.0.0"),
        port=r.port("CDP_PROXY_PORT", 9223),
        disconnect_timeout=disconnect,
        first_connect_timeout=r.number("CDP_FIRST_CONNECT_TIMEOUT", disconnect, low=1, high=86_400),
        handshake_timeout=r.number("CDP_HANDSHAKE_TIMEOUT", 10.0, low=0.5, high=120),
    )

    limits = ProfileLimits(
        max_archive_bytes=r.integer("CONTEXT_MAX_ARCHIVE_BYTES", 512 * _MiB, low=1, high=2**40),
        max_unpacked_bytes=r.integer("CONTEXT_MAX_UNPACKED_BYTES", 2048 * _MiB, low=1, high=2**42),
        max_entries=r.integer("CONTEXT_MAX_ENTRIES", 100_000, low=1, high=10_000_000),
        max_file_bytes=r.integer("CONTEXT_MAX_FILE_BYTES", 1024 * _MiB, low=1, high=2**40),
        max_depth=r.integer("CONTEXT_MAX_DEPTH", 32, low=1, high=256),
        max_name_length=r.integer("CONTEXT_MAX_NAME_LENGTH", 255, low=16, high=4096),
        restore_timeout=r.number("CONTEXT_RESTORE_TIMEOUT", 60.0, low=1, high=3600),
        multipart_threshold=r.integer("CONTEXT_MULTIPART_THRESHOLD", 64 * _MiB, low=5 * _MiB, high=5 * 2**30),
        multipart_part_size=r.integer("CONTEXT_MULTIPART_PART_SIZE", 16 * _MiB, low=5 * _MiB, high=5 * 2**30),
    )

    budget = ShutdownBudget(
        stop_timeout=r.number("STOP_TIMEOUT", 30.0, low=2, high=120),
        proxy_drain=r.number("CDP_DRAIN_TIMEOUT", 2.0, low=0, high=60),
        chrome_close=r.number("CHROME_CLOSE_TIMEOUT", 5.0, low=0.5, high=60),
        profile_upload=r.number("CONTEXT_UPLOAD_TIMEOUT", 15.0, low=1, high=110),
        final_write=r.number("SESSION_FINAL_WRITE_TIMEOUT", 3.0, low=0.5, high=30),
    )
    context = _context(r)
    persist = context is not None and context.persist
    if budget.required(persist=persist) > budget.stop_timeout:
        r.problems.append(
            f"STOP_TIMEOUT={budget.stop_timeout:g} is shorter than the shutdown steps need "
            f"({budget.required(persist=persist):g} s: CDP_DRAIN_TIMEOUT + CHROME_CLOSE_TIMEOUT"
            f"{' + CONTEXT_UPLOAD_TIMEOUT' if persist else ''} + SESSION_FINAL_WRITE_TIMEOUT"
            f" + {budget.margin:g} s margin)"
        )

    arn, key = _signing(r)
    log_level = r.string("LOG_LEVEL", "INFO").upper()
    if log_level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        r.problems.append(f"LOG_LEVEL={log_level!r} is not one of DEBUG, INFO, WARNING, ERROR")

    config = Config(
        session_id=session_id or "",
        chrome=chrome,
        proxy=proxy,
        project_id=r.raw("PROJECT_ID"),
        sessions_table=r.string("SESSIONS_TABLE_NAME", "wallcrawler-sessions"),
        context=context,
        profile_limits=limits,
        health_check_interval=r.number("CDP_HEALTH_CHECK_INTERVAL", 10.0, low=0.1, high=3600),
        signing_secret_arn=arn,
        signing_key=key,
        jwt_leeway=r.number("JWT_LEEWAY", 30.0, low=0, high=60),
        jwt_max_lifetime=r.number("JWT_MAX_LIFETIME", 86_400.0, low=60, high=30 * 86_400),
        aws_region=r.raw("AWS_REGION") or r.raw("AWS_DEFAULT_REGION") or "us-east-1",
        aws_endpoint_url=r.raw("AWS_ENDPOINT_URL"),
        ecs_metadata_uri=r.raw("ECS_CONTAINER_METADATA_URI_V4"),
        metrics_host=r.string("METRICS_HOST", "0.0.0.0"),
        metrics_port=r.port("METRICS_PORT", 9464),
        shutdown=budget,
        dynamodb_timeout=r.number("DYNAMODB_TIMEOUT", 2.0, low=0.1, high=60),
        event_history_limit=r.integer("SESSION_EVENT_HISTORY_LIMIT", 50, low=1, high=500),
        log_level=log_level,
    )
    ports = {
        "CDP_PROXY_PORT": proxy.port,
        "METRICS_PORT": config.metrics_port,
        "CHROME_DEBUG_PORT": chrome.debug_port,
    }
    fixed = [port for port in ports.values() if port != 0]
    if len(set(fixed)) != len(fixed):
        r.problems.append(f"{', '.join(ports)} must all differ (got {ports})")
    if r.problems:
        raise ConfigError(r.problems)
    return config
