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


def _settings_from(env: dict[str, str], monkeypatch) -> Settings:
    """The worker's settings with exactly ``env`` as its environment."""
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings()


def test_worker_environment_is_valid_settings(monkeypatch):
    env = {key: _interpolate(value, DUMMY_ENV) for key, value in
           _environment(_service("worker")).items()}
    assert env["SMS_BACKEND"] == "console"
    settings = _settings_from(env, monkeypatch)
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


# ---------------------------------------------------------------- profile: cluster


def _cluster_nodes() -> dict[str, dict]:
    return {name: service for name, service in _compose()["services"].items()
            if "cluster" in service.get("profiles", []) and "kafka" in service.get("image", "")}


def test_the_single_node_pair_has_no_profile():
    """``docker compose up`` starts exactly the single broker and its worker."""
    services = _compose()["services"]
    assert [name for name, service in services.items() if not service.get("profiles")] == [
        "kafka", "worker"]


def test_cluster_profile_is_three_kraft_nodes_with_one_quorum():
    nodes = _cluster_nodes()
    assert len(nodes) == 3
    envs = {name: _environment(service) for name, service in nodes.items()}
    ids = {name: int(env["KAFKA_NODE_ID"]) for name, env in envs.items()}
    assert sorted(ids.values()) == [1, 2, 3]
    voters = {env["KAFKA_CONTROLLER_QUORUM_VOTERS"] for env in envs.values()}
    assert len(voters) == 1  # every node votes in the same quorum of three
    expected = {f"{ids[name]}@{nodes[name]['hostname']}:9093" for name in nodes}
    assert set(voters.pop().split(",")) == expected
    assert len({env["CLUSTER_ID"] for env in envs.values()}) == 1
    for name, env in envs.items():
        assert nodes[name]["image"] == _service("kafka")["image"]  # the pom's version
        assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
        assert f"PLAINTEXT://{nodes[name]['hostname']}:9092" in (
            env["KAFKA_ADVERTISED_LISTENERS"].split(","))
        assert "CONTROLLER://:9093" in env["KAFKA_LISTENERS"].split(",")
        assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
        assert env["KAFKA_UNCLEAN_LEADER_ELECTION_ENABLE"] == "false"
        assert "healthcheck" in nodes[name]
        for key in ("KAFKA_DEFAULT_REPLICATION_FACTOR", "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
                    "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"):
            assert env[key] == "3", key
        for key in ("KAFKA_MIN_INSYNC_REPLICAS", "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"):
            assert env[key] == "2", key
    volumes = [service["volumes"][0].split(":")[0] for service in nodes.values()]
    assert len(set(volumes)) == 3 and set(volumes) <= set(_compose()["volumes"])
    host_ports = [port for service in nodes.values() for port in service["ports"]]
    host_ports += [port for name in ("kafka", "worker") for port in _service(name)["ports"]]
    host_ports += _service("worker-cluster")["ports"]
    assert len({str(port).split(":")[0] for port in host_ports}) == len(host_ports)


def test_cluster_worker_knows_all_three_brokers_and_replicates_three_times(monkeypatch):
    worker = _service("worker-cluster")
    assert worker["profiles"] == ["cluster"]
    nodes = _cluster_nodes()
    assert {name for name, dep in worker["depends_on"].items()
            if dep["condition"] == "service_healthy"} == set(nodes)
    env = {key: _interpolate(value, DUMMY_ENV) for key, value in _environment(worker).items()}
    assert sorted(env["KAFKA_BOOTSTRAP_SERVERS"].split(",")) == sorted(
        f"{service['hostname']}:9092" for service in nodes.values())
    assert set(env) - {name.upper() for name in Settings.model_fields} == set()
    assert env["REPLICATION_FACTOR"] == "3"  # the worker makes min.insync.replicas RF - 1 = 2
    for name in ("CODE_HASH_KEY", "API_KEY"):
        assert re.fullmatch(rf"\$\{{{name}:\?[^}}]*\}}", _environment(worker)[name])
    settings = _settings_from(env, monkeypatch)
    assert settings.replication_factor == 3
    assert len(settings.kafka_bootstrap_servers.split(",")) == 3


def test_docker_compose_validates_the_cluster_profile(tmp_path):
    compose = _docker_compose()
    if compose is None:
        pytest.skip("no `docker compose` client here")
    empty = tmp_path / "empty.env"
    empty.write_text("")
    env = {key: value for key, value in os.environ.items() if not key.startswith("COMPOSE_")}
    run = subprocess.run([*compose, "-f", str(COMPOSE), "--env-file", str(empty),
                          "--profile", "cluster", "config", "--services"],
                         capture_output=True, text=True, env=env | DUMMY_ENV, cwd=tmp_path,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    assert {"kafka-1", "kafka-2", "kafka-3", "worker-cluster"} <= set(run.stdout.split())
