"""The one place that talks to the Auth0 Management API.

Credentials come from `AUTH0_DOMAIN`, `AUTH0_CLIENT_ID` and `AUTH0_CLIENT_SECRET`; the official SDK
(`auth0-python`) fetches and caches a client-credentials token for the audience `https://<domain>/api/v2/`.
Every request goes through `Management.call`, which waits out 429 answers as long as their `Retry-After` says
(a bounded number of times, telling `on_rate_limit` of each wait) and turns 401/403 answers into an error that
names the scope the request needs.
The SDK's own retries are switched off for each request (`ONE_TRY`): they would also repeat a POST after a 5xx
or a 409, and creating an Action twice is worse than failing once. Where the SDK's models cannot describe
an answer (deliveries come as a bare array or as `{deliveries, next}`; a 202 may have no body),
`Management.request` sends plain JSON through `call` with the same token; the Events API's server-sent events
are streamed by `relay.auth0.catch_up` with `access_token` and `refused`.
"""

from __future__ import annotations

import email.utils
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import httpx
from auth0.management import ManagementClient
from auth0.management.core.api_error import ApiError
from auth0.management.core.parse_error import ParsingError
from auth0.management.core.request_options import RequestOptions
from auth0.management.token_provider import TokenProvider

from relay.settings import ConfigError

T = TypeVar("T")

RateLimited = Callable[[str, float], None]
"""Told of each wait after a 429: what was being tried (completing "trying to …"), and the seconds to wait."""

CREDENTIAL_VARIABLES = {
    "AUTH0_DOMAIN": "the tenant's canonical domain, e.g. acme.us.auth0.com (not a custom domain)",
    "AUTH0_CLIENT_ID": "the client id of the machine-to-machine application",
    "AUTH0_CLIENT_SECRET": "the client secret of the machine-to-machine application",
}

MAX_ATTEMPTS = 5
"""Tries per request while Auth0 answers 429."""
MAX_WAIT_SECONDS = 60.0
"""Longest single wait after a 429, whatever `Retry-After` says."""

ONE_TRY: RequestOptions = {"max_retries": 0}
"""Request options for every SDK call made through `Management.call`: no retries by the SDK itself."""

_DOMAIN = re.compile(r"[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+(:[0-9]{1,5})?")
_GRANT_HINT = (
    "grant it in the Dashboard: Applications > APIs > Auth0 Management API > Machine To Machine Applications"
)


class ManagementError(Exception):
    """A Management API request failed; the message says what to do and never holds a secret."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status  # Auth0's HTTP status, when Auth0 answered


@dataclass(frozen=True, slots=True)
class Credentials:
    domain: str
    client_id: str
    client_secret: str = field(repr=False)


def read_variables(environ: Mapping[str, str], required: Mapping[str, str]) -> dict[str, str]:
    """The values of `required` (name → what it is); one ConfigError line for each one that is missing."""
    values = {name: environ.get(name, "").strip() for name in required}
    missing = [f"{name}: not set; {meaning}" for name, meaning in required.items() if not values[name]]
    if missing:
        raise ConfigError("\n".join(missing))
    return values


def credentials_from(values: Mapping[str, str]) -> Credentials:
    raw = values["AUTH0_DOMAIN"]
    domain = raw.removeprefix("https://").rstrip("/")
    if not _DOMAIN.fullmatch(domain):
        raise ConfigError(f"AUTH0_DOMAIN: expected a host name such as acme.us.auth0.com, got {raw!r}")
    return Credentials(domain, values["AUTH0_CLIENT_ID"], values["AUTH0_CLIENT_SECRET"])


def credentials_from_env(environ: Mapping[str, str]) -> Credentials:
    return credentials_from(read_variables(environ, CREDENTIAL_VARIABLES))


class Management:
    """A Management API client for one tenant; `call` runs one SDK request with the rules above."""

    def __init__(
        self,
        credentials: Credentials,
        *,
        sleep: Callable[[float], None] = time.sleep,
        secrets: Iterable[str] = (),
        timeout: float = 30.0,
        on_rate_limit: RateLimited = lambda _what, _seconds: None,
    ) -> None:
        self.domain = credentials.domain
        # The SDK's provider fetches a client-credentials token for https://<domain>/api/v2/ and caches it;
        # SDK calls and the plain requests below share it.
        self._tokens = TokenProvider(
            domain=credentials.domain,
            client_id=credentials.client_id,
            client_secret=credentials.client_secret,
        )
        self._sdk = ManagementClient(domain=credentials.domain, token=self._tokens.get_token, timeout=timeout)
        self._timeout = timeout
        self._sleep = sleep
        self._on_rate_limit = on_rate_limit
        self._secrets = tuple(s for s in (credentials.client_secret, *secrets) if s)

    def call(self, what: str, scope: str, request: Callable[[ManagementClient, RequestOptions], T]) -> T:
        """Runs `request(sdk, ONE_TRY)`; `request` passes ONE_TRY on as the SDK call's `request_options`.

        `what` completes "could not …" in messages; `scope` is the Management API scope the request needs.
        """
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                return request(self._sdk, ONE_TRY)
            except ApiError as error:
                refusal = _Refusal(error.status_code or 0, error.headers or {}, error.body)
            except httpx.HTTPStatusError as error:
                # Only the token request raises this: the SDK fetches tokens with an httpx client of its own.
                refusal = _Refusal.of_token_request(error.response)
            except ParsingError as error:
                cause = " ".join(str(error.cause).split())[:300]
                raise self._error(f"could not {what}: unexpected answer from Auth0: {cause}") from None
            except httpx.TransportError as error:
                raise self._error(f"could not reach https://{self.domain} to {what}: {error}") from None
            if refusal.status != 429 or attempt == MAX_ATTEMPTS:
                raise self._error(refusal.explain(what, scope), refusal.status) from None
            wait = retry_after(refusal.headers)
            self._on_rate_limit(what, wait)
            self._sleep(wait)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def request(
        self,
        what: str,
        scope: str,
        method: str,
        path: str,
        *,
        params: Mapping[str, str | int] | None = None,
        json: Any = None,
    ) -> httpx.Response:
        """A JSON request to `/api/v2/<path>` under the rules of `call`; returns the 2xx answer."""

        def send(_sdk: ManagementClient, _once: RequestOptions) -> httpx.Response:
            headers = {"authorization": f"Bearer {self._tokens.get_token()}", "accept": "application/json"}
            with httpx.Client(timeout=self._timeout) as http:
                response = http.request(
                    method, f"https://{self.domain}/api/v2/{path}", params=params, json=json, headers=headers
                )
            if not response.is_success:
                raise ApiError(
                    status_code=response.status_code, headers=dict(response.headers), body=_body(response)
                )
            return response

        return self.call(what, scope, send)

    def access_token(self, what: str, scope: str) -> str:
        """A Management API token (cached), for a request made without the SDK such as a streamed one."""
        return self.call(what, scope, lambda _sdk, _once: self._tokens.get_token())

    def refused(self, response: httpx.Response, what: str, scope: str) -> ManagementError:
        """The error for a non-2xx answer to a request made without the SDK (its body already read)."""
        refusal = _Refusal(response.status_code, dict(response.headers), _body(response))
        return self._error(refusal.explain(what, scope), response.status_code)

    def _error(self, message: str, status: int | None = None) -> ManagementError:
        for secret in self._secrets:
            message = message.replace(secret, "[redacted]")
        return ManagementError(message, status)


@dataclass(frozen=True, slots=True)
class _Refusal:
    status: int
    headers: Mapping[str, str]
    body: Any
    token_request: bool = False

    @classmethod
    def of_token_request(cls, response: httpx.Response) -> _Refusal:
        return cls(response.status_code, dict(response.headers), _body(response), token_request=True)

    def explain(self, what: str, scope: str) -> str:
        reason = _reason(self.body)
        answer = f"{self.status} {reason}" if reason else str(self.status)
        if self.token_request and self.status == 401:
            return (
                f"Auth0 refused the client credentials ({answer}); check AUTH0_CLIENT_ID and "
                f"AUTH0_CLIENT_SECRET. To {what} the application needs the Management API scope {scope}"
            )
        if self.token_request and self.status == 403:
            return (
                f"Auth0 refused a Management API token ({answer}): the application is not authorized for the "
                f"Auth0 Management API. To {what} it needs the scope {scope}; {_GRANT_HINT}"
            )
        if self.status in (401, 403):
            return (
                f"Auth0 refused to {what} ({answer}): the application needs the scope {scope}; {_GRANT_HINT}"
            )
        if self.status == 429:
            return f"could not {what}: Auth0 was still rate limiting after {MAX_ATTEMPTS} attempts; try later"
        return f"could not {what}: Auth0 answered {answer}"


def _body(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text


def _reason(body: Any) -> str:
    """Auth0's own words from an error body: its error code, then `message` (API) or `error_description`."""
    if isinstance(body, Mapping):
        code = body.get("errorCode") or body.get("error")
        message = body.get("message") or body.get("error_description")
        return ": ".join(str(part) for part in (code, message) if part)
    return " ".join(str(body or "").split())[:300]


def retry_after(headers: Mapping[str, str], now: float | None = None) -> float:
    """Seconds to wait after a 429: `Retry-After` (seconds or a date), else Auth0's `X-RateLimit-Reset`."""
    lowered = {name.lower(): value for name, value in headers.items()}
    current = time.time() if now is None else now
    wait = 1.0
    raw = lowered.get("retry-after", "").strip()
    if raw.isdigit():
        wait = float(raw)
    elif raw and (date := email.utils.parsedate_tz(raw)) is not None:
        wait = email.utils.mktime_tz(date) - current
    elif lowered.get("x-ratelimit-reset", "").strip().isdigit():
        wait = float(lowered["x-ratelimit-reset"]) - current
    return min(max(wait, 0.0), MAX_WAIT_SECONDS)


def rfc3339(moment: datetime) -> str:
    """UTC, whole seconds, `Z`: the one form every Auth0 time filter accepts (at most 20 characters)."""
    return moment.astimezone(UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")
