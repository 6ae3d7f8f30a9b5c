"""The pure renderer: a locale's template, a code, the app's name, the window -> the text.

Text (``sms``, ``whatsapp``): the first form that applies (a form with ``{app}`` only when
there is an app name) and fits one SMS segment with the ``@domain #code`` line, so a long app
name, a long code or a long domain drop the app name or the validity rather than split the SMS.
Speech (``call``): the code's digits in order separated by ``", "``, said as the form says it
(twice, as every speech form does).
"""

from __future__ import annotations

from dataclasses import dataclass

from phoneverify.models.templates.segments import segments

PLACEHOLDERS = frozenset({"code", "app", "minutes"})


@dataclass(frozen=True)
class Template:
    """One locale's forms, in order of preference, and the call's voice language."""

    locale: str
    source: str  # the file it came from, for messages
    voice: str
    text: tuple[str, ...]
    speech: tuple[str, ...]


def minutes_of(timeout_seconds: float) -> int:
    """The window in whole minutes, never more than it is (90 s: 1), at least 1."""
    return max(1, int(timeout_seconds // 60))


def web_otp_line(domain: str, code: str) -> str:
    """The origin-bound line the WebOTP API and Safari read: ``@example.com #1708``."""
    return f"@{domain} #{code}"


def _applies(form: str, app: str) -> bool:
    return bool(app) or "{app}" not in form


def text_candidates(template: Template, code: str, app: str, minutes: int,
                    domain: str = "") -> list[str]:
    """Every text the forms give, in order of preference (those that apply)."""
    line = "\n" + web_otp_line(domain, code) if domain else ""
    return [form.format(code=code, app=app, minutes=minutes) + line
            for form in template.text if _applies(form, app)]


def render_text(template: Template, code: str, app: str = "", minutes: int = 1,
                domain: str = "") -> str:
    """The SMS or WhatsApp body: the first form that fits one segment (the catalog's check
    makes sure one does; else the shortest)."""
    candidates = text_candidates(template, code, app, minutes, domain)
    fitting = [body for body in candidates if segments(body) == 1]
    return fitting[0] if fitting else min(candidates, key=len)


def spell(code: str) -> str:
    """The code as a voice should read it: ``1708`` -> ``1, 7, 0, 8``."""
    return ", ".join(code)


def render_speech(template: Template, code: str, app: str = "", minutes: int = 1) -> str:
    """What the call says (with ``template.voice``): the first form that applies."""
    form = next(form for form in template.speech if _applies(form, app))
    return form.format(code=spell(code), app=app, minutes=minutes)


def body(template: Template, channel: str, code: str, app: str = "", minutes: int = 1,
         domain: str = "") -> str:
    """What a delivery carries: for ``call`` the words spoken (never the WebOTP line), for
    ``sms`` and ``whatsapp`` the text, ending with ``@domain #code`` when there is a domain."""
    if channel == "call":
        return render_speech(template, code, app, minutes)
    return render_text(template, code, app, minutes, domain)
