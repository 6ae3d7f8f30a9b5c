"""Run one worker: create the topics, then start Faust (agents, tables, ticker, web server)."""

from __future__ import annotations

import asyncio
import logging
import logging.config
import os
import sys


def run_worker(argv: list[str] | None = None) -> None:
    from phoneverify.ops.logs import (
        json_logging,
        quiet_bad_requests,
        quiet_harmless_startup_errors,
    )
    from phoneverify.settings import Settings
    from phoneverify.topics import KeyMismatch, check_code_key, ensure_topics

    settings = Settings()
    if settings.log_format == "json":
        logging.config.dictConfig(json_logging(settings.log_level))
    else:
        logging.basicConfig(level=settings.log_level, format="[%(levelname)s] %(message)s")
    quiet_harmless_startup_errors()
    quiet_bad_requests()
    logging.getLogger("twilio.http_client").setLevel(logging.WARNING)  # headers of each send
    log = logging.getLogger("phoneverify")
    say = log.info
    (settings.data_dir / "faust").mkdir(parents=True, exist_ok=True)
    created, replicas = asyncio.run(ensure_topics(settings))
    if created:
        say("created topics (%d replica%s each): %s", replicas, "s" if replicas > 1 else "",
            ", ".join(created))
    os.environ["REPLICATION_FACTOR"] = str(replicas)  # for Faust's own topics
    try:
        asyncio.run(check_code_key(settings))
    except KeyMismatch as error:
        log.error("%s", error)
        raise SystemExit(2) from None
    from phoneverify.agents.app import (
        app,  # imported after the topics exist: Faust subscribes on start
    )

    if not settings.api_key_value:
        log.warning("API_KEY is empty: the HTTP API accepts requests without a key (local "
                    "use only)")
    elif settings.api_key is None:
        say("HTTP API key (X-API-Key): generated once, kept in %s",
            (settings.data_dir / "api_key").resolve())
    else:
        say("HTTP API key (X-API-Key): from API_KEY%s", " and API_KEYS" if settings.api_keys
            else "")
    quiet = ["--quiet"] if settings.log_format == "json" else []  # no banner: JSON lines only
    sys.argv = ["phoneverify", *quiet, "worker", "--loglevel", settings.log_level.lower(),
                *(argv or [])]
    app.main()


if __name__ == "__main__":
    run_worker(sys.argv[1:])
