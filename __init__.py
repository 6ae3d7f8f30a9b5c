"""phoneverify: phone-number verification by SMS code, an event-sourced actor on Kafka.

The public face for applications: the client, what it returns and what it raises. Importing
this package never builds a Faust app or starts a worker (``phoneverify worker`` does), and
loads the client only when one of these names is first used.

    from phoneverify import VerificationClient
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_CLIENT = (
    "BlockedNumber", "ChannelUnavailable", "InstanceIdInUse", "InvalidInput", "InvalidPhoneNumber",
    "KafkaUnavailable", "OutcomeTimeout", "RateLimited", "Refused", "ReplyTimeout",
    "UnknownVerification", "VerificationClient", "VerificationEnded", "VerificationError",
    "WebhookSignatureError", "verify_webhook",
)
_MESSAGES = ("Outcome", "Reply")
__all__ = [*_CLIENT, *_MESSAGES]


def __getattr__(name: str) -> Any:
    if name in _CLIENT:
        return getattr(import_module("phoneverify.interfaces.client"), name)
    if name in _MESSAGES:
        return getattr(import_module("phoneverify.models.messages"), name)
    raise AttributeError(f"module 'phoneverify' has no attribute {name!r}")
