"""Replay: rebuild every aggregate from ``verification.events`` and compare with the live table."""
