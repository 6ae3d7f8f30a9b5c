"""Faust agents: thin shells that move records in and out of the pure core in ``models``.

intake -> ratelimit -> actor <- (response, terminate, tick, sms-status); actor -> sender.
"""

from agents import actor, intake, ratelimit, sender, ticker

__all__ = ["actor", "intake", "ratelimit", "sender", "ticker"]
