"""The wire contract's messages (``../shared/contract.md``): what goes over the topics as JSON.

Incoming messages are parsed strictly: unknown fields are allowed (the contract says so),
wrong types and bad values are not, and the error names the field.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    StringConstraints,
    ValidationError,
)

INSTANCE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
InstanceId = Annotated[str, StringConstraints(pattern=f"^{INSTANCE_ID.pattern}$")]
#: A ``request_id``: chosen by the sender of a command, echoed in its one ``Reply``.
RequestId = InstanceId
Digits = Annotated[str, StringConstraints(pattern=r"^[0-9]{1,32}$")]


def _utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("timestamp needs a time zone (UTC)")
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("timestamp out of range in UTC") from None


def iso(value: datetime) -> str:
    """ISO-8601 UTC with a ``Z``, millisecond precision, as every timestamp on the wire."""
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def explain(error: ValidationError) -> str:
    """A validation error as ``field: why`` pairs, never echoing the input (it may be a code)."""
    return "; ".join(
        f"{'.'.join(str(part) for part in item['loc']) or 'value'}: {item['msg']}"
        for item in error.errors(include_input=False, include_url=False))


UtcTime = Annotated[datetime, AfterValidator(_utc), PlainSerializer(iso, return_type=str)]


def _text_or_none(value: object) -> str | None:
    """A locale or header that cannot be one (not text, too long) counts as absent: the start
    falls back to the next source of its locale rather than fail (rule 18)."""
    return value if isinstance(value, str) and len(value) <= 512 else None


#: A BCP 47 tag as given (``fr``, ``pt-BR``); matched to a template, or unknown, at the start.
LocaleTag = Annotated[str | None, BeforeValidator(_text_or_none)]

OutcomeStatus = Literal["verified", "failed", "terminated"]
OutcomeReason = Literal[
    "code_matched", "expired", "too_many_attempts", "terminated",
    "invalid_phone_number", "blocked_number", "sms_undeliverable", "rate_limited",
]
#: Why a start was refused before it reached the actor (it gets an outcome with this reason).
RefusalReason = Literal["invalid_phone_number", "blocked_number", "rate_limited"]
CommandName = Literal["start", "response", "terminate", "resend"]
#: How a code reaches the person (rule 16): a text, a WhatsApp message, or a voice call.
Channel = Literal["sms", "whatsapp", "call"]
#: What a start or resend may ask for: a channel, or ``auto`` (sms, or call for landlines).
ChannelChoice = Literal["sms", "whatsapp", "call", "auto"]
CHANNELS: tuple[Channel, ...] = ("sms", "whatsapp", "call")
ReplyStatus = Literal["pending", "verified", "failed", "terminated", "unknown"]
ReplyResult = Literal[
    # start
    "started", "duplicate", "rate_limited", "invalid_phone_number", "blocked_number",
    # response
    "verified", "wrong_code", "too_many_attempts", "expired",
    # terminate
    "terminated",
    # resend (and start: a channel not offered or not possible for the number)
    "resent", "channel_unavailable",
    # response, terminate and resend
    "ended", "unknown",
]


class Message(BaseModel):
    """Base of all wire messages: strict types, extra fields tolerated, immutable."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_bytes(cls, raw: bytes | None) -> Message:
        if raw is None:
            raise ValueError("empty record value")
        return cls.model_validate_json(raw)


def _client_ip(value: str) -> str:
    from phoneverify.models.fraud import client_address

    return client_address(value)


#: A client's IPv4 or IPv6 address, in its canonical form (rule 20).
ClientIp = Annotated[str, AfterValidator(_client_ip)]


class StartVerification(Message):
    instance_id: InstanceId
    phone_number: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    request_id: RequestId | None = None
    #: Rule 18: the language of the message (BCP 47); unknown or absent: it falls back.
    locale: LocaleTag = None
    #: The HTTP start's ``Accept-Language`` header (an addition: the next choice after
    #: ``locale``).
    accept_language: LocaleTag = None
    #: The address of the person's client: starts per address are limited (rule 20).
    client_ip: ClientIp | None = None
    #: Rule 16: how the code goes out (``sms`` when absent).
    channel: ChannelChoice | None = None

    def to_bytes(self) -> bytes:
        """As JSON; ``locale``, ``accept_language``, ``client_ip`` and ``channel`` only when
        given."""
        unset = {name for name in ("locale", "accept_language", "client_ip", "channel")
                 if getattr(self, name) is None}
        return self.model_dump_json(exclude=unset).encode()


class ResendCode(Message):
    """Rule 15: the same code again, over ``channel`` (absent: the channel used last)."""

    instance_id: InstanceId
    channel: ChannelChoice | None = None
    request_id: RequestId | None = None
    #: The address of the person's client (an addition, as the start's): resends count
    #: against the same per-address limit as starts (rule 20).
    client_ip: ClientIp | None = None

    def to_bytes(self) -> bytes:
        """As JSON; ``client_ip`` only when given."""
        return self.model_dump_json(exclude={"client_ip"} if self.client_ip is None
                                    else set()).encode()


class SubmitCode(Message):
    instance_id: InstanceId
    code: Digits
    request_id: RequestId | None = None


class Terminate(Message):
    instance_id: InstanceId
    reason: Annotated[str, StringConstraints(max_length=500)] = ""
    request_id: RequestId | None = None


class Reply(Message):
    """The answer to a command that carried a ``request_id``, once the actor decided on it.

    ``status``, ``attempts_left`` and ``deadline`` describe the verification after the command.
    ``retry_after`` (seconds, an addition to the contract) comes with ``rate_limited``.
    """

    request_id: RequestId
    instance_id: InstanceId
    command: CommandName
    result: ReplyResult
    status: ReplyStatus
    attempts_left: int | None
    deadline: UtcTime | None
    retry_after: float | None = None
    #: For a refused start: why, in words a person understands (additions to the contract).
    detail: str | None = None
    #: Starts: the locale of its messages (rule 18).
    locale: str | None = None
    #: Starts and resends: the channel of the delivery (rule 16).
    channel: Channel | None = None
    #: Starts and resends: how many resends the verification has left (rule 15).
    resends_left: int | None = None


class Tick(Message):
    partition: Annotated[int, Field(ge=0)]
    now: UtcTime


class SendSms(Message):
    """One delivery of a code, over any channel (the topic keeps its name): for ``sms`` and
    ``whatsapp`` the body is the text, for ``call`` the words spoken."""

    command_id: str
    instance_id: InstanceId
    to: str
    body: str
    #: The locale the body is written in (rule 16, 18).
    locale: str | None = None
    channel: Channel = "sms"

    def __repr__(self) -> str:  # never show the code in a log line or traceback
        return f"SendSms(command_id={self.command_id!r}, instance_id={self.instance_id!r})"

    __str__ = __repr__


class SmsSent(Message):
    """The provider accepted the SMS; with ``receipt``, its delivery receipt says the phone
    got it (an addition to the contract: Twilio's status callbacks)."""

    type: Literal["sms_sent"] = "sms_sent"
    command_id: str
    instance_id: InstanceId
    provider_id: str | None = None
    receipt: Literal["delivered"] | None = None


class SmsFailed(Message):
    type: Literal["sms_failed"] = "sms_failed"
    command_id: str
    instance_id: InstanceId
    error: str
    permanent: bool = True


SmsStatus = Annotated[SmsSent | SmsFailed, Field(discriminator="type")]


class Outcome(Message):
    instance_id: InstanceId
    verified: bool
    status: OutcomeStatus
    reason: OutcomeReason
    attempts: int
    created_at: UtcTime
    completed_at: UtcTime


class DeadLetter(Message):
    topic: str
    partition: int
    offset: int
    key: str | None
    value: str
    error: str

    @classmethod
    def of(cls, topic: str, partition: int, offset: int, key: bytes | None,
           value: bytes | None, error: str) -> DeadLetter:
        """A dead letter for a raw record; the value is cut at 4 KiB, decoded with replacement."""
        return cls(
            topic=topic, partition=partition, offset=offset,
            key=None if key is None else key.decode("utf-8", "replace"),
            value=(value or b"")[:4096].decode("utf-8", "replace"),
            error=error[:2000],
        )


# ---------------------------------------------------------------- internal topics


class WebhookTried(Message):
    """The result of one try to POST an outcome to a webhook URL (the webhook stage's own
    record: its table changes only in stream iteration)."""

    instance_id: InstanceId
    url: str
    attempt: Annotated[int, Field(ge=1)]
    ok: bool
    #: Why it failed (``HTTP 503``, ``timed out after 5 s``, ``connection refused``...).
    error: str = ""


# A command's origin: where the client's record was first written, ``topic:partition:offset``.
# It identifies a command across redeliveries and forwards, for idempotence.


class PhoneStart(Message):
    """A parsed, admissible-looking start, re-keyed by its E.164 number for admission."""

    type: Literal["start"] = "start"
    instance_id: InstanceId
    phone_number: str
    requested_at: UtcTime
    origin: str
    request_id: RequestId | None = None
    #: The locale chosen for it at intake (rule 18).
    locale: str | None = None
    client_ip: str | None = None
    channel: Channel = "sms"
    channels: tuple[Channel, ...] = CHANNELS


class PhoneDelivery(Message):
    """A resend or fallback the actor asks the number's admission for (rule 9 counts every
    delivery). Keyed by phone number; idempotent per origin. A resend that names its client's
    address goes first to the fraud guard's stage (keyed ``ip:<address>``), as such a start."""

    type: Literal["delivery"] = "delivery"
    instance_id: InstanceId
    phone_number: str
    requested_at: UtcTime
    origin: str
    client_ip: str | None = None


class Settle(Message):
    """A concluded verification's report to its number: give back the attempts not spent.

    ``wrong_codes`` are the times of its wrong codes: they count against the number's guess
    budget for ``GUESS_LIMIT_WINDOW_SECONDS``. Keyed by phone number; idempotent per origin.
    """

    type: Literal["settle"] = "settle"
    phone_number: str
    origin: str
    wrong_codes: tuple[UtcTime, ...] = ()


class RoutedCode(Message):
    """A response the actor moved to its partition: the code only as its keyed hash."""

    instance_id: InstanceId
    code_hash: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
    request_id: RequestId | None = None


class Admission(Message):
    """Admission's (or intake's) verdict on a start, keyed by instance id for the actor."""

    instance_id: InstanceId
    verdict: Literal["admitted", "rate_limited", "invalid_phone_number", "blocked_number",
                     "channel_unavailable"]
    phone_number: str | None = None
    requested_at: UtcTime
    origin: str
    request_id: RequestId | None = None
    attempts: int = 0
    retry_after: float | None = None
    #: Why a start was refused, in words (number policy).
    detail: str = ""
    #: The locale chosen for it at intake (rule 18).
    locale: str | None = None
    #: ``delivery``: the verdict on a resend or fallback (:class:`PhoneDelivery`).
    kind: Literal["start", "delivery"] = "start"
    #: Starts: the channel asked for (resolved) and the offered channels the number may use.
    channel: Channel = "sms"
    channels: tuple[Channel, ...] = CHANNELS
