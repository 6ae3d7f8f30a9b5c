"""The Kafka topics as an AsyncAPI 3 document (``docs/asyncapi.yaml``), from the models.

:data:`CATALOGUE` says, for every topic of :mod:`phoneverify.topics`, what its key holds,
which messages (pydantic models of :mod:`phoneverify.models`) its values are, and who writes
and reads it; the JSON Schemas are generated from the models. ``phoneverify schema asyncapi``
prints the document; a test fails when the checked-in file differs from it, when a topic has
no entry here, or when a message model is on no topic.

Imports nothing of Faust or the app.
"""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import TypeAdapter
from pydantic.json_schema import JsonSchemaMode

from phoneverify import topics
from phoneverify.models import fraud
from phoneverify.models import messages as m
from phoneverify.models.verification import Event
from phoneverify.settings import Settings

REF = "#/components/schemas/{model}"
SERVICE, CLIENTS = "phoneverify", "clients"

INSTANCE_KEY = {"type": "string", "pattern": f"^{m.INSTANCE_ID.pattern}$",
                "description": "the verification's instance_id (UTF-8)"}
PHONE_KEY = {"type": "string", "pattern": r"^\+[0-9]{2,15}$",
             "description": "the E.164 phone number (UTF-8), or `tick` for a tick"}
TICK_KEY = {"type": "string", "const": "tick"}
FRAUD_KEY = {"type": "string", "pattern": r"^(\+[0-9]{1,14}|[A-Z]{2})$",
             "description": "the block's key: an E.164 prefix or an ISO region code"}


@dataclass(frozen=True)
class Topic:
    """What one topic carries."""

    description: str
    #: Message name -> model (or any type pydantic describes).
    messages: dict[str, Any]
    key: dict[str, Any]
    #: Who writes and who reads it: ``clients`` (anyone outside), ``phoneverify``, or both.
    writers: tuple[str, ...]
    readers: tuple[str, ...]
    internal: bool = False


#: Events on ``verification.events`` carry their place in the verification's stream too.
EVENT_ENVELOPE = {"type": "object", "properties": {
    "seq": {"type": "integer", "description": "the verification's version after the event"},
    "life": {"type": "string", "description": "the origin of the record that created the "
                                              "verification: its events form one stream"}},
    "required": ["seq", "life"]}

CATALOGUE: dict[str, Topic] = {
    topics.START: Topic("Start a verification: one SMS with a fresh code.",
                        {"StartVerification": m.StartVerification}, INSTANCE_KEY,
                        (CLIENTS,), (SERVICE,)),
    topics.RESPONSE: Topic("The code a person sent back.", {"SubmitCode": m.SubmitCode},
                           INSTANCE_KEY, (CLIENTS,), (SERVICE,)),
    topics.TERMINATE: Topic("End a verification now.", {"Terminate": m.Terminate},
                            INSTANCE_KEY, (CLIENTS,), (SERVICE,)),
    topics.RESEND: Topic("Send the same code again, over the same channel or another "
                         "(rule 15).", {"ResendCode": m.ResendCode}, INSTANCE_KEY,
                         (CLIENTS,), (SERVICE,)),
    topics.TICK: Topic("The clock: one tick to every partition each TICK_INTERVAL_SECONDS.",
                       {"Tick": m.Tick}, TICK_KEY, (SERVICE,), (SERVICE,)),
    topics.SMS: Topic("Deliveries to make: the only topic that carries plain codes (kept "
                      "SMS_TOPIC_RETENTION_SECONDS).", {"SendSms": m.SendSms}, INSTANCE_KEY,
                      (SERVICE,), (SERVICE,)),
    topics.SMS_STATUS: Topic("What became of each delivery (provider's answer, receipts).",
                             {"SmsSent": m.SmsSent, "SmsFailed": m.SmsFailed}, INSTANCE_KEY,
                             (SERVICE,), (SERVICE,)),
    topics.EVENTS: Topic("Domain events, the audit trail replay reads: each is the event's "
                         "fields and `seq`, `life`.", {"DomainEvent": Event}, INSTANCE_KEY,
                         (SERVICE,), (CLIENTS,)),
    topics.OUTCOME: Topic("Exactly one outcome per verification.", {"Outcome": m.Outcome},
                          INSTANCE_KEY, (SERVICE,), (CLIENTS,)),
    topics.DEAD_LETTER: Topic("Records that could not be handled, with the reason; and "
                              "webhooks given up.", {"DeadLetter": m.DeadLetter},
                              {"type": ["string", "null"],
                               "description": "the original record's key"},
                              (SERVICE,), (CLIENTS,)),
    topics.REPLIES: Topic("One reply per command that carried a request_id.",
                          {"Reply": m.Reply}, INSTANCE_KEY, (SERVICE,), (CLIENTS,)),
    topics.ADMISSION: Topic("Internal: per number, parsed starts, resends and fallbacks to "
                            "admit, settlements and ticks.",
                            {"PhoneStart": m.PhoneStart, "PhoneDelivery": m.PhoneDelivery,
                             "Settle": m.Settle, "Tick": m.Tick},
                            PHONE_KEY, (SERVICE,), (SERVICE,), internal=True),
    topics.ADMITTED: Topic("Internal: admission's verdict on each start, resend and fallback.",
                           {"Admission": m.Admission}, INSTANCE_KEY, (SERVICE,), (SERVICE,),
                           internal=True),
    topics.REROUTED: Topic("Internal: responses, terminates and resends moved to their "
                           "partition (the code only as its keyed hash).",
                           {"RoutedCode": m.RoutedCode, "Terminate": m.Terminate,
                            "ResendCode": m.ResendCode},
                           INSTANCE_KEY, (SERVICE,), (SERVICE,), internal=True),
    topics.WEBHOOK_TRIES: Topic("Internal: the result of each try to POST an outcome to a "
                                "webhook URL, and the webhook stage's ticks.",
                                {"WebhookTried": m.WebhookTried, "Tick": m.Tick},
                                {"type": "string", "description": "the verification's "
                                 "instance_id (UTF-8), or `#tick` for a tick"},
                                (SERVICE,), (SERVICE,), internal=True),
    topics.FRAUD: Topic("The fraud guard's blocks and unblocks of a prefix or a country (rule "
                        "20), by the guard or an operator; compacted: the last record of a key "
                        "is its state.", {"FraudBlock": fraud.FraudBlock}, FRAUD_KEY,
                        (SERVICE, CLIENTS), (SERVICE, CLIENTS)),
    topics.GUARD: Topic("Internal: the fraud guard's input: deliveries and conclusions (by "
                        "prefix), judgments (by country), starts that name their client's "
                        "address (by `ip:<address>`), ticks.",
                        {"Delivered": fraud.Delivered, "Concluded": fraud.Concluded,
                         "Judged": fraud.Judged, "PhoneStart": m.PhoneStart, "Tick": m.Tick},
                        {"type": "string", "description": "an E.164 prefix, an ISO region, "
                                                          "`ip:` and an address, or `tick`"},
                        (SERVICE,), (SERVICE,), internal=True),
    topics.KEYS: Topic("Internal (one partition): the fingerprint of CODE_HASH_KEY, so workers "
                       "with another key refuse to start.",
                       {"KeyFingerprint": str}, {"type": "string", "const": "code_hash_key"},
                       (SERVICE,), (SERVICE,), internal=True),
}


def missing() -> tuple[list[str], list[str]]:
    """Topics with no entry in :data:`CATALOGUE`, and wire messages on no topic."""
    every = [*topics.ALL, topics.KEYS]
    described = {id(model) for topic in CATALOGUE.values() for model in topic.messages.values()}
    models = [name for name, value in vars(m).items()
              if isinstance(value, type) and issubclass(value, m.Message)
              and value is not m.Message and id(value) not in described]
    return [name for name in every if name not in CATALOGUE], models


def document(settings: Settings | None = None) -> dict[str, Any]:
    """The AsyncAPI 3.0 document of every topic, with the defaults of the settings (not the
    environment's) unless ``settings`` are given."""
    settings = settings or Settings.model_construct()
    configs = topics.configs(settings)
    wanted: list[tuple[str, JsonSchemaMode, TypeAdapter[Any]]] = []
    for topic in CATALOGUE.values():
        mode: JsonSchemaMode = "validation" if CLIENTS in topic.writers else "serialization"
        for name, model in topic.messages.items():
            wanted.append((name, mode, TypeAdapter(model)))
    found, definitions = TypeAdapter.json_schemas(_unique(wanted), ref_template=REF)
    payloads = {name: schema for (name, _mode), schema in found.items()}
    payloads["DomainEvent"] = {"allOf": [payloads["DomainEvent"], EVENT_ENVELOPE]}
    schemas = definitions.get("$defs", {})
    for event in _event_names(payloads["DomainEvent"]):  # they carry the envelope's fields too
        schemas[event].pop("additionalProperties", None)

    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for address, topic in CATALOGUE.items():
        channel = _channel_id(address)
        config = configs.get(address, {})
        binding: dict[str, Any] = {
            "partitions": 1 if address == topics.KEYS else settings.partitions,
            "bindingVersion": "0.5.0"}
        if "retention.ms" in config:
            binding["topicConfiguration"] = {"retention.ms": int(config["retention.ms"])}
        channels[channel] = {
            "address": address,
            "title": address,
            "description": topic.description + (" Not for clients." if topic.internal else ""),
            "messages": {name: {"$ref": f"#/components/messages/{name}"}
                         for name in topic.messages},
            "bindings": {"kafka": binding},
        }
        for name in topic.messages:
            messages.setdefault(name, _message(name, payloads[name], topic.key))
        refs = [{"$ref": f"#/channels/{channel}/messages/{name}"} for name in topic.messages]
        if SERVICE in topic.readers:
            operations[f"receive_{channel}"] = {
                "action": "receive", "channel": {"$ref": f"#/channels/{channel}"},
                "summary": f"phoneverify reads {address}", "messages": refs}
        if SERVICE in topic.writers:
            operations[f"send_{channel}"] = {
                "action": "send", "channel": {"$ref": f"#/channels/{channel}"},
                "summary": f"phoneverify writes {address}", "messages": refs}
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "phoneverify",
            "version": _version(),
            "description": (
                "Phone-number verification by SMS code over Kafka. Every per-verification "
                "topic is keyed by the verification's instance_id and has PARTITIONS "
                "partitions (default 8): the partition Java's default partitioner (murmur2) "
                "gives the key. TOPIC_PREFIX, if set, comes before every name. Values are "
                "UTF-8 JSON; fields beyond those described are allowed, never required."),
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": dict(sorted(schemas.items()))},
    }


def document_yaml(settings: Settings | None = None) -> str:
    """The document as YAML, as checked in at ``docs/asyncapi.yaml``."""
    header = ("# Generated by `phoneverify schema asyncapi` from the models: do not edit by hand\n"
              "# (a test fails when this file differs from what the command prints).\n")
    return header + yaml.safe_dump(document(settings), sort_keys=False, width=100,
                                   allow_unicode=True)


def _message(name: str, payload: dict[str, Any], key: dict[str, Any]) -> dict[str, Any]:
    text = name == "KeyFingerprint"
    return {
        "name": name,
        "title": name,
        "contentType": "text/plain" if text else "application/json",
        "payload": payload,
        "bindings": {"kafka": {"key": key, "bindingVersion": "0.5.0"}},
    }


def _event_names(payload: dict[str, Any]) -> list[str]:
    return [ref["$ref"].rsplit("/", 1)[1] for ref in payload["allOf"][0]["oneOf"]]


def _unique(wanted: Iterable[tuple[str, JsonSchemaMode, TypeAdapter[Any]]]) -> list[Any]:
    seen: dict[str, Any] = {}
    for name, mode, adapter in wanted:
        seen.setdefault(name, (name, mode, adapter))
    return list(seen.values())


def _channel_id(address: str) -> str:
    """``verification.sms-status`` -> ``verificationSmsStatus``."""
    first, *rest = re.split(r"[._-]", address)
    return first + "".join(part.capitalize() for part in rest)


def _version() -> str:
    try:
        return importlib.metadata.version("phoneverify")
    except importlib.metadata.PackageNotFoundError:
        return "0"
