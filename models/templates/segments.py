"""How many SMS segments a text takes (GSM 03.38): 160 GSM-7 characters in one, else 153 per
segment; a text with any character outside GSM-7 goes as UCS-2: 70 in one, else 67 each."""

from __future__ import annotations

import math

#: The GSM 03.38 basic character set (one septet each), without the escape to the extension.
GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà")
#: The extension table: each costs two septets (the escape and itself).
GSM7_EXTENSION = frozenset("\f^{}\\[~]|€")


def is_gsm7(text: str) -> bool:
    return all(char in GSM7_BASIC or char in GSM7_EXTENSION for char in text)


def septets(text: str) -> int:
    """Its length in GSM-7 septets (the extension table's characters count two)."""
    return sum(2 if char in GSM7_EXTENSION else 1 for char in text)


def ucs2_units(text: str) -> int:
    """Its length in UTF-16 code units (a character outside the BMP, an emoji, counts two)."""
    return len(text.encode("utf-16-le")) // 2


def segment_limit(text: str) -> int:
    """What one segment holds for this text: 160 (GSM-7) or 70 (UCS-2)."""
    return 160 if is_gsm7(text) else 70


def length(text: str) -> int:
    """Its length in the unit its encoding counts: septets, or UTF-16 code units."""
    return septets(text) if is_gsm7(text) else ucs2_units(text)


def segments(text: str) -> int:
    """The number of SMS segments ``text`` takes."""
    size, single = length(text), segment_limit(text)
    if size <= single:
        return 1
    return math.ceil(size / (153 if single == 160 else 67))
