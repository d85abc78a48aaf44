import base64
import os
import subprocess
import sys
from pathlib import Path

import pytest

from relay.settings import ConfigError, Settings
from relay.signing import DIAGNOSTIC_HEADERS
from tests.support import REPO

# 24-byte and 32-byte keys in Standard Webhooks format.
SECRET_A = "whsec_" + base64.b64encode(b"a" * 24).decode()
SECRET_B = "whsec_" + base64.b64encode(b"b" * 32).decode()
TOO_SHORT_SECRET = "whsec_c2hvcnQtczNjcmV0"  # "short-s3cret": 12 bytes
SECRET_VARIABLES = {
    "DATABASE_URL",
    "RELAY_SIGNING_SECRETS",
    "RELAY_WEBHOOK_TOKENS",
    "RELAY_WEBHOOK_BASIC",
    "RELAY_WEBHOOK_HEADER",
}


def config_error(environ: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as error:
        Settings.from_env(environ)
    return str(error.value)


def test_empty_environment_gives_the_documented_defaults():
    settings = Settings.from_env({})

    assert settings == Settings()
    assert settings.database_url is None
    assert settings.signing_secrets == ()
    assert settings.webhook_tokens == ()
    assert settings.webhook_basic == ()
    assert settings.webhook_headers == ()
    assert settings.db_schema == "auth0"
    assert settings.host == "127.0.0.1"
    assert settings.port == 8000
    assert settings.max_body_bytes == 256 * 1024
    assert settings.delete_mode == "soft"
    assert settings.pool_size == 10
    assert settings.db_timeout_seconds == 2.0
    assert settings.data_dir == Path(".data")
    assert settings.log_level == "INFO"
    assert not settings.has_credentials


def test_blank_values_count_as_unset():
    blank = {
        name: "  "
        for name in (
            "DATABASE_URL",
            "RELAY_SIGNING_SECRETS",
            "RELAY_WEBHOOK_TOKENS",
            "RELAY_DB_SCHEMA",
            "RELAY_PORT",
            "RELAY_DELETE_MODE",
            "RELAY_LOG_LEVEL",
        )
    }
    assert Settings.from_env(blank) == Settings()


def test_every_variable_is_parsed():
    settings = Settings.from_env(
        {
            "DATABASE_URL": "postgresql://relay:pw@db.internal:5433/users",
            "RELAY_SIGNING_SECRETS": f"{SECRET_A}, {SECRET_B}",
            "RELAY_WEBHOOK_TOKENS": "token-one, token-two,,",
            "RELAY_WEBHOOK_BASIC": "auth0:first-password,backup:second:with-colon",
            "RELAY_WEBHOOK_HEADER": "X-Relay-Key: value-one, X-Other-Key:value-two",
            "RELAY_DB_SCHEMA": "identity_copy",
            "RELAY_HOST": "0.0.0.0",
            "RELAY_PORT": " 9100 ",
            "RELAY_MAX_BODY_BYTES": "1048576",
            "RELAY_DELETE_MODE": "scrub",
            "RELAY_DB_POOL_SIZE": "25",
            "RELAY_DB_TIMEOUT_SECONDS": "0.5",
            "RELAY_LOG_LEVEL": "debug",
            "RELAY_DATA_DIR": "/var/lib/relay",
        }
    )

    assert settings.database_url == "postgresql://relay:pw@db.internal:5433/users"
    assert settings.signing_secrets == (b"a" * 24, b"b" * 32)
    assert settings.webhook_tokens == ("token-one", "token-two")
    assert settings.webhook_basic == ("auth0:first-password", "backup:second:with-colon")
    assert settings.webhook_headers == (("x-relay-key", "value-one"), ("x-other-key", "value-two"))
    assert settings.db_schema == "identity_copy"
    assert settings.host == "0.0.0.0"
    assert settings.port == 9100
    assert settings.max_body_bytes == 1048576
    assert settings.delete_mode == "scrub"
    assert settings.pool_size == 25
    assert settings.db_timeout_seconds == 0.5
    assert settings.log_level == "DEBUG"
    assert settings.data_dir == Path("/var/lib/relay")
    assert settings.has_credentials


def test_signing_secret_without_padding_is_accepted_like_the_reference_libraries():
    unpadded = "whsec_" + base64.b64encode(b"c" * 25).decode().rstrip("=")
    assert Settings.from_env({"RELAY_SIGNING_SECRETS": unpadded}).signing_secrets == (b"c" * 25,)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("RELAY_WEBHOOK_TOKENS", "token-one"),
        ("RELAY_WEBHOOK_BASIC", "auth0:pw"),
        ("RELAY_WEBHOOK_HEADER", "X-Key:v"),
        ("RELAY_SIGNING_SECRETS", SECRET_A),
    ],
)
def test_any_one_credential_kind_is_enough(variable, value):
    assert Settings.from_env({variable: value}).has_credentials


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("DATABASE_URL", "mysql://relay:s3cret-db-password@db/users"),
        ("DATABASE_URL", "just some words s3cret-db-password"),
        ("DATABASE_URL", "postgresql://relay:s3cret-db-password@db/users?bogus_option=1"),
        ("RELAY_SIGNING_SECRETS", "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
        ("RELAY_SIGNING_SECRETS", "whsec_not*base64*at*all*s3cret"),
        ("RELAY_SIGNING_SECRETS", TOO_SHORT_SECRET),
        ("RELAY_SIGNING_SECRETS", f"{SECRET_A},{TOO_SHORT_SECRET}"),
        ("RELAY_WEBHOOK_BASIC", "no-colon-s3cret"),
        ("RELAY_WEBHOOK_BASIC", "auth0:"),
        ("RELAY_WEBHOOK_BASIC", ":s3cret-password"),
        ("RELAY_WEBHOOK_HEADER", "X-Relay-Key=s3cret-value"),
        ("RELAY_WEBHOOK_HEADER", "X-Relay-Key:"),
        ("RELAY_WEBHOOK_HEADER", "X Relay Key:s3cret-value"),
        ("RELAY_WEBHOOK_HEADER", "Authorization:Bearer s3cret-value"),
        ("RELAY_WEBHOOK_HEADER", "Content-Type:s3cret-value"),
        ("RELAY_DB_SCHEMA", "Auth0"),
        ("RELAY_DB_SCHEMA", "1users"),
        ("RELAY_DB_SCHEMA", "auth0; DROP SCHEMA public"),
        ("RELAY_DB_SCHEMA", "a" * 64),
        ("RELAY_DB_SCHEMA", "pg_relay"),
        ("RELAY_HOST", "http://0.0.0.0"),
        ("RELAY_HOST", "0.0.0.0:8000"),
        ("RELAY_HOST", "local host"),
        ("RELAY_PORT", "notaport"),
        ("RELAY_PORT", "0"),
        ("RELAY_PORT", "65536"),
        ("RELAY_PORT", "8000.5"),
        ("RELAY_MAX_BODY_BYTES", "1mb"),
        ("RELAY_MAX_BODY_BYTES", "100"),
        ("RELAY_MAX_BODY_BYTES", str(64 * 1024 * 1024 + 1)),
        ("RELAY_DELETE_MODE", "hard"),
        ("RELAY_DB_POOL_SIZE", "0"),
        ("RELAY_DB_POOL_SIZE", "ten"),
        ("RELAY_DB_TIMEOUT_SECONDS", "2s"),
        ("RELAY_DB_TIMEOUT_SECONDS", "0"),
        ("RELAY_DB_TIMEOUT_SECONDS", "31"),
        ("RELAY_DB_TIMEOUT_SECONDS", "nan"),
        ("RELAY_DB_TIMEOUT_SECONDS", "inf"),
        ("RELAY_LOG_LEVEL", "verbose"),
    ],
)
def test_malformed_value_names_its_variable_and_hides_secrets(variable, value):
    message = config_error({variable: value})

    assert message.startswith(f"{variable}: ")
    assert "s3cret" not in message
    if variable in SECRET_VARIABLES:
        for item in value.split(","):
            assert item.removeprefix("whsec_") not in message


def test_a_later_malformed_secret_is_reported_without_the_valid_one():
    message = config_error({"RELAY_SIGNING_SECRETS": f"{SECRET_B},{TOO_SHORT_SECRET}"})
    assert SECRET_B.removeprefix("whsec_") not in message


def relay_cli(*args: str, **variables: str) -> subprocess.CompletedProcess[str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("RELAY_")}
    env.pop("DATABASE_URL", None)
    env.update(variables)
    return subprocess.run(
        [sys.executable, "-m", "relay.cli", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("variable", "value"),
    [("RELAY_PORT", "notaport"), ("RELAY_SIGNING_SECRETS", TOO_SHORT_SECRET)],
)
def test_relay_serve_refuses_bad_configuration_in_one_line(variable, value):
    finished = relay_cli(
        "serve",
        DATABASE_URL="postgresql://relay@127.0.0.1:1/unused",
        RELAY_WEBHOOK_TOKENS="t",
        **{variable: value},
    )

    assert finished.returncode == 2
    lines = finished.stderr.splitlines()
    assert len(lines) == 1, finished.stderr
    assert lines[0].startswith(f"relay: configuration error: {variable}: ")
    assert "Traceback" not in finished.stderr
    assert TOO_SHORT_SECRET.removeprefix("whsec_") not in finished.stderr


@pytest.mark.parametrize("name", sorted(DIAGNOSTIC_HEADERS))
def test_a_custom_header_credential_may_not_use_a_header_kept_with_dead_letters(name):
    """Issue 10, item 4: a dead letter keeps its request's diagnostic headers, so a credential sent in one of
    them would be stored in clear."""
    message = config_error({"RELAY_WEBHOOK_HEADER": f"{name.title()}:s3cret-value"})

    assert message == (
        f"RELAY_WEBHOOK_HEADER: {name.title()!r} cannot carry a custom-header credential "
        "(the request needs it for itself, or a dead letter keeps it for diagnosis)"
    )


QUEUE_URL = "https://sqs.eu-west-1.amazonaws.com/123456789012/auth0-events"


def test_the_queue_region_comes_from_the_aws_environment_else_from_the_queue_url():
    assert Settings.from_env({"RELAY_SQS_QUEUE_URL": QUEUE_URL}).aws_region == "eu-west-1"
    named = {"RELAY_SQS_QUEUE_URL": QUEUE_URL, "AWS_DEFAULT_REGION": "us-east-2"}
    assert Settings.from_env(named).aws_region == "us-east-2"
    assert Settings.from_env({**named, "AWS_REGION": "ap-south-1"}).aws_region == "ap-south-1"
    assert Settings.from_env({}).sqs_queue_url is None


@pytest.mark.parametrize(
    ("environ", "variable"),
    [
        ({"RELAY_SQS_QUEUE_URL": "sqs://queue"}, "RELAY_SQS_QUEUE_URL"),
        ({"RELAY_SQS_QUEUE_URL": "http://127.0.0.1:5000/123456789012/q"}, "AWS_REGION"),
        ({"RELAY_EVENTBRIDGE_SOURCES": "aws.partner/auth0.com/a b"}, "RELAY_EVENTBRIDGE_SOURCES"),
        ({"RELAY_SQS_VISIBILITY_SECONDS": "1"}, "RELAY_SQS_VISIBILITY_SECONDS"),
        ({"RELAY_SQS_POLLERS": "0"}, "RELAY_SQS_POLLERS"),
    ],
)
def test_bad_eventbridge_settings_name_the_variable(environ, variable):
    assert config_error(environ).startswith(f"{variable}:")
