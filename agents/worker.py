"""Run one worker: create the topics, then start Faust (agents, tables, ticker, web server)."""

from __future__ import annotations

import asyncio
import logging
import os
import sys


def run_worker(argv: list[str] | None = None) -> None:
    from phoneverify.ops.logs import quiet_harmless_startup_errors
    from phoneverify.settings import Settings
    from phoneverify.topics import ensure_topics

    settings = Settings()
    logging.basicConfig(level=settings.log_level)
    quiet_harmless_startup_errors()
    (settings.data_dir / "faust").mkdir(parents=True, exist_ok=True)
    created, replicas = asyncio.run(ensure_topics(settings))
    if created:
        print(f"created topics ({replicas} replica{'s' if replicas > 1 else ''} each): "
              f"{', '.join(created)}", flush=True)
    os.environ["REPLICATION_FACTOR"] = str(replicas)  # for Faust's own topics
    from phoneverify.agents.app import (
        app,  # imported after the topics exist: Faust subscribes on start
    )

    if not settings.api_key_value:
        print("WARNING: API_KEY is empty: the HTTP API accepts requests without a key "
              "(local use only)", flush=True)
    elif settings.api_key is None:
        print(f"HTTP API key (X-API-Key): generated once, kept in {settings.data_dir / 'api_key'}",
              flush=True)
    else:
        print("HTTP API key (X-API-Key): from API_KEY", flush=True)
    level = settings.log_level.lower()
    sys.argv = ["phoneverify", "worker", "--loglevel", level, *(argv or [])]
    app.main()


if __name__ == "__main__":
    run_worker(sys.argv[1:])
