"""docs/asyncapi.yaml: generated from the models by `phoneverify schema asyncapi`; stale is a
failure. Every topic has its entry, every wire message is on a topic, and the payload schemas
accept what the service really writes."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime

import yaml
from jsonschema import Draft202012Validator
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from phoneverify import topics
from phoneverify.interfaces.asyncapi import CATALOGUE, missing
from phoneverify.models.messages import DeadLetter, Outcome, Reply
from phoneverify.models.verification import Verified

from support import ROOT

CHECKED_IN = ROOT / "docs" / "asyncapi.yaml"


def generated() -> str:
    out = subprocess.run([sys.executable, "-m", "phoneverify.interfaces.cli", "schema",
                          "asyncapi"], cwd=ROOT, capture_output=True, check=True, timeout=60,
                         text=True)
    return out.stdout


def test_the_checked_in_document_is_what_the_command_prints_now():
    assert CHECKED_IN.read_text() == generated(), (
        "docs/asyncapi.yaml is stale: run `phoneverify schema asyncapi --output "
        "docs/asyncapi.yaml` (or `make docs`) and commit it")


def test_every_topic_and_every_message_is_described():
    topics_missing, messages_missing = missing()
    assert not topics_missing, f"topics without an entry in asyncapi.CATALOGUE: {topics_missing}"
    assert not messages_missing, f"wire messages on no topic: {messages_missing}"
    document = yaml.safe_load(CHECKED_IN.read_text())
    assert document["asyncapi"].startswith("3.")
    addresses = {channel["address"] for channel in document["channels"].values()}
    assert addresses == {*topics.ALL, topics.KEYS} == set(CATALOGUE)
    for operation in document["operations"].values():
        channel = operation["channel"]["$ref"].removeprefix("#/channels/")
        for ref in operation["messages"]:
            name = ref["$ref"].rsplit("/", 1)[1]
            assert name in document["channels"][channel]["messages"]
            assert name in document["components"]["messages"]


def test_payload_schemas_accept_what_the_service_writes():
    document = yaml.safe_load(CHECKED_IN.read_text())
    registry = Registry().with_resource("urn:asyncapi", DRAFT202012.create_resource(document))
    now = datetime.now(UTC)
    samples = {
        "Outcome": Outcome(instance_id="a1", verified=True, status="verified",
                           reason="code_matched", attempts=1, created_at=now, completed_at=now),
        "Reply": Reply(request_id="r1", instance_id="a1", command="start", result="started",
                       status="pending", attempts_left=4, deadline=now),
        "DeadLetter": DeadLetter.of("verification.start", 0, 7, b"a1", b"{", "not JSON"),
        "DomainEvent": {**Verified(instance_id="a1", attempts=1, at=now).model_dump(
            mode="json"), "seq": 3, "life": "verification.admitted:0:5"},
    }
    for name, message in samples.items():
        Draft202012Validator.check_schema(document["components"]["messages"][name]["payload"])
        validator = Draft202012Validator(
            {"$ref": f"urn:asyncapi#/components/messages/{name}/payload"}, registry=registry)
        value = message if isinstance(message, dict) else message.model_dump(mode="json")
        assert not list(validator.iter_errors(value)), name
        assert list(validator.iter_errors({"instance_id": "a1"})), f"{name}: accepts anything"
