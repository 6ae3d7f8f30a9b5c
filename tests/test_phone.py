"""Phone numbers: the forms people type normalised to E.164, junk refused, the number policy
(rule 12), masking."""

from __future__ import annotations

import pytest

from phoneverify.models.phone import (
    TYPE_NAMES,
    BlockedNumber,
    InvalidPhoneNumber,
    NumberPolicy,
    admissible,
    mask,
    normalise,
)


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


# ---------------------------------------------------------------- admissible (rule 12)

DEFAULT = NumberPolicy()


@pytest.mark.parametrize("raw", [
    "+1 425-555-0100", "+1 425-555-0101", "+1 425-555-0142", "+1 425-555-0199",
    "(425) 555-0100", "4255550100",
])
def test_the_readme_example_numbers_are_valid_and_admissible(raw):
    e164 = admissible(raw, "US", DEFAULT)
    assert e164.startswith("+1425555")
    assert e164 == normalise(raw)


def test_the_default_policy_is_all_regions_mobile_numbers():
    assert DEFAULT.regions == frozenset()
    assert DEFAULT.types == {"mobile", "fixed_line_or_mobile"}


def test_a_seven_digit_local_number_is_possible_but_not_valid():
    # normalise (the client's cheap check) lets it through; the service does not.
    assert normalise("555-0100")
    with pytest.raises(InvalidPhoneNumber, match="not a valid phone number"):
        admissible("555-0100", "US", DEFAULT)


@pytest.mark.parametrize("junk", ["", "hello", "12", "+1 425", "+999 123 456",
                                  "+1 425 555 0100 1234 5678", "+1 123 456 7890"])
def test_junk_and_unassigned_numbers_are_invalid(junk):
    with pytest.raises(InvalidPhoneNumber):
        admissible(junk, "US", DEFAULT)


@pytest.mark.parametrize(("raw", "kind"), [
    ("+1 900 234 5678", "premium rate"),
    ("+1 900 555 0100", "premium rate"),
    ("+44 909 8790879", "premium rate"),
    ("+1 800 234 5678", "toll free"),
    ("+1 888 234 5678", "toll free"),
    ("+44 20 7946 0958", "fixed line"),  # a landline cannot receive an SMS
])
def test_numbers_of_types_not_allowed_are_blocked(raw, kind):
    with pytest.raises(BlockedNumber, match=kind):
        admissible(raw, "US", DEFAULT)


def test_a_blocked_type_is_admissible_when_the_policy_allows_it():
    policy = NumberPolicy(types=frozenset({"premium_rate", "toll_free"}))
    assert admissible("+1 900 234 5678", "US", policy) == "+19002345678"
    assert admissible("+1 800 234 5678", "US", policy) == "+18002345678"
    with pytest.raises(BlockedNumber):
        admissible("+1 425-555-0100", "US", policy)


@pytest.mark.parametrize("raw", ["+44 7400 123456", "+49 151 23456789"])
def test_mobile_numbers_abroad_are_admissible_when_every_region_is(raw):
    assert admissible(raw, "US", DEFAULT).startswith(("+44", "+49"))


def test_regions_outside_the_allowed_ones_are_blocked():
    policy = NumberPolicy(regions=frozenset({"US", "CA"}))
    assert admissible("+1 425-555-0100", "US", policy) == "+14255550100"
    with pytest.raises(BlockedNumber, match="region GB"):
        admissible("+44 7400 123456", "US", policy)
    with pytest.raises(BlockedNumber, match="region DE"):
        admissible("+49 151 23456789", "US", policy)
    assert admissible("+44 7400 123456", "US", NumberPolicy(regions=frozenset({"GB"}))) == (
        "+447400123456")


def test_an_invalid_number_is_invalid_even_outside_the_regions():
    with pytest.raises(InvalidPhoneNumber):
        admissible("555-0100", "US", NumberPolicy(regions=frozenset({"GB"})))


def test_blocked_and_invalid_are_distinct_value_errors():
    assert issubclass(BlockedNumber, ValueError)
    assert issubclass(InvalidPhoneNumber, ValueError)
    assert not issubclass(BlockedNumber, InvalidPhoneNumber)
    assert not issubclass(InvalidPhoneNumber, BlockedNumber)


@pytest.mark.parametrize("types", [{"mobile", "cell"}, {"Mobile"}, {"fixed-line"}, {""}])
def test_number_policy_rejects_unknown_type_names(types):
    with pytest.raises(ValueError, match="unknown phone number types"):
        NumberPolicy(types=frozenset(types))


def test_number_policy_takes_every_libphonenumber_type_name_in_lower_case():
    names = set(TYPE_NAMES.values())
    assert {"mobile", "fixed_line", "fixed_line_or_mobile", "toll_free", "premium_rate",
            "voip"} <= names
    assert NumberPolicy(types=frozenset(names)).types == names
