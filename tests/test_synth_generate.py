"""Generation client, `data synth`, `data augment` and the closing audit on tiny:llama and a real
`tunelab serve` on loopback."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tunelab.console import make_console
from tunelab.data.loaders import DataError
from tunelab.serve.server import BackgroundServer, ServeConfig, build_app
from tunelab.synth.client import (
    EndpointBackend,
    GenerationError,
    GenSettings,
    cache_key,
    normalise_endpoint,
    open_generator,
)

CONVS = [
    [{"role": "user", "content": "Say hi"}],
    [{"role": "user", "content": "Count to three please"}],
    [{"role": "user", "content": "Name a colour"}],
]


class Served:
    """A tiny-model `tunelab serve` app behind a real socket, counting the chat requests it answers."""

    def __init__(self) -> None:
        self.requests = 0
        app = build_app(ServeConfig(base="tiny:llama", device="cpu", max_tokens_limit=512))

        @app.middleware("http")
        async def count(request, call_next):  # type: ignore[no-untyped-def]
            if request.url.path.endswith("/chat/completions"):
                self.requests += 1
            return await call_next(request)

        self.server = BackgroundServer(app)


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    served = Served()
    with served.server:
        yield served


def quiet():
    return make_console(stderr=True, file=open("/dev/null", "w"))  # noqa: SIM115 - closed with the process


# -- the client ----------------------------------------------------------------------------------


def test_local_generation_is_batched_seeded_and_cached(tmp_path: Path) -> None:
    settings = GenSettings(max_tokens=12, temperature=0.9, seed=3)
    gen = open_generator("tiny:llama", cache_dir=tmp_path / "c", batch_size=2, device="cpu", console=quiet())
    first = gen.chat(CONVS, settings)
    assert len(first) == 3 and all(isinstance(a, str) for a in first)
    assert gen.model_calls == 3
    again = gen.chat(CONVS, settings)
    assert again == first and gen.model_calls == 3  # all from the cache: no model call
    # A fresh generator (a re-run) on the same cache: same rows, still no model call.
    rerun = open_generator("tiny:llama", cache_dir=tmp_path / "c", device="cpu", console=quiet())
    assert rerun.chat(CONVS, settings) == first and rerun.model_calls == 0
    # Without the cache, the same seed gives the same samples; another seed gives others.
    fresh = open_generator("tiny:llama", use_cache=False, batch_size=2, device="cpu", console=quiet())
    assert fresh.chat(CONVS, settings) == first
    other = fresh.chat(CONVS, GenSettings(max_tokens=12, temperature=0.9, seed=4))
    assert other != first and fresh.model_calls == 6


def test_cache_key_covers_model_conversation_and_settings() -> None:
    base = cache_key("m", CONVS[0], GenSettings())
    assert base == cache_key("m", CONVS[0], GenSettings())
    assert base != cache_key("n", CONVS[0], GenSettings())
    assert base != cache_key("m", CONVS[1], GenSettings())
    assert base != cache_key("m", CONVS[0], GenSettings(seed=1))
    assert base != cache_key("m", CONVS[0], GenSettings(stop=("x",)))


def test_stop_strings_cut_the_answer(tmp_path: Path) -> None:
    gen = open_generator("tiny:llama", use_cache=False, device="cpu", console=quiet())
    (full,) = gen.chat(CONVS[:1], GenSettings(max_tokens=24, temperature=0))
    cut_at = next(c for c in full[1:] if not c.isspace())
    (cut,) = gen.chat(CONVS[:1], GenSettings(max_tokens=24, temperature=0, stop=(cut_at,)))
    assert cut_at not in cut and full.startswith(cut)


def test_bad_model_spec_is_a_generation_error(tmp_path: Path) -> None:
    with pytest.raises(GenerationError, match="cannot load model"):
        open_generator(str(tmp_path / "nope"), console=quiet())
    with pytest.raises(GenerationError, match="no model"):
        open_generator(None, console=quiet())


def test_endpoint_url_normalised() -> None:
    assert normalise_endpoint("http://127.0.0.1:8000") == "http://127.0.0.1:8000/v1"
    assert normalise_endpoint("http://h:1/v1/") == "http://h:1/v1"
    assert normalise_endpoint("https://h/openai/v1") == "https://h/openai/v1"
    with pytest.raises(GenerationError, match="not an http"):
        normalise_endpoint("localhost:8000")


def test_endpoint_generation_and_cache_on_a_real_server(served: Served, tmp_path: Path) -> None:
    url = served.server.url
    settings = GenSettings(max_tokens=8, temperature=0.8, seed=5)
    gen = open_generator(endpoint=url, cache_dir=tmp_path / "c", concurrency=2, console=quiet())
    assert gen.name == f"endpoint:{url}/v1#tiny:llama"  # the served model, found through /v1/models
    before = served.requests
    answers = gen.chat(CONVS, settings)
    assert len(answers) == 3 and served.requests - before == 3
    rerun = open_generator(endpoint=url, cache_dir=tmp_path / "c", console=quiet())
    assert rerun.chat(CONVS, settings) == answers
    assert served.requests - before == 3 and rerun.model_calls == 0  # the re-run made no request


def _backend_with(handler, sleeps: list[float], retries: int = 3) -> EndpointBackend:
    backend = EndpointBackend(
        "http://fake.invalid/v1", "m", api_key="k", concurrency=1, retries=retries, sleep=sleeps.append
    )
    backend.client = openai.OpenAI(
        base_url="http://fake.invalid/v1",
        api_key="k",
        max_retries=0,
        http_client=httpx.Client(transport=httpx.MockTransport(handler)),
    )
    return backend


def _reply(text: str) -> dict:
    message = {"role": "assistant", "content": text}
    return {
        "id": "x",
        "object": "chat.completion",
        "created": 0,
        "model": "m",
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
    }


def test_endpoint_retries_429_and_5xx_with_backoff_but_not_4xx() -> None:
    statuses = iter([429, 503, 200])
    seen: list[dict] = []

    def flaky(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        status = next(statuses)
        return httpx.Response(status, json=_reply("ok") if status == 200 else {"error": {"message": "busy"}})

    sleeps: list[float] = []
    backend = _backend_with(flaky, sleeps)
    out = list(backend.generate(CONVS[:1], GenSettings(seed=9, stop=("a", "b", "c", "d", "e"))))
    assert out == [([0], ["ok"])]
    assert sleeps == [0.5, 1.0]  # exponential back-off
    assert seen[-1]["seed"] == 9 and seen[-1]["stop"] == ["a", "b", "c", "d"]  # seed passed through

    calls: list[int] = []

    def refuses(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(400, json={"error": {"message": "max_tokens too large"}})

    with pytest.raises(GenerationError, match="HTTP 400"):
        list(_backend_with(refuses, sleeps).generate(CONVS[:1], GenSettings()))
    assert len(calls) == 1  # a 4xx is never retried


def test_unreachable_endpoint_fails_after_retries() -> None:
    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    sleeps: list[float] = []
    with pytest.raises(GenerationError, match="after 3 attempt"):
        list(_backend_with(down, sleeps, retries=2).generate(CONVS[:1], GenSettings()))
    assert sleeps == [0.5, 1.0]


# -- the closing audit -----------------------------------------------------------------------------


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_finish_drops_what_the_audit_would_and_logs_reasons(tmp_path: Path) -> None:
    from tunelab.synth.finish import finish

    evaluation = write_rows(
        tmp_path / "eval.jsonl", [EVAL_ROW, {"instruction": "Write a haiku about rain", "output": "x"}]
    )
    long_text = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen"
    rows = [
        {"instruction": "Name three red fruits", "output": "apple cherry strawberry"},
        {"instruction": "Name three red fruits", "output": "apple cherry strawberry"},  # exact duplicate
        dict(EVAL_ROW),  # the eval row itself
        {"instruction": "Write a haiku about rain", "output": "something else"},  # same prompt as eval
        {"instruction": "Tell me a joke", "output": "   "},  # empty output
        {"instruction": "Who to mail", "output": "write to bob@example.com"},  # PII
        {"instruction": "Count", "output": long_text},
        {"instruction": "Count", "output": long_text + " sixteen"},  # near duplicate of the one above
        {"instruction": "List two big cities in Asia", "output": "Tokyo and Delhi"},
    ]
    out = tmp_path / "out.jsonl"
    summary = finish(
        rows, out, eval_path=evaluation, kind="test", dropped=[{"reason": "length", "instruction": "Hi"}]
    )
    assert [r["instruction"] for r in _read(out)] == [
        "Name three red fruits",
        "Count",
        "List two big cities in Asia",
    ]
    assert summary["kept"] == 3
    assert summary["dropped_by"] == {
        "test": {"length": 1},
        "audit": {"empty_output": 1, "eval_leak": 2, "exact_duplicate": 1, "near_duplicate": 1, "pii": 1},
    }
    rejects = _read(tmp_path / "out.jsonl.rejects.jsonl")
    leaks = {r["kind"] for r in rejects if r["reason"] == "eval_leak"}
    assert leaks == {"exact", "prompt"} and all("row" in r for r in rejects if r["stage"] == "audit")
    # Never over an input; a limit keeps the first clean rows only.
    with pytest.raises(DataError, match="is the input file"):
        finish(rows, evaluation, eval_path=evaluation, kind="test")
    assert finish(rows, out, kind="test", limit=1)["kept"] == 1 and len(_read(out)) == 1


# -- data synth ------------------------------------------------------------------------------------

EVAL_ROW = {"instruction": "Name the largest planet in the solar system.", "input": "", "output": "Jupiter"}
LONG_TASK = (
    "Write a detailed step by step plan for a family of four who want to spend a quiet and cheap "
    "weekend camping in the mountains"
)
PLANTED = [
    "Write a short poem about the moon tonight.",  # ROUGE-L close to a seed
    "Describe the picture of a cat on a sofa.",  # blocklist: picture
    "Hi there",  # too short
    "Summarise the story of a famous novel in two sentences.",
    "Summarise the story of a famous novel in two short sentences.",  # ROUGE-L close to the one above
    LONG_TASK,
    LONG_TASK + " today",  # a near duplicate by MinHash (the ROUGE-L threshold is 0.99 in that test)
    "Explain why the sky is blue to a young child.",  # its output is over-long
    "Classify the sentiment of the tweet as happy or sad.",  # classification: output first
    EVAL_ROW["instruction"],  # its instance is the eval row: a leak
]
INSTANCES = {
    "Summarise the story": "Input: <none>\nOutput: A boy meets a whale. The whale wins.",
    "Write a detailed": "Input: <none>\nOutput: Pack a tent, drive up on Friday, hike on Saturday.",
    "Explain why the sky": "Input: <none>\nOutput: " + "blue " * 40,
    "Classify the sentiment": "Class label: happy\nInput: I won the lottery today",
    "Name the largest planet": "Input: <none>\nOutput: Jupiter",
}


class Scripted:
    """A Generator that answers each kind of synth prompt from a script, counting what it is asked."""

    name = "scripted"

    def __init__(self, instructions: list[str]) -> None:
        self.instructions, self.calls, self.seen = instructions, 0, []

    def chat(self, conversations, settings, *, desc="generating"):
        self.calls += len(conversations)
        self.seen += [(c[-1]["content"], settings) for c in conversations]
        return [self.answer(c[-1]["content"]) for c in conversations]

    def answer(self, text: str) -> str:
        if text.startswith("Here are some tasks"):
            return "\n".join(f"{i}. {t}" for i, t in enumerate(self.instructions, 4))
        if text.startswith("Is each task"):
            return "Yes" if "sentiment of the tweet" in text.rsplit("Task:", 1)[1] else "No"
        task = text.split("\n", 1)[0].removeprefix("Task: ")
        return next((v for k, v in INSTANCES.items() if task.startswith(k)), "Input: <none>\nOutput: ok")


SEEDS = [
    {"instruction": "Write a short poem about the moon.", "input": "", "output": "Silver light."},
    {"instruction": "Give three tips for staying healthy.", "input": "", "output": "Eat, sleep, move."},
    {
        "instruction": "Classify the review as positive or negative.",
        "instances": [{"input": "Great", "output": "positive"}],
        "is_classification": True,
    },
]


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_self_instruct_filters_planted_candidates_and_writes_provenance(tmp_path: Path) -> None:
    from tunelab.synth.finish import finish
    from tunelab.synth.selfinstruct import SelfInstruct, SynthConfig, read_seeds

    seeds = read_seeds(write_rows(tmp_path / "seeds.jsonl", SEEDS))
    evaluation = write_rows(tmp_path / "eval.jsonl", [EVAL_ROW])
    config = SynthConfig(n=20, max_rounds=1, prompts_per_round=1, max_output_words=30, rouge_threshold=0.7)
    gen = Scripted(PLANTED)
    rows, dropped = SelfInstruct(gen, seeds, config, eval_path=str(evaluation)).run()
    reasons = {d.get("instruction", d.get("row", {}).get("instruction")): d["reason"] for d in dropped}
    assert reasons[PLANTED[0]] == "rouge_similar" and reasons[PLANTED[4]] == "rouge_similar"
    assert reasons[PLANTED[1]] == "blocklist" and reasons[PLANTED[2]] == "length"
    assert reasons[PLANTED[7]] == "output_too_long"
    summary = finish(rows, tmp_path / "out.jsonl", eval_path=evaluation, kind="synth", dropped=dropped)
    kept = {r["instruction"]: r for r in _read(tmp_path / "out.jsonl")}
    assert EVAL_ROW["instruction"] not in kept and summary["dropped_by"]["audit"] == {"eval_leak": 1}
    assert set(kept) == {PLANTED[3], PLANTED[5], PLANTED[8]}  # LONG_TASK + " today" is ROUGE-L close too
    sentiment = kept[PLANTED[8]]
    assert sentiment["output"] == "happy" and sentiment["input"] == "I won the lottery today"
    prov = sentiment["provenance"]
    assert (
        prov["method"] == "self-instruct" and prov["model"] == "scripted" and prov["classification"] is True
    )
    assert {e["seed_row"] for e in prov["examples"]} <= {1, 2, 3} and len(prov["examples"]) == 3
    assert prov["instance_settings"]["max_tokens"] == 256 and "seed" in prov["instruction_settings"]


def test_minhash_catches_near_duplicate_instructions_rouge_lets_through(tmp_path: Path) -> None:
    from tunelab.synth.selfinstruct import SelfInstruct, SynthConfig, read_seeds

    seeds = read_seeds(write_rows(tmp_path / "seeds.jsonl", SEEDS))
    config = SynthConfig(n=20, max_rounds=1, prompts_per_round=1, rouge_threshold=0.99)
    _, dropped = SelfInstruct(Scripted([LONG_TASK, LONG_TASK + " today"]), seeds, config).run()
    assert [d["reason"] for d in dropped] == ["near_duplicate_instruction"]
    assert dropped[0]["instruction"] == LONG_TASK + " today" and dropped[0]["similarity"] >= 0.8


def test_self_instruct_stops_at_n_and_classification_is_asked(tmp_path: Path) -> None:
    from tunelab.synth.selfinstruct import SelfInstruct, SynthConfig, read_seeds

    seeds = read_seeds(write_rows(tmp_path / "seeds.jsonl", SEEDS))
    gen = Scripted(PLANTED)
    loop = SelfInstruct(gen, seeds, SynthConfig(n=2, max_rounds=5, prompts_per_round=1))
    rows, _ = loop.run()
    assert len(rows) == 2 and loop.rounds == 1  # two clean rows after one round: no second round
    asked = [text for text, _ in gen.seen if text.startswith("Is each task")]
    assert len(asked) == 2 and "Classification: Yes" in asked[0]  # few-shot from the seed's flag


def test_seed_file_errors_are_one_line(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from tunelab.cli import app

    bad = write_rows(
        tmp_path / "seeds.jsonl", [{"instruction": "ok task here"}, {"output": "no instruction"}]
    )
    result = CliRunner().invoke(
        app, ["data", "synth", str(bad), "-o", str(tmp_path / "o.jsonl"), "--model", "tiny:llama"]
    )
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "seeds.jsonl:2" in lines[0] and "'instruction'" in lines[0]


def _synth_args(seeds: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    return [
        "data", "synth", str(seeds), "-o", str(out), "--n", "2", "--max-rounds", "2", "--min-words", "1",
        "--max-tokens", "24", "--prompts-per-round", "2", "--cache-dir", str(cache), "--json", *extra,
    ]  # fmt: skip


def test_synth_cli_on_tiny_llama_writes_provenance_and_reruns_from_cache(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from tunelab.cli import app

    seeds = write_rows(tmp_path / "seeds.jsonl", SEEDS)
    args = _synth_args(
        seeds, tmp_path / "out.jsonl", tmp_path / "cache", "--model", "tiny:llama", "--device", "cpu"
    )
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    summary = json.loads(first.stdout.strip().splitlines()[-1])
    assert summary["model_calls"] > 0 and summary["model"] == "tiny:llama"
    rows = _read(tmp_path / "out.jsonl")
    assert len(rows) == summary["kept"] <= 2
    assert all(r["provenance"]["model"] == "tiny:llama" for r in rows)
    again = CliRunner().invoke(app, [*args, "--overwrite"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout.strip().splitlines()[-1])["model_calls"] == 0
    assert _read(tmp_path / "out.jsonl") == rows  # the same rows, from the cache


def test_synth_against_a_real_server_reruns_without_requests(served: Served, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from tunelab.cli import app

    seeds = write_rows(tmp_path / "seeds.jsonl", SEEDS)
    args = _synth_args(seeds, tmp_path / "out.jsonl", tmp_path / "cache", "--endpoint", served.server.url)
    before = served.requests
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    made = served.requests - before
    assert made > 0 and json.loads(first.stdout.strip().splitlines()[-1])["model_calls"] == made
    rows = _read(tmp_path / "out.jsonl")
    assert all(r["provenance"]["model"].startswith("endpoint:") for r in rows)
    again = CliRunner().invoke(app, [*args, "--overwrite"])
    assert again.exit_code == 0 and served.requests - before == made  # the re-run sent nothing
    assert _read(tmp_path / "out.jsonl") == rows


# -- data augment ----------------------------------------------------------------------------------

REVIEWS = [
    {"text": "the film was a delight from start to finish and I smiled the whole time", "label": "positive"},
    {"text": "a dull and tired story with wooden acting that never takes off at all", "label": "negative"},
    {"text": "What is the capital of France", "label": "neutral"},
]


def test_augment_eda_keeps_labels_changes_inputs_and_never_leaks(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from tunelab.cli import app

    source = write_rows(tmp_path / "train.jsonl", REVIEWS)
    evaluation = write_rows(tmp_path / "eval.jsonl", [REVIEWS[2]])
    out = tmp_path / "aug.jsonl"
    args = [
        "data",
        "augment",
        str(source),
        "-o",
        str(out),
        "--eval",
        str(evaluation),
        "--variants",
        "2",
        "--json",
    ]
    result = CliRunner().invoke(app, [*args, "--alpha", "0.2"])
    assert result.exit_code == 0, result.output
    rows = _read(out)
    assert REVIEWS[2] not in rows and all(r.get("provenance", {}).get("source_row") != 3 for r in rows)
    made = [r for r in rows if "provenance" in r]
    assert {r["provenance"]["op"] for r in made} == {"swap", "delete", "insert"}
    for r in made:
        source_row = REVIEWS[r["provenance"]["source_row"] - 1]
        assert r["label"] == source_row["label"] and r["text"] != source_row["text"]
        assert set(r["text"].split()) <= set(source_row["text"].split())  # EDA uses the text's own words
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["dropped_by"] == {"augment": {"source_leaks_eval": 1}, "audit": {"eval_leak": 1}}
    CliRunner().invoke(app, [*args, "--alpha", "0.2", "--overwrite"])
    assert _read(out) == rows  # seeded: the same variants again


def test_augment_with_a_model_paraphrases_and_backtranslates_the_input_side(
    served: Served, tmp_path: Path
) -> None:
    from tunelab.synth.augment import AugmentConfig, augment_rows

    rows = [
        (1, {"instruction": "Summarise this", "input": "A long day at the office.", "output": "Long day."})
    ]
    gen = open_generator(endpoint=served.server.url, cache_dir=tmp_path / "c", console=quiet())
    config = AugmentConfig(
        ops=("paraphrase", "backtranslate"), pivot="German", settings=GenSettings(max_tokens=8)
    )
    made, _ = augment_rows(rows, "instruction", config, gen)
    assert made[0] == rows[0][1] and gen.model_calls == 3  # paraphrase, to German, back
    ops = {r["provenance"]["op"]: r for r in made[1:]}
    assert set(ops) <= {"paraphrase", "backtranslate"}  # a variant equal to its source is dropped
    for r in made[1:]:
        assert r["output"] == "Long day." and r["instruction"] == "Summarise this"
        assert r["provenance"]["field"] == "input" and r["provenance"]["model"].startswith("endpoint:")
    if "backtranslate" in ops:
        assert ops["backtranslate"]["provenance"]["pivot"] == "German"


def test_eda_operations() -> None:
    import random

    from tunelab.synth.augment import eda

    text = "one two three four five six seven eight nine ten"
    swapped = eda(text, "swap", 0.1, random.Random(0))
    assert sorted(swapped.split()) == sorted(text.split()) and swapped != text
    deleted = eda(text, "delete", 0.1, random.Random(0))
    assert len(deleted.split()) < 10 and set(deleted.split()) < set(text.split())
    inserted = eda(text, "insert", 0.2, random.Random(0)).split()
    assert len(inserted) == 12 and set(inserted) == set(text.split())
    assert eda("alone", "swap", 0.5, random.Random(0)) == "alone"


def test_augment_needs_a_model_for_model_ops(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from tunelab.cli import app

    source = write_rows(tmp_path / "train.jsonl", REVIEWS)
    result = CliRunner().invoke(
        app, ["data", "augment", str(source), "-o", str(tmp_path / "o.jsonl"), "--ops", "paraphrase"]
    )
    assert (
        result.exit_code == 2
        and "need a model" in result.output
        and len(result.output.strip().splitlines()) == 1
    )
    result = CliRunner().invoke(
        app, ["data", "augment", str(source), "-o", str(tmp_path / "o.jsonl"), "--ops", "shuffle"]
    )
    assert result.exit_code == 2 and "--ops takes" in result.output


def test_a_missing_eval_file_fails_before_any_generation(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from tunelab.cli import app

    seeds = write_rows(tmp_path / "seeds.jsonl", SEEDS)
    out = tmp_path / "out.jsonl"
    args = [
        "data",
        "synth",
        str(seeds),
        "-o",
        str(out),
        "--model",
        "no/such-model",
        "--eval",
        str(tmp_path / "nope.jsonl"),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "nope.jsonl: file not found" in result.output  # not the model error
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()


def test_instruction_parsing() -> None:
    from tunelab.synth.selfinstruct import parse_instance, parse_instructions

    answer = 'Here are new tasks:\n4. Name a river.\nTask 5: Write a limerick.\n6) "Sort these words."\n\nInstruction: Add 2 and 3.'
    assert parse_instructions(answer) == [
        "Name a river.",
        "Write a limerick.",
        "Sort these words.",
        "Add 2 and 3.",
    ]
    assert parse_instance("Input: <none>\nOutput: Nile", False) == ("", "Nile")
    assert parse_instance("Input: 2, 3\nOutput: 5", False) == ("2, 3", "5")
    assert parse_instance("just an answer", False) == ("", "just an answer")
    assert parse_instance("Class label: spam\nInput: WIN A PRIZE", True) == ("WIN A PRIZE", "spam")
    assert parse_instance("ham\nsee you at lunch", True) == ("see you at lunch", "ham")


def test_input_side_of_each_format() -> None:
    from tunelab.synth.augment import input_side

    chat = {"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                         {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]}  # fmt: skip
    side = input_side(chat, "chat")
    assert side.get(chat) == "q2"
    changed = side.with_text(chat, "Q2")
    assert changed["messages"][2]["content"] == "Q2" and chat["messages"][2]["content"] == "q2"  # a copy
    assert changed["messages"][3] == chat["messages"][3]
    sharegpt = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    assert input_side(sharegpt, "chat").get(sharegpt) == "hi"
    assert input_side({"instruction": "Do", "input": "", "output": "x"}, "instruction").name == "instruction"
    assert input_side({"instruction": "Do", "input": "this", "output": "x"}, "instruction").name == "input"
    assert input_side({"prompt": "p", "completion": "c"}, "prompt_completion").name == "prompt"
    assert input_side({"text": "t", "label": "l"}, "classification").name == "text"
