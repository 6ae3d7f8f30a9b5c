"""Phone numbers: any form a person types, normalised to E.164 with ``phonenumbers``."""

from __future__ import annotations

import phonenumbers


class InvalidPhoneNumber(ValueError):
    pass


def normalise(raw: str, default_region: str = "US") -> str:
    """``"+1 425-555-0100"`` -> ``"+14255550100"``; raises :class:`InvalidPhoneNumber`."""
    try:
        number = phonenumbers.parse(raw, default_region)
    except phonenumbers.NumberParseException as error:
        raise InvalidPhoneNumber(f"not a phone number: {error}") from None
    if not phonenumbers.is_possible_number(number):
        raise InvalidPhoneNumber("not a possible phone number (wrong length for its region)")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def mask(e164: str | None) -> str | None:
    """Keep the first digits and the last two: ``+14255550100`` -> ``+142******00``."""
    if not e164:
        return e164
    keep = 4 if len(e164) > 8 else 2
    return e164[:keep] + "*" * (len(e164) - keep - 2) + e164[-2:]
