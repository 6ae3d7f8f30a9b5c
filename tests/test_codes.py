"""Code derivation and keyed hashing: length, stability, key separation, hiding, distribution."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from phoneverify.models.codes import draw_code, hash_code

KEY = b"unit-test-code-key"
OTHER_KEY = b"unit-test-code-key-2"


@pytest.mark.parametrize("length", [4, 6, 8, 10])
def test_codes_have_the_configured_length_in_digits(length):
    for n in range(300):
        code = draw_code(KEY, f"id-{n}", length)
        assert len(code) == length
        assert code.isdigit() and code.isascii()


def test_leading_zeros_are_kept():
    codes = [draw_code(KEY, f"id-{n}", 4) for n in range(2000)]
    zero_led = [code for code in codes if code.startswith("0")]
    assert zero_led  # about one in ten
    assert all(len(code) == 4 for code in zero_led)


def test_codes_are_stable_for_the_same_key_and_id():
    assert draw_code(KEY, "abc", 4) == draw_code(KEY, "abc", 4)
    assert draw_code(bytes(KEY), "abc", 6) == draw_code(KEY, "abc", 6)


def test_codes_differ_across_keys_and_ids():
    ids = [f"id-{n}" for n in range(200)]
    mine = [draw_code(KEY, iid, 8) for iid in ids]
    theirs = [draw_code(OTHER_KEY, iid, 8) for iid in ids]
    assert sum(a == b for a, b in zip(mine, theirs, strict=True)) <= 1
    assert len(set(mine)) >= 198  # 200 draws from 10**8: collisions are very unlikely


def test_hashes_are_hex_stable_and_differ_per_instance_code_and_key():
    h = hash_code(KEY, "abc", "0042")
    assert re.fullmatch(r"[0-9a-f]{64}", h)
    assert hash_code(KEY, "abc", "0042") == h
    assert hash_code(KEY, "abd", "0042") != h
    assert hash_code(KEY, "abc", "0043") != h
    assert hash_code(KEY, "abc", "42") != h  # leading zeros count
    assert hash_code(OTHER_KEY, "abc", "0042") != h
    # The separator keeps (id, code) pairs apart that would concatenate alike.
    assert hash_code(KEY, "abc1", "234") != hash_code(KEY, "abc", "1234")


def test_hashes_do_not_reveal_the_code():
    for n in range(500):
        iid = f"id-{n}"
        code = draw_code(KEY, iid, 10)
        h = hash_code(KEY, iid, code)
        assert code not in h
        assert h != code
    # The hash of a code is not the code-drawing output: the key is split by purpose.
    assert draw_code(KEY, "abc", 10) not in hash_code(KEY, "abc", draw_code(KEY, "abc", 10))


def test_every_code_hashes_differently_for_one_instance():
    hashes = {hash_code(KEY, "abc", f"{n:04d}") for n in range(10_000)}
    assert len(hashes) == 10_000


def test_digits_are_roughly_uniform_in_every_position():
    n, length = 20_000, 4
    codes = [draw_code(KEY, f"instance-{i}", length) for i in range(n)]
    for position in range(length):
        counts = Counter(code[position] for code in codes)
        assert set(counts) == set("0123456789")
        for digit, count in counts.items():
            # Expected 2000 each, sd ~42; allow a very loose +-15 %.
            assert 1700 <= count <= 2300, (position, digit, count)
    assert len(set(codes)) > 8_000  # 20k draws from 10k codes cover most of them
