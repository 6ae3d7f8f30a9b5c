"""``phoneverify``: the command line (``phoneverify --help``).

Every command but ``worker``, ``status`` and ``replay`` talks to Kafka through the client
library (:mod:`phoneverify.interfaces.client`) and says what the service answered;
``status`` asks a worker's HTTP API. Settings come from the environment, as for the worker
(KAFKA_BOOTSTRAP_SERVERS, TOPIC_PREFIX, WEB_PORT, API_KEY, ...).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

OK, FAILED, USAGE, UNAVAILABLE, REFUSED = 0, 1, 2, 3, 4

DESCRIPTION = "Verify phone numbers by SMS code: run workers, start and follow verifications."
EPILOG = """\
examples (a worker running: `make run`, or `phoneverify worker` with Kafka up):
  phoneverify start "+1 425-555-0142"          start; prints the new verification's id
  phoneverify start 4255550143 --id order-17   choose the id (1-64 of A-Z a-z 0-9 . _ -)
  phoneverify start "+33 6 12 34 56 78" --locale de  the SMS in German (else French)
  phoneverify respond order-17 0042            send back the code from the SMS (0042 != 42)
  phoneverify resend order-17 --channel call   the same code again, read out in a call
  phoneverify start "+44 20 7946 0958" --channel auto   a landline: the code by a call
  phoneverify watch --id order-17              wait for its outcome; exit 0 if verified
  phoneverify status order-17 --json           ask a worker's HTTP API (needs API_KEY)
  phoneverify terminate order-17 --reason "user left"
  phoneverify watch --timeout 60               print every outcome for a minute

start, respond and terminate wait for the service's answer and print it (--no-wait: only
send). exit codes:
  0  done: started, verified, terminated; for status and watch: verified or still running
  1  not verified: a wrong code, too many attempts, too late; a failed or terminated outcome
  2  invalid input or usage: a bad id or code, a number the service holds invalid or does
     not serve
  3  no answer: a timeout, Kafka or the worker unreachable (a command may still take effect)
  4  refused: the id is in use, too many starts for the number, no such verification, it
     had already ended (nothing changed), a resend too soon or none left, or a channel
     that cannot reach the number

--json prints one JSON document per result (the service's reply; JSON lines for watch).
"""


class Failure(Exception):
    """Ends the command with a message on stderr and an exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def build_parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="phoneverify", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=raw)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print JSON, for scripts")
    kafka = argparse.ArgumentParser(add_help=False, parents=[common])
    kafka.add_argument("--bootstrap-servers", metavar="HOST:PORT",
                       help="Kafka (default: $KAFKA_BOOTSTRAP_SERVERS or 127.0.0.1:9092)")

    def command(name: str, help: str, parents: list[argparse.ArgumentParser],
                example: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, parents=parents,
                              epilog=f"example:\n  {example}", formatter_class=raw)

    sub.add_parser("worker", help="run a worker (settings from the environment)",
                   description="Run a worker: creates the topics, then consumes them. Settings "
                               "come from the environment:", epilog=_settings_help(),
                   formatter_class=raw)
    ident = "the verification's id (as printed by start)"
    commands = argparse.ArgumentParser(add_help=False, parents=[kafka])
    commands.add_argument("--no-wait", action="store_true",
                          help="only send it (acknowledged by Kafka); do not wait for the answer")
    commands.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                          help="how long to wait for the answer (default 30)")

    start = command("start", "start a verification: one SMS with a code goes to PHONE",
                    [commands], 'phoneverify start "+1 425-555-0142" --id signup-42')
    start.add_argument("phone", metavar="PHONE",
                       help="phone number in any usual form; without a country code it is "
                            "read in $PHONE_DEFAULT_REGION (default US)")
    start.add_argument("--id", dest="instance_id", metavar="ID",
                       help="the verification's id (default: a new UUID4 hex)")
    start.add_argument("--locale", metavar="TAG",
                       help="the SMS's language, BCP 47 (fr, pt-BR; default: the number's "
                            "country's, else $DEFAULT_LOCALE)")
    channels = ("sms", "whatsapp", "call", "auto")
    start.add_argument("--channel", choices=channels, default=None,
                       help="how the code goes out (default sms; auto: a call for landlines)")

    resend = command("resend", "send the same code again (deadline and attempts unchanged)",
                     [commands], "phoneverify resend signup-42 --channel call")
    resend.add_argument("instance_id", metavar="ID", help=ident)
    resend.add_argument("--channel", choices=channels, default=None,
                        help="sms, whatsapp, call or auto (default: the channel used last)")

    respond = command("respond", "send back the code the SMS carried", [commands],
                      "phoneverify respond signup-42 0042")
    respond.add_argument("instance_id", metavar="ID", help=ident)
    respond.add_argument("code", metavar="CODE", help="the digits, as received: 0042 is not 42")

    terminate = command("terminate", "end a verification now (outcome: terminated)",
                        [commands], 'phoneverify terminate signup-42 --reason "user cancelled"')
    terminate.add_argument("instance_id", metavar="ID", help=ident)
    terminate.add_argument("--reason", default="", help="why (up to 500 characters)")

    status = command("status", "show a verification's state, from a worker's HTTP API",
                     [common], "phoneverify status signup-42 --url http://127.0.0.1:6066")
    status.add_argument("instance_id", metavar="ID", help=ident)
    status.add_argument("--url", help="a worker's web server (default: http://127.0.0.1:$WEB_PORT"
                                      ", WEB_PORT 6066 unless set)")
    status.add_argument("--api-key", help="the X-API-Key (default: $API_KEY, else the key a "
                                          "local worker keeps in $DATA_DIR/api_key)")
    status.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                        help="HTTP timeout (default 10)")

    watch = command("watch", "print outcomes as they come (Ctrl-C stops); with --id, wait for "
                    "that verification's outcome (also one that came before)", [kafka],
                    "phoneverify watch --id signup-42 --timeout 120")
    watch.add_argument("--id", dest="instance_id", metavar="ID",
                       help="only this verification: print its outcome and exit")
    watch.add_argument("--timeout", type=float, metavar="SECONDS",
                       help="stop after this long (exit 3 if --id or --count was not satisfied)")
    watch.add_argument("--count", type=int, metavar="N", help="stop after N outcomes")
    watch.add_argument("--from-beginning", action="store_true",
                       help="also print the outcomes published before (those still on the "
                            "topic), oldest first, then the new ones as they come")

    schema = sub.add_parser(
        "schema", help="print the API documents: openapi (HTTP, JSON) or asyncapi (topics, YAML)",
        description="Print a document generated from the service's models: openapi (the HTTP "
                    "API, as GET /openapi.json serves it) or asyncapi (the Kafka topics, as "
                    "docs/asyncapi.yaml).", formatter_class=raw,
        epilog="example:\n  phoneverify schema asyncapi --output docs/asyncapi.yaml")
    schema.add_argument("document", choices=("openapi", "asyncapi"))
    schema.add_argument("--output", metavar="FILE", help="write it there (default: stdout)")

    fraud = command("fraud", "list, set or lift the fraud guard's blocks (SMS pumping)", [kafka],
                    "phoneverify fraud block +44740012 --for 12h")
    action = fraud.add_subparsers(dest="action", required=True, metavar="ACTION")
    action.add_parser("list", parents=[kafka], help="the blocks in force",
                      description="The blocks in force (prefixes and countries), from "
                                  "verification.fraud.")
    key_help = "an E.164 prefix (+44740012: the numbers starting so) or an ISO region (GB)"
    block = action.add_parser("block", parents=[kafka], help="block a prefix or a country",
                              description="Refuse starts to KEY on every worker for a while.")
    block.add_argument("key", metavar="KEY", help=key_help)
    block.add_argument("--for", dest="duration", required=True, metavar="DURATION",
                       help="how long: seconds, or 90s, 30m, 12h, 7d")
    unblock = action.add_parser("unblock", parents=[kafka], help="lift a block",
                                description="Lift the block of KEY (by the guard or an "
                                            "operator); its judged deliveries are forgotten.")
    unblock.add_argument("key", metavar="KEY", help=key_help)

    sub.add_parser("replay", add_help=False,
                   help="rebuild state from verification.events and compare "
                        "(phoneverify replay --help)")
    return parser


def _settings_help() -> str:
    """Every setting with its default, from the Settings model."""
    from phoneverify.settings import Settings

    lines = ["settings (environment variable=default):"]
    for name, field in Settings.model_fields.items():
        default = field.default
        if hasattr(default, "get_secret_value"):
            default = default.get_secret_value()
        lines.append(f"  {name.upper()}={'' if default is None else default}")
        if field.description:
            lines.append(f"      {field.description}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.command == "worker":
        from phoneverify.agents.worker import run_worker

        run_worker(rest)
        return OK
    if args.command == "replay":
        from phoneverify.ops import replay

        return replay.main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "schema":
        return _schema(args)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # errors are reported below
    handler = HANDLERS[args.command]
    try:
        return asyncio.run(handler(args))
    except Failure as failure:
        print(f"phoneverify {args.command}: {failure}", file=sys.stderr)
        return failure.code
    except KeyboardInterrupt:
        return OK if args.command == "watch" else 130
    except BrokenPipeError:  # the reader went away (| head): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return OK


def _schema(args: argparse.Namespace) -> int:
    """Print (or write) the OpenAPI or AsyncAPI document."""
    if args.document == "openapi":
        from phoneverify.interfaces.http import api_document

        text = json.dumps(api_document(), indent=2) + "\n"
    else:
        from phoneverify.interfaces.asyncapi import document_yaml

        text = document_yaml()
    if args.output:
        with open(args.output, "w", encoding="utf-8") as file:
            file.write(text)
    else:
        sys.stdout.write(text)
    return OK


# ---------------------------------------------------------------- commands over Kafka


@contextlib.asynccontextmanager
async def _client(args: argparse.Namespace) -> AsyncIterator[Any]:
    """A client that connects at its first use, so input is checked before Kafka is asked."""
    from phoneverify.interfaces.client import VerificationClient

    client = VerificationClient(args.bootstrap_servers)
    try:
        yield client
    finally:
        await client.close()


async def _kafka(run: Callable[[], Awaitable[int]], as_json: bool = False) -> int:
    """Run ``run`` turning the client's exceptions into messages and exit codes (and, with
    ``--json``, printing the service's reply to a refused command)."""
    from phoneverify.interfaces.client import (
        BlockedNumber,
        InvalidInput,
        InvalidPhoneNumber,
        KafkaUnavailable,
        OutcomeTimeout,
        Refused,
        ReplyTimeout,
    )

    try:
        return await run()
    except InvalidInput as error:
        raise Failure(str(error), USAGE) from None
    except Refused as error:
        if as_json:
            print(error.reply.model_dump_json(), flush=True)
        usage = isinstance(error, InvalidPhoneNumber | BlockedNumber)
        raise Failure(str(error), USAGE if usage else REFUSED) from None
    except (KafkaUnavailable, OutcomeTimeout, ReplyTimeout) as error:
        raise Failure(str(error), UNAVAILABLE) from None


async def cmd_start(args: argparse.Namespace) -> int:
    async def run() -> int:
        async with _client(args) as client:
            if args.no_wait:
                iid = await client.send_start(args.phone, args.instance_id, locale=args.locale)
                return _sent(args, iid, f"Start of {iid} sent (not waiting for the answer).")
            reply = await client.start(args.phone, args.instance_id, locale=args.locale,
                                       channel=args.channel,
                                       timeout=args.timeout)
        iid = reply.instance_id
        if args.json:
            print(reply.model_dump_json(), flush=True)
        elif reply.status == "pending":
            print(f"Started verification {iid}: {_by(reply.channel)} with a code is on its way; "
                  f"{_attempts(reply.attempts_left)} until {_clock(reply.deadline)}.\n"
                  f"  send the code back: phoneverify respond {iid} CODE\n"
                  f"  wait for the outcome: phoneverify watch --id {iid}")
        else:  # a terminate sent before the start ended it at once
            print(f"Started verification {iid}, and it is already {reply.status}: a command "
                  "sent before the start ended it; no SMS was sent.")
            return FAILED
        return OK

    return await _kafka(run, args.json)


async def cmd_respond(args: argparse.Namespace) -> int:
    async def run() -> int:
        async with _client(args) as client:
            if args.no_wait:
                await client.send_code(args.instance_id, args.code)
                return _sent(args, args.instance_id, f"Code for {args.instance_id} sent "
                                                     "(not waiting for the answer).")
            reply = await client.submit_code(args.instance_id, args.code,
                                             timeout=args.timeout)
        iid = reply.instance_id
        if args.json:
            print(reply.model_dump_json(), flush=True)
        match reply.result:
            case "verified":
                _say(args, f"Verified: {iid} (the code matched).")
                return OK
            case "wrong_code":
                _say(args, f"Wrong code for {iid}: {_attempts(reply.attempts_left)} left, "
                           f"until {_clock(reply.deadline)}.")
            case "too_many_attempts":
                _say(args, f"Wrong code for {iid}, and it was the last attempt: the "
                           "verification failed (too_many_attempts).")
            case "expired":
                _say(args, f"Too late: {iid} expired before this code arrived; the "
                           "verification failed (expired).")
            case _:  # ended
                raise Failure(f"{iid} had already concluded ({reply.status}); nothing changed",
                              REFUSED)
        return FAILED

    return await _kafka(run, args.json)


async def cmd_terminate(args: argparse.Namespace) -> int:
    async def run() -> int:
        async with _client(args) as client:
            if args.no_wait:
                await client.send_terminate(args.instance_id, args.reason)
                return _sent(args, args.instance_id, f"Terminate of {args.instance_id} sent "
                                                     "(not waiting for the answer).")
            reply = await client.terminate(args.instance_id, args.reason, timeout=args.timeout)
        if args.json:
            print(reply.model_dump_json(), flush=True)
        if reply.result == "ended":
            raise Failure(f"{reply.instance_id} had already concluded ({reply.status}); "
                          "nothing changed", REFUSED)
        _say(args, f"Terminated {reply.instance_id}.")
        return OK

    return await _kafka(run, args.json)


async def cmd_resend(args: argparse.Namespace) -> int:
    async def run() -> int:
        async with _client(args) as client:
            if args.no_wait:
                await client.send_resend(args.instance_id, args.channel)
                return _sent(args, args.instance_id, f"Resend of {args.instance_id} sent "
                                                     "(not waiting for the answer).")
            reply = await client.resend(args.instance_id, args.channel, timeout=args.timeout)
        if args.json:
            print(reply.model_dump_json(), flush=True)
        left = reply.resends_left
        _say(args, f"Resent {reply.instance_id}: {_by(reply.channel)} with the same code is on "
                   f"its way; {left} resend{'' if left == 1 else 's'} left, the code is good "
                   f"until {_clock(reply.deadline)}.")
        return OK

    return await _kafka(run, args.json)


def _by(channel: str | None) -> str:
    return {"call": "a call", "whatsapp": "a WhatsApp message"}.get(channel or "", "an SMS")


def _sent(args: argparse.Namespace, iid: str, message: str) -> int:
    if args.json:
        _print_json({"instance_id": iid, "sent": True})
    else:
        print(message)
    return OK


def _say(args: argparse.Namespace, message: str) -> None:
    if not args.json:
        print(message, flush=True)


def _attempts(n: int | None) -> str:
    return f"{n} attempt{'s' if n != 1 else ''}"


def _clock(value: Any) -> str:
    return "-" if value is None else value.strftime("%H:%M:%S UTC")


async def cmd_watch(args: argparse.Namespace) -> int:
    if args.count is not None and args.count < 1:
        raise Failure("--count must be at least 1", USAGE)
    timeout = math.inf if args.timeout is None else args.timeout

    async def one() -> int:
        async with _client(args) as client:
            outcome = await client.wait_for_outcome(args.instance_id, timeout)
        _print_outcome(outcome, args.json)
        return OK if outcome.verified else FAILED

    async def stream() -> int:
        seen = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with _client(args) as client, \
                client.outcomes(from_beginning=args.from_beginning) as outcomes:
            # On stderr even with --json: a script may wait for it before causing outcomes.
            print("watching outcomes (Ctrl-C stops)", file=sys.stderr, flush=True)
            while args.count is None or seen < args.count:
                left = deadline - loop.time()
                try:
                    outcome = await asyncio.wait_for(anext(outcomes), None if math.isinf(left)
                                                     else max(left, 0))
                except TimeoutError:
                    if args.count is not None:
                        raise Failure(f"{seen} of {args.count} outcomes in {timeout:g}s",
                                      UNAVAILABLE) from None
                    return OK
                _print_outcome(outcome, args.json)
                seen += 1
        return OK

    return await _kafka(one if args.instance_id is not None else stream)


def _print_outcome(outcome: Any, as_json: bool) -> None:
    if as_json:
        print(outcome.model_dump_json(), flush=True)
        return
    attempts = f"{outcome.attempts} attempt{'s' if outcome.attempts != 1 else ''}"
    print(f"{_time(outcome.completed_at)}  {outcome.instance_id}  {outcome.status} "
          f"({outcome.reason}, {attempts})", flush=True)


def _time(value: Any) -> str:
    from phoneverify.models.messages import iso

    return iso(value)


# ---------------------------------------------------------------- status over HTTP

RUNTIME = {
    "Pending": "Pending (started; the SMS is not confirmed sent yet)",
    "Running": "Running (SMS sent; waiting for the code)",
    "Completed": "Completed",
    "Terminated": "Terminated",
}


async def cmd_status(args: argparse.Namespace) -> int:
    import aiohttp

    from phoneverify.interfaces.client import InvalidInput, check_instance_id
    from phoneverify.settings import Settings

    settings = Settings()
    url = (args.url or f"http://127.0.0.1:{settings.web_port}").rstrip("/")
    key = args.api_key if args.api_key is not None else _api_key(settings)
    try:
        check_instance_id(args.instance_id)
    except InvalidInput as error:
        raise Failure(str(error), USAGE) from None
    target = f"{url}/verifications/{args.instance_id}"
    headers = {"X-API-Key": key} if key else {}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=args.timeout)) as s, \
                s.get(target, headers=headers) as response:
            body = await response.json(content_type=None)
            status = response.status
    except (aiohttp.ClientError, TimeoutError) as error:
        raise Failure(f"no answer from {url}: {str(error) or type(error).__name__} "
                      "(is a worker running there? --url)",
                      UNAVAILABLE) from None
    except ValueError:
        raise Failure(f"{target} did not answer JSON", UNAVAILABLE) from None
    if status == 401:
        raise Failure(f"{url} refused the API key: set API_KEY or --api-key", USAGE)
    if status == 404:
        if args.json:
            _print_json({"id": args.instance_id, "error": body.get("error")})
        print(f"phoneverify status: {body.get('error', 'not found')}", file=sys.stderr)
        return REFUSED
    is_status = isinstance(body, dict) and "runtimeStatus" in body
    if status == 400 and not is_status:  # 400 with a status document: it was terminated
        raise Failure(body.get("error", "bad request"), USAGE)
    if status not in (200, 202, 400):  # Durable Functions' codes: 202 while it runs
        raise Failure(f"{url} answered {status}: {body.get('error', body)}", UNAVAILABLE)
    body.pop("error", None)  # "was terminated" with the 400: the status says it
    if args.json:
        _print_json(body)
    else:
        _print_status(body)
    final = body.get("runtimeStatus") in ("Completed", "Terminated")
    return FAILED if final and body.get("output") is not True else OK


def _api_key(settings: Any) -> str:
    """$API_KEY, else the key a local worker generated and keeps in its DATA_DIR."""
    if "API_KEY" in os.environ:
        return os.environ["API_KEY"]
    kept = settings.data_dir / "api_key"
    return kept.read_text().strip() if kept.exists() else ""


def _print_status(body: dict[str, Any]) -> None:
    output = {True: "verified", False: "not verified", None: "-"}.get(body.get("output"), "?")
    rows = [
        ("id", body.get("instanceId")),
        ("status", RUNTIME.get(body.get("runtimeStatus", ""), body.get("runtimeStatus"))),
        ("output", output + (f" ({body['reason']})" if body.get("reason") else "")),
        ("phone", body.get("input")),
        ("attempts", f"{body.get('attempts', 0)} used, {body.get('attemptsLeft', 0)} left"),
        ("deadline", body.get("deadline")),
        ("created", body.get("createdTime")),
        ("updated", body.get("lastUpdatedTime")),
    ]
    if body.get("terminateReason"):
        rows.append(("reason", body["terminateReason"]))
    for name, value in rows:
        print(f"{name:<9} {value if value is not None else '-'}")


def _print_json(value: Any) -> None:
    print(json.dumps(value), flush=True)


async def cmd_fraud(args: argparse.Namespace) -> int:
    from phoneverify.interfaces.client import NotBlocked
    from phoneverify.models.fraud import parse_duration

    async def run() -> int:
        async with _client(args) as client:
            if args.action == "list":
                blocks = await client.fraud_blocks()
                if args.json:
                    _print_json([_block_json(b) for b in blocks])
                elif not blocks:
                    print("No blocks in force.")
                for block in blocks if not args.json else []:
                    figures = f", {block.converted} of {block.judged} converted" \
                        if block.by == "guard" else ""
                    print(f"{block.level:<8} {block.key:<12} until {_time(block.blocked_until)}"
                          f"  (by {block.by}{figures})")
                return OK
            if args.action == "block":
                try:
                    seconds = parse_duration(args.duration)
                except ValueError as error:
                    raise Failure(f"--for: {error}", USAGE) from None
                record = await client.block(args.key, seconds)
                _say_json(args, _block_json(record),
                          f"Blocked {record.level} {record.key} until "
                          f"{_time(record.blocked_until)}: starts and resends to it are refused.")
                return OK
            try:
                record = await client.unblock(args.key)
            except NotBlocked as error:
                raise Failure(str(error), REFUSED) from None
            _say_json(args, _block_json(record), f"Unblocked {record.level} {record.key}.")
            return OK

    return await _kafka(run, args.json)


def _block_json(block: Any) -> dict[str, Any]:
    return block.model_dump(mode="json", include={"level", "key", "blocked", "blocked_until",
                                                  "by", "judged", "converted", "at"})


def _say_json(args: argparse.Namespace, value: Any, message: str) -> None:
    if args.json:
        _print_json(value)
    else:
        print(message)


HANDLERS: dict[str, Callable[[argparse.Namespace], Awaitable[int]]] = {
    "fraud": cmd_fraud,
    "start": cmd_start,
    "respond": cmd_respond,
    "terminate": cmd_terminate,
    "resend": cmd_resend,
    "status": cmd_status,
    "watch": cmd_watch,
}


if __name__ == "__main__":
    sys.exit(main())
