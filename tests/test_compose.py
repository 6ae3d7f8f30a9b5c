"""The container files (Dockerfile, docker-compose.yml) agree with the project: fast checks that
need neither Kafka nor a Docker engine."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from phoneverify.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
POM = ROOT / "ops" / "broker" / "pom.xml"
PYPROJECT = ROOT / "pyproject.toml"

#: Values for the variables the compose file requires (``${NAME:?...}``).
DUMMY_ENV = {"CODE_HASH_KEY": "dummy-code-hash-key", "API_KEY": "dummy-api-key"}

_INTERPOLATION = re.compile(r"\$\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _service(name: str) -> dict:
    return _compose()["services"][name]


def _environment(service: dict) -> dict[str, str]:
    """A service's ``environment``, in either of its two forms, as a mapping."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def _interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ``${NAME}``, ``${NAME:-default}`` and ``${NAME:?error}``, from ``env`` alone."""

    def substitute(match: re.Match) -> str:
        name, op, arg = match["name"], match["op"], match["arg"]
        given = env.get(name)
        if (op in (":-", ":?") and not given) or (op in ("-", "?") and given is None):
            if op.endswith("?"):
                raise KeyError(f"{name}: {arg}")
            return arg
        return given or ""

    return _INTERPOLATION.sub(substitute, value.replace("$$", "\0")).replace("\0", "$")


def _dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (KEYWORD, arguments), continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, args = line.partition(" ")
            instructions.append((keyword.upper(), args.strip()))
    return instructions


def _final_stage() -> list[tuple[str, str]]:
    instructions = _dockerfile()
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def _exec_form(args: str) -> list[str]:
    return yaml.safe_load(args) if args.startswith("[") else shlex.split(args)


def test_compose_file_parses():
    compose = _compose()
    assert {"kafka", "worker"} <= set(compose["services"])


def test_kafka_image_matches_the_pom():
    root = ET.parse(POM).getroot()  # noqa: S314 - the project's own file
    [version] = [e.text for e in root.iter() if e.tag.rpartition("}")[2] == "kafka.version"]
    assert version
    assert _service("kafka")["image"] == f"apache/kafka:{version}"


def test_kafka_is_single_node_kraft_without_auto_topics():
    env = _environment(_service("kafka"))
    assert "controller" in env["KAFKA_PROCESS_ROLES"]
    assert "broker" in env["KAFKA_PROCESS_ROLES"]
    for name in ("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
                 "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
                 "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"):
        assert env[name] == "1"
    assert env["KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS"] == "0"
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    assert "PLAINTEXT://kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"].split(",")
    assert "kafka:9092" in " ".join(_service("kafka")["healthcheck"]["test"])


def test_worker_command_is_a_console_script():
    scripts = tomllib.loads(PYPROJECT.read_text())["project"]["scripts"]
    [cmd] = [args for keyword, args in _final_stage() if keyword == "CMD"]
    commands = [_exec_form(cmd)]
    if "command" in _service("worker"):
        command = _service("worker")["command"]
        commands.append(command if isinstance(command, list) else shlex.split(command))
    for command in commands:
        assert command[0] in scripts, command
        assert command[1:] == ["worker"]


def test_worker_waits_for_a_healthy_kafka():
    worker = _service("worker")
    assert worker["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert "healthcheck" in _service("kafka")
    env = _environment(worker)
    assert env["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert env["WEB_HOST"] == "0.0.0.0"
    assert any(str(port).endswith("6066:6066") for port in worker["ports"])
    volumes = {volume.split(":")[0] for volume in worker["volumes"]}
    assert volumes <= set(_compose()["volumes"])


def test_worker_environment_names_are_settings():
    fields = {name.upper() for name in Settings.model_fields}
    assert set(_environment(_service("worker"))) - fields == set()
    dockerfile_env = set()
    for keyword, args in _final_stage():
        if keyword == "ENV":
            dockerfile_env |= {item.split("=", 1)[0] for item in shlex.split(args)}
    assert {name for name in dockerfile_env if not name.startswith(("PYTHON", "PIP_"))} <= fields


def test_worker_environment_is_valid_settings(monkeypatch):
    env = {key: _interpolate(value, DUMMY_ENV) for key, value in
           _environment(_service("worker")).items()}
    assert env["SMS_BACKEND"] == "console"
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.web_port == 6066
    assert str(settings.data_dir) == "/data"
    assert settings.code_hash_key.get_secret_value() == DUMMY_ENV["CODE_HASH_KEY"]


def test_secrets_are_required_not_written_down():
    env = _environment(_service("worker"))
    for name in ("CODE_HASH_KEY", "API_KEY"):
        assert re.fullmatch(rf"\$\{{{name}:\?[^}}]*\}}", env[name]), env[name]
        with pytest.raises(KeyError, match=name):
            _interpolate(env[name], {})
    for name in ("TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN", "TWILIO_PHONE_NUMBER"):
        assert env[name].startswith(f"${{{name}"), env[name]


def test_dockerfile_base_image_is_python_311():
    bases = [args.split()[0] for keyword, args in _dockerfile() if keyword == "FROM"]
    assert bases
    assert all(re.fullmatch(r"python:3\.11(\.\d+)?(-slim\S*)?", base) for base in bases), bases


def test_dockerfile_runs_as_a_non_root_user_with_data_on_a_volume():
    final = _final_stage()
    users = [args for keyword, args in final if keyword == "USER"]
    assert users
    assert users[-1].split(":")[0] not in ("root", "0")
    assert any(keyword == "VOLUME" and "/data" in args for keyword, args in final)
    assert any(keyword == "EXPOSE" and "6066" in args.split() for keyword, args in final)


def _docker_compose() -> list[str] | None:
    if shutil.which("docker") is None:
        return None
    try:
        subprocess.run(["docker", "compose", "version"], capture_output=True, check=True,
                       timeout=30)
    except (subprocess.SubprocessError, OSError):
        return None
    return ["docker", "compose"]


def test_docker_compose_validates_the_file(tmp_path):
    """``docker compose config`` needs no engine, only the client with its compose plugin."""
    compose = _docker_compose()
    if compose is None:
        pytest.skip("no `docker compose` client here")
    env = {key: value for key, value in os.environ.items() if not key.startswith("COMPOSE_")}
    for name in DUMMY_ENV:
        env.pop(name, None)
    empty = tmp_path / "empty.env"  # instead of a developer's own .env beside the compose file
    empty.write_text("")
    command = [*compose, "-f", str(COMPOSE), "--env-file", str(empty), "config", "-q"]
    run = subprocess.run(command, capture_output=True, text=True, env=env | DUMMY_ENV,
                         cwd=tmp_path, timeout=60)
    assert run.returncode == 0, run.stderr
    run = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=60)
    assert run.returncode != 0
    assert "CODE_HASH_KEY" in run.stderr or "API_KEY" in run.stderr
