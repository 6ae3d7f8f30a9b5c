"""Phone numbers: the forms people type normalised to E.164, junk refused, masking."""

from __future__ import annotations

import pytest

from phoneverify.models.phone import InvalidPhoneNumber, mask, normalise


@pytest.mark.parametrize(("raw", "region", "e164"), [
    ("+1 425-555-0100", "US", "+14255550100"),
    ("+1 (425) 555-0100", "US", "+14255550100"),
    ("(425) 555-0100", "US", "+14255550100"),
    ("425.555.0100", "US", "+14255550100"),
    ("4255550100", "US", "+14255550100"),
    ("+14255550100", "US", "+14255550100"),
    ("+44 20 7946 0958", "US", "+442079460958"),
    ("020 7946 0958", "GB", "+442079460958"),
    ("  +44 (0)20 7946 0958  ", "US", "+442079460958"),
])
def test_typed_forms_normalise_to_e164(raw, region, e164):
    assert normalise(raw, region) == e164


def test_the_default_region_is_us():
    assert normalise("(425) 555-0100") == "+14255550100"


@pytest.mark.parametrize("junk", [
    "", " ", "hello", "phone", "12", "+1 425", "+1 425 555 0100 1234 5678",
    "+999 123 456", "++--", "0",
])
def test_junk_is_refused(junk):
    with pytest.raises(InvalidPhoneNumber):
        normalise(junk)


def test_invalid_phone_number_is_a_value_error():
    with pytest.raises(ValueError, match="phone number"):
        normalise("not a number")


@pytest.mark.parametrize("e164", ["+14255550100", "+442079460958", "+4915123456789"])
def test_mask_hides_the_middle(e164):
    masked = mask(e164)
    assert masked is not None
    assert len(masked) == len(e164)
    assert masked[:2] == e164[:2]  # the country code's first digit stays
    assert masked[-2:] == e164[-2:]  # the last two stay
    hidden = masked[4:-2]
    assert hidden and set(hidden) == {"*"}
    assert e164[4:-2] not in masked
    assert masked.count("*") >= len(e164) // 2


def test_mask_of_a_short_number_still_hides_its_middle():
    assert mask("+1234567") == "+1****67"


def test_mask_passes_through_nothing():
    assert mask(None) is None
    assert mask("") == ""
