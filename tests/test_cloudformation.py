"""deploy/aws/eventbridge-sqs.yaml passes cfn-lint, takes the partner event source `relay deploy-eventbridge`
prints, and wires the pieces the relay relies on (redrive to a dead-letter queue, the rule matching the
source, a queue policy for that rule). No AWS account is reached: the stack itself is not deployed here."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from cfnlint.decode import decode

from tests.support import REPO

TEMPLATE = REPO / "deploy" / "aws" / "eventbridge-sqs.yaml"
CFN_LINT = Path(sys.executable).parent / "cfn-lint"
PARTNER_SOURCE = "aws.partner/auth0.com/acme-0a1b2c3d-4e5f-6789-abcd-ef0123456789/auth0.events"


def lint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CFN_LINT), str(path)], capture_output=True, text=True, timeout=120)


def test_the_template_passes_cfn_lint_and_a_broken_copy_does_not(tmp_path: Path) -> None:
    assert lint(TEMPLATE).returncode == 0, lint(TEMPLATE).stdout
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        TEMPLATE.read_text().replace("!GetAtt DeadLetterQueue.Arn", "!GetAtt DeadLetterQueue.Nope")
    )
    result = lint(broken)
    assert result.returncode != 0
    assert "Nope" in result.stdout


def test_the_template_takes_the_partner_event_source_and_wires_queue_rule_and_dead_letter_queue() -> None:
    template, errors = decode(str(TEMPLATE))
    assert not errors and template is not None
    source = template["Parameters"]["PartnerEventSourceName"]
    assert re.fullmatch(source["AllowedPattern"], PARTNER_SOURCE)
    assert not re.fullmatch(source["AllowedPattern"], PARTNER_SOURCE.replace("auth0.events", "auth0.logs"))
    resources = template["Resources"]
    bus = resources["PartnerEventBus"]["Properties"]
    assert bus["Name"] == bus["EventSourceName"] == {"Ref": "PartnerEventSourceName"}
    redrive = resources["EventQueue"]["Properties"]["RedrivePolicy"]
    assert redrive["deadLetterTargetArn"] == {"Fn::GetAtt": ["DeadLetterQueue", "Arn"]}
    rule = resources["ToQueueRule"]["Properties"]
    assert rule["EventPattern"] == {"source": [{"Ref": "PartnerEventSourceName"}]}
    assert rule["Targets"][0]["Arn"] == {"Fn::GetAtt": ["EventQueue", "Arn"]}
    [statement] = resources["QueuePolicy"]["Properties"]["PolicyDocument"]["Statement"]
    assert statement["Principal"] == {"Service": "events.amazonaws.com"}
    assert template["Outputs"]["QueueUrl"]["Value"] == {"Ref": "EventQueue"}
    api_destination = resources["RelayApiDestination"]["Properties"]
    assert api_destination["InvocationEndpoint"] == {"Fn::Sub": "${RelayUrl}/events/eventbridge"}
