"""Delivery backends: how a code reaches a phone, over a channel (``sms``, ``whatsapp``, or
``call``: a voice call that reads the body) through a provider (console or Twilio).

A backend's ``send`` returns a :class:`Delivery` for a final answer (sent, or refused for
good, such as an invalid number) and raises :class:`TransientSmsError` for what may work on a
retry (rate limited, server error, network). :func:`send_with_retry` retries those with
exponential backoff and reports a failure when the tries run out.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from phoneverify.settings import Settings


@dataclass(frozen=True)
class Delivery:
    ok: bool
    provider_id: str | None = None
    error: str = ""
    permanent: bool = True


class TransientSmsError(Exception):
    """The provider may accept the same message later."""


class SmsBackend(Protocol):
    async def send(self, to: str, body: str, *, instance_id: str | None = None,
                   command_id: str | None = None, channel: str = "sms",
                   locale: str | None = None) -> Delivery:
        """Send ``body`` to ``to`` over ``channel`` (for ``call`` it is the text spoken, in
        ``locale``); ``instance_id`` and ``command_id`` name the verification and its
        delivery, for backends that show them (the console) or get them back (a delivery
        receipt or call status), never sent to the phone."""
        ...

    async def close(self) -> None: ...


async def send_with_retry(backend: SmsBackend, to: str, body: str, tries: int = 4,
                          first_delay: float = 0.2, *, instance_id: str | None = None,
                          command_id: str | None = None, channel: str = "sms",
                          locale: str | None = None,
                          before_each: Callable[[], None] | None = None) -> Delivery:
    """Send, trying again after transient errors (doubling the delay); ``before_each`` runs
    before every try (the worker's fence)."""
    delay = first_delay
    for attempt in range(1, tries + 1):
        if before_each is not None:
            before_each()
        try:
            return await backend.send(to, body, instance_id=instance_id, command_id=command_id,
                                      channel=channel, locale=locale)
        except TransientSmsError as error:
            if attempt == tries:
                return Delivery(ok=False, error=f"gave up after {tries} tries: {error}",
                                permanent=False)
            await asyncio.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def backend_from(settings: Settings) -> SmsBackend:
    """The backend SMS_BACKEND names: ``console`` (default) or ``twilio``."""
    if settings.sms_backend == "twilio":
        from phoneverify.delivery.twilio_sender import TwilioBackend

        return TwilioBackend.from_settings(settings)
    from phoneverify.delivery.console import ConsoleBackend

    return ConsoleBackend()
