"""The fraud guard (contract rule 20): conversion per prefix and per country, when to block,
and the limit of starts per client address. Pure: time comes in as arguments.

- A **prefix** is an E.164 number without its last 4 digits (``+1425555``); a **country** its
  ISO region (``US``). Each is *watched*: its state (:class:`Watch`) counts judged deliveries
  and how many of them converted, in buckets over ``window`` seconds.
- Each verification's deliveries wait for their answer in a state of their own
  (:class:`Waiting`): *converted* when it is verified, *unconverted* once ``answer`` seconds
  pass without that, or when it concludes otherwise. Each judgment counts for the prefix (a
  :class:`Watch` holds only counts per time bucket and its block, so a record costs the same
  however many deliveries wait in the prefix), and is forwarded to the country's watch.
- A watch with at least ``min_sends`` judged deliveries in the window (``prefix_min_sends`` or
  ``country_min_sends``) and a conversion below ``min_conversion`` is blocked for ``block``
  seconds (:func:`judge`); the block ends by itself (:func:`lift`) or by an operator.
  Numbers under ``FRAUD_SAFE_PREFIXES`` are neither watched nor refused.
- **Per client address**: at most ``limit`` starts and resends in any ``window`` seconds
  (:func:`admit_address`), each named by its origin so a redelivered one counts once.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Annotated, Literal, NamedTuple

import phonenumbers
from pydantic import BaseModel, ConfigDict, Field

from phoneverify.models.messages import Message, UtcTime

Level = Literal["prefix", "country"]
#: The guard's key of a client address: ``ip:198.51.100.7``.
ADDRESS = "ip:"
#: The guard's key of a verification's deliveries waiting for their answer:
#: ``waiting:<instance_id>`` (in its prefix's partition).
WAITING = "waiting:"
#: Most deliveries one verification's :class:`Waiting` follows (a verification makes at most
#: 1 + ``RESEND_LIMIT`` + its fallbacks; more can only come from a bogus record).
MAX_DELIVERIES = 32
_PREFIX = re.compile(r"^\+[0-9]{1,14}$")
_COUNTRY = re.compile(r"^[A-Za-z]{2}$")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Policy(_Frozen):
    """The guard's settings (``FRAUD_*``), defaults as the contract's."""

    answer: float = 60.0
    window: float = 3600.0
    min_conversion: float = 0.2
    prefix_min_sends: int = 20
    country_min_sends: int = 100
    block: float = 43200.0
    safe_prefixes: tuple[str, ...] = ()

    def min_sends(self, level: Level) -> int:
        return self.prefix_min_sends if level == "prefix" else self.country_min_sends


class FraudBlock(Message):
    """A block or unblock, on ``verification.fraud`` keyed by ``key`` (compacted: the last
    record of a key is its state)."""

    level: Level
    key: str
    blocked: bool
    blocked_until: UtcTime | None = None
    judged: Annotated[int, Field(ge=0)] = 0
    converted: Annotated[int, Field(ge=0)] = 0
    at: UtcTime
    by: Literal["guard", "operator"]

    def in_force(self, now: datetime) -> bool:
        return self.blocked and self.blocked_until is not None and self.blocked_until > now


# The guard's input records on ``verification.guard`` (internal), besides ticks and starts
# that carry a client address (``PhoneStart``, keyed ``ip:<address>``).


class Delivered(Message):
    """A delivery to ``phone_number`` (from the actor), keyed by its prefix."""

    type: Literal["delivered"] = "delivered"
    instance_id: str
    phone_number: str
    at: UtcTime


class Concluded(Message):
    """The verification concluded (from the actor), keyed by its number's prefix."""

    type: Literal["concluded"] = "concluded"
    instance_id: str
    phone_number: str
    verified: bool
    at: UtcTime


class Judged(Message):
    """Judgments of one prefix's deliveries, for its country (keyed by the country)."""

    type: Literal["judged"] = "judged"
    judged: Annotated[int, Field(ge=0)]
    converted: Annotated[int, Field(ge=0)]
    at: UtcTime


# ---------------------------------------------------------------- keys


def prefix_of(e164: str) -> str:
    """``+14255550100`` -> ``+1425555``."""
    return e164[:-4]


def country_of(e164: str) -> str | None:
    """The number's ISO region (``GB``), or None when libphonenumber cannot tell."""
    try:
        region = phonenumbers.region_code_for_number(phonenumbers.parse(e164))
    except phonenumbers.NumberParseException:
        return None
    return region if region and region != "ZZ" else None


def parse_key(text: str) -> tuple[Level, str]:
    """An operator's key: an E.164 prefix (``+44740012``) or an ISO region code (``GB``);
    ValueError saying what is wrong otherwise."""
    if not isinstance(text, str):
        raise ValueError("key must be a string: an E.164 prefix (+44740012) or an ISO "
                         "region code (GB)")
    text = text.strip()
    if _PREFIX.fullmatch(text):
        return "prefix", text
    if _COUNTRY.fullmatch(text):
        region = text.upper()
        if region not in phonenumbers.SUPPORTED_REGIONS:
            raise ValueError(f"{region} is not a region libphonenumber knows (ISO 3166 "
                             "alpha-2, say GB)")
        return "country", region
    raise ValueError(f"{text[:40]!r} is neither an E.164 prefix (+ and 1 to 14 digits, "
                     "+44740012) nor an ISO region code (GB)")


def is_safe(number_or_prefix: str, policy: Policy) -> bool:
    """Under one of ``FRAUD_SAFE_PREFIXES``: never watched, never refused."""
    return any(number_or_prefix.startswith(safe) for safe in policy.safe_prefixes)


def blocking(e164: str, blocks: Mapping[str, FraudBlock], at: datetime,
             policy: Policy) -> FraudBlock | None:
    """The block in force at ``at`` that refuses a delivery to ``e164``, if any."""
    if is_safe(e164, policy):
        return None
    # The guard blocks 4-digits-short prefixes; an operator may block any prefix (+33612).
    keys = [e164[:n] for n in range(2, len(e164) + 1)]
    for key in (*keys, country_of(e164)):
        block = blocks.get(key) if key else None
        if block is not None and block.in_force(at):
            return block
    return None


def refusal(block: FraudBlock, at: datetime) -> str:
    """The reason a refused start gets, in words: ``suspected SMS pumping to +44740012…,
    blocked until 03:12 UTC``."""
    assert block.blocked_until is not None
    until = block.blocked_until
    when = until.strftime("%H:%M UTC") if until - at < timedelta(hours=23) \
        else until.strftime("%Y-%m-%d %H:%M UTC")
    to = f"{block.key}…" if block.level == "prefix" else f"numbers in {block.key}"
    by = "" if block.by == "guard" else " by an operator"
    return f"suspected SMS pumping to {to}, blocked{by} until {when}"


# ---------------------------------------------------------------- operators

#: The longest block an operator may set (a year): longer is more likely a typo.
MAX_BLOCK_SECONDS = 366 * 86400.0
_DURATION = re.compile(r"^([0-9]+(?:\.[0-9]+)?)\s*([smhd]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """``3600``, ``90s``, ``30m``, ``12h``, ``7d`` -> seconds; ValueError saying what is wrong."""
    match = _DURATION.fullmatch(text.strip().lower()) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"{str(text)[:40]!r} is not a duration: use seconds (3600) or a "
                         "number with s, m, h or d (90s, 30m, 12h, 7d)")
    return check_seconds(float(match.group(1)) * _UNITS[match.group(2)])


def check_seconds(seconds: object) -> float:
    """A block's length: more than 0 and at most a year."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) \
            or not math.isfinite(seconds) or not 0 < seconds <= MAX_BLOCK_SECONDS:
        raise ValueError("seconds must be a number more than 0 and at most "
                         f"{MAX_BLOCK_SECONDS:.0f} (a year)")
    return float(seconds)


def operator_block(text: str, seconds: object, now: datetime, policy: Policy) -> FraudBlock:
    """An operator's block of ``text`` (a prefix or a region) for ``seconds`` from ``now``;
    ValueError (nothing blocked) for a malformed key or length, or a safe prefix."""
    level, key = parse_key(text)
    length = check_seconds(seconds)
    if level == "prefix" and is_safe(key, policy):
        raise ValueError(f"{key} is under FRAUD_SAFE_PREFIXES: it is never blocked")
    return FraudBlock(level=level, key=key, blocked=True,
                      blocked_until=now + timedelta(seconds=length), at=now, by="operator")


def operator_unblock(text: str, now: datetime) -> FraudBlock:
    level, key = parse_key(text)
    return FraudBlock(level=level, key=key, blocked=False, at=now, by="operator")


# ---------------------------------------------------------------- one watch


class Judgment(NamedTuple):
    judged: int = 0
    converted: int = 0

    def __add__(self, other: object) -> Judgment:
        assert isinstance(other, Judgment)
        return Judgment(self.judged + other.judged, self.converted + other.converted)


class Waiting(_Frozen):
    """One verification's deliveries waiting for their answer: a table key of its own
    (``waiting:<instance_id>``), so its prefix's state does not grow with them."""

    prefix: str = ""
    #: The country its judgments also count for.
    country: str | None = None
    at: tuple[UtcTime, ...] = ()

    @property
    def is_empty(self) -> bool:
        return not self.at


class Block(_Frozen):
    until: UtcTime
    by: Literal["guard", "operator"]
    at: UtcTime


class Watch(_Frozen):
    """One prefix's or country's state: judged deliveries per time bucket, and its block.
    At most :func:`bucket_width`'s 60 buckets (61 across a boundary): bounded."""

    #: Fields a state written by an older version holds (its deliveries waiting) are ignored.
    model_config = ConfigDict(frozen=True, extra="ignore")

    #: ``(bucket start, judged, converted)``, oldest first.
    judged: tuple[tuple[UtcTime, int, int], ...] = ()
    block: Block | None = None

    @property
    def is_empty(self) -> bool:
        return not (self.judged or self.block)


def deliver(waiting: Waiting, prefix: str, country: str | None, at: datetime) -> Waiting:
    """A delivery to a number of ``prefix``, waiting for its answer (a delivery reported
    again changes nothing)."""
    if at in waiting.at or len(waiting.at) >= MAX_DELIVERIES:
        return waiting
    return Waiting(prefix=prefix, country=waiting.country or country, at=(*waiting.at, at))


def conclude(waiting: Waiting, verified: bool) -> tuple[Waiting, Judgment]:
    """The verification concluded: its deliveries still waiting are judged now (none: they
    were judged before, no answer in time, or never seen here)."""
    n = len(waiting.at)
    return Waiting(), Judgment(n, n if verified else 0)


def expire(waiting: Waiting, now: datetime, policy: Policy) -> tuple[Waiting, Judgment]:
    """Deliveries unanswered for ``answer`` seconds are judged unconverted."""
    since = now - timedelta(seconds=policy.answer)
    kept = tuple(t for t in waiting.at if t > since)
    late = len(waiting.at) - len(kept)
    if not late:
        return waiting, Judgment()
    return waiting.model_copy(update={"at": kept}), Judgment(late, 0)


def waiting_due(waiting: Waiting, policy: Policy) -> datetime | None:
    """When its first delivery's answer window ends."""
    return min(waiting.at) + timedelta(seconds=policy.answer) if waiting.at else None


def count(watch: Watch, judgment: Judgment, at: datetime, policy: Policy) -> Watch:
    """Add ``judgment`` to the bucket of ``at`` (a country's watch gets its prefixes')."""
    if not judgment.judged and not judgment.converted:
        return watch
    width = bucket_width(policy)
    start = datetime.fromtimestamp(math.floor(at.timestamp() / width) * width, at.tzinfo)
    buckets = list(watch.judged)
    for n, (when, judged, converted) in enumerate(buckets):
        if when == start:
            buckets[n] = (when, judged + judgment.judged, converted + judgment.converted)
            break
    else:
        buckets.append((start, judgment.judged, judgment.converted))
        buckets.sort(key=lambda bucket: bucket[0])
    return watch.model_copy(update={"judged": tuple(buckets)})


def bucket_width(policy: Policy) -> float:
    """Judgments are counted in 60 buckets per window (a judgment leaves the window at most
    one bucket early), at least a second wide."""
    return max(1.0, policy.window / 60)


def totals(watch: Watch, now: datetime, policy: Policy) -> Judgment:
    """Judged and converted deliveries inside the window ending at ``now``."""
    since = now - timedelta(seconds=policy.window)
    return sum((Judgment(j, c) for when, j, c in watch.judged if when > since), Judgment())


def judge(watch: Watch, level: Level, key: str, now: datetime, policy: Policy
          ) -> tuple[Watch, FraudBlock | None]:
    """Block the watch if its conversion is too low over enough judged deliveries."""
    if watch.block is not None and watch.block.until > now:
        return watch, None
    if level == "prefix" and is_safe(key, policy):
        return watch, None
    judged, converted = totals(watch, now, policy)
    if judged < policy.min_sends(level) or converted >= policy.min_conversion * judged:
        return watch, None
    until = now + timedelta(seconds=policy.block)
    block = FraudBlock(level=level, key=key, blocked=True, blocked_until=until, judged=judged,
                       converted=converted, at=now, by="guard")
    return watch.model_copy(update={"block": Block(until=until, by="guard", at=now)}), block


def lift(watch: Watch, level: Level, key: str, now: datetime, policy: Policy
         ) -> tuple[Watch, FraudBlock | None]:
    """End a block whose time is over; its judgments are forgotten (a fresh start)."""
    if watch.block is None or watch.block.until > now:
        return watch, None
    judged, converted = totals(watch, now, policy)
    record = FraudBlock(level=level, key=key, blocked=False, judged=judged,
                        converted=converted, at=now, by="guard")
    return watch.model_copy(update={"block": None, "judged": ()}), record


def apply(watch: Watch, record: FraudBlock) -> Watch:
    """A record of ``verification.fraud`` (an operator's, or the guard's own read back)."""
    if record.blocked and record.blocked_until is not None:
        block = Block(until=record.blocked_until, by=record.by, at=record.at)
        return watch if watch.block == block else watch.model_copy(update={"block": block})
    if watch.block is None or watch.block.at > record.at:
        return watch  # nothing to lift, or a block newer than this unblock
    return watch.model_copy(update={"block": None, "judged": ()})


def prune(watch: Watch, now: datetime, policy: Policy) -> Watch:
    """Forget buckets that left the window."""
    since = now - timedelta(seconds=policy.window)
    kept = tuple(bucket for bucket in watch.judged if bucket[0] > since)
    return watch if kept == watch.judged else watch.model_copy(update={"judged": kept})


def next_due(watch: Watch, policy: Policy) -> datetime | None:
    """When a tick must next look at the watch: a block ends, or a bucket leaves the
    window."""
    times: list[datetime] = []
    if watch.block is not None:
        times.append(watch.block.until)
    if watch.judged:
        times.append(watch.judged[0][0] + timedelta(seconds=policy.window))
    return min(times, default=None)


# ---------------------------------------------------------------- per client address


class Address(_Frozen):
    """One client address's admitted starts ``(origin, time)`` inside the window."""

    starts: tuple[tuple[str, UtcTime], ...] = ()


def client_address(text: str) -> str:
    """The address in its canonical form; ValueError when it is not an IPv4 or IPv6 one."""
    if not isinstance(text, str) or len(text) > 64:
        raise ValueError("client_ip must be an IPv4 or IPv6 address")
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        raise ValueError(f"client_ip {text[:64]!r} is not an IPv4 or IPv6 address") from None


def admit_address(address: Address, origin: str, at: datetime, limit: int, window: float
                  ) -> tuple[float | None, Address]:
    """``(None, after)`` when the start ``origin`` is admitted, else ``(retry_after, same)``
    with the seconds until a start from the address would be admitted."""
    if any(o == origin for o, _ in address.starts):
        return None, address  # delivered again: admitted the first time, counted once
    span = timedelta(seconds=window)
    recent = sorted(t for _, t in address.starts if at - span < t <= at + span)
    if len(recent) >= limit:
        frees = recent[len(recent) - limit] + span
        return max(round((frees - at).total_seconds(), 3), 0.0), address
    return None, address.model_copy(update={"starts": (*address.starts, (origin, at))})


def prune_address(address: Address, now: datetime, window: float) -> Address:
    """Forget starts that no later start can count (one window more for late arrivals)."""
    since = now - timedelta(seconds=2 * window)
    kept = tuple(entry for entry in address.starts if entry[1] > since)
    return address if kept == address.starts else Address(starts=kept)


def address_due(address: Address, window: float) -> datetime | None:
    return min((t + timedelta(seconds=2 * window) for _, t in address.starts), default=None)
