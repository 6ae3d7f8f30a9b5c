"""The templates (contract rules 16, 18, 19): every shipped locale renders in one SMS segment
with the longest code, a 30-character app name and the WebOTP line; speech spells the code
twice; a bad template is refused naming its file and the problem; GSM-7 segment arithmetic."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from phoneverify.models.templates.catalog import Budget, TemplateError, load
from phoneverify.models.templates.render import (
    body,
    minutes_of,
    render_speech,
    render_text,
    spell,
)
from phoneverify.models.templates.segments import (
    GSM7_BASIC,
    is_gsm7,
    segment_limit,
    segments,
    septets,
)

REQUIRED = {"en", "fr", "de", "es", "it", "pt", "pt-BR", "nl", "pl", "sv", "ja", "zh-CN"}
#: The worst case the budget promises: the longest code, a 30-character name, a long domain.
LONGEST_CODE = "8" * 10
APP_30 = "Société Générale Mobile Banking"[:30]
DOMAIN = "login.example-shop.co.uk"
WORST = Budget(code_length=10, app="A" * 30, domain=DOMAIN, minutes=1)
CATALOG = load(WORST)
LOCALES = CATALOG.locales


def run_of(code: str, body: str) -> bool:
    """``code`` stands in ``body`` as one run of digits (no digit just before or after)."""
    return re.search(rf"(?<![0-9]){code}(?![0-9])", body) is not None


def test_the_required_locales_ship():
    assert set(LOCALES) >= REQUIRED


@pytest.mark.parametrize("locale", LOCALES)
@pytest.mark.parametrize("app", ["", "A" * 30, APP_30, "アプリ" * 10])
def test_every_text_fits_one_segment_with_the_longest_code_and_the_webotp_line(locale, app):
    body = render_text(CATALOG[locale], LONGEST_CODE, app, minutes=15, domain=DOMAIN)
    assert segments(body) == 1, (locale, len(body), body)
    assert body.endswith(f"\n@{DOMAIN} #{LONGEST_CODE}")
    assert run_of(LONGEST_CODE, body.splitlines()[0])


@pytest.mark.parametrize("locale", LOCALES)
def test_the_code_comes_first_and_the_app_name_is_kept_when_it_fits(locale):
    """Readers that take the first run of digits get the code; a usual name is kept."""
    body = render_text(CATALOG[locale], "0042", "Acme", minutes=2, domain="example.com")
    assert re.search(r"[0-9]+", body).group() == "0042"
    assert "Acme" in body
    assert "2" in body  # the window, where it fits (it does with a short name)
    plain = render_text(CATALOG[locale], "0042", "", minutes=2)
    assert "{" not in plain and "Acme" not in plain and "@" not in plain
    assert segments(plain) == 1


@pytest.mark.parametrize("locale", LOCALES)
def test_speech_spells_the_code_twice_and_never_carries_the_webotp_line(locale):
    template = CATALOG[locale]
    spoken = render_speech(template, "1708", "Acme", minutes=1)
    assert spoken.count("1, 7, 0, 8") == 2
    assert "1708" not in spoken and "@" not in spoken and "Acme" in spoken
    assert render_speech(template, "1708", "").count("1, 7, 0, 8") == 2
    assert re.fullmatch(r"[a-z]{2,3}-[A-Z]{2}", template.voice)


def test_a_delivery_body_is_text_with_the_webotp_line_or_speech_without_it():
    template = CATALOG["fr"]
    for channel in ("sms", "whatsapp"):
        text = body(template, channel, "1708", "Acme", 1, "example.com")
        assert text == ("Acme : votre code de vérification est 1708. Il est valable 1 min.\n"
                        "@example.com #1708")
    spoken = body(template, "call", "1708", "Acme", 1, "example.com")
    assert spoken == "Voici votre code de vérification Acme : 1, 7, 0, 8. Je répète : 1, 7, 0, 8."


@given(locale=st.sampled_from(LOCALES), length=st.integers(4, 10),
       app=st.text(min_size=0, max_size=30).filter(lambda a: "\x00" not in a),
       minutes=st.integers(1, 60), domain=st.sampled_from(["", "example.com", DOMAIN]),
       data=st.data())
def test_any_name_and_code_length_fits_one_segment_with_the_code_as_one_run(
        locale, length, app, minutes, domain, data):
    code = data.draw(st.from_regex(rf"[0-9]{{{length}}}", fullmatch=True))
    body = render_text(CATALOG[locale], code, app.strip(), minutes, domain)
    assert segments(body) == 1
    assert run_of(code, body)


def test_minutes_never_promise_more_than_the_window():
    assert [minutes_of(s) for s in (30, 60, 90, 119, 120, 600)] == [1, 1, 1, 1, 2, 10]
    assert spell("0042") == "0, 0, 4, 2"


# ---------------------------------------------------------------- segments


def test_gsm7_counts_160_in_one_segment_and_153_after():
    assert segments("a" * 160) == 1
    assert segments("a" * 161) == 2
    assert segments("a" * 306) == 2
    assert segments("a" * 307) == 3


def test_the_extension_table_counts_two_septets():
    assert is_gsm7("€[]{}") and septets("€") == 2
    assert segments("€" * 80) == 1
    assert segments("€" * 80 + "a") == 2


def test_one_character_outside_gsm7_makes_it_ucs2_with_70_in_one_segment():
    assert not is_gsm7("ç") and not is_gsm7("ó") and is_gsm7("éèàùìòÇÄÖÑÜäöñüßÉ")
    assert segment_limit("a" * 69 + "ç") == 70
    assert segments("a" * 69 + "ç") == 1
    assert segments("a" * 70 + "ç") == 2
    assert segments("😀" * 35) == 1 and segments("😀" * 36) == 2  # two UTF-16 units each


@given(st.text(alphabet=sorted(GSM7_BASIC), max_size=400))
def test_basic_gsm7_segments_follow_160_then_153(text):
    expected = 1 if len(text) <= 160 else -(-len(text) // 153)
    assert segments(text) == expected


# ---------------------------------------------------------------- TEMPLATES_DIR


def write(folder: Path, name: str, text: str, speech: str | None = None,
          voice: str = "da-DK") -> Path:
    speech = speech or "Din kode er {code}. Igen: {code}."
    path = folder / name
    path.write_text(f'voice = "{voice}"\ntext = ["{text}"]\nspeech = ["{speech}"]\n',
                    encoding="utf-8")
    return path


def test_a_folder_adds_a_locale_and_overrides_a_shipped_one(tmp_path):
    write(tmp_path, "da.toml", "Din kode er {code}.")
    write(tmp_path, "en.toml", "Code {code} ({minutes} min).", voice="en-GB")
    catalog = load(Budget(), tmp_path)
    assert render_text(catalog["da"], "1234") == "Din kode er 1234."
    assert render_text(catalog["en"], "1234", minutes=2) == "Code 1234 (2 min)."
    assert catalog["en"].voice == "en-GB" and "fr" in catalog.locales


@pytest.mark.parametrize(("text", "speech", "problem"), [
    ("Din kode er klar.", None, "text form 1 has no {code}"),
    ("Kode {code} til {user}.", None, "unknown placeholder {user}"),
    ("Kode {code:>8}.", None, "without a format or conversion"),
    ("Kode {code", None, "literal brace"),
    ("Kode {code}. " + "x" * 150, None, "no text form fits one SMS segment"),
    ("{app}: kode {code}.", None, "one without it is needed"),
    ("Kode {code}.", "Din kode er {code}.", "says {code} once"),
])
def test_a_bad_template_is_refused_naming_its_file_and_the_problem(tmp_path, text, speech,
                                                                   problem):
    path = write(tmp_path, "da.toml", text, speech)
    with pytest.raises(TemplateError) as refused:
        load(Budget(), tmp_path)
    assert str(path) in str(refused.value)
    assert problem in str(refused.value)


def test_the_budget_counts_the_webotp_line_and_the_code_length(tmp_path):
    write(tmp_path, "da.toml", "Kode {code}. " + "x" * 125)  # 136; 167 with the line
    load(Budget(code_length=4, domain=""), tmp_path)
    with pytest.raises(TemplateError, match=re.escape("the line '@example.com #8888888888'")):
        load(Budget(code_length=10, domain="example.com"), tmp_path)


@pytest.mark.parametrize(("name", "content", "problem"), [
    ("da.toml", "voice = \n", "not valid TOML"),
    ("not a tag!.toml", 'voice = "da-DK"\n', "must be a locale tag"),
    ("da.toml", 'voice = "da-DK"\ntxt = ["{code}"]\n', "unknown key txt"),
    ("da.toml", 'voice = 3\ntext = ["{code}"]\nspeech = ["{code} {code}"]\n', "`voice`"),
])
def test_a_broken_file_is_refused_naming_it(tmp_path, name, content, problem):
    (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(TemplateError, match=re.escape(problem)) as refused:
        load(Budget(), tmp_path)
    assert name in str(refused.value)


def test_every_voice_is_said_in_its_own_language_by_twilio():
    """The sender hands a call its template's voice; Twilio's ``<Say>`` takes it as it is."""
    from phoneverify.delivery.twilio_sender import call_twiml

    for locale in CATALOG.locales:
        voice = CATALOG.get(locale, "en").voice
        assert re.fullmatch(r"[a-z]{2,3}-[A-Z]{2}", voice), (locale, voice)
        assert f'<Say language="{voice}">' in call_twiml("1, 7, 0, 8", voice)
