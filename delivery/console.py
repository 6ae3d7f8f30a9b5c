"""The console backend: prints each delivery to standard output, standing in for the phone.

One line per delivery, naming its channel and the verification (instance id) when the sender
gives it, so a script can tell two codes for one number apart::

    [sms to +14255550100 for signup-42] Your verification code is 2168
    [call to +14255550100 for signup-42] Your verification code is 2, 1, 6, 8. Again: ...

This is the one place a plain code may appear outside ``verification.sms``.
"""

from __future__ import annotations

import itertools
import sys

from phoneverify.delivery import Delivery


class ConsoleBackend:
    def __init__(self) -> None:
        self._ids = itertools.count(1)

    async def send(self, to: str, body: str, *, instance_id: str | None = None,
                   command_id: str | None = None, channel: str = "sms",
                   locale: str | None = None) -> Delivery:
        where = to if instance_id is None else f"{to} for {instance_id}"
        print(f"[{channel} to {where}] {body}", file=sys.stdout, flush=True)
        return Delivery(ok=True, provider_id=f"console-{next(self._ids)}")

    async def close(self) -> None:
        return None
