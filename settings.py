"""Settings from the environment (names as in the wire contract), read with pydantic-settings."""

from __future__ import annotations

import secrets
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob of the service. Defaults match the contract; see README 'Settings'."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore", frozen=True)

    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    partitions: int = Field(8, ge=1, le=1024)
    replication_factor: int = Field(1, ge=1)
    verification_timeout_seconds: float = Field(90.0, gt=0)
    verification_max_attempts: int = Field(4, ge=1, le=100)
    verification_code_length: int = Field(4, ge=4, le=10)
    tick_interval_seconds: float = Field(1.0, gt=0)
    rate_limit_starts: int = Field(5, ge=1)
    rate_limit_window_seconds: float = Field(600.0, gt=0)

    sms_backend: Literal["console", "twilio"] = "console"
    twilio_account_sid: str = ""
    twilio_auth_token: SecretStr = SecretStr("")
    twilio_phone_number: str = ""
    #: Where the Twilio client sends requests; only tests point it at a local fake.
    twilio_base_url: str | None = None

    #: Secret key for the keyed hash (and derivation) of codes; same on every worker.
    code_hash_key: SecretStr | None = None
    #: Key required in ``X-API-Key``; unset: generated once and kept in DATA_DIR;
    #: empty: no check (local use only).
    api_key: SecretStr | None = None

    web_host: str = "127.0.0.1"
    web_port: int = 6066
    #: How other workers reach this one's web server (status requests are routed there).
    web_advertised_host: str | None = None
    #: Region assumed for phone numbers typed without a country code.
    phone_default_region: str = "US"

    # Additions to the contract, for running several independent deployments on one broker.
    app_id: str = "phoneverify"
    topic_prefix: str = ""
    #: Generated keys and local table stores; relative to the working directory by default.
    data_dir: Path = Path(".local") / "worker"
    log_level: str = "INFO"

    def _kept_secret(self, name: str, given: SecretStr | None) -> bytes:
        """The given secret, or one generated with ``secrets`` once and kept in DATA_DIR."""
        if given is not None:
            return given.get_secret_value().encode()
        path = self.data_dir / name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch(mode=0o600)
            path.write_text(secrets.token_urlsafe(32))
        return path.read_text().strip().encode()

    @cached_property
    def code_key(self) -> bytes:
        return self._kept_secret("code_hash_key", self.code_hash_key)

    @cached_property
    def api_key_value(self) -> str:
        """The API key in force; empty means the check is off."""
        return self._kept_secret("api_key", self.api_key).decode()


def get_settings() -> Settings:
    return Settings()
