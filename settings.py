"""Every knob of the service, from the environment (names as in the wire contract).

Read with pydantic-settings; ``phoneverify worker --help`` lists them with their defaults.
"""

from __future__ import annotations

import ipaddress
import secrets
from functools import cached_property
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from phoneverify.models.admission import Limits
from phoneverify.models.fraud import Policy
from phoneverify.models.locale import match
from phoneverify.models.messages import CHANNELS, Channel
from phoneverify.models.phone import NumberPolicy
from phoneverify.models.templates.catalog import Budget, Catalog, TemplateError, load
from phoneverify.models.templates.render import minutes_of


def _items(csv: str) -> frozenset[str]:
    return frozenset(item.strip() for item in csv.split(",") if item.strip())


def _channels(csv: str, name: str, ordered: bool = False) -> tuple[Channel, ...]:
    given = [item.strip().lower() for item in csv.split(",") if item.strip()]
    unknown = sorted(set(given) - set(CHANNELS))
    if unknown:
        raise ValueError(f"{name}: unknown channel(s) {', '.join(unknown)}; use "
                         f"{', '.join(CHANNELS)}")
    if ordered:
        return tuple(dict.fromkeys(given))  # type: ignore[arg-type]
    return tuple(c for c in CHANNELS if c in given)


class Settings(BaseSettings):
    """Defaults match the contract; see README 'Settings'."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore", frozen=True)

    # ------------------------------------------------------------ the contract's
    kafka_bootstrap_servers: str = Field("127.0.0.1:9092", description="brokers, comma-separated")
    partitions: int = Field(8, ge=1, le=1024, description="partitions of every topic")
    verification_timeout_seconds: float = Field(90.0, gt=0, description="the answer window")
    verification_max_attempts: int = Field(4, ge=1, le=100, description="tries per verification")
    verification_code_length: int = Field(4, ge=4, le=10, description="digits in a code")
    tick_interval_seconds: float = Field(1.0, gt=0, description="expiry is at most this late")
    rate_limit_starts: int = Field(5, ge=1, description="starts per number per window")
    rate_limit_window_seconds: float = Field(600.0, gt=0, description="the start rate window")
    early_command_grace_seconds: float = Field(
        10.0, ge=0, description="how long a response or terminate waits for its start")
    guess_limit: int = Field(20, ge=1, description="wrong codes per number per guess window")
    guess_limit_window_seconds: float = Field(86400.0, gt=0, description="the guess window")
    phone_allowed_regions: str = Field(
        "", description="ISO 3166 region codes served, comma-separated; empty: all")
    phone_allowed_types: str = Field(
        "mobile,fixed_line_or_mobile", description="libphonenumber number types served")
    channels: str = Field(
        "sms,whatsapp,call", description="channels offered (rule 16): sms, whatsapp, call")
    fallback_channels: str = Field(
        "", description="ordered channels tried when a delivery fails for good (rule 17)")
    resend_limit: int = Field(4, ge=0, le=20, description="resends per verification (rule 15)")
    resend_interval_seconds: float = Field(
        30.0, ge=0, description="least time between two deliveries of one verification")
    phone_allowed_call_types: str = Field(
        "mobile,fixed_line_or_mobile,fixed_line",
        description="libphonenumber number types a voice call may reach")
    twilio_whatsapp_number: str = Field(
        "", description="the WhatsApp sender (E.164) for whatsapp deliveries with Twilio")
    sms_topic_retention_seconds: float = Field(
        3600.0, gt=0, description="how long verification.sms keeps codes")
    verification_retention_seconds: float = Field(
        3600.0, ge=0, description="how long a concluded verification is kept")
    sms_backend: Literal["console", "twilio"] = Field(
        "console", description="console (prints each SMS) or twilio")
    twilio_account_sid: str = ""
    twilio_auth_token: SecretStr = SecretStr("")
    twilio_phone_number: str = ""
    code_hash_key: SecretStr | None = Field(
        None, description="key for drawing and hashing codes; unset: generated into DATA_DIR")
    web_port: int = Field(6066, description="the HTTP API and page")
    api_key: SecretStr | None = Field(
        None, description="the X-API-Key; unset: generated into DATA_DIR; empty: no check")
    http_reply_timeout_seconds: float = Field(
        10.0, gt=0, description="how long an HTTP write waits for the actor's reply")

    processing_guarantee: Literal["at_least_once", "exactly_once"] = Field(
        "at_least_once", description="at_least_once, or exactly_once: each batch's state, "
        "outputs and input offsets in one Kafka transaction (docs/guarantees.md)")

    # ------------------------------------------------------------ the fraud guard (rule 20)
    fraud_guard: bool = Field(True, description="the SMS pumping guard (off: sends as before)")
    fraud_answer_seconds: float = Field(
        60.0, gt=0, description="a delivery unanswered this long is unconverted")
    fraud_window_seconds: float = Field(
        3600.0, gt=0, description="judged deliveries counted over this window")
    fraud_min_conversion: float = Field(
        0.2, ge=0, le=1, description="a prefix or country converting less is blocked")
    fraud_prefix_min_sends: int = Field(
        20, ge=1, description="judged deliveries before a prefix can be blocked")
    fraud_country_min_sends: int = Field(
        100, ge=1, description="judged deliveries before a country can be blocked")
    fraud_block_seconds: float = Field(43200.0, gt=0, description="how long a block lasts")
    fraud_safe_prefixes: str = Field(
        "", description="E.164 prefixes never blocked, comma-separated")
    http_starts_per_ip: int = Field(
        20, ge=0, description="HTTP starts and resends per client address per window (0: no limit)")
    http_ip_window_seconds: float = Field(
        3600.0, gt=0, description="the window of HTTP_STARTS_PER_IP")
    trusted_proxies: str = Field(
        "", description="proxies whose X-Forwarded-For is believed: addresses or CIDRs")

    # ------------------------------------------------------------ additions
    api_keys: str = Field("", description="more accepted API keys, comma-separated (rotation)")
    http_max_body_bytes: int = Field(4096, ge=64, description="largest HTTP request body")
    replication_factor: int | None = Field(
        None, ge=1, description="for the topics a worker creates (default: brokers, at most 3)")
    web_host: str = Field("127.0.0.1", description="the address the HTTP server binds")
    web_advertised_host: str | None = Field(
        None, description="how other workers reach this one (default WEB_HOST)")
    phone_default_region: str = Field("US", description="region of numbers typed without +")
    public_base_url: str | None = Field(
        None, description="this service's public URL, for Twilio delivery receipts")
    app_id: str = Field("phoneverify", description="consumer group and changelog names")
    topic_prefix: str = Field("", description="before every topic name")
    data_dir: Path = Field(Path(".local") / "worker",
                           description="generated keys and the local table stores")
    log_level: str = "INFO"
    log_format: Literal["text", "json"] = Field("text", description="text or json log lines")
    #: Where the Twilio client sends requests; only tests point it at a local fake.
    twilio_base_url: str | None = None
    event_loop: Literal["uvloop", "asyncio"] = Field(
        "uvloop", description="the event loop: uvloop (less CPU per record) or asyncio's own")
    fetch_linger_ms: float = Field(
        5.0, ge=0, le=1000,
        description="after a fetch that brought records, wait this long before the next one "
                    "(fewer, fuller fetches at light load; at most this much per hop; 0: off)")
    restore_batch: bool = Field(
        True, description="restore a table without its store by reading its changelog in "
                          "large fetches and writing each as one RocksDB batch (false: "
                          "Faust's restore, a record at a time)")

    # ------------------------------------------------------------ language (rules 18, 19)
    app_name: str = Field("", max_length=64, description="the app's name in messages ({app}); "
                          "empty: none")
    default_locale: str = Field("en", description="the locale when nothing else decides")
    templates_dir: Path | None = Field(
        None, description="a folder of <locale>.toml templates that override or add locales")
    web_otp_domain: str = Field(
        "", max_length=253, pattern=r"^([A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?\.)*"
        r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?$|^$",
        description="with it, SMS and WhatsApp bodies end with '@<domain> #<code>' (WebOTP)")

    # ------------------------------------------------------------ outcome webhooks (rule 21)
    webhook_urls: str = Field(
        "", description="http(s) URLs, comma-separated: every outcome is POSTed to each")
    webhook_secret: SecretStr = Field(
        SecretStr(""), description="the key of the Phoneverify-Signature HMAC (needed with "
                                   "WEBHOOK_URLS)")
    webhook_timeout_seconds: float = Field(5.0, gt=0, description="the longest one try takes")
    webhook_max_age_seconds: float = Field(
        86400.0, gt=0, description="tries stop this long after the outcome (then a dead letter)")
    webhook_retry_seconds: float = Field(
        1.0, gt=0, description="the first retry's gap; it doubles up to 600 s")
    webhook_concurrency: int = Field(8, ge=1, description="tries at once per URL")

    @field_validator("webhook_urls")
    @classmethod
    def _http_urls(cls, value: str) -> str:
        for url in _items(value):
            parsed = urlsplit(url)
            if parsed.scheme not in ("http", "https") or not parsed.hostname:
                raise ValueError(f"{url!r} is not an http(s) URL (http://host/path)")
        return value

    @model_validator(mode="after")
    def _webhook_secret(self) -> Settings:
        if self.webhook_urls.strip() and not self.webhook_secret.get_secret_value():
            raise ValueError("WEBHOOK_URLS needs WEBHOOK_SECRET, the key receivers check "
                             "signatures with")
        return self

    # ------------------------------------------------------------ derived

    @cached_property
    def templates(self) -> Catalog:
        """Every locale's template, checked (TemplateError names a bad file and why)."""
        app = self.app_name if len(self.app_name) > 30 else "A" * 30
        budget = Budget(code_length=self.verification_code_length, app=app,
                        domain=self.web_otp_domain, minutes=self.minutes)
        return load(budget, self.templates_dir)

    @cached_property
    def locale(self) -> str:
        """DEFAULT_LOCALE as one of the templates' locales (``en-GB`` -> ``en``)."""
        found = match(self.default_locale, self.templates.locales)
        if found is None:
            raise TemplateError(f"DEFAULT_LOCALE {self.default_locale!r}: no template is close "
                                f"to it (there are {', '.join(self.templates.locales)})")
        return found

    @property
    def minutes(self) -> int:
        """The answer window in whole minutes, as messages say it."""
        return minutes_of(self.verification_timeout_seconds)

    @cached_property
    def number_policy(self) -> NumberPolicy:
        regions = frozenset(region.upper() for region in _items(self.phone_allowed_regions))
        return NumberPolicy(regions=regions, types=_items(self.phone_allowed_types.lower()))

    @cached_property
    def call_policy(self) -> NumberPolicy:
        """Where a voice call may go: the regions of the number policy, the call types."""
        return NumberPolicy(regions=self.number_policy.regions,
                            types=_items(self.phone_allowed_call_types.lower()))

    @cached_property
    def offered_channels(self) -> tuple[Channel, ...]:
        """CHANNELS, in the contract's order; an unknown name stops the worker."""
        return _channels(self.channels, "CHANNELS")

    @cached_property
    def fallback(self) -> tuple[Channel, ...]:
        """FALLBACK_CHANNELS, in its order."""
        return _channels(self.fallback_channels, "FALLBACK_CHANNELS", ordered=True)

    @cached_property
    def limits(self) -> Limits:
        return Limits(starts=self.rate_limit_starts, starts_window=self.rate_limit_window_seconds,
                      guesses=self.guess_limit, guess_window=self.guess_limit_window_seconds,
                      max_attempts=self.verification_max_attempts,
                      timeout=self.verification_timeout_seconds,
                      hold=self.early_command_grace_seconds + self.tick_interval_seconds)

    @field_validator("fraud_safe_prefixes")
    @classmethod
    def _e164_prefixes(cls, value: str) -> str:
        for prefix in _items(value):
            if not (prefix.startswith("+") and prefix[1:].isascii() and prefix[1:].isdigit()):
                raise ValueError(f"{prefix!r} is not an E.164 prefix (+ and digits)")
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: str) -> str:
        for item in _items(value):
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is neither an address nor a CIDR") from None
        return value

    @cached_property
    def fraud_policy(self) -> Policy:
        safe = sorted(_items(self.fraud_safe_prefixes))
        return Policy(answer=self.fraud_answer_seconds, window=self.fraud_window_seconds,
                      min_conversion=self.fraud_min_conversion,
                      prefix_min_sends=self.fraud_prefix_min_sends,
                      country_min_sends=self.fraud_country_min_sends,
                      block=self.fraud_block_seconds, safe_prefixes=tuple(safe))

    @cached_property
    def trusted_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(ipaddress.ip_network(item, strict=False)
                     for item in sorted(_items(self.trusted_proxies)))

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
    def webhook_targets(self) -> tuple[str, ...]:
        """The webhook URLs, in the order given, each once."""
        return tuple(dict.fromkeys(url.strip() for url in self.webhook_urls.split(",")
                                   if url.strip()))

    @cached_property
    def code_key(self) -> bytes:
        return self._kept_secret("code_hash_key", self.code_hash_key)

    @cached_property
    def api_key_value(self) -> str:
        """The API key in force; empty means the check is off."""
        return self._kept_secret("api_key", self.api_key).decode()

    @cached_property
    def accepted_api_keys(self) -> tuple[str, ...]:
        """Every key the HTTP API accepts (API_KEY and API_KEYS); empty: the check is off."""
        keys = [self.api_key_value, *sorted(_items(self.api_keys))]
        return tuple(k for k in keys if k)
