"""`relay send-sample`: post a signed `user.created` event to a relay, for a first look."""

from __future__ import annotations

import json
import secrets
import sys
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from typing import Any

from relay.settings import Settings, decode_signing_secret


def sample_event(email: str) -> dict[str, Any]:
    """A `user.created` event shaped as Auth0 sends it (but naming no tenant), with a fresh id and time."""
    now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    local_id = secrets.token_hex(12)
    return {
        "specversion": "1.0",
        "type": "user.created",
        "source": "urn:auth0:example.us.auth0.com",
        "id": "evt_" + secrets.token_urlsafe(16).replace("-", "a").replace("_", "b")[:22],
        "time": now,
        "data": {
            "object": {
                "user_id": f"auth0|{local_id}",
                "email": email,
                "email_verified": False,
                "name": email,
                "nickname": email.split("@")[0],
                "identities": [
                    {
                        "connection": "Username-Password-Authentication",
                        "provider": "auth0",
                        "isSocial": False,
                        "user_id": local_id,
                    }
                ],
                "app_metadata": {},
                "user_metadata": {},
                "created_at": now,
                "updated_at": now,
            }
        },
        # No `a0tenant`: a sample must not pin the schema to a tenant that does not exist (the first tenant
        # to deliver an event is the one the schema holds).
    }


def send_sample(settings: Settings, url: str, email: str) -> int:
    from relay.embedded import dev_credentials
    from relay.signing import sign

    if settings.signing_secrets:
        key = settings.signing_secrets[0]
    else:
        key = decode_signing_secret(dev_credentials(settings.data_dir).signing_secret, "dev-credentials.json")
    event = sample_event(email)
    body = json.dumps(event, separators=(",", ":")).encode()
    timestamp = int(time.time())
    request = urllib.request.Request(  # noqa: S310  (the URL is the operator's own relay)
        url.rstrip("/") + "/events/action",
        data=body,
        method="POST",
        headers={
            "content-type": "application/json",
            "webhook-id": event["id"],
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(key, event["id"], timestamp, body),
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            print(f"{response.status} {response.read().decode()}")
    except urllib.error.HTTPError as error:
        print(f"{error.code} {error.read().decode()}", file=sys.stderr)
        return 1
    except urllib.error.URLError as error:
        print(f"could not reach {url}: {error.reason}", file=sys.stderr)
        return 1
    print(f"posted {event['type']} {event['id']} for {event['data']['object']['user_id']}")
    return 0
