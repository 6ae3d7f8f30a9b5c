"""The console backend: prints each SMS to standard output, standing in for the phone.

This is the one place a plain code may appear outside ``verification.sms``.
"""

from __future__ import annotations

import itertools
import sys

from phoneverify.sms import Delivery


class ConsoleBackend:
    def __init__(self) -> None:
        self._ids = itertools.count(1)

    async def send(self, to: str, body: str) -> Delivery:
        print(f"[sms to {to}] {body}", file=sys.stdout, flush=True)
        return Delivery(ok=True, provider_id=f"console-{next(self._ids)}")

    async def close(self) -> None:
        return None
