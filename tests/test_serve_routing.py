"""The serving logic that needs no model: routing, A/B stickiness, watcher rollback, rollout, stop
strings, bind safety. A fake clock drives every time-dependent rule; nothing sleeps."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from tunelab.serve.engine import StopScanner, truncate_at_stop
from tunelab.serve.routing import Router, WatchPolicy, bucket, parse_alias, parse_rollout, pick
from tunelab.serve.security import check_bearer, check_bind, is_loopback


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


POLICY = WatchPolicy(min_samples=5, window=50, max_age_s=100)


def make_router(clock: FakeClock | None = None, **alias_kw: object) -> Router:
    router = Router("base", ["stable", "canary"], POLICY, clock=clock or FakeClock(), wall_clock=lambda: 0.0)
    router.set_alias("bot", {"stable": 0.5, "canary": 0.5}, **alias_kw)
    return router


def feed(router: Router, adapter: str, n: int, *, ok: bool = True, latency: float = 0.1) -> None:
    for _ in range(n):
        router.observe(adapter, ok, latency, alias="bot")


def test_bucket_is_stable_and_spreads_users() -> None:
    points = [bucket(f"user-{i}", "bot") for i in range(2000)]
    assert points[:5] == [bucket(f"user-{i}", "bot") for i in range(5)]
    assert all(0 <= p < 1 for p in points)
    assert 0.45 < sum(p < 0.5 for p in points) / len(points) < 0.55
    assert bucket("user-1", "bot") != bucket("user-1", "other-alias")


def test_pick_walks_cumulative_shares_in_order_and_skips_zero() -> None:
    shares = {"a": 0.9, "b": 0.1}
    assert pick(shares, 0.0) == "a" and pick(shares, 0.899) == "a" and pick(shares, 0.95) == "b"
    assert pick({"a": 0.0, "b": 0.3}, 0.1) == "b"
    with pytest.raises(ValueError, match="every share is 0"):
        pick({"a": 0.0}, 0.5)


def test_growing_the_candidate_share_only_moves_users_into_it() -> None:
    router = make_router()
    users = [f"u{i}" for i in range(300)]
    before = {u: router.resolve("bot", u)[0] for u in users}
    router.set_alias("bot", {"stable": 0.25, "canary": 0.75})
    after = {u: router.resolve("bot", u)[0] for u in users}
    assert all(after[u] == "canary" for u in users if before[u] == "canary")
    assert sum(a == "canary" for a in after.values()) > sum(b == "canary" for b in before.values())


def test_resolve_names_base_adapter_alias_and_unknown() -> None:
    router = make_router()
    assert router.resolve("base", None) == (None, None)
    assert router.resolve("canary", None) == ("canary", None)
    assert router.resolve("bot", "alice") == (router.resolve("bot", "alice")[0], "bot")
    with pytest.raises(KeyError):
        router.resolve("nope", None)


def test_error_rate_increase_rolls_the_candidate_back_with_the_reason() -> None:
    router = make_router()
    feed(router, "stable", 10)
    feed(router, "canary", 4, ok=False)
    assert router.describe()["bot"]["shares"]["canary"] == 0.5  # 4 samples < min_samples: not judged yet
    feed(router, "canary", 1, ok=False)
    described = router.describe()["bot"]
    assert described["shares"] == {"stable": 1.0, "canary": 0.0}
    assert described["events"][-1]["kind"] == "rollback"
    assert "error rate 100.0% vs baseline 0.0%" in described["events"][-1]["message"]
    assert all(router.resolve("bot", f"u{i}")[0] == "stable" for i in range(50))


def test_latency_ratio_and_feedback_drop_each_trigger_rollback() -> None:
    slow = make_router()
    feed(slow, "stable", 10, latency=0.1)
    feed(slow, "canary", 10, latency=0.19)
    assert slow.describe()["bot"]["shares"]["canary"] == 0.5  # ×1.9 is within ×2
    feed(slow, "canary", 10, latency=0.5)
    assert slow.describe()["bot"]["shares"]["canary"] == 0.0
    assert "p95 latency" in slow.describe()["bot"]["events"][-1]["message"]

    disliked = make_router()
    for _ in range(5):
        disliked.feedback("stable", 1.0)
        disliked.feedback("canary", 0.6)
    assert disliked.describe()["bot"]["shares"]["canary"] == 0.5  # a drop of 0.4 is allowed
    for _ in range(5):
        disliked.feedback("canary", -1.0)
    assert disliked.describe()["bot"]["shares"]["canary"] == 0.0
    assert "mean feedback" in disliked.describe()["bot"]["events"][-1]["message"]


def test_old_samples_leave_the_window() -> None:
    clock = FakeClock()
    router = make_router(clock)
    feed(router, "canary", 5, ok=False)
    clock.now += POLICY.max_age_s + 1
    assert router.health("canary")["requests"] == 0
    feed(router, "stable", 10)
    feed(router, "canary", 5)
    assert router.describe()["bot"]["shares"]["canary"] == 0.5


def test_rollout_advances_on_healthy_requests_and_finishes() -> None:
    router = Router("base", ["stable", "canary"], POLICY, clock=FakeClock())
    router.set_alias("bot", {"stable": 1.0, "canary": 0.0}, rollout=[0.1, 0.5, 1.0], rollout_every=5)
    assert router.describe()["bot"]["shares"] == {"stable": 0.9, "canary": 0.1}
    feed(router, "stable", 10)
    feed(router, "canary", 5)
    assert router.describe()["bot"]["shares"] == {"stable": 0.5, "canary": 0.5}
    feed(router, "canary", 4)
    assert router.describe()["bot"]["rollout"]["step"] == 1
    feed(router, "canary", 1)
    assert router.describe()["bot"]["shares"] == {"stable": 0.0, "canary": 1.0}
    feed(router, "canary", 5)
    assert router.describe()["bot"]["rollout"]["state"] == "done"


def test_rollout_waits_for_a_baseline_to_compare_with_and_stops_at_rollback() -> None:
    router = Router("base", ["stable", "canary"], POLICY, clock=FakeClock())
    router.set_alias("bot", {"stable": 1.0, "canary": 0.0}, rollout=[0.1, 1.0], rollout_every=3)
    feed(router, "canary", 10)
    assert router.describe()["bot"]["rollout"]["step"] == 0  # no baseline data: not judged, no advance
    feed(router, "stable", 10)
    feed(router, "canary", 10, ok=False)
    described = router.describe()["bot"]
    assert described["rollout"]["state"] == "rolled_back"
    assert described["shares"] == {"stable": 1.0, "canary": 0.0}


def test_time_based_rollout_advances_on_the_timer_check() -> None:
    clock = FakeClock()
    router = Router("base", ["stable", "canary"], POLICY, clock=clock)
    router.set_alias("bot", {"stable": 1, "canary": 0}, rollout=[0.2, 1.0], rollout_every_seconds=60)
    feed(router, "stable", 5)
    feed(router, "canary", 5)
    assert router.check() == []
    clock.now += 61
    assert "share → 1" in router.check()[0]
    assert router.describe()["bot"]["shares"]["canary"] == 1.0


def test_an_adapter_an_alias_routes_to_cannot_be_removed() -> None:
    router = make_router()
    with pytest.raises(ValueError, match="still routed to by alias"):
        router.remove_adapter("canary")
    router.set_alias("bot", {"stable": 1.0, "canary": 0.0})
    router.remove_adapter("canary")
    assert router.adapters == ["stable"]
    with pytest.raises(ValueError, match="already the base model"):
        router.add_adapter("base")


def test_bad_alias_definitions_are_refused_with_the_reason() -> None:
    router = make_router()
    with pytest.raises(ValueError, match="unknown adapter"):
        router.set_alias("x", {"ghost": 1.0})
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        router.set_alias("x", {"stable": 1.5})
    with pytest.raises(ValueError, match="already an adapter"):
        router.set_alias("stable", {"canary": 1.0})
    with pytest.raises(ValueError, match="exactly one adapter besides"):
        router.set_alias("x", {"stable": 1.0}, rollout=[0.5])
    assert parse_alias("bot=a:0.9,b:0.1") == ("bot", {"a": 0.9, "b": 0.1})
    assert parse_rollout("bot=0.05,0.25,1") == ("bot", [0.05, 0.25, 1.0])
    with pytest.raises(ValueError, match="ALIAS=ADAPTER:SHARE"):
        parse_alias("bot")


def test_truncate_at_stop_cuts_at_the_earliest_stop() -> None:
    assert truncate_at_stop("one two three", ["three", "two"]) == ("one ", True)
    assert truncate_at_stop("one two", ["four"]) == ("one two", False)
    assert truncate_at_stop("abc", []) == ("abc", False)


def test_stop_scanner_never_sends_a_stop_string_or_its_start() -> None:
    scanner = StopScanner(["END"])
    sent = [
        scanner.feed(t)
        for t in ("hel", "hello E", "hello EN", "hello ENx", "hello ENx E", "hello ENx END more")
    ]
    assert sent == ["hel", "lo ", "", "ENx", " ", ""]
    assert scanner.stopped and scanner.text == "hello ENx "
    assert "".join(sent) + scanner.flush() == "hello ENx "
    free = StopScanner(["END"])
    assert free.feed("done E") == "done " and free.flush() == "E"  # generation ended: the held tail is text


def test_bind_rules_and_bearer_check() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0")
    check_bind("127.0.0.1", None)
    check_bind("0.0.0.0", "secret")
    with pytest.raises(ValueError, match="without an API key"):
        check_bind("0.0.0.0", None)
    check_bearer("Bearer secret", "secret")
    with pytest.raises(Exception, match="wrong API key"):
        check_bearer("Bearer nope", "secret")
    with pytest.raises(Exception, match="admin endpoints are disabled"):
        check_bearer(None, None, admin=True)


def test_serve_command_refuses_a_public_bind_without_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    from tunelab.cli import app

    monkeypatch.delenv("TUNELAB_API_KEY", raising=False)
    result = CliRunner().invoke(app, ["serve", "--base", "tiny:llama", "--host", "0.0.0.0"])
    assert result.exit_code == 2
    assert "without an API key" in result.output


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--port", "99999"], "error: --port 99999: give a port from 1 to 65535"),
        (["--port", "0"], "error: --port 0: give a port from 1 to 65535"),
        (["--queue-size", "0"], "error: --queue-size 0: give a whole number of at least 1"),
        (["--request-timeout", "0"], "error: --request-timeout 0: give a number of seconds above 0"),
    ],
)
def test_serve_command_refuses_out_of_range_numbers_in_one_line(
    monkeypatch: pytest.MonkeyPatch, options: list[str], message: str
) -> None:
    """`--port 99999` once loaded the model and then died in the socket layer with a traceback."""
    from tunelab.cli import app

    def never(config: object) -> None:
        raise AssertionError("the server must not start")

    monkeypatch.setattr("tunelab.serve.server.serve", never)
    result = CliRunner().invoke(app, ["serve", "--base", "tiny:llama", *options])
    assert result.exit_code == 2
    assert result.output.splitlines() == [message]


def test_shares_that_do_not_add_up_to_one_are_refused_with_a_fix() -> None:
    router = make_router()
    with pytest.raises(ValueError, match=r"shares add up to 1.2 \(0.9 \+ 0.3\); make them add up to 1, e.g."):
        router.set_alias("bot", {"stable": 0.9, "canary": 0.3})
    router.set_alias("bot", {"stable": 0.7, "canary": 0.3})  # 0.7 + 0.3 is 1 within float error


def test_a_rollback_is_undone_by_restore_with_a_fresh_window_and_its_rollout_resumed() -> None:
    router = Router("base", ["stable", "canary"], WatchPolicy(min_samples=2), clock=FakeClock())
    router.set_alias("bot", {"stable": 1.0, "canary": 0.0}, rollout=[0.2, 1.0], rollout_every=100)
    with pytest.raises(ValueError, match="no rollback to undo"):
        router.restore("bot")
    for _ in range(2):
        router.observe("stable", True, 0.1, alias="bot")
        router.observe("canary", False, 0.1, alias="bot")
    described = router.describe()["bot"]
    assert described["shares"] == {"stable": 1.0, "canary": 0.0}
    assert described["rollout"]["state"] == "rolled_back"
    router.restore("bot")
    described = router.describe()["bot"]
    assert described["shares"] == {"stable": 0.8, "canary": 0.2}
    assert described["rollout"]["state"] == "running"
    assert described["health"]["canary"]["requests"] == 0  # the faults that rolled it back are gone
    assert described["events"][-1]["kind"] == "restore"
    router.check()
    assert router.describe()["bot"]["shares"]["canary"] == 0.2  # not rolled back again at once
    with pytest.raises(KeyError):
        router.restore("nope")
