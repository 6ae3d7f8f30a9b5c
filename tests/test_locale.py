"""Choosing a verification's locale (contract rule 18): the start's ``locale``, else
``Accept-Language``, else the number's country, else the default; junk never fails."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from phoneverify.models.locale import accepted, choose, match, of_region

SHIPPED = ["en", "fr", "de", "es", "it", "pt", "pt-BR", "nl", "pl", "sv", "ja", "zh-CN"]


@pytest.mark.parametrize(("tag", "expected"), [
    ("fr", "fr"), ("pt-PT", "pt"), ("pt-BR", "pt-BR"), ("pt-br", "pt-BR"), ("fr-CA", "fr"),
    ("zh-Hans-CN", "zh-CN"), ("zh", "zh-CN"), ("en-GB", "en"), ("de_AT", "de"),
    ("es-419", "es"), ("ja-JP", "ja"),
    ("tlh", None), ("zh-TW", None), ("nb", None), ("", None), (None, None),
    ("not a tag", None), ("fr;q=1", None), ("x" * 100, None),
])
def test_a_tag_matches_the_closest_shipped_locale_or_none(tag, expected):
    assert match(tag, SHIPPED) == expected


@pytest.mark.parametrize(("region", "expected"), [
    ("FR", "fr"), ("DE", "de"), ("ES", "es"), ("BR", "pt-BR"), ("PT", "pt"), ("IT", "it"),
    ("NL", "nl"), ("PL", "pl"), ("SE", "sv"), ("JP", "ja"), ("CN", "zh-CN"), ("US", "en"),
    ("CH", "de"), ("MX", "es"), ("AT", "de"), ("IN", None), ("KR", None), ("ZZ", None),
    ("XK", None), ("fr", "fr"),
    (None, None), ("", None),
])
def test_a_country_speaks_its_main_language_when_a_template_has_it(region, expected):
    assert of_region(region, SHIPPED) == expected


def test_accept_language_is_ranked_by_quality():
    assert accepted("da, en-gb;q=0.8, en;q=0.7") == ["da", "en-gb", "en"]
    assert accepted("en;q=0.1, fr-CH , *;q=0.5, de;q=0") == ["fr-CH", "en"]
    assert accepted("fr;q=abc, it") == ["it"]
    assert accepted("") == accepted(None) == []


def test_given_a_locale_it_wins_over_everything():
    assert choose(SHIPPED, "en", "pt-PT", "de", "FR") == "pt"


def test_given_an_unknown_locale_accept_language_then_the_country_then_the_default():
    assert choose(SHIPPED, "en", "tlh", "da, fr-CA;q=0.9", "DE") == "fr"
    assert choose(SHIPPED, "en", "###", "da", "DE") == "de"
    assert choose(SHIPPED, "sv", "###", None, "IN") == "sv"
    assert choose(SHIPPED, "en", None, None, None) == "en"


@given(requested=st.one_of(st.none(), st.text(max_size=80)),
       header=st.one_of(st.none(), st.text(max_size=200)),
       region=st.one_of(st.none(), st.text(max_size=4)))
def test_any_input_yields_a_shipped_locale_never_an_error(requested, header, region):
    assert choose(SHIPPED, "en", requested, header, region) in SHIPPED
