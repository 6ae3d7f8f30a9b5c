"""Per-number admission (contract rules 9 and 11): the start rate limit and the guess budget.

Pure functions over one phone number's state; the admission agent keeps that state in a table
keyed by the number, so the starts for one number are decided one at a time, and a limit holds
exactly under concurrent starts.

- **Rate limit.** At most ``starts`` deliveries (admitted starts, resends and fallbacks: rule 9
  counts deliveries) in any window of ``starts_window`` seconds.
- **Guess budget.** At most ``guesses`` wrong codes in any window of ``guess_window`` seconds,
  across all the number's verifications. A start is admitted with ``min(max_attempts, budget
  left)`` attempts, *reserved* from the budget; when its verification concludes, the
  reservation is *settled*: its wrong codes stay counted (at their times), the rest return.
  Counting reservations as if they were all spent is what makes the budget exact however many
  starts run at once.

Starts are identified by their *origin* (where the client's record was written), so a start
that is delivered twice is admitted once and keeps its reservation.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Literal, NamedTuple

from pydantic import BaseModel, ConfigDict

from phoneverify.models.messages import UtcTime


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Limits(_Frozen):
    """The policy, from settings."""

    starts: int
    starts_window: float
    guesses: int
    guess_window: float
    max_attempts: int
    #: The verification timeout: a reservation returns within it at the latest.
    timeout: float
    #: How much earlier than its start a wrong code can be (a response held for the start:
    #: the early-command grace plus a tick interval); counted so the budget stays exact.
    hold: float = 0.0


class Reservation(_Frozen):
    origin: str
    attempts: int
    at: UtcTime


class Spent(_Frozen):
    """The wrong codes of one settled verification, by the time each came."""

    origin: str
    at: tuple[UtcTime, ...]


class Number(_Frozen):
    """What one phone number holds inside its windows."""

    #: Admitted starts ``(origin, time)``, kept for two rate windows (late arrivals).
    starts: tuple[tuple[str, UtcTime], ...] = ()
    #: Attempts reserved by verifications that have not concluded.
    open: tuple[Reservation, ...] = ()
    spent: tuple[Spent, ...] = ()

    @property
    def is_empty(self) -> bool:
        return not (self.starts or self.open or self.spent)


class Verdict(NamedTuple):
    verdict: Literal["admitted", "rate_limited"]
    attempts: int = 0
    #: For ``rate_limited``: seconds until the number's window frees (at the earliest).
    retry_after: float | None = None


def admit(number: Number, origin: str, at: datetime, limits: Limits) -> tuple[Verdict, Number]:
    """The verdict on the start ``origin`` at ``at``, and the number's state after it.

    Starts for one number may arrive slightly out of time order (they come from different
    partitions), so a start is checked against every admitted start less than a window before
    or after it.
    """
    for reservation in number.open:
        if reservation.origin == origin:  # delivered again: the same verdict, nothing counted
            return Verdict("admitted", reservation.attempts), number
    span = timedelta(seconds=limits.starts_window)
    newest = max([at, *(time for _, time in number.starts)])
    starts = tuple(entry for entry in number.starts if entry[1] > newest - 2 * span)
    seen = any(o == origin for o, _ in starts)
    near = [time for _, time in starts if at - span < time < at + span]
    if not seen and len(near) >= limits.starts:
        return Verdict("rate_limited", retry_after=_seconds(min(near) + span - at)), number
    left = limits.guesses - len(_wrong_codes(number, at, limits)) - _reserved(number)
    if left <= 0:
        return Verdict("rate_limited", retry_after=_budget_frees(number, at, limits)), number
    attempts = min(limits.max_attempts, left)
    after = number.model_copy(update={
        "starts": starts if seen else (*starts, (origin, at)),
        "open": (*number.open, Reservation(origin=origin, attempts=attempts, at=at)),
    })
    return Verdict("admitted", attempts), after


def admit_delivery(number: Number, origin: str, at: datetime,
                   limits: Limits) -> tuple[Verdict, Number]:
    """A resend or fallback of a started verification (``origin`` names it): rule 9 counts
    every delivery, so it passes the same window as starts; it reserves no attempts."""
    span = timedelta(seconds=limits.starts_window)
    newest = max([at, *(time for _, time in number.starts)])
    starts = tuple(entry for entry in number.starts if entry[1] > newest - 2 * span)
    if any(o == origin for o, _ in starts):  # delivered again: the same verdict
        return Verdict("admitted"), number
    near = [time for _, time in starts if at - span < time < at + span]
    if len(near) >= limits.starts:
        return Verdict("rate_limited", retry_after=_seconds(min(near) + span - at)), number
    return Verdict("admitted"), number.model_copy(update={"starts": (*starts, (origin, at))})


def settle(number: Number, origin: str, wrong_codes: tuple[datetime, ...]) -> Number:
    """The verification started by ``origin`` concluded with these wrong codes (idempotent)."""
    spent = tuple(s for s in number.spent if s.origin != origin)
    if wrong_codes:
        spent = (*spent, Spent(origin=origin, at=tuple(wrong_codes)))
    return number.model_copy(update={
        "open": tuple(r for r in number.open if r.origin != origin), "spent": spent})


def prune(number: Number, now: datetime, limits: Limits) -> Number:
    """Forget what no start stamped after ``now - starts_window`` can count any more.

    A start may reach admission after a tick whose ``now`` is later than its own time (it was
    on its way when the tick came), so both kinds of entries are kept for one rate window
    more than their own window, the late-arrival allowance of :func:`admit`.
    """
    starts_from = now - 2 * timedelta(seconds=limits.starts_window)
    guesses_from = now - _guesses_kept(limits)
    spent = []
    for entry in number.spent:
        kept = tuple(t for t in entry.at if t > guesses_from)
        if kept:
            spent.append(entry if kept == entry.at else Spent(origin=entry.origin, at=kept))
    return number.model_copy(update={
        "starts": tuple(e for e in number.starts if e[1] > starts_from), "spent": tuple(spent)})


def next_due(number: Number, limits: Limits) -> datetime | None:
    """When :func:`prune` will next forget something (open reservations wait for settles)."""
    times = [t + 2 * timedelta(seconds=limits.starts_window) for _, t in number.starts]
    times += [t + _guesses_kept(limits) for s in number.spent for t in s.at]
    return min(times, default=None)


def _guesses_kept(limits: Limits) -> timedelta:
    """How long a wrong code is kept: its window, the hold margin, and the late allowance."""
    return timedelta(seconds=limits.guess_window + limits.hold + limits.starts_window)


def _wrong_codes(number: Number, at: datetime, limits: Limits) -> list[datetime]:
    since = at - timedelta(seconds=limits.guess_window + limits.hold)
    return [t for entry in number.spent for t in entry.at if t > since]


def _reserved(number: Number) -> int:
    return sum(r.attempts for r in number.open)


def _budget_frees(number: Number, at: datetime, limits: Limits) -> float:
    """Seconds until some budget comes back: a wrong code leaves the window, or a reservation
    returns (a verification concludes within its timeout at the latest)."""
    wrong = _wrong_codes(number, at, limits)
    times = [t + timedelta(seconds=limits.guess_window + limits.hold) for t in wrong]
    times += [r.at + timedelta(seconds=limits.timeout) for r in number.open]
    return _seconds(min(times) - at) if times else 0.0


def _seconds(delta: timedelta) -> float:
    return max(round(delta.total_seconds(), 3), 0.0)
