"""The ``phoneverify`` command line, run as a subprocess with the deployment's environment,
against a worker process on the real broker: output, --json, exit codes, --help."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from phoneverify.interfaces import cli
from phoneverify.models.phone import mask

from support import ROOT, Client, Deployment, Worker

PHONEVERIFY = str(Path(sys.executable).parent / "phoneverify")
PHONE = "+1 425-555-0100"


@dataclass
class Shared:
    deployment: Deployment
    worker: Worker

    def env(self, **extra: str) -> dict[str, str]:
        return self.deployment.env(WEB_PORT=str(self.worker.web_port), **extra)


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> dict:
        return json.loads(self.out)


@pytest.fixture(scope="module")
def shared(kafka: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    """One deployment and worker for this module's tests (each uses its own instance ids)."""
    deployment = Deployment(kafka, Path(tmp_path_factory.mktemp("cli")))
    worker = Worker(deployment, "cli-w1", VERIFICATION_MAX_ATTEMPTS="2", RATE_LIMIT_STARTS="1000",
                    GUESS_LIMIT="1000", EARLY_COMMAND_GRACE_SECONDS="1")
    try:
        worker.start()
        yield Shared(deployment, worker)
    finally:
        worker.stop()


async def spawn(env: dict[str, str], *args: str,
                program: tuple[str, ...] = (PHONEVERIFY,)) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *program, *args, cwd=ROOT, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def finish(process: asyncio.subprocess.Process, timeout: float = 60.0) -> Result:
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return Result(process.returncode, out.decode(), err.decode())


async def run(env: dict[str, str], *args: str, **kwargs: tuple[str, ...]) -> Result:
    return await finish(await spawn(env, *args, **kwargs))


@pytest.fixture
async def background() -> AsyncIterator[list[asyncio.subprocess.Process]]:
    """Processes started in a test; killed (by pid) if the test did not finish them."""
    processes: list[asyncio.subprocess.Process] = []
    yield processes
    for process in processes:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_help_teaches_with_examples():
    result = await run({}, "--help")
    assert result.code == 0
    for words in ("examples", 'phoneverify start "+1 425-555-0142"', "exit codes",
                  "3  no answer", "4  refused", "--json", "--no-wait"):
        assert words in result.out
    result = await run({}, "respond", "--help")
    assert result.code == 0 and "example:\n  phoneverify respond signup-42 0042" in result.out
    assert re.search(r"^  ID +the verification's id", result.out, re.M)
    result = await run({}, "watch", "--help",
                       program=(sys.executable, "-m", "phoneverify.interfaces.cli"))
    assert result.code == 0 and "--timeout SECONDS" in result.out
    result = await run({}, "status", "--help")
    assert "--api-key" in result.out and "--url" in result.out
    result = await run({}, "worker", "--help")  # every setting, with its default
    assert "VERIFICATION_TIMEOUT_SECONDS=90.0" in result.out and "GUESS_LIMIT=20" in result.out
    result = await run({}, "replay", "--help")
    assert "--bootstrap-servers" in result.out and "``" not in result.out


async def test_start_respond_status_watch_to_verified(shared, background):
    result = await run(shared.env(), "start", PHONE, "--json")
    assert result.code == 0, result
    started = result.json()
    iid = started["instance_id"]
    assert (started["result"], started["status"], started["attempts_left"]) == (
        "started", "pending", 2) and len(iid) == 32

    watcher = await spawn(shared.env(), "watch", "--id", iid, "--timeout", "60", "--json")
    background.append(watcher)
    # Started means the status answers at once: no polling.
    result = await run(shared.env(), "status", iid, "--json")
    assert result.code == 0, result
    status = result.json()
    assert status["instanceId"] == iid and status["input"] == mask("+14255550100")
    assert status["runtimeStatus"] in ("Pending", "Running") and status["output"] is None

    async with Client(shared.deployment) as kafka:
        code = await kafka.sms_code(iid)
    wrong = "0000" if code != "0000" else "1111"
    result = await run(shared.env(), "respond", iid, wrong)
    assert result.code == 1 and re.fullmatch(
        rf"Wrong code for {iid}: 1 attempt left, until \d\d:\d\d:\d\d UTC\.\n", result.out)
    result = await run(shared.env(), "respond", iid, code)
    assert (result.code, result.out) == (0, f"Verified: {iid} (the code matched).\n")
    result = await run(shared.env(), "respond", iid, code)
    assert result.code == 4 and f"{iid} had already concluded (verified)" in result.err

    watched = await finish(watcher)
    assert watched.code == 0, watched
    outcome = json.loads(watched.out)
    assert (outcome["instance_id"], outcome["status"], outcome["reason"]) == (
        iid, "verified", "code_matched")

    result = await run(shared.env(), "status", iid)
    assert result.code == 0, result
    assert re.search(r"^status +Completed$", result.out, re.M)
    assert re.search(r"^output +verified \(code_matched\)$", result.out, re.M)
    assert code not in result.out.replace(iid, "")  # the code is never shown


async def test_failed_and_terminated_outcomes_exit_1(shared):
    result = await run(shared.env(), "start", "425 555 0100", "--id", "cli-fail-1x")
    assert result.code == 0 and re.match(
        r"Started verification cli-fail-1x: an SMS with a code is on its way; 2 attempts until "
        r"\d\d:\d\d:\d\d UTC\.\n", result.out)
    async with Client(shared.deployment) as kafka:
        code = await kafka.sms_code("cli-fail-1x")
    wrong = "0000" if code != "0000" else "1111"
    assert (await run(shared.env(), "respond", "cli-fail-1x", wrong)).code == 1
    result = await run(shared.env(), "respond", "cli-fail-1x", wrong)
    assert result.code == 1 and "it was the last attempt: the verification failed" in result.out
    result = await run(shared.env(), "watch", "--id", "cli-fail-1x", "--timeout", "30")
    assert result.code == 1, result
    assert re.fullmatch(r"\S+Z  cli-fail-1x  failed \(too_many_attempts, 2 attempts\)\n",
                        result.out)
    result = await run(shared.env(), "status", "cli-fail-1x", "--json")
    assert result.code == 1 and result.json()["output"] is False

    assert (await run(shared.env(), "start", PHONE, "--id", "cli-term-1x")).code == 0
    result = await run(shared.env(), "terminate", "cli-term-1x", "--reason", "user left")
    assert (result.code, result.out) == (0, "Terminated cli-term-1x.\n")
    result = await run(shared.env(), "watch", "--id", "cli-term-1x", "--timeout", "30", "--json")
    assert result.code == 1 and result.json()["status"] == "terminated"
    result = await run(shared.env(), "terminate", "cli-term-1x")
    assert result.code == 4 and "had already concluded (terminated)" in result.err
    result = await run(shared.env(), "status", "cli-term-1x")  # the API answers it with 400
    assert result.code == 1 and re.search(r"^status +Terminated$", result.out, re.M), result


async def test_no_wait_only_sends(shared):
    result = await run(shared.env(), "start", PHONE, "--id", "cli-nowait", "--no-wait")
    assert (result.code, result.out) == (
        0, "Start of cli-nowait sent (not waiting for the answer).\n")
    result = await run(shared.env(), "respond", "cli-nowait", "1234", "--no-wait", "--json")
    assert result.json() == {"instance_id": "cli-nowait", "sent": True}


async def test_watch_follows_outcomes_as_they_come(shared, background):
    watcher = await spawn(shared.env(), "watch", "--json", "--count", "2", "--timeout", "60")
    background.append(watcher)
    assert watcher.stderr is not None
    line = await asyncio.wait_for(watcher.stderr.readline(), 30)  # listening from here on
    assert line.startswith(b"watching outcomes")

    ids = ["cli-watch-a", "cli-watch-b"]
    for iid in ids:
        assert (await run(shared.env(), "start", PHONE, "--id", iid)).code == 0
    for iid in ids:
        assert (await run(shared.env(), "terminate", iid)).code == 0
    watched = await finish(watcher)
    assert watched.code == 0, watched
    outcomes = [json.loads(line) for line in watched.out.splitlines()]
    assert sorted(o["instance_id"] for o in outcomes) == ids
    assert {o["status"] for o in outcomes} == {"terminated"}

    # With a deadline: nothing more comes; that is fine unless something specific was awaited.
    result = await run(shared.env(), "watch", "--timeout", "0.5")
    assert (result.code, result.out) == (0, "")
    result = await run(shared.env(), "watch", "--count", "1", "--timeout", "0.5")
    assert result.code == 3 and "0 of 1 outcomes in 0.5s" in result.err
    result = await run(shared.env(), "watch", "--id", "cli-never", "--timeout", "0.5")
    assert result.code == 3 and "no outcome for cli-never within 0.5s" in result.err


async def test_watch_from_the_beginning_prints_in_time_order(shared):
    from phoneverify.topics import partition_for

    # Concluded one after the other on partitions 3, 2, 1, 0: partition order is not time order.
    ids = []
    for partition in (3, 2, 1, 0):
        ids.append(next(iid for n in range(1000) if partition_for(
            (iid := f"cli-order-{partition}-{n}").encode(), 4) == partition))
    for iid in ids:
        assert (await run(shared.env(), "start", PHONE, "--id", iid)).code == 0
    for iid in ids:
        assert (await run(shared.env(), "terminate", iid)).code == 0
    result = await run(shared.env(), "watch", "--from-beginning", "--json", "--timeout", "3")
    assert result.code == 0, result
    outcomes = [json.loads(line) for line in result.out.splitlines()]
    times = [o["completed_at"] for o in outcomes]
    assert times == sorted(times)
    assert [o["instance_id"] for o in outcomes if o["instance_id"] in ids] == ids


@pytest.mark.parametrize(("args", "extra", "code", "words"), [
    (("start", "call me maybe"), {}, 2, "phone_number: not a phone number"),
    (("start", PHONE, "--id", "bad id"), {}, 2, "instance id 'bad id' is not valid"),
    (("respond", "abc", "12x"), {}, 2, "code must be a string of digits"),
    (("terminate", "abc", "--reason", "x" * 501), {}, 2, "reason"),
    (("start",), {}, 2, "the following arguments are required: PHONE"),
    (("start", PHONE, "--bogus"), {}, 2, "unrecognized arguments: --bogus"),
    ((), {}, 2, "required: COMMAND"),
    (("watch", "--count", "0"), {}, 2, "--count must be at least 1"),
    (("start", "555-0100"), {}, 2, "not a valid phone number"),
    (("start", "+1 900 555 0100", "--json"), {}, 2, "premium rate numbers are not served"),
    (("start", PHONE, "--id", "cli-fail-1x"), {}, 4, "the id cli-fail-1x is already in use"),
    (("respond", "cli-nobody", "1234"), {}, 4, "no verification cli-nobody has started"),
    (("terminate", "cli-nobody-2"), {}, 4, "no verification cli-nobody-2 has started"),
    (("respond", "cli-slow", "1234", "--timeout", "0.1"), {}, 3, "may still take effect"),
    (("start", PHONE), {"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"}, 3, "cannot reach Kafka"),
    (("start", PHONE), {"TOPIC_PREFIX": "nowhere."}, 3,
     "topic nowhere.verification.start does not exist"),
    (("status", "abc", "--url", "http://127.0.0.1:1"), {}, 3, "no answer from"),
    (("status", "abc", "--api-key", "wrong"), {}, 2, "refused the API key"),
    (("status", "cli-unknown"), {}, 4, "no verification cli-unknown"),
    (("status", "a/b"), {}, 2, "is not valid"),
])
async def test_exit_codes(shared, args, extra, code, words):
    result = await run(shared.env(**extra), *args)
    assert result.code == code, result
    assert words in result.err, result


def test_replay_is_delegated_to_replay_main(monkeypatch):
    from phoneverify.ops import replay

    seen: list[list[str]] = []

    def fake_main(argv: list[str]) -> int:
        seen.append(argv)
        return 5

    monkeypatch.setattr(replay, "main", fake_main, raising=False)
    assert cli.main(["replay", "--from-beginning", "--json"]) == 5
    assert seen == [["--from-beginning", "--json"]]
