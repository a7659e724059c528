"""The controller's exception tree.

Every error the controller raises on purpose derives from :class:`ControllerError`::

    ControllerError
    ├── ConfigError            the environment is invalid (exit code 2)
    ├── AuthError              a client's token is rejected (HTTP 401, never fatal)
    ├── ChromeError            Chromium is missing, failed to start, or died
    ├── ProfileError           a context archive could not be restored or persisted
    │   └── UnsafeArchiveError the archive is hostile, corrupt or over a cap
    ├── SessionStoreError      the session item could not be written
    │   └── SessionGoneError   the item no longer exists (TTL or the API removed it)
    └── UsageError             CPU/memory figures could not be sampled

Two boundaries catch them: the proxy's connection handler (log, answer or close with a code) and
``__main__`` (log, exit code). Causes are chained with ``raise ... from exc``.
"""

from __future__ import annotations


class ControllerError(Exception):
    """Base class of every error the controller raises on purpose."""


class ConfigError(ControllerError):
    """The environment does not describe a valid configuration.

    Attributes:
        problems: one human-readable line per invalid variable, each naming it.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class AuthError(ControllerError):
    """A client's signing key was rejected.

    Attributes:
        reason: short, stable, log- and client-safe reason (never contains the token).
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class ChromeError(ControllerError):
    """Chromium could not be started, did not become usable, or exited unexpectedly."""


class ProfileError(ControllerError):
    """A browser context could not be restored or persisted."""


class UnsafeArchiveError(ProfileError):
    """A context archive is hostile, corrupt or exceeds a configured cap."""


class SessionStoreError(ControllerError):
    """The session item could not be written."""


class SessionGoneError(SessionStoreError):
    """The session item does not exist any more; it is never recreated."""


class UsageError(ControllerError):
    """CPU or memory usage could not be sampled."""
