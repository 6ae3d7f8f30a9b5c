"""phoneverify: phone-number verification by SMS code, an event-sourced actor on Kafka.

The public face for applications: the client and what it returns or raises. Importing this
package never builds a Faust app or starts a worker (``phoneverify worker`` does).

    from phoneverify import VerificationClient
"""

from phoneverify.interfaces.client import (
    InvalidInput,
    KafkaUnavailable,
    OutcomeTimeout,
    VerificationClient,
    VerificationError,
)
from phoneverify.models.messages import Outcome

__all__ = [
    "InvalidInput",
    "KafkaUnavailable",
    "Outcome",
    "OutcomeTimeout",
    "VerificationClient",
    "VerificationError",
]
