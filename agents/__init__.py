"""Faust agents: thin shells that move records in and out of the pure core in ``models``.

intake -> admission -> actor <- (response, terminate, tick, sms-status); actor -> sender;
the actor reports conclusions back to admission; the ticker drives both.
``app.py`` imports each agent module to register it; this package imports nothing itself, so
``agents.deadlines`` can be used without creating the Faust app.
"""
