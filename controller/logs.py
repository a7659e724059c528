"""Logging: the only ``structlog.configure()``, JSON lines on stdout, secrets redacted.

Every line is one JSON object with ``event`` (a short snake_case name), ``level``, ``logger``,
``timestamp`` and the context bound through contextvars (``session_id``, ``conn_id``). Library loggers
(websockets, asyncio, botocore...) go through the same pipeline and never log below INFO. A traceback is
the ``exception`` field of its line, never raw lines: warnings, and exceptions nobody caught (main
thread, other threads, unraisable ones), are routed through the same pipeline.

Redaction runs last before rendering, on every line, whoever logged it: fields named like a secret
(``authorization``, ``cookie``, ``signingKey``, CDP ``params``/``payload``...) lose their value, and every
other string is scrubbed of token-shaped text (``signingKey=…``, ``Bearer …``, header lines, JWTs).
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections.abc import Mapping
from types import TracebackType
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

__all__ = ["REDACTED", "bind_context", "configure_logging", "get_logger", "redact", "redact_text"]

REDACTED = "[REDACTED]"

# Field names (compared lower-cased, with '-' and '_' ignored) whose values are never logged.
_SECRET_KEYS = frozenset(
    name.replace("-", "").replace("_", "")
    for name in (
        "authorization",
        "proxy-authorization",
        "x-bb-signing-key",
        "signingkey",
        "signing_key",
        "token",
        "access_token",
        "refresh_token",
        "id_token",
        "jwt",
        "key",
        "secret",
        "secret_string",
        "password",
        "aws_secret_access_key",
        "aws_session_token",
        "x-amz-security-token",
        "cookie",
        "cookies",
        "set-cookie",
        # CDP traffic: commands, results and events carry page content, cookies and credentials.
        "payload",
        "params",
        "result",
        "message",
        "body",
    )
)
# Keys structlog's ProcessorFormatter uses internally; other processors still need the real objects.
_META_KEYS = frozenset({"_record", "_from_structlog"})
# Header-like names inside free text: `Authorization: …`, `"cookie": "…"`, `x-bb-signing-key=…`.
_NAMED = r"(?:proxy-)?authorization|x-bb-signing-key|signing[-_]?key|set-cookie|cookie|password|secret"
# A token inside any string: query parameters (plain or percent-encoded, as in devtoolsFrontendUrl),
# header lines and JSON-ish pairs, bearer credentials, and JWT-shaped blobs whatever surrounds them.
_TEXT_PATTERNS = (
    re.compile(r"(?i)(signingKey=)[^&\s\"'#]+"),
    re.compile(r"(?i)(signingKey%3D)(?:(?!%26)[^&\s\"'#])+"),
    re.compile(rf"(?i)((?:{_NAMED})[\"']?\s*[:=]\s*[\"']?)(?!\[REDACTED\])[^\r\n\"',]+"),
    re.compile(r"(?i)(\bbearer\s+)[A-Za-z0-9._~+/=-]+"),
    re.compile(r"eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*"),
)
# Libraries that would otherwise be chatty (or print request headers) at DEBUG.
_INFO_LIBRARIES = ("websockets", "asyncio", "anyio")
# The AWS SDK's INFO lines ("Found credentials in environment variables") are noise for on-call.
_WARNING_LIBRARIES = ("botocore", "aiobotocore", "boto3", "s3transfer", "urllib3")


def redact_text(text: str) -> str:
    """Remove anything token-shaped from a free-form string.

    Args:
        text: any string (a URL, a header line, an error message, a traceback).

    Returns:
        The string with every secret replaced by ``[REDACTED]``; the names before them are kept.
    """
    for pattern in _TEXT_PATTERNS:
        text = pattern.sub(lambda m: (m.group(1) if m.groups() else "") + REDACTED, text)
    return text


def _is_secret(key: str) -> bool:
    return key.lower().replace("-", "").replace("_", "") in _SECRET_KEYS


def _redact_value(key: str, value: Any) -> Any:
    if _is_secret(key):
        return REDACTED
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, bytes | bytearray):
        return redact_text(bytes(value).decode("utf-8", "replace"))
    if isinstance(value, Mapping):
        return {str(k): _redact_value(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact_value(key, v) for v in value]
    # Anything else (exceptions, paths, URLs...) would be rendered with repr(), unscrubbed.
    return redact_text(str(value))


def redact(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: drop secret fields and scrub token-shaped text everywhere.

    Returns:
        A new event dict whose values are all JSON-native, with no secret left in them.
    """
    return {
        key: value if key in _META_KEYS else _redact_value(key, value) for key, value in event_dict.items()
    }


def _shared_processors() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        redact,
    ]


def _route_uncaught_errors() -> None:
    """Send tracebacks that would go to stderr as raw lines through logging instead."""
    log = logging.getLogger("controller.uncaught")

    def excepthook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        log.critical("uncaught_exception", exc_info=(exc_type, exc, tb))

    def thread_excepthook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit or args.exc_value is None:
            return
        thread = args.thread.name if args.thread is not None else None
        log.error(
            "thread_exception",
            exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
            extra={"thread_name": thread},
        )

    def unraisablehook(unraisable: sys.UnraisableHookArgs) -> None:
        exc = unraisable.exc_value
        exc_info = (type(exc), exc, unraisable.exc_traceback) if exc is not None else None
        log.error("unraisable_exception", exc_info=exc_info)

    sys.excepthook = excepthook
    threading.excepthook = thread_excepthook
    sys.unraisablehook = unraisablehook
    logging.captureWarnings(True)  # warnings go to the "py.warnings" logger, not stderr


def configure_logging(level: str = "INFO", *, stream: TextIO | None = None) -> None:
    """Configure structlog and the standard library to write JSON lines. Safe to call again.

    Args:
        level: the controller's level (``DEBUG``, ``INFO``...); library loggers never go below INFO.
        stream: where lines go (stdout by default).
    """
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    renderer = structlog.processors.JSONRenderer(sort_keys=False)
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.ExtraAdder(allow=("thread_name",)), *_shared_processors()],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    for library in _INFO_LIBRARIES:
        logging.getLogger(library).setLevel(max(numeric, logging.INFO))
    for library in _WARNING_LIBRARIES:
        logging.getLogger(library).setLevel(max(numeric, logging.WARNING))
    _route_uncaught_errors()
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
    """Bind fields into the contextvars of the current task (and the tasks it starts).

    Returns:
        The tokens to pass to ``structlog.contextvars.reset_contextvars`` to undo the binding.
    """
    return structlog.contextvars.bind_contextvars(**fields)
