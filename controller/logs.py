"""Logging: the only ``structlog.configure()``, JSON lines on stdout, secrets redacted.

Every line is one JSON object with ``event`` (a short snake_case name), ``level``, ``timestamp`` and
the context bound through contextvars (``session_id``, ``conn_id``). Library loggers (websockets,
botocore, aiobotocore) go through the same pipeline and stay at INFO or above.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

__all__ = ["REDACTED", "bind_context", "configure_logging", "get_logger", "redact", "redact_text"]

REDACTED = "[REDACTED]"

# Field names whose values are never logged, whatever they hold.
_SECRET_KEYS = frozenset(
    {
        "authorization",
        "x-bb-signing-key",
        "signingkey",
        "signing_key",
        "token",
        "jwt",
        "key",
        "secret",
        "password",
        "cookie",
        "cookies",
        "set-cookie",
        "payload",
        "params",
        "body",
    }
)
# A token inside any string: query parameters, header lines, JWT-shaped blobs.
_TEXT_PATTERNS = (
    re.compile(r"(?i)(signingKey=)[^&\s\"'#]+"),
    re.compile(r"(?i)((?:authorization|x-bb-signing-key|cookie)\s*[:=]\s*)[^\r\n\"',]+"),
    re.compile(r"\beyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*"),
)


def redact_text(text: str) -> str:
    """Remove anything token-shaped from a free-form string."""
    for pattern in _TEXT_PATTERNS:
        text = pattern.sub(lambda m: (m.group(1) if m.groups() else "") + REDACTED, text)
    return text


def _redact_value(key: str, value: Any) -> Any:
    if key.lower() in _SECRET_KEYS:
        return REDACTED
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return {k: _redact_value(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_value(key, v) for v in value]
    return value


def redact(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: drop secret fields and scrub token-shaped text everywhere."""
    return {key: _redact_value(key, value) for key, value in event_dict.items()}


def _shared_processors() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        redact,
    ]


def configure_logging(level: str = "INFO", *, stream: TextIO | None = None) -> None:
    """Configure structlog and the standard library to write JSON lines.

    Args:
        level: the controller's level; library loggers never go below INFO.
        stream: where lines go (stdout by default).
    """
    numeric = logging.getLevelName(level)
    renderer = structlog.processors.JSONRenderer(sort_keys=False)
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=_shared_processors(),
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    for library in ("websockets", "asyncio"):
        logging.getLogger(library).setLevel(max(numeric, logging.INFO))
    # The AWS SDK's INFO lines ("Found credentials in environment variables") are noise for on-call.
    for library in ("botocore", "aiobotocore", "urllib3"):
        logging.getLogger(library).setLevel(max(numeric, logging.WARNING))
    structlog.configure(
        processors=[*_shared_processors(), structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """Return a logger for one module; bind fields with ``.bind()`` or contextvars."""
    logger: structlog.stdlib.BoundLogger = structlog.stdlib.get_logger(name)
    return logger


def bind_context(**fields: Any) -> Mapping[str, Any]:
    """Bind fields into the contextvars of the current task (and the tasks it starts)."""
    return structlog.contextvars.bind_contextvars(**fields)
