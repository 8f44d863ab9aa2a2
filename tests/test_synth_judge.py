"""`data judge`, `data constitute` and the judge reward: verdict parsing, position swapping, pairs with
reasons and provenance, agreement with human labels, critique-and-revise rounds, the cache on re-runs,
on tiny:llama, a real `tunelab serve` on loopback and a scripted judge behind a real HTTP socket."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.data.loaders import DataError
from tunelab.recipe import parse_recipe
from tunelab.serve.server import BackgroundServer, ServeConfig, build_app
from tunelab.synth import constitute as cai
from tunelab.synth import preferences as prefs
from tunelab.synth.client import GenSettings
from tunelab.synth.judge import Judge, JudgeReward, combine, parse_rating, parse_verdict
from tunelab.train.rewards import load_reward

PAIR = re.compile(
    r"## Answer of assistant A\n(.*)\n\n## Answer of assistant B\n(.*)\n\n## Verdict\n", re.DOTALL
)
RATED = re.compile(r"## Answer to rate\n(.*)\n\n## Verdict\n", re.DOTALL)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def prefers_longer(messages: list[dict]) -> str:
    """A fair judge: the longer answer wins, wherever it is shown; equal lengths tie."""
    user = messages[-1]["content"]
    if (rated := RATED.search(user)) is not None:
        return f"[[{min(10, 1 + len(rated.group(1)) // 4)}]] Looks fine."
    a, b = PAIR.search(user).groups()
    verdict = "A" if len(a) > len(b) else "B" if len(b) > len(a) else "C"
    return f"[[{verdict}]] The better answer is longer."


def always_first(messages: list[dict]) -> str:
    """A position-biased judge: whatever is shown first wins."""
    return "A is shown first. [[A]]"


class FakeGenerator:
    """A scripted Generator: answers each conversation with ``answer(conversation)``; records calls."""

    def __init__(self, answer: Callable[[list[dict]], str], name: str = "fake") -> None:
        self.answer, self.name, self.seen = answer, name, []

    def chat(self, conversations, settings, *, desc="generating"):  # type: ignore[no-untyped-def]
        self.seen += conversations
        return [self.answer(c) for c in conversations]


def item(prompt: str, *answers: str, human: int | None = None) -> prefs.Item:
    candidates = [
        prefs.Candidate([{"role": "assistant", "content": a}], f"m{k}", k) for k, a in enumerate(answers)
    ]
    return prefs.Item(0, [{"role": "user", "content": prompt}], candidates, human)


# -- parsing and the two orders -------------------------------------------------------------------


def test_verdicts_and_ratings_are_read_from_the_judges_text() -> None:
    assert parse_verdict("blah [[A]]") == "A"
    assert parse_verdict("[[B]] because ... unlike [[A]]") == "B"  # the first verdict counts (asked first)
    assert parse_verdict("Verdict: tie") == "tie" and parse_verdict("no idea") is None
    assert parse_verdict("Overall, Assistant B is better.") == "B"
    assert parse_rating("I would give it 6/10.") == 6.0
    assert parse_rating("good.\nRating: [[7]]") == 7.0
    assert parse_rating("Score: 3") == 3.0
    assert parse_rating("Rating: [[11]]") is None and parse_rating("nothing") is None


def test_both_orders_must_agree_for_a_winner() -> None:
    assert combine("A", "B") == "x"  # x shown first won, and x shown second won
    assert combine("B", "A") == "y"
    assert combine("A", "A") == "tie"  # position decided both times: no winner
    assert combine("tie", "A") == "tie"
    assert combine(None, "A") is None


def test_pairwise_judging_swaps_positions() -> None:
    items = [item("Say hi", "hi", "hi there, how are you")]
    fair = FakeGenerator(prefers_longer)
    (outcome,) = prefs.judge_pairwise(Judge(fair), items)
    assert (outcome.chosen, outcome.rejected) == (1, 0)
    assert outcome.judge["position_consistent"] is True
    shown_first = [PAIR.search(c[-1]["content"]).group(1) for c in fair.seen]
    assert shown_first == ["hi", "hi there, how are you"]  # each order asked once

    biased = FakeGenerator(always_first)
    (outcome,) = prefs.judge_pairwise(Judge(biased), items)
    assert outcome.chosen is None and outcome.reason == prefs.TIE  # a first-position bias is a tie


def test_pairwise_over_several_candidates_pairs_most_wins_with_fewest() -> None:
    items = [item("q", "bb", "a", "cccc")]
    (outcome,) = prefs.judge_pairwise(Judge(FakeGenerator(prefers_longer)), items)
    assert outcome.judge["wins"] == [1.0, 0.0, 2.0]
    assert (outcome.chosen, outcome.rejected) == (2, 1)


def test_pointwise_scores_and_the_margin() -> None:
    judge = Judge(FakeGenerator(prefers_longer))
    (kept,) = prefs.judge_pointwise(judge, [item("q", "x" * 30, "x")])
    assert kept.judge["scores"] == [8.0, 1.0] and (kept.chosen, kept.rejected) == (0, 1)
    assert len(kept.judge["reasons"]) == 2
    (close,) = prefs.judge_pointwise(judge, [item("q", "x" * 8, "x" * 5)], min_margin=2.0)
    assert close.judge["scores"] == [3.0, 2.0]
    assert close.chosen is None and close.reason == prefs.TIE  # a gap under --min-margin is a tie
    (unread,) = prefs.judge_pointwise(Judge(FakeGenerator(lambda m: "fine")), [item("q", "a", "bb")])
    assert unread.reason == prefs.UNREADABLE
    (alone,) = prefs.judge_pointwise(judge, [item("q", "only one")])
    assert alone.reason == prefs.TOO_FEW


def test_agreement_with_human_labels() -> None:
    items = [
        item("q1", "long answer here", "short", human=0),  # judge agrees
        item("q2", "short", "long answer here", human=0),  # judge disagrees
        item("q3", "same", "same", human=0),  # a tie
        item("q4", "longer one", "x"),  # no label: not counted
    ]
    outcomes = prefs.judge_pairwise(Judge(FakeGenerator(prefers_longer)), items)
    stats = prefs.agreement(outcomes)
    assert {k: stats[k] for k in ("labelled", "agree", "disagree", "tie")} == {
        "labelled": 3,
        "agree": 1,
        "disagree": 1,
        "tie": 1,
    }
    assert stats["rate"] == pytest.approx(1 / 3) and stats["rate_without_ties"] == 0.5
    row = prefs.pair_row(outcomes[0], Judge(FakeGenerator(prefers_longer)), GenSettings())
    assert row["judge"]["agrees_with_human"] is True
    assert prefs.agreement(outcomes[3:]) is None


def test_sampled_candidates_use_one_seed_each_and_drop_duplicates() -> None:
    items = [prefs.Item(1, [{"role": "user", "content": "q"}])]
    seeds: list[int] = []

    class Seeded(FakeGenerator):
        def chat(self, conversations, settings, *, desc="generating"):  # type: ignore[no-untyped-def]
            seeds.append(settings.seed)
            return ["same" if settings.seed < 7 else "other"] * len(conversations)

    prefs.sample_candidates(items, [Seeded(str)], 3, GenSettings(seed=5))
    assert seeds == [5, 6, 7]
    assert [c.text for c in items[0].candidates] == ["same", "other"]  # equal answers kept once
    assert [c.seed for c in items[0].candidates] == [5, 7]


# -- constitute -----------------------------------------------------------------------------------


def test_default_constitution_loads_and_bad_ones_are_refused(tmp_path: Path) -> None:
    principles = cai.load_constitution()
    assert len(principles) >= 6 and all(p.critique and p.revision for p in principles)
    bad = tmp_path / "c.yaml"
    bad.write_text("- critique: find harm\n- critique: x\n  revision: ''\n")
    with pytest.raises(DataError, match="revision"):
        cai.load_constitution(bad)
    bad.write_text("principles: {}\n")
    with pytest.raises(DataError, match="non-empty YAML list"):
        cai.load_constitution(bad)


def test_constitute_critiques_and_revises_for_each_round() -> None:
    principles = [
        cai.Principle("p1", "CRITIQUE-1", "REVISE-1"),
        cai.Principle("p2", "CRITIQUE-2", "REVISE-2"),
    ]

    def model(conversation: list[dict]) -> str:
        last = conversation[-1]["content"]
        if last.startswith("CRITIQUE"):
            return "too short"
        if last.startswith("REVISE"):
            return "Revision: " + conversation[-4]["content"] + " (better)"
        return "first answer"

    gen = FakeGenerator(model, name="fake-model")
    items = [
        prefs.Item(3, [{"role": "user", "content": "Help me"}]),
        prefs.Item(4, [{"role": "user", "content": "x"}]),
    ]
    traces = cai.constitute(gen, items, principles, rounds=2, settings=GenSettings(seed=1))
    assert traces[0].original == "first answer"
    assert traces[0].final == "first answer (better) (better)"  # two rounds, the label "Revision:" cut
    assert [r["principle"] for r in traces[0].rounds] == [
        cai.draw(principles, 1, 3, r).name for r in range(2)
    ]
    sft, sft_dropped, pairs, pairs_dropped = cai.outputs(traces, gen.name, GenSettings(seed=1), "default")
    assert sft[0]["messages"][-1] == {"role": "assistant", "content": "first answer (better) (better)"}
    assert (
        pairs[0]["chosen"][0]["content"].endswith("(better)")
        and pairs[0]["rejected"][0]["content"] == "first answer"
    )
    meta = pairs[0]["provenance"]
    assert meta["model"] == "fake-model" and meta["source_row"] == 3 and len(meta["rounds"]) == 2
    assert meta["rounds"][0]["critique"] == "too short"
    assert not sft_dropped and not pairs_dropped


def test_unchanged_and_empty_revisions_give_no_pair() -> None:
    principles = [cai.Principle("p", "CRIT", "REV")]
    same = FakeGenerator(lambda c: "answer" if c[-1]["content"] != "CRIT" else "fine as is")
    items = [prefs.Item(1, [{"role": "user", "content": "q"}])]
    traces = cai.constitute(same, items, principles, rounds=1)
    assert traces[0].final == "answer"
    sft, _, pairs, dropped = cai.outputs(traces, "m", GenSettings(), "default")
    assert len(sft) == 1 and not pairs and dropped[0][1] == cai.UNCHANGED
    empty = FakeGenerator(lambda c: "")
    sft, sft_dropped, pairs, _ = cai.outputs(
        cai.constitute(empty, items, principles), "m", GenSettings(), "d"
    )
    assert not sft and sft_dropped[0][1] == cai.EMPTY


# -- the judge as a reward ------------------------------------------------------------------------


def test_judge_reward_rates_completions_and_parses_from_a_recipe() -> None:
    fake = FakeGenerator(prefers_longer)
    reward = JudgeReward(Judge(fake), unparsed_score=5.5)
    chat = [{"role": "user", "content": "Say hi"}]
    assert reward(["<s>Say hi", "plain prompt"], ["x" * 12, "x"], [chat, None]) == [4.0, 1.0]
    assert fake.seen[0][-1]["content"].startswith("## Conversation\n[user]\nSay hi")
    assert "[user]\nplain prompt" in fake.seen[1][-1]["content"]  # no conversation: the prompt text
    unread = JudgeReward(Judge(FakeGenerator(lambda m: "no rating")), unparsed_score=5.5)
    assert unread(["p"], ["c"], [None]) == [5.5] and unread.unreadable == 1

    raw = {
        "model": {"name_or_path": "tiny:llama"},
        "data": {"train": "x.jsonl"},
        "method": {"name": "full"},
        "objective": {"name": "grpo", "reward": {"judge": "http://127.0.0.1:1/v1#j", "rubric": "be brief"}},
    }
    recipe = parse_recipe(raw)
    assert recipe.objective.reward.judge == "http://127.0.0.1:1/v1#j"
    assert recipe.objective.reward.rubric == "be brief"
    raw["objective"]["reward"] = {"judge": "tiny:llama", "bogus": 1}
    with pytest.raises(ValueError, match=r"objective\.reward\.bogus: unknown key"):
        parse_recipe(raw)
    raw["objective"]["reward"] = {"rubric": "no judge named"}  # the mapping's own error, not the string's
    with pytest.raises(ValueError, match=r"^recipe: objective\.reward\.judge: required field is missing$"):
        parse_recipe(raw)


# -- through real HTTP: `tunelab serve` for candidates, a scripted judge server --------------------


class ScriptedJudge:
    """An OpenAI-compatible server whose answers come from a Python function; counts requests."""

    def __init__(self, answer: Callable[[list[dict]], str]) -> None:
        self.requests = 0
        api = FastAPI()

        @api.get("/v1/models")
        def models() -> dict:
            return {
                "object": "list",
                "data": [{"id": "judge", "object": "model", "created": 0, "owned_by": "t"}],
            }

        @api.post("/v1/chat/completions")
        def chat(body: dict) -> dict:
            self.requests += 1
            message = {"role": "assistant", "content": answer(body["messages"])}
            choice = {"index": 0, "message": message, "finish_reason": "stop"}
            return {
                "id": "j",
                "object": "chat.completion",
                "created": 0,
                "model": "judge",
                "choices": [choice],
            }

        self.server = BackgroundServer(api)


class Served:
    """`tunelab serve` with tiny:llama on loopback, counting chat requests."""

    def __init__(self) -> None:
        self.requests = 0
        api = build_app(ServeConfig(base="tiny:llama", device="cpu", max_tokens_limit=512))

        @api.middleware("http")
        async def count(request, call_next):  # type: ignore[no-untyped-def]
            if request.url.path.endswith("/chat/completions"):
                self.requests += 1
            return await call_next(request)

        self.server = BackgroundServer(api)


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[Served, ScriptedJudge]]:
    served, judge = Served(), ScriptedJudge(prefers_longer)
    with served.server, judge.server:
        yield served, judge


PROMPTS = [{"prompt": p} for p in ("Say hi", "Name a colour", "Count to three", "Name an animal")]


def judge_args(tmp_path: Path, served: Served, judge: ScriptedJudge, *extra: str) -> list[str]:
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    return [
        "data", "judge", str(prompts), "--output", str(tmp_path / "pairs.jsonl"),
        "--model", f"{served.server.url}/v1", "--judge", f"{judge.server.url}/v1#judge",
        "--candidates", "2", "--max-tokens", "12", "--cache-dir", str(tmp_path / "cache"), *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def candidates() -> Iterator[ScriptedJudge]:
    """A candidate model with clean text of varied lengths: tiny:llama's answers are byte soup (U+FFFD,
    control characters) that the closing audit drops, so pairs are checked on answers it keeps."""
    made = iter(range(10**6))

    def answer(messages: list[dict]) -> str:
        k = next(made)
        return f"Candidate answer number {k} " + "with more words " * (k % 4)

    server = ScriptedJudge(answer)
    with server.server:
        yield server


def test_judge_command_over_http_writes_pairs_and_a_rerun_hits_the_cache(
    servers, candidates, tmp_path: Path
) -> None:
    served, judge = candidates, servers[1]
    before_served, before_judge = served.requests, judge.requests
    result = CliRunner().invoke(app, judge_args(tmp_path, served, judge))
    assert result.exit_code == 0, result.output
    rows = read_jsonl(tmp_path / "pairs.jsonl")
    rejects = read_jsonl(tmp_path / "pairs.jsonl.rejects.jsonl")
    assert len(rows) + len(rejects) == 4 and rows
    assert served.requests - before_served == 8  # 4 prompts x 2 candidates
    assert judge.requests - before_judge == 2 * len(rows + [r for r in rejects if r["row"].get("judge")])
    row = rows[0]
    chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
    assert len(chosen) > len(rejected)  # the scripted judge's rule, whichever position each had
    assert row["judge"]["mode"] == "pairwise" and row["judge"]["position_consistent"] is True
    assert len(row["judge"]["reasons"]) == 2 and "[[" in row["judge"]["reasons"][0]
    assert row["judge"]["model"].endswith("#judge")
    assert row["provenance"]["chosen"]["model"] == f"endpoint:{served.server.url}/v1#judge"
    assert {row["provenance"]["chosen"]["seed"], row["provenance"]["rejected"]["seed"]} == {0, 1}
    assert "kept" in result.output

    counts = served.requests, judge.requests
    again = CliRunner().invoke(app, [*judge_args(tmp_path, served, judge), "--overwrite"])
    assert again.exit_code == 0, again.output
    assert (served.requests, judge.requests) == counts  # a re-run is answered by the cache
    assert read_jsonl(tmp_path / "pairs.jsonl") == rows


def test_judge_command_reports_agreement_with_human_labels(servers, tmp_path: Path) -> None:
    _, judge = servers
    labelled = [
        {"prompt": "q1", "chosen": "a long and careful answer", "rejected": "meh"},
        {"prompt": "q2", "chosen": "ok", "rejected": "a longer answer the human did not like"},
    ]
    data = write_jsonl(tmp_path / "labelled.jsonl", labelled)
    args = [
        "data",
        "judge",
        str(data),
        "--output",
        str(tmp_path / "p.jsonl"),
        "--judge",
        f"{judge.server.url}/v1",
    ]
    result = CliRunner().invoke(app, [*args, "--mode", "pointwise", "--no-cache"])
    assert result.exit_code == 0, result.output
    assert "judge vs human labels" in result.output and "50%" in result.output
    rows = read_jsonl(tmp_path / "p.jsonl")
    assert [r["judge"]["agrees_with_human"] for r in rows] == [True, False]
    assert rows[1]["chosen"][0]["content"].startswith("a longer answer")  # the judge's preference is written


def test_judge_command_errors_are_one_line(servers, tmp_path: Path) -> None:
    _, judge = servers
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    runner = CliRunner()
    no_model = runner.invoke(
        app, ["data", "judge", str(prompts), "--output", str(tmp_path / "o.jsonl"), "--judge", "x"]
    )
    assert no_model.exit_code == 2 and "need --model" in no_model.output
    same = runner.invoke(
        app, ["data", "judge", str(prompts), "--output", str(prompts), "--judge", "x", "--model", "y"]
    )
    assert same.exit_code == 2 and "is the input file" in same.output
    assert prompts.read_text().count("\n") == 4  # the input is untouched
    mode = runner.invoke(
        app,
        ["data", "judge", str(prompts), "--output", str(tmp_path / "o.jsonl"), "--judge", "x", "--mode", "x"],
    )
    assert mode.exit_code == 2 and "--mode must be" in mode.output
    for result in (no_model, same, mode):
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_judge_and_constitute_on_the_local_tiny_model(tmp_path: Path) -> None:
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS[:2])
    common = ["--max-tokens", "8", "--device", "cpu", "--cache-dir", str(tmp_path / "cache")]
    runner = CliRunner()
    judged = runner.invoke(
        app,
        ["data", "judge", str(prompts), "--output", str(tmp_path / "j.jsonl"), "--model", "tiny:llama",
         "--judge", "tiny:llama", "--judge-max-tokens", "8", *common],
    )  # fmt: skip
    assert judged.exit_code == 0, judged.output
    # A random 2-layer model writes no verdict: every item is dropped as unreadable, and said so.
    rejects = read_jsonl(tmp_path / "j.jsonl.rejects.jsonl")
    assert [r["reason"] for r in rejects] == [prefs.UNREADABLE] * 2
    assert rejects[0]["row"]["candidates"][0]["model"] == "tiny:llama"

    made = runner.invoke(
        app, ["data", "constitute", str(prompts), "--output", str(tmp_path / "sft.jsonl"), "--model", "tiny:llama",
              "--rounds", "2", *common],
    )  # fmt: skip
    assert made.exit_code == 0, made.output
    sft = read_jsonl(tmp_path / "sft.jsonl") + [
        r["row"] for r in read_jsonl(tmp_path / "sft.jsonl.rejects.jsonl")
    ]
    assert len(sft) == 2
    meta = sft[0]["provenance"]
    assert meta["command"] == "constitute" and meta["model"] == "tiny:llama" and len(meta["rounds"]) == 2
    assert meta["rounds"][0]["principle"] in {p.name for p in cai.load_constitution()}
    pairs = read_jsonl(tmp_path / "sft.pairs.jsonl")
    assert all(p["rejected"][0]["content"] == p["provenance"]["original"] for p in pairs)


def test_constitute_refuses_a_bad_constitution(tmp_path: Path) -> None:
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS[:1])
    bad = tmp_path / "c.yaml"
    bad.write_text("- critique: only a critique\n")
    result = CliRunner().invoke(
        app, ["data", "constitute", str(prompts), "--output", str(tmp_path / "o.jsonl"), "--model", "tiny:llama",
              "--constitution", str(bad)],
    )  # fmt: skip
    assert result.exit_code == 2 and "revision" in result.output and str(bad) in result.output
    assert not (tmp_path / "o.jsonl").exists()


def test_judge_reward_from_an_endpoint_spec(servers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path))  # the reward's generation cache
    _, judge = servers
    before = judge.requests
    recipe_reward = parse_recipe(
        {
            "model": {"name_or_path": "tiny:llama"},
            "data": {"train": "x.jsonl"},
            "method": {"name": "full"},
            "objective": {"name": "grpo", "reward": {"judge": f"{judge.server.url}/v1"}},
        }
    ).objective.reward
    reward = load_reward(recipe_reward)
    scores = reward(["q", "q"], ["a" * 40, "a"], [None, None])
    assert scores == [10.0, 1.0] and judge.requests - before == 2


@pytest.mark.slow
def test_grpo_trains_on_judge_rewards(servers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tunelab.train.run import train  # noqa: PLC0415

    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path))
    _, judge = servers
    before = judge.requests
    data = write_jsonl(
        tmp_path / "prompts.jsonl", [{"instruction": p["prompt"], "output": "x"} for p in PROMPTS]
    )
    recipe = parse_recipe(
        {
            "seed": 0,
            "model": {"name_or_path": "tiny:llama"},
            "data": {"train": str(data), "max_length": 64},
            "method": {"name": "full"},
            "objective": {
                "name": "grpo",
                "num_generations": 2,
                "max_new_tokens": 8,
                "reward": {"judge": f"{judge.server.url}/v1#judge", "rubric": "longer is better"},
            },
            "training": {"max_steps": 2, "batch_size": 4, "learning_rate": 1e-3, "warmup_steps": 0},
            "output": {"dir": str(tmp_path / "runs"), "name": "judge-grpo"},
        }
    )
    result = train(recipe)
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward_mean"] for r in rows if "reward_mean" in r]
    assert len(rewards) == 2 and all(1.0 <= r <= 10.0 for r in rewards)
    assert judge.requests - before == 16  # 2 steps x 4 prompts x 2 completions, each rated once


def test_judge_output_goes_through_the_closing_audit(servers, tmp_path: Path) -> None:
    _, judge = servers
    labelled = [
        {"prompt": "Plant a leak", "chosen": "a long and careful answer", "rejected": "meh"},
        {"prompt": "Keep me", "chosen": "another long careful answer", "rejected": "nah"},
    ]
    data = write_jsonl(tmp_path / "labelled.jsonl", labelled)
    held_out = write_jsonl(tmp_path / "eval.jsonl", [{"instruction": "Plant a leak", "output": "anything"}])
    args = ["data", "judge", str(data), "-o", str(tmp_path / "p.jsonl"), "--judge", f"{judge.server.url}/v1"]
    result = CliRunner().invoke(app, [*args, "--eval", str(held_out), "--no-cache", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["kept"] == 1 and summary["dropped_by"] == {"audit": {"eval_leak": 1}}
    assert [r["prompt"][0]["content"] for r in read_jsonl(tmp_path / "p.jsonl")] == ["Keep me"]
    (leak,) = read_jsonl(tmp_path / "p.jsonl.rejects.jsonl")
    assert leak["reason"] == "eval_leak" and leak["row"]["judge"]["reasons"]  # dropped with its reasons


def test_constitute_over_http_and_a_rerun_hits_the_cache(servers, tmp_path: Path) -> None:
    served, _ = servers
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS[:2])
    args = [
        "data", "constitute", str(prompts), "-o", str(tmp_path / "sft.jsonl"), "--endpoint", served.server.url,
        "--pairs", str(tmp_path / "pairs.jsonl"), "--max-tokens", "8", "--cache-dir", str(tmp_path / "cache"),
    ]  # fmt: skip
    before = served.requests
    first = CliRunner().invoke(app, [*args, "--json"])
    assert first.exit_code == 0, first.output
    assert served.requests - before == 6  # 2 prompts x (answer, critique, revision)
    summary = json.loads(first.output.strip().splitlines()[-1])
    assert summary["model"] == f"endpoint:{served.server.url}/v1#tiny:llama" and summary["prompts"] == 2
    made = read_jsonl(tmp_path / "sft.jsonl") + [
        r["row"] for r in read_jsonl(tmp_path / "sft.jsonl.rejects.jsonl")
    ]
    assert sorted(r["provenance"]["source_row"] for r in made) == [1, 2]
    again = CliRunner().invoke(app, [*args, "--overwrite"])
    assert again.exit_code == 0, again.output
    assert served.requests - before == 6  # the re-run is answered by the cache


def test_a_judge_that_cannot_load_fails_before_any_candidate_is_sampled(servers, tmp_path: Path) -> None:
    served, _ = servers
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    before = served.requests
    args = [
        "data",
        "judge",
        str(prompts),
        "-o",
        str(tmp_path / "o.jsonl"),
        "--model",
        f"{served.server.url}/v1",
    ]
    result = CliRunner().invoke(app, [*args, "--judge", str(tmp_path / "no-such-model")])
    assert result.exit_code == 2 and "cannot load model" in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert served.requests == before and not (tmp_path / "o.jsonl").exists()
