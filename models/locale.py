"""Which language a verification speaks (contract rule 18), decided once, at its start.

In order: the start's ``locale``, else the HTTP start's ``Accept-Language``, else the language
of the number's country, else ``DEFAULT_LOCALE``; each only if a template is close enough to
it (langcodes' language distance: ``pt-PT`` -> ``pt``, ``fr-CA`` -> ``fr``, ``zh-Hans-CN`` ->
``zh-CN``). Anything that is not a BCP 47 tag counts as unknown: it falls back, never fails.
"""

from __future__ import annotations

from collections.abc import Collection
from functools import lru_cache

import langcodes

#: Longer than any real tag or header: ignored (it falls back).
MAX_TAG = 64
MAX_HEADER = 512


def match(tag: str | None, available: Collection[str]) -> str | None:
    """The available locale closest to ``tag``; ``None`` for no tag, junk, or none close."""
    if not tag or len(tag) > MAX_TAG or not available:
        return None
    return _closest(tag.strip().replace("_", "-"), tuple(sorted(available)))


@lru_cache(maxsize=4096)  # a start costs a dict lookup, not a language distance (~0.5 ms)
def _closest(tag: str, available: tuple[str, ...]) -> str | None:
    try:
        return langcodes.closest_supported_match(tag, list(available))
    except ValueError:  # not a BCP 47 tag (langcodes' LanguageTagError)
        return None


def accepted(header: str | None) -> list[str]:
    """The tags of an ``Accept-Language`` header, most preferred first (``q=0`` and ``*``
    left out; a malformed part is skipped)."""
    if not header or len(header) > MAX_HEADER:
        return []
    ranked: list[tuple[float, int, str]] = []
    for n, part in enumerate(header.split(",")):
        tag, _, params = part.strip().partition(";")
        quality = 1.0
        name, _, value = params.strip().partition("=")
        if name.strip() == "q":
            try:
                quality = float(value)
            except ValueError:
                continue
        if tag.strip() and tag.strip() != "*" and quality > 0:
            ranked.append((-quality, n, tag.strip()))
    return [tag for _, _, tag in sorted(ranked)]


def of_region(region: str | None, available: Collection[str]) -> str | None:
    """The locale for a country (ISO 3166, ``FR``) when a template speaks its main language
    (CLDR's likely subtags: ``BR`` -> ``pt-BR``, ``CH`` -> ``de``)."""
    region = (region or "").upper()
    if len(region) != 2 or not region.isascii() or not region.isalpha() or _private(region):
        return None
    return match(_likely(region), available)


@lru_cache(maxsize=512)
def _likely(region: str) -> str | None:
    """CLDR's likely language of a region, as a tag (``BR`` -> ``pt-Latn-BR``)."""
    try:
        likely = langcodes.Language.get(f"und-{region}").maximize()
    except ValueError:
        return None
    return likely.to_tag() if likely.language != "und" else None


def _private(region: str) -> bool:
    """ISO 3166's user-assigned codes (``ZZ`` is libphonenumber's unknown region): no
    language of their own (CLDR would answer English)."""
    return region in ("AA", "ZZ") or (region[0] == "Q" and region[1] >= "M") or region[0] == "X"


def choose(available: Collection[str], default: str, requested: str | None = None,
           accept_language: str | None = None, region: str | None = None) -> str:
    """The locale a verification uses (``default`` must be one of ``available``)."""
    for tag in (requested, *accepted(accept_language)):
        found = match(tag, available)
        if found:
            return found
    return of_region(region, available) or default
