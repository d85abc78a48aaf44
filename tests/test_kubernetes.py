"""deploy/kubernetes/ against the relay it deploys. No cluster is at hand, so the manifests are linted, held
to the relay's own ports, routes, variables, user and drain time, and run for real where that is possible: a
relay started with the Deployment's environment (its secrets in files, as the Secret mounts them) answers the
probes and takes a signed event."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from relay.app import GRACEFUL_SHUTDOWN_SECONDS
from relay.settings import SECRET_FILE_SUFFIX, SECRET_VARIABLES, Settings
from tests.support import REPO
from tests.support.database import Database
from tests.support.events import encode, fixture
from tests.support.http import SIGNING_SECRET, relay_environment, running_relay, signed_headers

KUBERNETES = REPO / "deploy" / "kubernetes"


def manifests() -> dict[str, dict[str, Any]]:
    """Each object of the folder by kind (one object of each kind)."""
    objects = [
        document
        for path in sorted(KUBERNETES.glob("*.yaml"))
        for document in yaml.safe_load_all(path.read_text())
        if document
    ]
    by_kind = {document["kind"]: document for document in objects}
    assert len(by_kind) == len(objects), "one object of each kind is expected"
    return by_kind


MANIFESTS = manifests()
DEPLOYMENT = MANIFESTS["Deployment"]
POD = DEPLOYMENT["spec"]["template"]["spec"]
[RELAY] = POD["containers"]
JOB_POD = MANIFESTS["Job"]["spec"]["template"]["spec"]
[MIGRATE] = JOB_POD["containers"]


def plain_environment(container: dict[str, Any]) -> dict[str, str]:
    return {variable["name"]: variable["value"] for variable in container["env"]}


def settings_without_secrets(container: dict[str, Any]) -> Settings:
    """The settings the container's environment gives, its secret files aside (they exist only in a pod)."""
    environment = plain_environment(container)
    return Settings.from_env(
        {name: value for name, value in environment.items() if not name.endswith(SECRET_FILE_SUFFIX)}
    )


def documented_variables() -> set[str]:
    """The variables of the README's Configuration table."""
    readme = (REPO / "README.md").read_text()
    table = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([A-Z0-9_]+)` \|", table, flags=re.MULTILINE))


def secret_files(pod: dict[str, Any], container: dict[str, Any]) -> dict[str, str]:
    """{file path in the container: Secret key} for every Secret item the container mounts."""
    secrets = {volume["name"]: volume["secret"] for volume in pod["volumes"] if "secret" in volume}
    return {
        f"{mount['mountPath']}/{item['path']}": item["key"]
        for mount in container["volumeMounts"]
        if mount["name"] in secrets
        for item in secrets[mount["name"]]["items"]
    }


def test_every_deployment_file_passes_yamllint() -> None:
    linted = subprocess.run(
        [sys.executable, "-m", "yamllint", "--strict", "-c", str(REPO / ".yamllint.yaml"), "deploy"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )

    assert linted.returncode == 0, linted.stdout + linted.stderr


def test_the_kustomization_lists_every_manifest() -> None:
    listed = set(MANIFESTS["Kustomization"]["resources"])

    assert listed == {path.name for path in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(MANIFESTS) == {"Kustomization", "Deployment", "Service", "PodDisruptionBudget", "Job"}


def test_the_service_and_the_disruption_budget_select_the_relays_pods() -> None:
    labels = DEPLOYMENT["spec"]["template"]["metadata"]["labels"]

    assert DEPLOYMENT["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert MANIFESTS["Service"]["spec"]["selector"].items() <= labels.items()
    assert MANIFESTS["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert MANIFESTS["PodDisruptionBudget"]["spec"]["minAvailable"] < DEPLOYMENT["spec"]["replicas"]


def test_ports_agree_with_the_port_the_relay_listens_on() -> None:
    [port] = RELAY["ports"]
    settings = settings_without_secrets(RELAY)
    annotations = DEPLOYMENT["spec"]["template"]["metadata"]["annotations"]
    [service_port] = MANIFESTS["Service"]["spec"]["ports"]

    assert port["containerPort"] == settings.port
    assert settings.host == "0.0.0.0"  # reachable from the Service, not only inside the pod
    assert service_port["targetPort"] == port["name"]
    assert (
        RELAY["livenessProbe"]["httpGet"]["port"]
        == RELAY["readinessProbe"]["httpGet"]["port"]
        == port["name"]
    )
    assert int(annotations["prometheus.io/port"]) == settings.port
    assert annotations["prometheus.io/path"] == "/metrics"


@pytest.mark.parametrize(("pod", "container"), [(POD, RELAY), (JOB_POD, MIGRATE)], ids=["relay", "migrate"])
def test_every_variable_is_documented_and_secrets_come_only_from_files_of_the_secret(
    pod: dict[str, Any], container: dict[str, Any]
) -> None:
    environment = plain_environment(container)
    files = secret_files(pod, container)
    documented = documented_variables()

    for name, value in environment.items():
        secret = name.removesuffix(SECRET_FILE_SUFFIX)
        if name.endswith(SECRET_FILE_SUFFIX):
            assert secret in SECRET_VARIABLES and secret in documented, name
            assert value in files, f"{name}: {value} is not a file of the mounted Secret"
        else:
            assert name in documented, f"{name} is not a variable the README documents"
            assert name not in SECRET_VARIABLES, f"{name} holds a secret: use {name}{SECRET_FILE_SUFFIX}"
    assert {"DATABASE_URL_FILE"} <= set(environment)


@pytest.mark.parametrize(("container", "command"), [(RELAY, "serve"), (MIGRATE, "migrate")])
def test_the_containers_run_relay_commands_that_exist(container: dict[str, Any], command: str) -> None:
    assert container["args"] == ["relay", command]
    helped = subprocess.run([sys.executable, "-m", "relay", command, "--help"], capture_output=True, cwd=REPO)
    assert helped.returncode == 0


def test_pods_run_as_the_images_non_root_user_with_nothing_to_escalate() -> None:
    [image_user] = re.findall(r"^USER (\d+):(\d+)$", (REPO / "Containerfile").read_text(), flags=re.MULTILINE)

    for pod, container in ((POD, RELAY), (JOB_POD, MIGRATE)):
        context = pod["securityContext"]
        assert context["runAsNonRoot"] is True
        assert (str(context["runAsUser"]), str(context["runAsGroup"])) == image_user
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert container["resources"]["limits"]["memory"]


def test_kubernetes_waits_longer_than_the_relay_takes_to_drain() -> None:
    pause = RELAY["lifecycle"]["preStop"]["exec"]["command"]
    assert pause[0] == "sleep"

    assert POD["terminationGracePeriodSeconds"] > int(pause[1]) + GRACEFUL_SHUTDOWN_SECONDS


@pytest.mark.integration
def test_a_relay_with_the_deployments_environment_answers_its_probes_and_takes_a_signed_event(
    database: Database, tmp_path: Path
) -> None:
    environment = plain_environment(RELAY)
    # The Secret's keys, as the files Kubernetes would mount; the paths come from the manifest.
    secret_values = {"database-url": database.conninfo, "signing-secrets": SIGNING_SECRET}
    files = secret_files(POD, RELAY)
    for name, path in environment.items():
        if name.endswith(SECRET_FILE_SUFFIX):
            local = tmp_path / files[path]
            local.write_text(secret_values[files[path]] + "\n")
            environment[name] = str(local)
    environment.update(RELAY_DB_SCHEMA=database.schema, RELAY_HOST="127.0.0.1")  # loopback only, in tests
    base = {
        name: value
        for name, value in relay_environment(database.conninfo, database.schema).items()
        if name not in SECRET_VARIABLES
    }
    event = fixture("user.created")
    body = encode(event)

    with running_relay({**base, **environment}) as relay, relay.client() as client:
        probes = {
            probe: client.get(RELAY[probe]["httpGet"]["path"]).status_code
            for probe in ("livenessProbe", "readinessProbe")
        }
        signed = client.post("/events/action", content=body, headers=signed_headers(body, event["id"]))
        bearer = client.post("/events/webhook", content=body, headers={"authorization": "Bearer any"})

    assert probes == {"livenessProbe": 200, "readinessProbe": 200}
    assert signed.status_code == 200, signed.text
    assert bearer.status_code == 401  # only the Secret's credentials are configured
