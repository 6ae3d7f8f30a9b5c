"""The language of the message (contract rules 18, 19) against a worker on the real broker:
the number's country, the start's ``locale``, ``Accept-Language`` over HTTP, the fallback of
an unknown locale (the reply says the one used), the WebOTP line, and a bad template that
stops the worker naming its file."""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from typing import Any

import aiohttp
import pytest

from support import ROOT, Client, Worker

pytestmark = pytest.mark.kafka
KEY = {"X-API-Key": "test-api-key"}
DOMAIN = "example.com"


async def started(client: Client, phone: str, **fields: Any) -> tuple[dict, dict]:
    """Start over Kafka (``fields``: locale, ...); returns the reply and the SMS command."""
    iid = uuid.uuid4().hex
    reply = await client.ask("verification.start",
                             {"instance_id": iid, "phone_number": phone, **fields})
    assert reply["result"] == "started", reply
    return reply, await sms(client, iid)


async def sms(client: Client, iid: str) -> dict:
    [command] = await client.read("verification.sms", lambda r: len(r) >= 1, key=iid)
    return command


def text_and_code(command: dict) -> tuple[str, str]:
    """The SMS's text, and its code, which must also end the WebOTP line."""
    text, line = command["body"].rsplit("\n", 1)
    match = re.fullmatch(rf"@{re.escape(DOMAIN)} #([0-9]+)", line)
    assert match, command["body"]
    code = match.group(1)
    assert re.search(r"[0-9]+", text).group() == code  # one run, the first digits
    return text, code


async def test_the_country_then_the_locale_then_a_fallback_choose_the_language(
        start_worker, deployment):
    start_worker(APP_NAME="Acme", WEB_OTP_DOMAIN=DOMAIN)
    async with Client(deployment) as client:
        reply, command = await started(client, "+33 6 12 34 56 78")
        text, code = text_and_code(command)
        assert reply["locale"] == command["locale"] == "fr"
        assert text == f"Acme : votre code de vérification est {code}. Il est valable 1 min."

        reply, command = await started(client, "+33 6 12 34 56 79", locale="de-AT")
        text, code = text_and_code(command)
        assert reply["locale"] == command["locale"] == "de"
        assert text == f"Acme: Ihr Bestätigungscode lautet {code}. Er ist 1 Min. gültig."

        # Unknown or not a tag at all: the next choice, the number's country (Brazil), and
        # the reply says which; junk of the wrong type does not lose the start either.
        for junk in ("tlh", "not a tag!", 42):
            reply, command = await started(client, "+55 11 91234-5678", locale=junk)
            text, code = text_and_code(command)
            assert reply["locale"] == command["locale"] == "pt-BR", junk
            assert text.startswith(f"Seu código Acme é {code}")

        # No template for the country's language (India: Hindi): DEFAULT_LOCALE, English.
        reply, command = await started(client, "+91 98765 43210")
        text, code = text_and_code(command)
        assert reply["locale"] == "en"
        assert text == f"Your Acme verification code is {code}. It expires in 1 min."

        # The code in the SMS is the one that verifies.
        verified = await client.ask("verification.response",
                                    {"instance_id": command["instance_id"], "code": code})
        assert verified["result"] == "verified"


async def test_over_http_accept_language_chooses_unless_the_body_names_a_locale(
        start_worker, deployment):
    worker = start_worker(DEFAULT_LOCALE="en")  # no WEB_OTP_DOMAIN, no APP_NAME
    url = f"http://127.0.0.1:{worker.web_port}/verifications"
    async with aiohttp.ClientSession(headers=KEY) as http, Client(deployment) as client:
        async def start(body: Any, accept: str) -> tuple[dict, dict]:
            async with http.post(url, json=body, headers={"Accept-Language": accept}) as answer:
                assert answer.status == 202, await answer.text()
                started = await answer.json()
            return started, await sms(client, started["id"])

        started, command = await start("+1 425-555-0100", "da, sv-SE;q=0.9, en;q=0.8")
        code = re.search(r"[0-9]+", command["body"]).group()
        assert started["locale"] == command["locale"] == "sv"
        assert command["body"] == f"Din verifieringskod är {code}. Koden gäller i 1 min."

        started, command = await start({"phone_number": "+1 425-555-0101", "locale": "ja"},
                                       "fr-FR")
        code = re.search(r"[0-9]+", command["body"]).group()
        assert started["locale"] == "ja"
        assert command["body"] == f"認証コード：{code}（1分間有効）"  # noqa: RUF001 (Japanese)

        started, command = await start({"phone_number": "+49 1512 3456789",
                                        "locale": "xx-unknown"}, "fr-CA,fr;q=0.9")
        assert started["locale"] == "fr"  # the unknown locale fell back to Accept-Language
        started, command = await start({"phone_number": "+49 1512 3456780"}, "*")
        assert started["locale"] == "de"  # nothing usable in the header: the country's


def test_a_bad_template_stops_the_worker_naming_the_file_and_the_problem(deployment):
    folder = deployment.tmp / "templates"
    folder.mkdir()
    bad = folder / "fr.toml"
    bad.write_text('voice = "fr-FR"\ntext = ["Votre code : {code}. Merci {user}."]\n'
                   'speech = ["{code} {code}"]\n', encoding="utf-8")
    worker = Worker(deployment, TEMPLATES_DIR=str(folder))
    done = subprocess.run([sys.executable, "-m", "phoneverify.agents.worker"], cwd=ROOT,
                          env=worker.env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert f"bad template: {bad}: text form 1: unknown placeholder {{user}}" in (
        done.stdout + done.stderr)
