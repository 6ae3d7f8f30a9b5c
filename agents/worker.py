"""Run one worker: create the topics, then start Faust (agents, tables, ticker, web server)."""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import logging.config
import os
import socket
import sys
from typing import TYPE_CHECKING

from phoneverify.ops import stopping

if TYPE_CHECKING:  # Faust is imported once the topics exist
    import faust


def port_taken(host: str, port: int) -> bool:
    """Whether another process listens on ``host:port`` (bound as aiohttp binds it)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                return True
            raise
    return False


def run_worker(argv: list[str] | None = None) -> None:
    """Start a worker; a stop signal (Ctrl-C, SIGTERM, SIGHUP) stops it wherever it lands
    (:mod:`phoneverify.ops.stopping`), and a stop before Faust runs exits 0 with one line."""
    stopping.while_starting()
    try:
        app = _prepare(argv)
    except stopping.StoppedWhileStarting as stop:
        logging.getLogger("phoneverify").info(
            "stopped by %s while starting (nothing was consuming yet)", stop.signal.name)
        raise SystemExit(0) from None
    stopping.handing_over()  # from here a stop signal is acted on once Faust's handlers are in
    # What is loaded by now (modules, classes, settings: about 100,000 objects) lives as long
    # as the process: out of the collector's sight, each full collection is cheap. Faust runs
    # one per table at every rebalance and at stop (0.1 to 0.5 s each, more on a busy machine).
    gc.freeze()
    app.main()


def _prepare(argv: list[str] | None = None) -> faust.App:
    """Everything before Faust: settings, logging, topics, the key check; returns the app with
    ``sys.argv`` set for its ``worker`` command."""
    from pydantic import ValidationError

    from phoneverify.models.templates.catalog import TemplateError
    from phoneverify.ops import speedups
    from phoneverify.ops.logs import (
        json_logging,
        quiet_bad_requests,
        quiet_harmless_startup_errors,
        quiet_late_ticks,
        quiet_rebalances,
        quiet_starved_loop,
    )
    from phoneverify.ops.recovery import STORE_DIR, check_cluster, cluster_id
    from phoneverify.settings import Settings
    from phoneverify.topics import KeyMismatch, check_code_key, ensure_topics

    try:
        settings = Settings()
    except ValidationError as error:  # say which setting is wrong and why, in one line each
        for item in error.errors(include_url=False):
            name = str(item["loc"][0]).upper() if item["loc"] else "settings"
            print(f"phoneverify worker: {name}: {item['msg'].removeprefix('Value error, ')}",
                  file=sys.stderr)
        raise SystemExit(2) from None
    if settings.log_format == "json":
        logging.config.dictConfig(json_logging(settings.log_level))
    else:
        logging.basicConfig(level=settings.log_level, format="[%(levelname)s] %(message)s")
    quiet_harmless_startup_errors()
    quiet_bad_requests()
    quiet_starved_loop()
    quiet_rebalances()
    quiet_late_ticks()
    logging.getLogger("twilio.http_client").setLevel(logging.WARNING)  # headers of each send
    log = logging.getLogger("phoneverify")
    say = log.info
    if port_taken(settings.web_host, settings.web_port):
        log.error("port %d (WEB_PORT) on %s is taken, by another worker or program: set "
                  "WEB_PORT to a free port (a second worker here needs its own DATA_DIR too)",
                  settings.web_port, settings.web_host)
        raise SystemExit(2)
    try:  # rule 18: every template is checked before anything starts
        catalog, default = settings.templates, settings.locale
    except TemplateError as error:
        log.error("bad template: %s", error)
        raise SystemExit(2) from None
    say("templates: %s (default %s)%s", " ".join(catalog.locales), default,
        f"; app name {settings.app_name!r}" if settings.app_name else "")
    use_event_loop(settings.event_loop, log)
    for what in speedups.missing():
        log.warning("%s", what)
    try:
        created, replicas = asyncio.run(ensure_topics(settings))
        if created:
            say("created topics (%d replica%s each): %s", replicas, "s" if replicas > 1 else "",
                ", ".join(created))
        os.environ["REPLICATION_FACTOR"] = str(replicas)  # for Faust's own topics
        # A store built from another Kafka cluster is set aside before Faust opens it.
        check_cluster(settings.data_dir,
                      asyncio.run(cluster_id(settings.kafka_bootstrap_servers)))
        (settings.data_dir / STORE_DIR).mkdir(parents=True, exist_ok=True)
        asyncio.run(check_code_key(settings))
        from phoneverify.agents.app import (
            app,  # imported after the topics exist: Faust subscribes on start
        )
    except KeyMismatch as error:
        log.error("%s", error)
        raise SystemExit(2) from None

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
    return app


def use_event_loop(name: str, log: logging.Logger) -> None:
    """Install uvloop's event loop policy (Faust's consumer thread makes its loop from it too),
    unless ``EVENT_LOOP=asyncio`` or uvloop is not installed (then warn and use asyncio's)."""
    if name != "uvloop":
        return
    try:
        import uvloop
    except ImportError:
        log.warning("EVENT_LOOP=uvloop but uvloop is not installed: asyncio's event loop is "
                    "used (more CPU per record)")
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


if __name__ == "__main__":
    run_worker(sys.argv[1:])
