"""Verification codes: drawn per instance, stored and compared only as keyed hashes.

The code is a keyed pseudo-random function (HMAC-SHA256 under a secret key made with
``secrets``) of the instance id. To anyone without the key it is as unpredictable as a fresh
``secrets`` draw; to the worker it is stable, so a start that is redelivered or replayed after
a crash yields the very same code and the same SMS command. No verification can ever get two
SMS with different codes. The key is split by purpose so the hash in state never reveals the
code-drawing key, and hashes are bound to their instance id.
"""

from __future__ import annotations

import hashlib
import hmac


def _subkey(key: bytes, purpose: bytes) -> bytes:
    return hmac.new(key, b"phoneverify/" + purpose, hashlib.sha256).digest()


def draw_code(key: bytes, instance_id: str, length: int) -> str:
    """The code for ``instance_id``: ``length`` decimal digits, leading zeros kept."""
    digest = hmac.new(_subkey(key, b"code"), instance_id.encode(), hashlib.sha512).digest()
    return str(int.from_bytes(digest, "big") % 10**length).zfill(length)


def hash_code(key: bytes, instance_id: str, code: str) -> str:
    """The keyed hash of ``code`` for ``instance_id``: what state and events hold."""
    message = f"{instance_id}\x00{code}".encode()
    return hmac.new(_subkey(key, b"hash"), message, hashlib.sha256).hexdigest()


def fingerprint(key: bytes) -> str:
    """Names the key without revealing it, so workers can check they share one."""
    return _subkey(key, b"fingerprint").hex()[:16]

