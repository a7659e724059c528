"""Verification of the ``signingKey`` JWT that every proxy request carries.

Bytes in, :class:`Claims` or :class:`~controller.errors.AuthError` out. The rules (CONTRACT.md): HS256
only; ``iss``, ``aud``, ``sub``, ``sessionId``, ``exp``, ``iat`` and ``nbf`` required; the token bound to
this task's session (and project, when configured); a small clock leeway; the current and previous
signing keys both accepted during a rotation. Reasons are short and stable so they can be logged,
counted and returned to the client without revealing anything about the key or the token.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jwt

from controller.errors import AuthError, ConfigError

if TYPE_CHECKING:
    from types_aiobotocore_secretsmanager import SecretsManagerClient

__all__ = ["Claims", "TokenVerifier", "fetch_signing_keys"]

ISSUER = "wallcrawler"
AUDIENCE = "cdp-access"
_REQUIRED = ("iss", "aud", "sub", "sessionId", "exp", "iat", "nbf")
_NUMERIC = ("exp", "iat", "nbf")
# Longest token we bother parsing: real ones are well under 2 KiB.
MAX_TOKEN_LENGTH = 8192


@dataclass(frozen=True, slots=True)
class Claims:
    """The claims of an accepted token that the controller uses."""

    session_id: str
    project_id: str | None
    user_id: str | None
    token_id: str | None
    expires_at: float


class TokenVerifier:
    """Checks tokens against this task's session with one or more HS256 keys."""

    def __init__(
        self,
        keys: Sequence[bytes],
        *,
        session_id: str,
        project_id: str | None = None,
        leeway: float = 30.0,
        max_lifetime: float = 86_400.0,
    ) -> None:
        """Build a verifier.

        Args:
            keys: accepted signing keys, newest first (current, then previous).
            session_id: the only session a token may be for.
            project_id: when set, the only project a token may be for.
            leeway: allowed clock skew in seconds (at most 60).
            max_lifetime: longest accepted ``exp - iat``; bounds absurd expiries.

        Raises:
            ValueError: no key, or a key shorter than 32 bytes.
        """
        if not keys:
            raise ValueError("at least one signing key is required")
        if any(len(key) < 32 for key in keys):
            raise ValueError("signing keys must be at least 32 bytes")
        self._keys = tuple(keys)
        self._session_id = session_id
        self._project_id = project_id
        self._leeway = leeway
        self._max_lifetime = max_lifetime

    def verify(self, token: str | None, *, now: float | None = None) -> Claims:
        """Verify a token for this session.

        Args:
            token: the compact JWT as the client sent it (None when absent).
            now: the current Unix time (tests pin it).

        Returns:
            The accepted token's claims.

        Raises:
            AuthError: with a short reason when the token is not acceptable.
        """
        if not token:
            raise AuthError("missing_token")
        if len(token) > MAX_TOKEN_LENGTH:
            raise AuthError("malformed_token")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError as exc:
            raise AuthError("malformed_token") from exc
        if header.get("alg") != "HS256":
            raise AuthError("algorithm_not_allowed")

        claims = self._decode(token)
        self._check_times(claims, time.time() if now is None else now)
        if claims["sub"] != self._session_id or claims["sessionId"] != self._session_id:
            raise AuthError("wrong_session")
        project = claims.get("projectId")
        if self._project_id is not None and project != self._project_id:
            raise AuthError("wrong_project")
        user = claims.get("userId")
        token_id = claims.get("jti") or claims.get("nonce")
        return Claims(
            session_id=self._session_id,
            project_id=project if isinstance(project, str) else None,
            user_id=user if isinstance(user, str) else None,
            token_id=token_id if isinstance(token_id, str) else None,
            expires_at=float(claims["exp"]),
        )

    def _decode(self, token: str) -> dict[str, Any]:
        # Times are checked by _check_times, strictly typed; PyJWT only checks signature, iss and aud.
        options: jwt.types.Options = {
            "require": list(_REQUIRED),
            "verify_exp": False,
            "verify_nbf": False,
            "verify_iat": False,
            "enforce_minimum_key_length": True,
        }
        error: AuthError | None = None
        for key in self._keys:
            try:
                decoded: dict[str, Any] = jwt.decode(
                    token, key, algorithms=["HS256"], audience=AUDIENCE, issuer=ISSUER, options=options
                )
            except jwt.InvalidSignatureError:
                error = AuthError("bad_signature")
                continue  # maybe signed with the previous key
            except jwt.MissingRequiredClaimError as exc:
                raise AuthError(f"missing_claim_{exc.claim}") from exc
            except jwt.InvalidAudienceError as exc:
                raise AuthError("wrong_audience") from exc
            except jwt.InvalidIssuerError as exc:
                raise AuthError("wrong_issuer") from exc
            except jwt.InvalidAlgorithmError as exc:
                raise AuthError("algorithm_not_allowed") from exc
            except jwt.PyJWTError as exc:
                raise AuthError("malformed_token") from exc
            return decoded
        assert error is not None
        raise error

    def _check_times(self, claims: dict[str, Any], now: float) -> None:
        for name in _NUMERIC:
            value = claims[name]
            # PyJWT accepts "123" and 1e30; a token must carry real, finite numbers.
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise AuthError(f"invalid_claim_{name}")
        for name in ("sub", "sessionId"):
            if not isinstance(claims[name], str):
                raise AuthError(f"invalid_claim_{name}")
        exp, iat, nbf = float(claims["exp"]), float(claims["iat"]), float(claims["nbf"])
        if exp <= now - self._leeway:
            raise AuthError("expired")
        if nbf > now + self._leeway:
            raise AuthError("not_yet_valid")
        if iat > now + self._leeway:
            raise AuthError("issued_in_future")
        if exp - iat > self._max_lifetime:
            raise AuthError("lifetime_too_long")


async def fetch_signing_keys(client: SecretsManagerClient, secret_arn: str) -> list[bytes]:
    """Read the signing keys from Secrets Manager: the current version, then the previous one.

    The secret is JSON ``{"algorithm": "HS256", "signingKey": "..."}``. The previous version is
    optional (there is none before the first rotation).

    Args:
        client: a Secrets Manager client.
        secret_arn: the secret's ARN or name.

    Returns:
        The keys, current first.

    Raises:
        ConfigError: the current version is missing, unreadable, not HS256 or too short.
    """
    keys: list[bytes] = []
    for stage in ("AWSCURRENT", "AWSPREVIOUS"):
        try:
            response = await client.get_secret_value(SecretId=secret_arn, VersionStage=stage)
        except client.exceptions.ResourceNotFoundException as exc:
            if stage == "AWSCURRENT":
                raise ConfigError(
                    [f"WALLCRAWLER_JWT_SIGNING_SECRET_ARN: secret not found ({stage})"]
                ) from exc
            continue
        try:
            key = _key_from_secret(response.get("SecretString", ""))
        except ValueError as exc:
            if stage == "AWSCURRENT":
                raise ConfigError([f"WALLCRAWLER_JWT_SIGNING_SECRET_ARN: {exc}"]) from exc
            continue  # a broken previous version must not stop the current one from working
        if key not in keys:
            keys.append(key)
    return keys


def _key_from_secret(text: str) -> bytes:
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError("secret is not JSON") from exc
    if not isinstance(document, dict):
        raise ValueError("secret is not a JSON object")
    algorithm = document.get("algorithm", "HS256")
    if algorithm != "HS256":
        raise ValueError(f"secret algorithm {algorithm!r} is not HS256")
    key = document.get("signingKey")
    if not isinstance(key, str) or len(key.encode()) < 32:
        raise ValueError("secret signingKey is missing or shorter than 32 bytes")
    return key.encode()
