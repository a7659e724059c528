"""The signingKey rules: the whole token matrix, and the keys read from Secrets Manager (moto server)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import pytest
from aiobotocore.session import get_session

from controller.auth import MAX_TOKEN_LENGTH, TokenVerifier, fetch_signing_keys
from controller.errors import AuthError, ConfigError
from tests.chromium_fixtures import KEY, PREVIOUS_KEY, PROJECT_ID, SESSION_ID, claims, mint
from tests.conftest import boto_client

if TYPE_CHECKING:
    from types_aiobotocore_secretsmanager import SecretsManagerClient

NOW = 1_800_000_000.0
LEEWAY = 30.0
OTHER_KEY = "an-unrelated-signing-key-0123456789abcdef0123456789abcdef01234567"


def verifier(*, project_id: str | None = PROJECT_ID, keys: tuple[str, ...] = (KEY,)) -> TokenVerifier:
    """A verifier for SESSION_ID with the given keys, 30 s leeway."""
    return TokenVerifier(
        [key.encode() for key in keys], session_id=SESSION_ID, project_id=project_id, leeway=LEEWAY
    )


def token(**overrides: Any) -> str:
    """A token issued at NOW with ``overrides`` applied, signed with KEY."""
    return mint(claims(now=NOW, **overrides))


def reason(raw: str | None, check: TokenVerifier | None = None) -> str:
    """The reason ``raw`` is rejected at NOW."""
    with pytest.raises(AuthError) as error:
        (check or verifier()).verify(raw, now=NOW)
    return error.value.reason


def b64(data: dict[str, Any] | bytes) -> str:
    """base64url without padding, as in a compact JWT."""
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def hs256(header: dict[str, Any], payload: bytes) -> str:
    """A compact JWT over exactly these payload bytes, signed HS256 with KEY."""
    signing_input = f"{b64(header)}.{b64(payload)}"
    return f"{signing_input}.{b64(hmac.new(KEY.encode(), signing_input.encode(), hashlib.sha256).digest())}"


def test_valid_token_accepted() -> None:
    """A well-formed token for this session and project yields its claims."""
    accepted = verifier().verify(token(userId="user_1"), now=NOW)
    assert accepted.session_id == SESSION_ID
    assert accepted.project_id == PROJECT_ID
    assert accepted.user_id == "user_1"
    assert accepted.token_id == "jti-test-1"
    assert accepted.expires_at == NOW + 600


def test_nonce_used_as_token_id_without_jti() -> None:
    """A token with ``nonce`` instead of ``jti`` still has a token id."""
    payload = claims(now=NOW, nonce="nonce-1")
    del payload["jti"]
    assert verifier().verify(mint(payload), now=NOW).token_id == "nonce-1"


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_alg_none_rejected(alg: str) -> None:
    """An unsigned token (alg none, any spelling) is rejected."""
    unsigned = f"{b64({'alg': alg, 'typ': 'JWT'})}.{b64(claims(now=NOW))}."
    assert reason(unsigned) == "algorithm_not_allowed"


def test_alg_none_with_a_signature_rejected() -> None:
    """alg none carrying a (valid HS256) signature is still rejected."""
    _, payload, signature = token().split(".")
    forged = f"{b64({'alg': 'none', 'typ': 'JWT'})}.{payload}.{signature}"
    assert reason(forged) == "algorithm_not_allowed"


@pytest.mark.parametrize("alg", ["HS384", "HS512"])
def test_other_hmac_algorithms_rejected(alg: str) -> None:
    """A token signed with the right key but another HMAC algorithm is rejected."""
    assert reason(mint(claims(now=NOW), algorithm=alg)) == "algorithm_not_allowed"


def test_asymmetric_algorithm_header_rejected() -> None:
    """A header claiming RS256 (key-confusion attempt) is rejected before any verification."""
    _, payload, signature = token().split(".")
    assert reason(f"{b64({'alg': 'RS256', 'typ': 'JWT'})}.{payload}.{signature}") == "algorithm_not_allowed"


def test_header_alg_swapped_to_hs256_breaks_the_signature() -> None:
    """An HS512 signature relabelled HS256 does not verify."""
    _, payload, signature = mint(claims(now=NOW), algorithm="HS512").split(".")
    assert reason(f"{b64({'alg': 'HS256', 'typ': 'JWT'})}.{payload}.{signature}") == "bad_signature"


def test_wrong_key_rejected() -> None:
    """A token signed with another key is rejected."""
    assert reason(mint(claims(now=NOW), key=OTHER_KEY)) == "bad_signature"


def test_tampered_payload_rejected() -> None:
    """Changing the payload of a signed token breaks its signature."""
    header, _, signature = token().split(".")
    forged = f"{header}.{b64(claims(now=NOW, exp=int(NOW) + 86_000))}.{signature}"
    assert reason(forged) == "bad_signature"


def test_expired_rejected() -> None:
    """A token expired longer ago than the leeway is rejected."""
    assert reason(token(exp=int(NOW - LEEWAY - 1))) == "expired"


def test_expired_within_leeway_accepted() -> None:
    """A token expired less than the leeway ago is still accepted (clock skew)."""
    verifier().verify(token(exp=int(NOW - LEEWAY + 1)), now=NOW)


def test_not_yet_valid_rejected() -> None:
    """A token whose nbf is further in the future than the leeway is rejected."""
    assert reason(token(nbf=int(NOW + LEEWAY + 1))) == "not_yet_valid"


def test_nbf_within_leeway_accepted() -> None:
    """A token valid a little in the future (within the leeway) is accepted."""
    verifier().verify(token(nbf=int(NOW + LEEWAY - 1)), now=NOW)


def test_issued_in_future_rejected() -> None:
    """A token issued beyond the leeway in the future is rejected."""
    assert reason(token(iat=int(NOW + LEEWAY + 60), exp=int(NOW + 600))) == "issued_in_future"


def test_zero_leeway_is_strict() -> None:
    """With no leeway a token expired one second ago is rejected."""
    strict = TokenVerifier([KEY.encode()], session_id=SESSION_ID, leeway=0)
    assert reason(token(exp=int(NOW) - 1), strict) == "expired"


@pytest.mark.parametrize(
    ("audience", "expected"),
    [("other", "wrong_audience"), (["other", "more"], "wrong_audience"), ([], "missing_claim_aud")],
)
def test_wrong_audience_rejected(audience: object, expected: str) -> None:
    """A token whose aud does not contain cdp-access is rejected."""
    assert reason(token(aud=audience)) == expected


@pytest.mark.parametrize("audience", ["cdp-access", ["api", "cdp-access"]])
def test_audience_containing_cdp_access_accepted(audience: object) -> None:
    """aud as a string or a list containing cdp-access is accepted."""
    verifier().verify(token(aud=audience), now=NOW)


def test_wrong_issuer_rejected() -> None:
    """A token from another issuer is rejected."""
    assert reason(token(iss="someone-else")) == "wrong_issuer"


def test_another_sessions_valid_token_rejected() -> None:
    """A perfectly valid token for another session does not open this one."""
    assert reason(token(sub="sess_other", sessionId="sess_other")) == "wrong_session"


@pytest.mark.parametrize(
    ("sub", "session_id"), [("sess_other", SESSION_ID), (SESSION_ID, "sess_other")], ids=["sub", "sessionId"]
)
def test_sub_and_session_id_must_both_match(sub: str, session_id: str) -> None:
    """sub ≠ sessionId is rejected, whichever of the two names another session."""
    assert reason(token(sub=sub, sessionId=session_id)) == "wrong_session"


@pytest.mark.parametrize("claim", ["iss", "aud", "sub", "sessionId", "exp", "iat", "nbf"])
def test_each_required_claim_missing(claim: str) -> None:
    """Each required claim, when missing, is rejected and named."""
    payload = claims(now=NOW)
    del payload[claim]
    assert reason(mint(payload)) == f"missing_claim_{claim}"


@pytest.mark.parametrize("claim", ["iss", "aud", "sub", "sessionId", "exp", "iat", "nbf"])
def test_each_required_claim_null(claim: str) -> None:
    """A required claim present but null counts as missing."""
    payload = json.dumps(claims(now=NOW, **{claim: None})).encode()
    assert reason(hs256({"alg": "HS256", "typ": "JWT"}, payload)) == f"missing_claim_{claim}"


def test_project_mismatch_rejected() -> None:
    """With PROJECT_ID set, a token for another project is rejected."""
    assert reason(token(projectId="proj_other")) == "wrong_project"


def test_project_missing_rejected_when_configured() -> None:
    """With PROJECT_ID set, a token without projectId is rejected."""
    payload = claims(now=NOW)
    del payload["projectId"]
    assert reason(mint(payload)) == "wrong_project"


def test_project_not_checked_when_unconfigured() -> None:
    """Without PROJECT_ID, any project's token for this session is accepted."""
    verifier(project_id=None).verify(token(projectId="proj_other"), now=NOW)


def test_rotation_accepts_current_and_previous_keys() -> None:
    """During a rotation tokens signed with the current or the previous key are both accepted."""
    rotating = verifier(keys=(KEY, PREVIOUS_KEY))
    rotating.verify(mint(claims(now=NOW), key=KEY), now=NOW)
    rotating.verify(mint(claims(now=NOW), key=PREVIOUS_KEY), now=NOW)
    assert reason(mint(claims(now=NOW), key=OTHER_KEY), rotating) == "bad_signature"


def test_previous_key_rejected_after_rotation_ends() -> None:
    """Once the previous key is dropped, its tokens are rejected."""
    assert reason(mint(claims(now=NOW), key=PREVIOUS_KEY)) == "bad_signature"


@pytest.mark.parametrize("claim", ["exp", "iat", "nbf"])
def test_string_time_claims_rejected(claim: str) -> None:
    """Times given as strings (PyJWT would accept "123") are rejected."""
    assert reason(token(**{claim: str(int(NOW))})) == f"invalid_claim_{claim}"


@pytest.mark.parametrize("claim", ["exp", "iat", "nbf"])
def test_boolean_time_claims_rejected(claim: str) -> None:
    """Times given as booleans are rejected."""
    assert reason(token(**{claim: True})) == f"invalid_claim_{claim}"


def test_huge_exp_rejected() -> None:
    """An absurd expiry (1e30) is rejected, not treated as 'valid forever'."""
    assert reason(token(exp=1e30)) == "lifetime_too_long"


def test_infinite_exp_rejected() -> None:
    """exp = Infinity (a JSON extension Python parses) is rejected."""
    payload = json.dumps(claims(now=NOW, exp=float("inf"))).encode()
    assert b"Infinity" in payload
    assert reason(hs256({"alg": "HS256", "typ": "JWT"}, payload)) == "invalid_claim_exp"


def test_lifetime_longer_than_allowed_rejected() -> None:
    """exp - iat longer than the configured maximum lifetime is rejected."""
    short = TokenVerifier([KEY.encode()], session_id=SESSION_ID, max_lifetime=3600)
    assert reason(token(exp=int(NOW + 7200)), short) == "lifetime_too_long"


def test_non_string_subject_rejected() -> None:
    """A numeric sub is rejected, never coerced into a match."""
    assert reason(token(sub=12345)) in {"invalid_claim_sub", "wrong_session", "malformed_token"}


@pytest.mark.parametrize("raw", [None, ""])
def test_missing_token_rejected(raw: str | None) -> None:
    """No token at all is rejected as missing."""
    assert reason(raw) == "missing_token"


@pytest.mark.parametrize("raw", ["not-a-jwt", "a.b.c", "eyJhbGciOiJIUzI1NiJ9", "...", "é.é.é"])
def test_garbage_rejected(raw: str) -> None:
    """Anything that is not a JWT is rejected as malformed."""
    assert reason(raw) == "malformed_token"


def test_oversized_token_rejected() -> None:
    """A token longer than the bound is rejected without being parsed."""
    assert reason(token(padding="x" * MAX_TOKEN_LENGTH)) == "malformed_token"


def test_reason_never_contains_the_token() -> None:
    """The rejection's text is a short reason, never the token or a part of it."""
    rejected = token(sub="sess_other", sessionId="sess_other")
    with pytest.raises(AuthError) as error:
        verifier().verify(rejected, now=NOW)
    text = str(error.value) + repr(error.value)
    assert all(part not in text for part in rejected.split("."))
    assert len(error.value.reason) < 40


@pytest.mark.parametrize("keys", [[], [b"too-short"]], ids=["none", "short"])
def test_verifier_refuses_missing_or_short_keys(keys: list[bytes]) -> None:
    """A verifier cannot be built without a key or with one shorter than 32 bytes."""
    with pytest.raises(ValueError, match="key"):
        TokenVerifier(keys, session_id=SESSION_ID)


# --- keys from Secrets Manager (moto server) --------------------------------------------------------------


@pytest.fixture
async def secrets(aws_endpoint: str) -> AsyncIterator[SecretsManagerClient]:
    """An aiobotocore Secrets Manager client on the moto server."""
    session = get_session()
    async with session.create_client(
        "secretsmanager", endpoint_url=aws_endpoint, region_name="us-east-1"
    ) as client:
        yield client


def secret_document(key: str, algorithm: str = "HS256") -> str:
    """The secret's JSON, as the platform stores it."""
    return json.dumps({"algorithm": algorithm, "signingKey": key})


@pytest.mark.anyio
async def test_secret_current_key(aws_endpoint: str, secrets: SecretsManagerClient) -> None:
    """A secret with one version yields that key."""
    arn = boto_client("secretsmanager", aws_endpoint).create_secret(
        Name="jwt-current", SecretString=secret_document(KEY)
    )["ARN"]
    assert await fetch_signing_keys(secrets, arn) == [KEY.encode()]


@pytest.mark.anyio
async def test_secret_rotation_current_then_previous(
    aws_endpoint: str, secrets: SecretsManagerClient
) -> None:
    """After a rotation the keys are AWSCURRENT then AWSPREVIOUS, and both verify tokens."""
    sm = boto_client("secretsmanager", aws_endpoint)
    arn = sm.create_secret(Name="jwt-rotated", SecretString=secret_document(PREVIOUS_KEY))["ARN"]
    sm.put_secret_value(SecretId=arn, SecretString=secret_document(KEY))
    keys = await fetch_signing_keys(secrets, arn)
    assert keys == [KEY.encode(), PREVIOUS_KEY.encode()]
    rotating = TokenVerifier(keys, session_id=SESSION_ID, project_id=PROJECT_ID)
    rotating.verify(mint(claims(), key=KEY))
    rotating.verify(mint(claims(), key=PREVIOUS_KEY))


@pytest.mark.anyio
async def test_secret_by_name(aws_endpoint: str, secrets: SecretsManagerClient) -> None:
    """The secret may be given by name as well as by ARN."""
    boto_client("secretsmanager", aws_endpoint).create_secret(
        Name="jwt-by-name", SecretString=secret_document(KEY)
    )
    assert await fetch_signing_keys(secrets, "jwt-by-name") == [KEY.encode()]


@pytest.mark.anyio
async def test_secret_missing_is_a_config_error(aws_endpoint: str, secrets: SecretsManagerClient) -> None:
    """A secret that does not exist stops the start, naming the variable."""
    with pytest.raises(ConfigError) as error:
        await fetch_signing_keys(
            secrets, "arn:aws:secretsmanager:us-east-1:123456789012:secret:missing-AbCdEf"
        )
    assert "WALLCRAWLER_JWT_SIGNING_SECRET_ARN" in str(error.value)


@pytest.mark.parametrize(
    "document",
    [
        "not json",
        json.dumps(["a", "list"]),
        json.dumps({"algorithm": "HS512", "signingKey": KEY}),
        json.dumps({"algorithm": "HS256", "signingKey": "short"}),
        json.dumps({"algorithm": "HS256"}),
    ],
    ids=["not-json", "not-object", "hs512", "short-key", "no-key"],
)
@pytest.mark.anyio
async def test_secret_unusable_current_is_a_config_error(
    aws_endpoint: str, secrets: SecretsManagerClient, document: str
) -> None:
    """An unusable current version stops the start, naming the variable but not the key."""
    arn = boto_client("secretsmanager", aws_endpoint).create_secret(Name="jwt-bad", SecretString=document)[
        "ARN"
    ]
    with pytest.raises(ConfigError) as error:
        await fetch_signing_keys(secrets, arn)
    assert "WALLCRAWLER_JWT_SIGNING_SECRET_ARN" in str(error.value)
    assert KEY not in str(error.value)


@pytest.mark.anyio
async def test_secret_broken_previous_ignored(aws_endpoint: str, secrets: SecretsManagerClient) -> None:
    """A broken previous version does not stop the current key from working."""
    sm = boto_client("secretsmanager", aws_endpoint)
    arn = sm.create_secret(Name="jwt-prev-broken", SecretString="garbage")["ARN"]
    sm.put_secret_value(SecretId=arn, SecretString=secret_document(KEY))
    assert await fetch_signing_keys(secrets, arn) == [KEY.encode()]
