"""The one fake of the Auth0 Management API: a tenant whose token endpoint respx answers, to which each test
adds the API routes it exercises. Nothing else is ever mocked; tests assert the exact requests made."""

from __future__ import annotations

import contextlib
import json
import urllib.parse
from collections.abc import Iterator
from typing import Any

import httpx
import respx

AUTH0_DOMAIN = "acme.us.auth0.com"
AUTH0_CLIENT_ID = "m2m-client-id-0123"
AUTH0_CLIENT_SECRET = "m2m-client-secret-abcdefghijklmnop"
AUTH0_ENVIRONMENT = {
    "AUTH0_DOMAIN": AUTH0_DOMAIN,
    "AUTH0_CLIENT_ID": AUTH0_CLIENT_ID,
    "AUTH0_CLIENT_SECRET": AUTH0_CLIENT_SECRET,
}
MANAGEMENT_API = f"https://{AUTH0_DOMAIN}/api/v2"
TOKEN_URL = f"https://{AUTH0_DOMAIN}/oauth/token"
ACCESS_TOKEN = "management-api-access-token"
# The client-credentials request the relay must make, as (method, path, query, form).
TOKEN_REQUEST = (
    "POST",
    "/oauth/token",
    {},
    {
        "grant_type": "client_credentials",
        "client_id": AUTH0_CLIENT_ID,
        "client_secret": AUTH0_CLIENT_SECRET,
        "audience": f"{MANAGEMENT_API}/",
    },
)


def mock_token(router: respx.MockRouter, answer: httpx.Response | None = None) -> respx.Route:
    """The tenant's token endpoint on `router`: a day-long Management API token, or `answer`."""
    return router.post(TOKEN_URL).mock(
        return_value=answer
        or httpx.Response(
            200, json={"access_token": ACCESS_TOKEN, "expires_in": 86400, "token_type": "Bearer"}
        )
    )


@contextlib.contextmanager
def management_api(*, assert_all_called: bool = False) -> Iterator[respx.MockRouter]:
    """respx in charge of every httpx request, with the token endpoint answering; any request to a route the
    test did not add fails the test."""
    with respx.mock(assert_all_mocked=True, assert_all_called=assert_all_called) as router:
        mock_token(router)
        yield router


def requests_made(router: respx.MockRouter) -> list[tuple[str, str, dict[str, str], Any]]:
    """Every request, as (method, path, query, body): JSON decoded, the token request's form decoded."""
    made = []
    for call in router.calls:
        request = call.request
        body: Any = None
        if request.content:
            if request.headers["content-type"].startswith("application/x-www-form-urlencoded"):
                body = dict(urllib.parse.parse_qsl(request.content.decode()))
            else:
                body = json.loads(request.content)
        made.append((request.method, request.url.path, dict(request.url.params), body))
    return made


def streams_page(*streams: dict[str, Any]) -> dict[str, Any]:
    """A page of `GET /api/v2/event-streams`, as Auth0 answers it."""
    return {"eventStreams": list(streams), "next": None}
