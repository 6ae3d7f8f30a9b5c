"""The Twilio backend: each delivery through the official client (async): ``sms`` with the
Messages API, ``whatsapp`` with Messages between ``whatsapp:`` addresses (from
``TWILIO_WHATSAPP_NUMBER``), ``call`` with the Calls API and inline TwiML ``<Say>`` in the
message's language.

Twilio's answer decides the outcome: a created message is a delivery; a 4xx refusal other than
429 (invalid, landline or unsubscribed number, bad credentials...) is permanent; 429, 5xx,
connection errors and timeouts raise :class:`~sms.TransientSmsError` so the caller may retry.
The message body carries the code, so it never goes into a log line or an error string.

With a ``status_callback`` base URL (``PUBLIC_BASE_URL``), each message asks Twilio for
delivery receipts, and each call for its final status (completed, no-answer, busy, failed), at
``{base}/twilio/status?instance_id=...&command_id=...``; the worker serves that route
(:mod:`phoneverify.interfaces.http`), checking Twilio's signature.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlencode

import aiohttp
from twilio.base.exceptions import TwilioRestException, TwilioServiceException
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.rest import Client
from twilio.twiml.voice_response import VoiceResponse

from phoneverify.delivery import Delivery, TransientSmsError
from phoneverify.settings import Settings

#: Seconds one Messages request may take. The twilio async client sets no timeout of its own.
DEFAULT_TIMEOUT = 10.0
#: The worker's route for Twilio's delivery receipts (status callbacks).
RECEIPTS = "/twilio/status"


class TwilioBackend:
    """Sends SMS from one Twilio number with one account's credentials."""

    def __init__(self, account_sid: str, auth_token: str, from_number: str, *,
                 base_url: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                 status_callback: str | None = None, whatsapp_number: str = "") -> None:
        """Check the settings now; the HTTP session is opened on the first send.

        ``base_url`` replaces ``https://api.twilio.com`` (tests point it at a local fake).
        """
        missing = [name for name, value in (("TWILIO_ACCOUNT_SID", account_sid),
                                            ("TWILIO_AUTH_TOKEN", auth_token),
                                            ("TWILIO_PHONE_NUMBER", from_number))
                   if not value.strip()]
        if missing:
            raise ValueError(f"SMS_BACKEND=twilio needs {', '.join(missing)} to be set")
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, not {timeout}")
        self._account_sid = account_sid.strip()
        self._auth_token = auth_token.strip()
        self._from = from_number.strip()
        self._base_url = base_url.rstrip("/") if base_url else None
        self._timeout = timeout
        self._status_callback = status_callback.rstrip("/") if status_callback else None
        self._whatsapp = whatsapp_number.strip().removeprefix("whatsapp:")
        self._http: AsyncTwilioHttpClient | None = None
        self._client: Client | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> TwilioBackend:
        """The backend the TWILIO_* settings describe."""
        return cls(settings.twilio_account_sid,
                   settings.twilio_auth_token.get_secret_value(),
                   settings.twilio_phone_number,
                   base_url=settings.twilio_base_url,
                   status_callback=settings.public_base_url,
                   whatsapp_number=settings.twilio_whatsapp_number)

    def _twilio(self) -> Client:
        """The client, made on first use: its aiohttp session needs the running loop."""
        if self._client is None:
            self._http = AsyncTwilioHttpClient()
            client = Client(self._account_sid, self._auth_token, http_client=self._http)
            if self._base_url:
                client.api.base_url = self._base_url
                # TWILIO_EDGE / TWILIO_REGION in the environment would rewrite the host.
                client.edge = client.region = None
            self._client = client
        return self._client

    async def send(self, to: str, body: str, *, instance_id: str | None = None,
                   command_id: str | None = None, channel: str = "sms",
                   locale: str | None = None) -> Delivery:
        """Deliver ``body`` to ``to`` (E.164) over ``channel``; see the module docstring for
        the outcomes. ``instance_id`` and ``command_id`` go only into the receipt URL, never
        to the phone."""
        receipts = {}
        if self._status_callback and instance_id and command_id:
            query = urlencode({"instance_id": instance_id, "command_id": command_id})
            receipts["status_callback"] = f"{self._status_callback}{RECEIPTS}?{query}"
        if channel == "whatsapp" and not self._whatsapp:
            return Delivery(ok=False, error="TWILIO_WHATSAPP_NUMBER is not set: no WhatsApp "
                                            "sender", permanent=True)
        try:
            async with asyncio.timeout(self._timeout):
                if channel == "call":
                    message = await self._twilio().calls.create_async(
                        to=to, from_=self._from, twiml=call_twiml(body, locale), **receipts)
                elif channel == "whatsapp":
                    message = await self._twilio().messages.create_async(
                        to=f"whatsapp:{to}", from_=f"whatsapp:{self._whatsapp}", body=body,
                        **receipts)
                else:
                    message = await self._twilio().messages.create_async(
                        to=to, from_=self._from, body=body, **receipts)
        except TwilioRestException as error:
            return _refusal(error.status, error.code, error.msg, body)
        except TwilioServiceException as error:
            return _refusal(error.status, error.code, error.detail or error.title, body)
        except TimeoutError as error:
            raise TransientSmsError(f"twilio: no answer within {self._timeout:g}s") from error
        except aiohttp.ClientError as error:
            raise TransientSmsError(f"twilio: {type(error).__name__}: {error}") from error
        return Delivery(ok=True, provider_id=message.sid)

    async def close(self) -> None:
        """Close the HTTP session, if one was opened."""
        if self._http is not None:
            await self._http.close()
        self._http = self._client = None


#: Twilio's ``<Say>`` voices by language; a bare language takes its main variant.
VOICE_LANGUAGES = {"en": "en-US", "fr": "fr-FR", "de": "de-DE", "es": "es-ES", "it": "it-IT",
                   "pt": "pt-PT", "nl": "nl-NL", "pl": "pl-PL", "sv": "sv-SE", "ja": "ja-JP",
                   "zh": "zh-CN"}


def call_twiml(spoken: str, locale: str | None = None) -> str:
    """The TwiML of a code call: ``<Say language=...>`` the spoken body (default en-US)."""
    language = "en-US"
    if locale:
        language = locale if "-" in locale else VOICE_LANGUAGES.get(locale.lower(), "en-US")
    response = VoiceResponse()
    response.say(spoken, language=language)
    return str(response)


def _refusal(status: int, code: int | None, message: str, body: str) -> Delivery:
    """A permanent failure for a 4xx refusal; raise for 429 and 5xx, which may pass later."""
    text = f"twilio error {code} (HTTP {status}): {message}"
    if body:
        text = text.replace(body, "<message body>")
    if status == 429 or status >= 500:
        raise TransientSmsError(text)
    return Delivery(ok=False, error=text, permanent=True)
