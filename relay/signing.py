"""Request authentication: Standard Webhooks v1 for the Action, static credentials for the webhook.

Pure functions over headers and bytes, no I/O, so they are tested against the published vector and the
reference library. Every comparison of secret material is constant-time, and a rejection carries a reason
that is safe to send back (it never echoes a credential).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterable, Mapping

TIMESTAMP_TOLERANCE_SECONDS = 300

# Request headers that never carry a credential, kept with a dead letter so a person can tell where it came
# from. A custom-header credential may not use any of these names (nor the ones the request needs for itself),
# or it would be stored in clear.
DIAGNOSTIC_HEADERS = frozenset(
    {"content-type", "content-length", "user-agent", "webhook-id", "webhook-timestamp", "x-request-id"}
)
HEADERS_NOT_FOR_CREDENTIALS = DIAGNOSTIC_HEADERS | {"authorization", "host", "webhook-signature"}


class Rejected(Exception):
    """The request is not authentic; `reason` says why, for the 401 body, and `code` names the kind of
    failure in a word, for metrics."""

    def __init__(self, reason: str, code: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


def sign(key: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    """One `v1,<base64>` entry of a `webhook-signature` header."""
    mac = hmac.new(key, f"{message_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def verify_standard_webhook(
    headers: Mapping[str, str], body: bytes, keys: Iterable[bytes], now: float
) -> str:
    """Checks a Standard Webhooks v1 request and returns its `webhook-id`.

    Any listed `v1` signature matching any key is accepted, which is what lets a sender sign with an old
    and a new secret while both ends rotate.
    """
    message_id = headers.get("webhook-id")
    timestamp_text = headers.get("webhook-timestamp")
    signature_header = headers.get("webhook-signature")
    for name, value in (
        ("webhook-id", message_id),
        ("webhook-timestamp", timestamp_text),
        ("webhook-signature", signature_header),
    ):
        if not value:
            raise Rejected(f"missing {name} header", "missing_header")
    assert message_id is not None and timestamp_text is not None and signature_header is not None
    # isascii(): str.isdigit() also accepts "²³" (latin-1, so it can arrive in a header), which int() refuses.
    if not (timestamp_text.isascii() and timestamp_text.isdigit()) or len(timestamp_text) > 12:
        raise Rejected("webhook-timestamp is not a Unix time in seconds", "malformed_timestamp")
    timestamp = int(timestamp_text)
    if abs(now - timestamp) > TIMESTAMP_TOLERANCE_SECONDS:
        raise Rejected(
            f"webhook-timestamp is outside the {TIMESTAMP_TOLERANCE_SECONDS} s tolerance",
            "timestamp_out_of_tolerance",
        )

    offered = []
    for entry in signature_header.split():
        version, comma, encoded = entry.partition(",")
        if version != "v1" or not comma:
            continue  # other schemes (v1a, future versions) are not ours to judge
        try:
            offered.append(base64.b64decode(encoded, validate=True))
        except ValueError:  # binascii.Error, or a str that is not ASCII
            continue
    if not offered:
        raise Rejected("webhook-signature has no v1 signature", "no_v1_signature")

    signed_content = f"{message_id}.{timestamp_text}.".encode() + body
    matched = False
    for key in keys:
        expected = hmac.new(key, signed_content, hashlib.sha256).digest()
        for signature in offered:
            # No early exit: the time taken must not reveal which key or entry matched.
            matched |= hmac.compare_digest(expected, signature)
    if not matched:
        raise Rejected("no webhook-signature entry matches a configured secret", "bad_signature")
    return message_id


def verify_webhook_credentials(
    headers: Mapping[str, str],
    *,
    tokens: Iterable[str],
    basic: Iterable[str],
    custom_headers: Iterable[tuple[str, str]],
) -> None:
    """Checks the credential Auth0's webhook destination sends: bearer, HTTP Basic, or a custom header."""
    presented = False
    matched = False
    authorization = headers.get("authorization", "")
    scheme, _, credential = authorization.partition(" ")
    credential = credential.strip()
    if scheme.lower() == "bearer" and credential:
        presented = True
        for token in tokens:
            matched |= hmac.compare_digest(credential.encode(), token.encode())
    elif scheme.lower() == "basic" and credential:
        presented = True
        try:
            pair = base64.b64decode(credential, validate=True)
        except ValueError:  # binascii.Error, or a str that is not ASCII
            raise Rejected("Authorization Basic credential is not base64", "malformed_credentials") from None
        for allowed in basic:
            matched |= hmac.compare_digest(pair, allowed.encode())
    for name, value in custom_headers:
        offered = headers.get(name)
        if offered is not None:
            presented = True
            matched |= hmac.compare_digest(offered.encode(), value.encode())
    if not presented:
        raise Rejected(
            "missing credentials: expected a bearer token, HTTP Basic, or the configured header",
            "missing_credentials",
        )
    if not matched:
        raise Rejected("unknown credentials", "unknown_credentials")
