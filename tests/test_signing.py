import base64
import time
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st
from standardwebhooks.webhooks import Webhook

from relay.settings import decode_signing_secret
from relay.signing import Rejected, sign, verify_standard_webhook, verify_webhook_credentials

# The published Standard Webhooks test vector (standard-webhooks/spec, reused by every reference library).
VECTOR_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
VECTOR_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
VECTOR_TIMESTAMP = 1614265330
VECTOR_BODY = b'{"test": 2432232314}'
VECTOR_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="

VECTOR_KEY = decode_signing_secret(VECTOR_SECRET, "test")
OTHER_KEY = b"another-thirty-two-byte-hmac-key"

NO_MATCH = "no webhook-signature entry matches a configured secret"
OUTSIDE_TOLERANCE = "webhook-timestamp is outside the 300 s tolerance"
NO_V1_SIGNATURE = "webhook-signature has no v1 signature"
NOT_UNIX_TIME = "webhook-timestamp is not a Unix time in seconds"


def webhook_headers(
    message_id: str = VECTOR_ID, timestamp: str = str(VECTOR_TIMESTAMP), signature: str = VECTOR_SIGNATURE
) -> dict[str, str]:
    return {"webhook-id": message_id, "webhook-timestamp": timestamp, "webhook-signature": signature}


def accepted(
    headers: dict[str, str],
    body: bytes = VECTOR_BODY,
    keys: tuple[bytes, ...] = (VECTOR_KEY,),
    now: float = VECTOR_TIMESTAMP,
) -> str:
    return verify_standard_webhook(headers, body, keys, now)


def rejection(
    headers: dict[str, str],
    body: bytes = VECTOR_BODY,
    keys: tuple[bytes, ...] = (VECTOR_KEY,),
    now: float = VECTOR_TIMESTAMP,
) -> str:
    with pytest.raises(Rejected) as refused:
        verify_standard_webhook(headers, body, keys, now)
    return refused.value.reason


def test_sign_reproduces_the_published_vector():
    assert sign(VECTOR_KEY, VECTOR_ID, VECTOR_TIMESTAMP, VECTOR_BODY) == VECTOR_SIGNATURE


def test_published_vector_is_accepted_and_its_id_returned():
    assert accepted(webhook_headers()) == VECTOR_ID


# --- the reference library as an oracle ---------------------------------------------------------------

secret_keys = st.binary(min_size=24, max_size=64)
message_ids = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=64)
bodies = st.text(max_size=2000)


@given(key=secret_keys, message_id=message_ids, timestamp=st.integers(0, 10**11), body=bodies)
def test_signatures_from_the_reference_library_verify_here(key, message_id, timestamp, body):
    secret = "whsec_" + base64.b64encode(key).decode()
    signature = Webhook(secret).sign(message_id, datetime.fromtimestamp(timestamp, tz=UTC), body)

    assert sign(decode_signing_secret(secret, "test"), message_id, timestamp, body.encode()) == signature
    headers = webhook_headers(message_id, str(timestamp), signature)
    assert verify_standard_webhook(headers, body.encode(), [key], now=timestamp) == message_id


@given(key=secret_keys, message_id=message_ids, offset=st.integers(-240, 240), body=bodies)
def test_our_signatures_verify_with_the_reference_library(key, message_id, offset, body):
    # The reference library checks the timestamp against the real clock, so sign close to now.
    timestamp = int(time.time()) + offset
    headers = webhook_headers(message_id, str(timestamp), sign(key, message_id, timestamp, body.encode()))

    assert Webhook(key).verify(body.encode(), headers, json_parse=False) is None


# --- refusals ----------------------------------------------------------------------------------------


def test_changed_body_is_refused():
    assert rejection(webhook_headers(), body=b'{"test": 2432232315}') == NO_MATCH


def test_changed_id_is_refused():
    assert rejection(webhook_headers(message_id="msg_p5jXN8AQM9LWM0D4loKWxJel")) == NO_MATCH


def test_changed_timestamp_within_tolerance_is_refused():
    assert rejection(webhook_headers(timestamp=str(VECTOR_TIMESTAMP + 1))) == NO_MATCH


def test_wrong_secret_is_refused():
    assert rejection(webhook_headers(), keys=(OTHER_KEY,)) == NO_MATCH


def test_no_configured_secret_refuses_everything():
    assert rejection(webhook_headers(), keys=()) == NO_MATCH


@pytest.mark.parametrize("age", [301, 3600, -301, -3600], ids=["old", "very-old", "ahead", "far-ahead"])
def test_timestamp_outside_tolerance_is_refused(age):
    assert rejection(webhook_headers(), now=VECTOR_TIMESTAMP + age) == OUTSIDE_TOLERANCE


@pytest.mark.parametrize("age", [300, -300], ids=["300s-old", "300s-ahead"])
def test_timestamp_exactly_at_tolerance_is_accepted(age):
    assert accepted(webhook_headers(), now=VECTOR_TIMESTAMP + age) == VECTOR_ID


@pytest.mark.parametrize(
    "signature",
    [
        "v2," + VECTOR_SIGNATURE.removeprefix("v1,"),
        "v1a," + VECTOR_SIGNATURE.removeprefix("v1,"),
        "v1a,c29tZS1lZDI1NTE5LXNpZ25hdHVyZQ== v2,AAAA",
    ],
    ids=["v2", "v1a", "v1a-and-v2"],
)
def test_only_unknown_signature_versions_are_refused(signature):
    assert rejection(webhook_headers(signature=signature)) == NO_V1_SIGNATURE


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_missing_header_is_refused_by_name(missing):
    headers = webhook_headers()
    del headers[missing]
    assert rejection(headers) == f"missing {missing} header"


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_empty_header_counts_as_missing(missing):
    assert rejection(webhook_headers() | {missing: ""}) == f"missing {missing} header"


@pytest.mark.parametrize(
    "timestamp",
    ["soon", "1614265330.0", "-1614265330", "1.6e9", "0x603624f2", " 1614265330", "1614265330000000", "²³"],
)
def test_non_numeric_timestamp_is_refused(timestamp):
    # "²³" is latin-1, so it can arrive in a real HTTP header; str.isdigit() accepts it, int() does not.
    assert rejection(webhook_headers(timestamp=timestamp)) == NOT_UNIX_TIME


@pytest.mark.parametrize(
    "signature",
    [
        "v1" + VECTOR_SIGNATURE.removeprefix("v1,"),
        "v1",
        "v1,@@@@not-base64@@@@",
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE",
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OÉ=",
    ],
    ids=["no-comma", "bare-version", "not-base64", "bad-padding", "non-ascii"],
)
def test_malformed_signature_is_refused(signature):
    assert rejection(webhook_headers(signature=signature)) == NO_V1_SIGNATURE


@pytest.mark.parametrize(
    "signature",
    [
        f"v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA= {VECTOR_SIGNATURE}",
        f"{VECTOR_SIGNATURE} v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        f"v1a,c29tZS1lZDI1NTE5 v1,not-base64 {VECTOR_SIGNATURE}",
    ],
    ids=["matching-last", "matching-first", "after-foreign-and-malformed"],
)
def test_one_matching_signature_among_several_is_accepted(signature):
    assert accepted(webhook_headers(signature=signature)) == VECTOR_ID


def test_second_configured_secret_matching_is_accepted():
    assert accepted(webhook_headers(), keys=(OTHER_KEY, VECTOR_KEY)) == VECTOR_ID


# --- static credentials for the webhook destination --------------------------------------------------

TOKENS = ("current-bearer-token-0123", "next-bearer-token-4567")
BASIC = ("auth0:basic-password-0123",)
CUSTOM_HEADERS = (("x-relay-key", "custom-header-secret-0123"),)
CONFIGURED_SECRETS = (*TOKENS, *BASIC, "basic-password-0123", CUSTOM_HEADERS[0][1])


def check(headers: dict[str, str]) -> None:
    verify_webhook_credentials(headers, tokens=TOKENS, basic=BASIC, custom_headers=CUSTOM_HEADERS)


def refusal(headers: dict[str, str]) -> str:
    with pytest.raises(Rejected) as refused:
        check(headers)
    return refused.value.reason


def basic(pair: str) -> str:
    return "Basic " + base64.b64encode(pair.encode()).decode()


@pytest.mark.parametrize("token", TOKENS)
def test_every_configured_bearer_token_is_accepted(token):
    assert check({"authorization": f"Bearer {token}"}) is None


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "bEaReR"])
def test_bearer_scheme_is_case_insensitive(scheme):
    assert check({"authorization": f"{scheme} {TOKENS[0]}"}) is None


@pytest.mark.parametrize(
    "token", ["wrong-token", TOKENS[0] + "x", TOKENS[0][:-1], TOKENS[0].upper()], ids=lambda t: t[:12]
)
def test_unknown_bearer_token_is_refused(token):
    assert refusal({"authorization": f"Bearer {token}"}) == "unknown credentials"


def test_configured_basic_pair_is_accepted():
    assert check({"authorization": basic(BASIC[0])}) is None


@pytest.mark.parametrize("scheme", ["basic", "BASIC"])
def test_basic_scheme_is_case_insensitive(scheme):
    assert check({"authorization": basic(BASIC[0]).replace("Basic", scheme)}) is None


@pytest.mark.parametrize("pair", ["auth0:wrong-password", "other:basic-password-0123", "auth0", "auth0:"])
def test_unknown_basic_pair_is_refused(pair):
    assert refusal({"authorization": basic(pair)}) == "unknown credentials"


@pytest.mark.parametrize("credential", ["!!not-base64!!", "YXV0aDA6cGFzcw", "ÿÿÿÿ"])
def test_malformed_basic_credential_is_refused(credential):
    # "ÿÿÿÿ" is latin-1, which is how a server decodes non-ASCII header bytes.
    assert "base64" in refusal({"authorization": f"Basic {credential}"})


def test_configured_custom_header_is_accepted():
    assert check({"x-relay-key": CUSTOM_HEADERS[0][1]}) is None


@pytest.mark.parametrize("value", ["wrong-value", CUSTOM_HEADERS[0][1] + " ", ""])
def test_unknown_custom_header_value_is_refused(value):
    assert refusal({"x-relay-key": value}) == "unknown credentials"


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"authorization": ""},
        {"authorization": "Bearer "},
        {"authorization": "Digest abc"},
        {"x-other": "v"},
    ],
    ids=["none", "empty-authorization", "empty-bearer", "other-scheme", "unrelated-header"],
)
def test_absent_credentials_are_refused_as_missing(headers):
    assert "missing" in refusal(headers)


def test_no_configured_credentials_refuse_a_presented_token():
    with pytest.raises(Rejected) as refused:
        verify_webhook_credentials(
            {"authorization": f"Bearer {TOKENS[0]}"}, tokens=(), basic=(), custom_headers=()
        )
    assert refused.value.reason == "unknown credentials"


@pytest.mark.parametrize(
    "headers",
    [
        {"authorization": "Bearer presented-secret-token"},
        {"authorization": f"Bearer {TOKENS[0][:-1]}"},
        {"authorization": basic("auth0:presented-secret-password")},
        {"authorization": "Basic presented-secret-garbage!"},
        {"x-relay-key": "presented-secret-header-value"},
        {"x-relay-key": CUSTOM_HEADERS[0][1][:-1]},
        {},
    ],
)
def test_refusal_reason_never_contains_a_credential(headers):
    reason = refusal(headers)
    presented = [value.removeprefix("Bearer ").removeprefix("Basic ") for value in headers.values()]
    for credential in (*CONFIGURED_SECRETS, *presented, "presented-secret", TOKENS[0][:-1]):
        assert credential not in reason
