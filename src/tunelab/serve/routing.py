"""Which adapter answers a request: aliases with A/B shares, health windows, automatic rollback, rollout.

An alias maps to ``{adapter: share}``. A user is hashed with the alias name into a bucket in
[0, 1) and walks the cumulative shares in the order they were given, so one user always lands on
the same adapter while shares stay put, and growing the last-listed candidate's share only moves
users *into* it (the baseline's slice shrinks from the top). A share of 0 is a rollback.

Every alias has a ``baseline``. After each request and on a timer, the :class:`Router` compares
each candidate's rolling window (error rate, p95 latency, mean feedback) with the baseline's; past
the :class:`WatchPolicy` thresholds it moves the candidate's traffic to the baseline and records
why. A rollout schedule (e.g. 0.05 → 0.25 → 1.0) raises the candidate's share after enough healthy
requests or seconds, and only while the comparison has data and finds nothing wrong.

Everything here is plain Python with an injected clock, so the logic is tested without servers
or sleeps.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("tunelab.serve")
Clock = Callable[[], float]


@dataclass(frozen=True)
class WatchPolicy:
    """When a candidate is worse enough than its baseline to lose its traffic."""

    max_error_increase: float = 0.05
    """Error rate may exceed the baseline's by at most this (0.05 = 5 percentage points)."""
    max_latency_ratio: float = 2.0
    """Candidate p95 latency may be at most this multiple of the baseline's."""
    max_feedback_drop: float = 0.5
    """Mean feedback score may fall at most this far below the baseline's."""
    min_samples: int = 20
    """Requests (and, for feedback, scores) each side needs before it is judged at all."""
    window: int = 200
    """Most recent requests and scores kept per adapter."""
    max_age_s: float = 600.0
    """Samples older than this leave the window, so an old incident does not count forever."""


def bucket(user: str, alias: str) -> float:
    """A stable number in [0, 1) for (user, alias); sha256 so it is the same in every process."""
    digest = hashlib.sha256(f"{alias}\x00{user}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def pick(shares: dict[str, float], point: float) -> str:
    """The adapter whose cumulative slice (in insertion order, normalised) contains ``point``."""
    live = [(name, share) for name, share in shares.items() if share > 0]
    if not live:
        raise ValueError("every share is 0; at least one adapter needs traffic")
    total = sum(share for _, share in live)
    edge = 0.0
    for name, share in live:
        edge += share / total
        if point < edge:
            return name
    return live[-1][0]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); enough for a health check, no numpy needed."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


class RollingStats:
    """One adapter's recent requests (ok, latency) and feedback scores, bounded by count and age."""

    def __init__(self, policy: WatchPolicy, clock: Clock) -> None:
        self._policy, self._clock = policy, clock
        self._requests: deque[tuple[float, bool, float]] = deque(maxlen=policy.window)
        self._feedback: deque[tuple[float, float]] = deque(maxlen=policy.window)

    def record(self, ok: bool, latency_s: float) -> None:
        self._requests.append((self._clock(), ok, latency_s))

    def record_feedback(self, score: float) -> None:
        self._feedback.append((self._clock(), score))

    def _fresh(self, samples: deque) -> list:
        cutoff = self._clock() - self._policy.max_age_s
        while samples and samples[0][0] < cutoff:
            samples.popleft()
        return list(samples)

    def summary(self) -> dict[str, Any]:
        """Counts, error rate, p95 latency and mean feedback over the current window."""
        requests, feedback = self._fresh(self._requests), self._fresh(self._feedback)
        latencies = sorted(lat for _, ok, lat in requests if ok)  # sorted once for both percentiles
        return {
            "requests": len(requests),
            "error_rate": (sum(1 for _, ok, _ in requests if not ok) / len(requests)) if requests else None,
            "p50_latency_s": percentile(latencies, 50) if latencies else None,
            "p95_latency_s": percentile(latencies, 95) if latencies else None,
            "feedback_n": len(feedback),
            "feedback_mean": (sum(s for _, s in feedback) / len(feedback)) if feedback else None,
        }


def compare(candidate: dict[str, Any], baseline: dict[str, Any], policy: WatchPolicy) -> tuple[bool, str]:
    """(judged, reason): judged is False without enough data; reason is empty when healthy."""
    judged = candidate["requests"] >= policy.min_samples and baseline["requests"] >= policy.min_samples
    if judged:
        increase = candidate["error_rate"] - baseline["error_rate"]
        if increase > policy.max_error_increase:
            return True, (
                f"error rate {candidate['error_rate']:.1%} vs baseline {baseline['error_rate']:.1%} "
                f"(+{increase * 100:.1f} pts > {policy.max_error_increase * 100:.1f})"
            )
        cand_p95, base_p95 = candidate["p95_latency_s"], baseline["p95_latency_s"]
        if cand_p95 is not None and base_p95 and cand_p95 > policy.max_latency_ratio * base_p95:
            return True, (
                f"p95 latency {cand_p95 * 1000:.0f} ms vs baseline {base_p95 * 1000:.0f} ms "
                f"(×{cand_p95 / base_p95:.1f} > ×{policy.max_latency_ratio:g})"
            )
    if candidate["feedback_n"] >= policy.min_samples and baseline["feedback_n"] >= policy.min_samples:
        judged = True
        drop = baseline["feedback_mean"] - candidate["feedback_mean"]
        if drop > policy.max_feedback_drop:
            return True, (
                f"mean feedback {candidate['feedback_mean']:.2f} vs baseline {baseline['feedback_mean']:.2f} "
                f"(−{drop:.2f} > {policy.max_feedback_drop:g})"
            )
    return judged, ""


@dataclass
class Rollout:
    """A candidate's share schedule; the next step needs ``every_requests`` healthy requests to the
    candidate in this step (or ``every_seconds`` elapsed, if set) while the watcher judges it healthy."""

    candidate: str
    schedule: list[float]
    every_requests: int = 50
    every_seconds: float | None = None
    step: int = 0
    step_started: float = 0.0
    step_requests: int = 0
    state: str = "running"  # running | done | rolled_back


@dataclass
class Alias:
    name: str
    shares: dict[str, float]
    baseline: str
    rollout: Rollout | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    before_rollback: dict[str, float] | None = None
    """The shares before the first rollback since they were set: what :meth:`Router.restore` puts back."""


class VariantDown(Exception):
    """The variant a request resolved to is down and no healthy baseline can take its place."""

    def __init__(self, variant: str, alias: str | None) -> None:
        super().__init__(variant)
        self.variant, self.alias = variant, alias


def rollback_kind(reason: str) -> str:
    """The metric label for a rollback reason written by :func:`compare`."""
    for prefix, kind in (
        ("error rate", "error_rate"),
        ("p95 latency", "latency"),
        ("mean feedback", "feedback"),
    ):
        if reason.startswith(prefix):
            return kind
    return "other"


class Router:
    """Resolves request models to variants and keeps every alias healthy. Thread-safe.

    A variant is the local base model (``base_name``; ``None`` when only backends are served), a
    loaded adapter, or a backend (an OpenAI-compatible upstream). Aliases mix them freely. A variant
    marked down (:meth:`set_up`) gets no traffic: its users go to their alias's baseline.
    """

    def __init__(
        self,
        base_name: str | None,
        adapters: list[str],
        policy: WatchPolicy | None = None,
        clock: Clock = time.monotonic,
        wall_clock: Clock = time.time,
        backends: list[str] | tuple[str, ...] = (),
    ) -> None:
        self.base_name = base_name
        self.policy = policy or WatchPolicy()
        self._clock, self._wall = clock, wall_clock
        self._lock = threading.RLock()
        self._adapters: set[str] = set(adapters)
        self._backends: set[str] = set(backends)
        self._down: set[str] = set()
        self._aliases: dict[str, Alias] = {}
        self._stats: dict[str, RollingStats] = {}
        clash = sorted(self._backends & (self._adapters | {base_name}))
        if clash:
            raise ValueError(
                f"backend name(s) {clash} are taken by the base or an adapter; rename the backend"
            )
        self.on_rollback: Callable[[str, str, str], None] | None = None
        """Called with (alias, variant, kind) on every rollback; the app counts them in /metrics."""

    @property
    def backends(self) -> list[str]:
        with self._lock:
            return sorted(self._backends)

    @property
    def variants(self) -> list[str]:
        """Every name a request can be answered by: base (if local), adapters, backends."""
        with self._lock:
            base = [self.base_name] if self.base_name is not None else []
            return base + sorted(self._adapters) + sorted(self._backends)

    def kind(self, variant: str) -> str:
        """base, adapter or backend."""
        if variant == self.base_name:
            return "base"
        return "backend" if variant in self._backends else "adapter"

    def set_up(self, variant: str, up: bool) -> None:
        """Mark a variant up or down; down variants get no traffic until marked up again."""
        with self._lock:
            (self._down.discard if up else self._down.add)(variant)

    def is_up(self, variant: str) -> bool:
        with self._lock:
            return variant not in self._down

    def baseline(self, alias: str) -> str | None:
        """The alias's baseline variant (None for an unknown alias)."""
        with self._lock:
            found = self._aliases.get(alias)
            return found.baseline if found else None

    def ready(self) -> bool:
        """Every alias's baseline is up (with no aliases: some variant is up)."""
        with self._lock:
            if self._aliases:
                return all(a.baseline not in self._down for a in self._aliases.values())
            return any(v not in self._down for v in self.variants)

    @property
    def adapters(self) -> list[str]:
        with self._lock:
            return sorted(self._adapters)

    @property
    def aliases(self) -> list[str]:
        with self._lock:
            return sorted(self._aliases)

    def add_adapter(self, name: str) -> None:
        with self._lock:
            self.check_name_free(name, kind="adapter")
            self._adapters.add(name)

    def remove_adapter(self, name: str) -> None:
        """Forget an adapter; refused while an alias still sends it traffic or holds it as baseline."""
        with self._lock:
            if name not in self._adapters:
                raise KeyError(name)
            users = sorted(
                a.name for a in self._aliases.values() if a.shares.get(name, 0) > 0 or a.baseline == name
            )
            if users:
                raise ValueError(
                    f"adapter '{name}' is still routed to by alias(es) {users}; "
                    "set its share to 0 (and pick another baseline) first"
                )
            self._adapters.discard(name)
            for alias in self._aliases.values():
                alias.shares.pop(name, None)
            self._stats.pop(name, None)

    def check_name_free(self, name: str, *, kind: str = "adapter") -> None:
        """Base, adapter and alias names share one namespace (the request's ``model``); an alias may
        be replaced by an alias of the same name."""
        taken = {self.base_name: "the base model", **dict.fromkeys(self._adapters, "an adapter")}
        taken.update(dict.fromkeys(self._backends, "a backend"))
        if kind == "adapter":
            taken.update(dict.fromkeys(self._aliases, "an alias"))
        if name in taken:
            raise ValueError(f"'{name}' is already {taken[name]}; choose another {kind} name")

    def set_alias(
        self,
        name: str,
        shares: dict[str, float],
        *,
        baseline: str | None = None,
        rollout: list[float] | None = None,
        rollout_every: int = 50,
        rollout_every_seconds: float | None = None,
    ) -> Alias:
        """Create or replace an alias. ``baseline`` defaults to the first adapter listed; with
        ``rollout``, the one other adapter starts at the schedule's first share."""
        with self._lock:
            self.check_name_free(name, kind="alias")
            self._check_shares(name, shares, baseline)
            baseline = baseline or next(iter(shares))
            alias = Alias(name, dict(shares), baseline)
            if rollout:
                alias.rollout = self._start_rollout(alias, rollout, rollout_every, rollout_every_seconds)
            previous = self._aliases.get(name)
            alias.events = previous.events if previous else []
            self._aliases[name] = alias
            self._event(alias, "set", f"shares {self._fmt(alias.shares)}, baseline {alias.baseline}")
            return alias

    def _check_shares(self, alias: str, shares: dict[str, float], baseline: str | None) -> None:
        if not shares:
            raise ValueError(f"alias '{alias}': give at least one adapter share")
        unknown = sorted(set(shares) - set(self.variants))
        if unknown:
            raise ValueError(
                f"alias '{alias}': unknown adapter(s) or backend(s) {unknown}; served: {self.variants}"
            )
        bad = {k: v for k, v in shares.items() if not (0 <= v <= 1) or math.isnan(v)}
        if bad:
            raise ValueError(f"alias '{alias}': shares must lie in [0, 1], got {bad}")
        check_share_sum(alias, shares)
        if baseline is not None and baseline not in shares:
            raise ValueError(
                f"alias '{alias}': baseline '{baseline}' must be one of its adapters {list(shares)}"
            )

    def _start_rollout(
        self, alias: Alias, schedule: list[float], every: int, seconds: float | None
    ) -> Rollout:
        candidates = [a for a in alias.shares if a != alias.baseline]
        if len(candidates) != 1:
            raise ValueError(
                f"alias '{alias.name}': a rollout needs exactly one adapter besides the baseline"
            )
        if any(not 0 < s <= 1 for s in schedule) or schedule != sorted(schedule):
            raise ValueError(f"alias '{alias.name}': rollout shares must rise within (0, 1], got {schedule}")
        rollout = Rollout(candidates[0], list(schedule), every, seconds, step_started=self._clock())
        self._apply_share(alias, rollout.candidate, schedule[0])
        return rollout

    @staticmethod
    def _apply_share(alias: Alias, candidate: str, share: float) -> None:
        """Give ``candidate`` this share and the baseline the rest (the only two in a rollout)."""
        alias.shares[alias.baseline] = round(1.0 - share, 6)
        alias.shares[candidate] = share

    def resolve(self, model: str, user: str | None) -> tuple[str | None, str | None]:
        """Request ``model`` → (variant, alias); variant None means the local base with adapters
        disabled. A down variant's users go to the alias's baseline; :class:`VariantDown` when the
        variant asked for (or the baseline it falls back to) is down."""
        with self._lock:
            if model == self.base_name or model in self._adapters or model in self._backends:
                if model in self._down:
                    raise VariantDown(model, None)
                return (None if model == self.base_name else model), None
            alias = self._aliases.get(model)
            if alias is None:
                raise KeyError(model)
            point = bucket(user, alias.name) if user else random.random()
            variant = pick(alias.shares, point)
            if variant in self._down:
                variant = alias.baseline
                if variant in self._down:
                    raise VariantDown(variant, alias.name)
            return (None if variant == self.base_name else variant), alias.name

    def observe(self, adapter: str | None, ok: bool, latency_s: float, alias: str | None = None) -> None:
        """Record one finished request of a variant (None = the base), advance its alias's rollout,
        then run the watcher."""
        adapter = self.base_name if adapter is None else adapter
        if adapter is None:
            return
        with self._lock:
            self._stats_of(adapter).record(ok, latency_s)
            rollout = self._aliases[alias].rollout if alias in self._aliases else None
            if ok and rollout and rollout.state == "running" and rollout.candidate == adapter:
                rollout.step_requests += 1
            self.check()

    def feedback(self, adapter: str, score: float) -> None:
        """A score for a variant (base, adapter or backend)."""
        with self._lock:
            if adapter not in self.variants:
                raise KeyError(adapter)
            self._stats_of(adapter).record_feedback(score)
            self.check()

    def _stats_of(self, adapter: str) -> RollingStats:
        if adapter not in self._stats:
            self._stats[adapter] = RollingStats(self.policy, self._clock)
        return self._stats[adapter]

    def check(self) -> list[str]:
        """The watcher: roll back unhealthy candidates, advance healthy rollouts. Returns what it did."""
        actions = []
        with self._lock:
            for alias in self._aliases.values():
                actions += self._check_alias(alias)
        return actions

    def _check_alias(self, alias: Alias) -> list[str]:
        base = self._stats_of(alias.baseline).summary()
        actions, verdicts = [], {}
        for candidate in [a for a, s in alias.shares.items() if s > 0 and a != alias.baseline]:
            judged, reason = compare(self._stats_of(candidate).summary(), base, self.policy)
            verdicts[candidate] = judged
            if reason:
                actions.append(self._rollback(alias, candidate, reason))
        rollout = alias.rollout
        if (
            rollout
            and rollout.state == "running"
            and verdicts.get(rollout.candidate)
            and self._step_due(rollout)
        ):
            actions.append(self._advance(alias, rollout))
        return actions

    def _rollback(self, alias: Alias, candidate: str, reason: str) -> str:
        if alias.before_rollback is None:
            alias.before_rollback = dict(alias.shares)
        moved = alias.shares[candidate]
        alias.shares[candidate] = 0.0
        alias.shares[alias.baseline] = round(alias.shares.get(alias.baseline, 0.0) + moved, 6)
        if alias.rollout and alias.rollout.candidate == candidate:
            alias.rollout.state = "rolled_back"
        message = f"rolled back '{candidate}' (share {moved:g} → 0) to baseline '{alias.baseline}': {reason}"
        self._event(alias, "rollback", message, level=logging.WARNING)
        if self.on_rollback is not None:
            self.on_rollback(alias.name, candidate, rollback_kind(reason))
        return message

    def restore(self, name: str) -> Alias:
        """Undo an alias's rollbacks: the shares they moved go back, a rolled-back rollout resumes at
        its step, and each restored candidate's window starts empty (the faults that rolled it back
        would roll it back again at once). KeyError for an unknown alias, ValueError when nothing
        was rolled back."""
        with self._lock:
            alias = self._aliases[name]
            if alias.before_rollback is None:
                raise ValueError(
                    f"alias '{name}' has no rollback to undo; its shares are {self._fmt(alias.shares)}"
                )
            restored = [v for v, share in alias.before_rollback.items() if share > alias.shares.get(v, 0)]
            alias.shares, alias.before_rollback = alias.before_rollback, None
            for variant in restored:
                self._stats.pop(variant, None)
            rollout = alias.rollout
            if rollout is not None and rollout.state == "rolled_back":
                rollout.state, rollout.step_started, rollout.step_requests = "running", self._clock(), 0
            self._event(alias, "restore", f"restored {', '.join(restored)}: shares {self._fmt(alias.shares)}")
            return alias

    def _step_due(self, rollout: Rollout) -> bool:
        if rollout.every_seconds is not None:
            return self._clock() - rollout.step_started >= rollout.every_seconds
        return rollout.step_requests >= rollout.every_requests

    def _advance(self, alias: Alias, rollout: Rollout) -> str:
        rollout.step += 1
        rollout.step_started, rollout.step_requests = self._clock(), 0
        if rollout.step >= len(rollout.schedule):
            rollout.state = "done"
            return self._event(
                alias, "rollout_done", f"'{rollout.candidate}' holds {self._fmt(alias.shares)}"
            )
        share = rollout.schedule[rollout.step]
        self._apply_share(alias, rollout.candidate, share)
        return self._event(alias, "rollout_step", f"'{rollout.candidate}' share → {share:g} (healthy so far)")

    def _event(self, alias: Alias, kind: str, message: str, level: int = logging.INFO) -> str:
        alias.events.append({"time": self._wall(), "kind": kind, "message": message})
        del alias.events[:-100]
        log.log(level, "alias '%s': %s", alias.name, message)
        return message

    @staticmethod
    def _fmt(shares: dict[str, float]) -> str:
        return ", ".join(f"{k}:{v:g}" for k, v in shares.items())

    def describe(self) -> dict[str, Any]:
        """Every alias with its shares, baseline, rollout, recent events and the windows it compares."""
        with self._lock:
            return {name: self._describe_alias(alias) for name, alias in sorted(self._aliases.items())}

    def _describe_alias(self, alias: Alias) -> dict[str, Any]:
        rollout = alias.rollout
        return {
            "shares": dict(alias.shares),
            "baseline": alias.baseline,
            "rollout": None
            if rollout is None
            else {
                "candidate": rollout.candidate,
                "schedule": rollout.schedule,
                "step": rollout.step,
                "state": rollout.state,
                "step_requests": rollout.step_requests,
            },
            "health": {a: self._stats_of(a).summary() for a in alias.shares},
            "events": list(alias.events),
        }

    def health(self, adapter: str) -> dict[str, Any]:
        with self._lock:
            return self._stats_of(adapter).summary()


def check_share_sum(alias: str, shares: dict[str, float]) -> None:
    """Shares are fractions of the alias's traffic: they add up to 1 (``bot=a:0.9,b:0.3`` would be
    shown as 90%/30% while a gets 75%)."""
    total = sum(shares.values())
    if total <= 0:
        raise ValueError(f"alias '{alias}': every share is 0; at least one adapter needs traffic")
    if abs(total - 1) > 1e-6:
        given = " + ".join(f"{v:g}" for v in shares.values())
        raise ValueError(
            f"alias '{alias}': shares add up to {total:g} ({given}); make them add up to 1, "
            f"e.g. {','.join(f'{k}:{v / total:.3g}' for k, v in shares.items())}"
        )


def parse_alias(text: str) -> tuple[str, dict[str, float]]:
    """``support-bot=a:0.9,b:0.1`` → ("support-bot", {"a": 0.9, "b": 0.1}); the first is the baseline."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise ValueError(
            f"--alias {text!r}: write ALIAS=ADAPTER:SHARE[,ADAPTER:SHARE...], e.g. bot=a:0.9,b:0.1"
        )
    shares: dict[str, float] = {}
    for part in rest.split(","):
        # The share follows the last colon: a variant may be a base name such as tiny:llama.
        adapter, colon, share = part.strip().rpartition(":")
        adapter = adapter if colon else share
        try:
            shares[adapter] = float(share) if colon else 1.0
        except ValueError:
            raise ValueError(f"--alias {text!r}: share {share!r} of '{adapter}' is not a number") from None
    return name, shares


def parse_rollout(text: str) -> tuple[str, list[float]]:
    """``support-bot=0.05,0.25,1`` → ("support-bot", [0.05, 0.25, 1.0])."""
    name, sep, rest = text.partition("=")
    try:
        schedule = [float(s) for s in rest.split(",")]
    except ValueError:
        schedule = []
    if not sep or not name or not schedule:
        raise ValueError(f"--rollout {text!r}: write ALIAS=SHARE,SHARE,..., e.g. bot=0.05,0.25,1.0")
    return name, schedule
