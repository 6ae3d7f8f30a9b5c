"""Phone numbers: any form a person types, normalised to E.164, and the number policy (rule 12).

All of it is libphonenumber (the ``phonenumbers`` package): whether a number is valid, its
region and its type (mobile, fixed line, toll free, premium rate, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

import phonenumbers
from phonenumbers import PhoneNumberType

#: libphonenumber's type names, lower case, as ``PHONE_ALLOWED_TYPES`` takes them.
TYPE_NAMES: dict[int, str] = {
    value: name.lower() for name, value in vars(PhoneNumberType).items()
    if name.isupper() and isinstance(value, int)
}


class InvalidPhoneNumber(ValueError):
    """Not a phone number libphonenumber holds valid (wrong length, unassigned range, ...)."""


class BlockedNumber(ValueError):
    """A valid number this deployment does not send SMS to (region or type not allowed)."""


@dataclass(frozen=True)
class NumberPolicy:
    """Where SMS may go: ISO 3166 regions (empty: all) and libphonenumber types."""

    regions: frozenset[str] = frozenset()
    types: frozenset[str] = frozenset({"mobile", "fixed_line_or_mobile"})

    def __post_init__(self) -> None:
        unknown = self.types - set(TYPE_NAMES.values())
        if unknown:
            raise ValueError(f"unknown phone number types {sorted(unknown)}; use "
                             f"{', '.join(sorted(TYPE_NAMES.values()))}")


_UNPARSABLE = {
    phonenumbers.NumberParseException.INVALID_COUNTRY_CODE:
        "not a phone number: the country code is missing or unknown (start with + and it)",
    phonenumbers.NumberParseException.NOT_A_NUMBER: "not a phone number",
    phonenumbers.NumberParseException.TOO_SHORT_AFTER_IDD:
        "not a phone number: too short after the international prefix",
    phonenumbers.NumberParseException.TOO_SHORT_NSN: "not a phone number: too short",
    phonenumbers.NumberParseException.TOO_LONG: "not a phone number: too long",
}


def _parse(raw: str, default_region: str) -> phonenumbers.PhoneNumber:
    try:
        return phonenumbers.parse(raw, default_region)
    except phonenumbers.NumberParseException as error:
        raise InvalidPhoneNumber(_UNPARSABLE.get(error.error_type, "not a phone number")) from None


def _e164(number: phonenumbers.PhoneNumber) -> str:
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def normalise(raw: str, default_region: str = "US") -> str:
    """``"+1 425-555-0100"`` -> ``"+14255550100"`` if it could be a number at all (a cheap
    check for clients; the service applies :func:`admissible`); else InvalidPhoneNumber."""
    number = _parse(raw, default_region)
    if not phonenumbers.is_possible_number(number):
        raise InvalidPhoneNumber("not a possible phone number (wrong length for its region)")
    return _e164(number)


def admissible(raw: str, default_region: str, policy: NumberPolicy) -> str:
    """The E.164 form of a valid number inside ``policy``; InvalidPhoneNumber or BlockedNumber."""
    number = _parse(raw, default_region)
    if not phonenumbers.is_valid_number(number):
        raise InvalidPhoneNumber("not a valid phone number (libphonenumber knows no such "
                                 "number: check the digits and the country code)")
    region = phonenumbers.region_code_for_number(number) or "unknown"
    if policy.regions and region not in policy.regions:
        raise BlockedNumber(f"numbers in region {region} are not served here "
                            f"(allowed: {', '.join(sorted(policy.regions))})")
    kind = TYPE_NAMES.get(phonenumbers.number_type(number), "unknown")
    if kind not in policy.types:
        raise BlockedNumber(f"{kind.replace('_', ' ')} numbers are not served here "
                            f"(allowed: {', '.join(sorted(policy.types))})")
    return _e164(number)


def region_of(e164: str) -> str | None:
    """The ISO 3166 region of an E.164 number (``+33...`` -> ``FR``), if libphonenumber
    knows it."""
    try:
        return phonenumbers.region_code_for_number(phonenumbers.parse(e164, None)) or None
    except phonenumbers.NumberParseException:
        return None


def reachable(raw: str, default_region: str,
              policies: dict[str, NumberPolicy]) -> tuple[str, tuple[str, ...]]:
    """The E.164 form and the channels (the keys of ``policies``, in order) whose policy
    admits the number (rule 16); InvalidPhoneNumber, or BlockedNumber when none does (the
    reason of the first channel's policy)."""
    e164, channels, refusal = "", [], None
    for channel, policy in policies.items():
        try:
            e164 = admissible(raw, default_region, policy)
        except BlockedNumber as error:
            refusal = refusal or error
            continue
        channels.append(channel)
    if not channels:
        raise refusal or BlockedNumber("no channel is offered here")
    return e164, tuple(channels)


def mask(e164: str | None) -> str | None:
    """Keep the first digits and the last two: ``+14255550100`` -> ``+142******00``."""
    if not e164:
        return e164
    keep = 4 if len(e164) > 8 else 2
    return e164[:keep] + "*" * (len(e164) - keep - 2) + e164[-2:]
