"""The page (``GET /``) end to end: a real headless Chromium, driven by Playwright, against a
worker process on the real broker. The code is read from ``verification.sms``, as a phone would.

Needs Debian's ``chromium`` (``apt-get install -y chromium``) and the ``playwright`` package;
without them the tests are skipped. Playwright's own browser download is never used.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import pytest

from support import ROOT, Client, Deployment, Worker

try:
    from playwright.async_api import async_playwright, expect
except ImportError:  # skipped below
    async_playwright = expect = None

if TYPE_CHECKING:
    from playwright.async_api import Page

# Debian's package (apt-get install -y chromium); Playwright's own browser download is not used.
CHROMIUM = shutil.which("chromium", path="/usr/bin") or shutil.which("chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT = ROOT / "docs" / "page.png"
PHONE_LABEL = "Phone number to verify, with its country code"
WAIT = 30_000  # ms: the deadline of every wait on the page (2 shared cores: be generous)

pytestmark = [
    pytest.mark.kafka,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed "
                                                "(apt-get install -y chromium)"),
    pytest.mark.skipif(async_playwright is None, reason="playwright is not installed "
                                                        "(pip install -e '.[dev]')"),
]


@pytest.fixture
async def page() -> AsyncIterator[Page]:
    """A fresh page in headless Chromium (800x600); fails the test on any script error."""
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS,
                                                   timeout=60_000)
        try:
            context = await browser.new_context(viewport={"width": 800, "height": 600})
            tab = await context.new_page()
            tab.set_default_timeout(WAIT)
            expect.set_options(timeout=WAIT)
            errors: list[str] = []
            tab.on("pageerror", lambda error: errors.append(str(error)))
            yield tab
            assert errors == [], f"script errors on the page: {errors}"
        finally:
            await browser.close()


async def open_page(tab: Page, worker: Worker, key: str) -> None:
    await tab.goto(f"http://127.0.0.1:{worker.web_port}/")
    await expect(tab.get_by_test_id("outcome")).to_have_text("nothing started yet")
    await tab.get_by_label("API key of this service", exact=True).fill(key)
    await tab.get_by_test_id("save-key").click()
    await expect(tab.get_by_test_id("key-saved")).to_have_text(
        re.compile(r"^saved for this tab"))
    await expect(tab.get_by_test_id("api-key")).to_be_hidden()
    assert await tab.evaluate("Object.values(sessionStorage)") == [key]


async def start(tab: Page, phone: str) -> str:
    """Start a verification on the page; returns its id as the page shows it."""
    await tab.get_by_label(PHONE_LABEL, exact=True).fill(phone)
    await tab.get_by_test_id("start").click()
    await expect(tab.get_by_test_id("start-message")).to_contain_text(
        "Started: an SMS with a code is on its way")
    iid = (await tab.get_by_test_id("verification-id").inner_text()).strip()
    assert re.fullmatch(r"[0-9a-f]{32}", iid), iid
    return iid


async def send_code(tab: Page, code: str) -> None:
    await tab.get_by_label("Code you received by SMS", exact=True).fill(code)
    await tab.get_by_test_id("send-code").click()


def other_than(code: str) -> str:
    return next(c for c in ("0000", "1111") if c != code)


async def test_a_person_verifies_a_number_after_a_wrong_code(page, deployment: Deployment,
                                                             start_worker):
    worker = start_worker()
    await open_page(page, worker, "test-api-key")
    iid = await start(page, "+1 425-555-0170")
    outcome, attempts = page.get_by_test_id("outcome"), page.get_by_test_id("attempts-left")
    # Live status: the SMS goes out, the countdown runs, all four attempts are left.
    await expect(outcome).to_have_text("waiting for the code (the SMS was sent)")
    await expect(attempts).to_have_text("4")
    await expect(page.get_by_test_id("countdown")).to_have_text(
        re.compile(r"^1:[0-3]\d \(\d+ seconds\)$"))
    await expect(page.get_by_test_id("number")).to_have_text("+142******70")

    async with Client(deployment) as kafka:
        code = await kafka.sms_code(iid, timeout=60)
    await send_code(page, other_than(code))
    await expect(page.get_by_test_id("code-message")).to_have_text(
        "Wrong code: 3 attempts left.")
    await expect(attempts).to_have_text("3")
    await expect(outcome).not_to_contain_text(re.compile("verified|failed"))

    await send_code(page, code)
    await expect(outcome).to_contain_text("verified")
    await expect(page.get_by_test_id("code-message")).to_have_text(
        "Right code: the number is verified.")
    await expect(page.get_by_test_id("countdown")).to_have_text("ended")
    await expect(page.get_by_test_id("code")).to_have_value("")
    await expect(page.get_by_test_id("code")).to_be_disabled()
    # The code is nowhere but in the input it was typed into (now empty), not even in storage.
    for testid in ("outcome", "code-message", "start-message", "key-message", "attempts-left"):
        assert code not in await page.get_by_test_id(testid).inner_text(), testid
    assert code not in await page.evaluate("JSON.stringify(sessionStorage)")
    SCREENSHOT.parent.mkdir(exist_ok=True)
    await page.screenshot(path=str(SCREENSHOT))


async def test_wrong_key_refusals_wrong_codes_and_cancel(page, deployment: Deployment,
                                                         start_worker):
    worker = start_worker(VERIFICATION_MAX_ATTEMPTS="2", RATE_LIMIT_STARTS="2")
    outcome = page.get_by_test_id("outcome")

    # A wrong key: said in words, and the page asks for it again (and forgets the wrong one).
    await open_page(page, worker, "not-the-key")
    await page.get_by_label(PHONE_LABEL, exact=True).fill("+1 425-555-0171")
    await page.get_by_test_id("start").click()
    await expect(page.get_by_test_id("key-message")).to_have_text(
        "The service did not accept this API key. Please enter the key again.")
    await expect(page.get_by_test_id("start-message")).to_contain_text(
        "the API key was not accepted")
    await expect(page.get_by_test_id("api-key")).to_be_focused()
    assert await page.evaluate("Object.values(sessionStorage)") == []
    await expect(outcome).to_have_text("nothing started yet")

    # The right key; a number that is not one is refused in words (400, nothing started).
    await open_page(page, worker, "test-api-key")
    await page.get_by_label(PHONE_LABEL, exact=True).fill("call me maybe")
    await page.get_by_test_id("start").click()
    await expect(page.get_by_test_id("start-message")).to_contain_text(
        "Not started: not a phone number")
    await expect(outcome).to_have_text("nothing started yet")

    # Two attempts: the second wrong code ends it; a third cannot be sent.
    iid = await start(page, "+1 425-555-0171")
    await expect(page.get_by_test_id("attempts-left")).to_have_text("2")
    async with Client(deployment) as kafka:
        code = await kafka.sms_code(iid, timeout=60)
    await send_code(page, other_than(code))
    await expect(page.get_by_test_id("code-message")).to_have_text(
        "Wrong code: 1 attempt left.")
    await send_code(page, other_than(code))
    await expect(outcome).to_have_text("failed: too many wrong codes")
    await expect(page.get_by_test_id("code-message")).to_have_text(
        "Wrong code, and that was the last attempt: the verification failed.")
    await expect(page.get_by_test_id("attempts-left")).to_have_text("0")
    await expect(page.get_by_test_id("code")).to_be_disabled()
    await expect(page.get_by_test_id("send-code")).to_be_disabled()

    # Another number, cancelled on the page: failed (terminated).
    await start(page, "+1 425-555-0172")
    await expect(outcome).to_have_text("waiting for the code (the SMS was sent)")
    await page.get_by_role("button", name="Cancel this verification").click()
    await expect(outcome).to_have_text("failed (terminated): cancelled on the page")
    await expect(page.get_by_test_id("terminate")).to_be_hidden()

    # Over the rate limit (two starts per number): 429, with the seconds to wait, in words.
    await start(page, "+1 425-555-0172")
    await page.get_by_test_id("start").click()
    await expect(page.get_by_test_id("start-message")).to_have_text(re.compile(
        r"^Not started: too many verifications for this number lately; no SMS was sent\. "
        r"You can try again in \d+ seconds \(about 10 minutes\)\.$"))


# ---------------------------------------------------------------- resend (rule 15)


async def test_resend_waits_with_a_countdown_then_calls_with_the_same_code(
        page, deployment: Deployment, start_worker):
    worker = start_worker(RESEND_INTERVAL_SECONDS="4", RESEND_LIMIT="1")
    await open_page(page, worker, "test-api-key")
    iid = await start(page, "+1 425-555-0180")
    assert await page.get_by_test_id("code").get_attribute("autocomplete") == "one-time-code"
    resend, call = page.get_by_test_id("resend"), page.get_by_test_id("call-instead")
    await expect(resend).to_have_text(re.compile(r"^Send the code again \(in \d seconds?\)$"))
    await expect(resend).to_be_disabled()
    await expect(call).to_be_disabled()

    await expect(call).to_be_enabled()  # the interval has passed
    await expect(resend).to_have_text("Send the code again")
    await call.click()
    await expect(page.get_by_test_id("resend-message")).to_have_text(
        "Sent again by a phone call, the same code: 0 resends left.")
    await expect(resend).to_have_text("No resends left")
    await expect(resend).to_be_disabled()
    await expect(call).to_be_disabled()

    async with Client(deployment) as kafka:
        sms, spoken = await kafka.read("verification.sms", lambda r: len(r) >= 2, key=iid)
    code = re.search(r"\d+", sms["body"]).group()
    assert spoken["channel"] == "call" and ", ".join(code) in spoken["body"]
    await page.get_by_label("Code you received by SMS", exact=True).fill(code)
    await page.get_by_test_id("send-code").click()
    await expect(page.get_by_test_id("outcome")).to_contain_text("verified")
    await expect(resend).to_have_text("Send the code again")
    await expect(resend).to_be_disabled()
