"""The HTTP API's bodies as pydantic models: what the handlers read and answer.

The handlers in :mod:`phoneverify.interfaces.http` build their answers from these models and
check what they read against them; ``GET /openapi.json`` describes the same models
(:mod:`phoneverify.interfaces.openapi`), so the document cannot drift from the code. Field
names are the seed's (Durable Functions' camelCase) where the seed had them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter

from phoneverify.models.messages import (
    Channel,
    ChannelChoice,
    Digits,
    InstanceId,
    LocaleTag,
    OutcomeReason,
    ReplyResult,
)

RuntimeStatus = Literal["Pending", "Running", "Completed", "Terminated"]


class Body(BaseModel):
    """Base of the bodies: extra fields tolerated in requests, none invented in answers."""

    model_config = ConfigDict(extra="ignore")

    def dump(self) -> dict[str, Any]:
        """As JSON-ready values; fields left unset are left out."""
        return self.model_dump(mode="json", exclude_unset=True)


# ---------------------------------------------------------------- errors


class ApiError(Body):
    """Any answer other than success: what is wrong, in words a person understands."""

    model_config = ConfigDict(extra="allow")

    error: str = Field(description="what went wrong, in words")
    result: str | None = Field(None, description="the actor's result, when it decided "
                                                 "(duplicate, rate_limited, ended...)")
    id: str | None = Field(None, description="the verification concerned")
    retryAfter: int | None = Field(None, description="seconds until a retry may succeed "
                                                     "(with 429)")


# ---------------------------------------------------------------- start


PhoneNumber = Annotated[str, StringConstraints(min_length=1, max_length=64),
                        Field(description="as a person types it: +1 425-555-0100",
                              examples=["+1 425-555-0100"])]


class StartRequest(Body):
    """A start as an object; the seed's plain JSON string (the number) is accepted too."""

    phone_number: PhoneNumber
    instance_id: InstanceId | None = Field(
        None, description="chosen by the client; a UUID4 hex when absent")
    locale: LocaleTag = Field(
        None, description="the language of the message, BCP 47 (fr, pt-BR); absent or "
                          "unknown: Accept-Language, else the number's country, else "
                          "DEFAULT_LOCALE", examples=["fr"])
    channel: ChannelChoice | None = Field(
        None, description="sms (default), whatsapp, call, or auto (a call for landlines)")


#: ``POST /verifications``: the number as a JSON string (the seed's body), or an object.
StartBody = Annotated[PhoneNumber | StartRequest, Field(title="StartBody")]
START_BODY: TypeAdapter[str | StartRequest] = TypeAdapter(StartBody)


class Started(Body):
    """The verification is started (its SMS requested): where to ask and answer next."""

    id: str = Field(description="the instance id")
    statusQueryGetUri: str
    sendEventPostUri: str = Field(description="POST the code here (the seed's URI keeps its "
                                              "{eventName} placeholder)")
    terminatePostUri: str = Field(description="POST here to end it ({text}: the reason)")
    locale: str | None = Field(None, description="the locale its messages use (rule 18)")
    channel: Channel | None = Field(None, description="the channel the code went out on")


# ---------------------------------------------------------------- one verification


class VerificationStatus(Body):
    """A verification's state; never the code nor its hash, the number masked."""

    name: str = Field(description="the orchestrator, as Durable Functions names it")
    instanceId: str
    runtimeStatus: RuntimeStatus = Field(
        description="Pending until the SMS is accepted, Running while waiting for the code, "
                    "Completed once verified or failed, Terminated")
    input: str | None = Field(description="the phone number, masked")
    customStatus: None = None
    output: bool | None = Field(description="true: verified; false: failed or terminated; "
                                            "null: not concluded")
    createdTime: str | None
    lastUpdatedTime: str | None
    attempts: int = Field(description="wrong and right codes submitted")
    attemptsLeft: int | None
    deadline: str | None = Field(description="until when a code is taken (ISO-8601 UTC)")
    reason: OutcomeReason | None = Field(description="why it concluded")
    sms: Literal["requested", "sent", "delivered", "failed"] | None = Field(
        description="the last delivery's status, whatever its channel")
    channel: Channel | None = Field(None, description="the last delivery's channel")
    resendsLeft: int | None = Field(None, description="resends this verification has left")
    resendAllowedAt: str | None = Field(
        None, description="when a resend is allowed next (null: none is, or it concluded)")
    terminateReason: str | None = Field(None, description="with Terminated: the reason given")


class TerminatedStatus(VerificationStatus):
    """``400`` from the status route: the verification was terminated (Durable Functions'
    code), with its status."""

    error: str


#: The code: a JSON string of digits (leading zeros count), or a JSON number as in the seed
#: (read as its digits, left-padded with zeros to the code length).
CodeBody = Annotated[Digits | Annotated[int, Field(ge=0, lt=10**32)], Field(title="CodeBody")]
CODE_BODY: TypeAdapter[str | int] = TypeAdapter(CodeBody, config=ConfigDict(strict=True))


class Decided(Body):
    """A code or terminate decided by the verification's actor."""

    id: str
    result: ReplyResult
    attemptsLeft: int | None
    runtimeStatus: RuntimeStatus | None
    output: bool | None


class Concluded(Decided):
    """``410``: the verification had already concluded; nothing changed."""

    error: str


class ResendRequest(Body):
    """A resend: the body may be empty, or name the channel (default: the one used last)."""

    channel: ChannelChoice | None = Field(None, description="sms, whatsapp, call or auto")


class Resent(Body):
    """The same code is on its way again (rule 15)."""

    id: str
    result: Literal["resent"]
    channel: Channel | None
    resendsLeft: int | None
    attemptsLeft: int | None
    runtimeStatus: RuntimeStatus | None
    output: bool | None


class TerminateQuery(Body):
    reason: Annotated[str, StringConstraints(max_length=500)] = Field(
        "", description="why, kept with the verification (at most 500 characters)")


class SeedQuery(Body):
    """Query parameters the seed's URIs carry: accepted and ignored (``code``, the key as
    Azure Functions takes it, is the ``code`` security scheme)."""

    taskHub: str | None = None
    connection: str | None = None


class SeedTerminateQuery(TerminateQuery, SeedQuery):
    pass


# ---------------------------------------------------------------- for operators


class Liveness(Body):
    status: Literal["ok"]


class Readiness(Body):
    status: Literal["ready", "not ready"]
    reason: str | None = Field(None, description="why not ready")


class TwilioCallback(Body):
    """The fields of a Twilio status callback this service reads (a form, signed)."""

    MessageStatus: str = Field("", description="delivered, undelivered, failed; others are "
                                           "ignored")
    MessageSid: str | None = None
    ErrorCode: str | None = None
    CallStatus: str = Field("", description="a call's: completed, no-answer, busy, failed; "
                                            "others are ignored")
    CallSid: str | None = None
