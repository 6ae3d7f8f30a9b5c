"""phoneverify: phone-number verification by SMS code, an event-sourced actor on Kafka.

The public face for applications: the client, what it returns and what it raises. Importing
this package never builds a Faust app or starts a worker (``phoneverify worker`` does).

    from phoneverify import VerificationClient
"""

from phoneverify.interfaces.client import (
    BlockedNumber,
    InstanceIdInUse,
    InvalidInput,
    InvalidPhoneNumber,
    KafkaUnavailable,
    OutcomeTimeout,
    RateLimited,
    Refused,
    ReplyTimeout,
    UnknownVerification,
    VerificationClient,
    VerificationError,
)
from phoneverify.models.messages import Outcome, Reply

__all__ = [
    "BlockedNumber",
    "InstanceIdInUse",
    "InvalidInput",
    "InvalidPhoneNumber",
    "KafkaUnavailable",
    "Outcome",
    "OutcomeTimeout",
    "RateLimited",
    "Refused",
    "Reply",
    "ReplyTimeout",
    "UnknownVerification",
    "VerificationClient",
    "VerificationError",
]
