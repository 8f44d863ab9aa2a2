"""The studio's Chat and Export pages through FastAPI's test client (the browser tests drive them too).

Chat answers come from the serve engine on tiny random models (nothing is downloaded); their thumbs
land in the server's feedback log format, which ``from_feedback`` turns into a preference pair.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from studio_client import studio_client
from tunelab.data.feedback import from_feedback
from tunelab.studio.chat_page import parse_sampling

SAMPLING = {"temperature": "0", "top_p": "1", "max_tokens": "8", "seed": "0"}


@pytest.fixture(scope="module")
def other_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny:llama's architecture with other random weights, saved as a model folder (a typed path)."""
    from tunelab.models.tiny import build_tiny_llama, build_tiny_tokenizer

    path = tmp_path_factory.mktemp("other") / "tiny-seed-7"
    tokenizer = build_tiny_tokenizer()
    build_tiny_llama(tokenizer, seed=7).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def send(client: TestClient, a: str, b: str, prompt: str, **sampling: str) -> str:
    """Post the chat form; the exchange id of the two columns it returns."""
    html = client.post(
        "/chat/send", data={"model_a_path": a, "model_b_path": b, "prompt": prompt, **SAMPLING, **sampling}
    ).text
    found = re.search(r'sse-connect="/chat/stream/(\w+)/a"', html)
    assert found, html
    return found.group(1)


def stream(client: TestClient, exchange: str, side: str) -> dict[str, list[str]]:
    """One column's server-sent events, by event name (the data of each, in order)."""
    events: dict[str, list[str]] = {}
    name, data = None, []
    with client.stream("GET", f"/chat/stream/{exchange}/{side}") as response:
        for line in response.iter_lines():
            if line.startswith("event: "):
                name, data = line[7:], []
            elif line.startswith("data: "):
                data.append(line[6:])
            elif line == "" and name is not None:
                events.setdefault(name, []).append("\n".join(data))
                name = None
    return events


def text_of(events: dict[str, list[str]]) -> str:
    import html

    return "".join(html.unescape(re.sub(r"</?span>", "", d)) for d in events.get("delta", []))


def test_sampling_fields_are_checked_with_the_field_named():
    assert parse_sampling({"temperature": "0.7", "top_p": "0.9", "max_tokens": "16", "seed": ""}).seed is None
    with pytest.raises(ValueError, match="max_tokens: 'many' is not an integer"):
        parse_sampling({"max_tokens": "many"})
    with pytest.raises(ValueError, match=r"temperature: 5.0 is outside 0.0..2.0"):
        parse_sampling({"temperature": "5"})


def test_send_refuses_bad_settings_and_missing_models_with_a_message(tmp_path):
    client = studio_client(tmp_path / "runs")
    html = client.post("/chat/send", data={"model_a_path": "tiny:llama", "model_b_path": "tiny:llama",
                                           "prompt": "hi", "top_p": "2"}).text  # fmt: skip
    assert "bad sampling setting: top_p: 2.0 is outside 0.0..1.0" in html
    html = client.post("/chat/send", data={"model_a_path": "tiny:llama", "prompt": "hi"}).text
    assert "choose a model for both columns" in html


def test_a_model_that_does_not_load_says_so_in_its_column(tmp_path):
    client = studio_client(tmp_path / "runs")
    exchange = send(client, str(tmp_path / "no-such-model"), "tiny:llama", "hello")
    events = stream(client, exchange, "a")
    assert "could not load" in events["footer"][0] and "no-such-model" in events["footer"][0]
    assert events["done"] == [""]  # the column's stream ends; the page does not hang


def test_thumbs_on_two_answers_become_a_dpo_pair(tmp_path, other_tiny):
    runs = tmp_path / "runs"
    client = studio_client(runs, roots=[tmp_path, other_tiny.parent])  # its second model lives elsewhere
    exchange = send(client, "tiny:llama", str(other_tiny), "Say something nice")
    a, b = stream(client, exchange, "a"), stream(client, exchange, "b")
    answer_a, answer_b = text_of(a), text_of(b)
    assert answer_a and answer_b and answer_a != answer_b  # two models, two streamed answers
    assert len(a["delta"]) > 1  # streamed token by token, not in one piece
    assert "temperature 0.0, top_p 1.0, max_tokens 8, seed 0" in a["footer"][0]  # the settings shown
    assert f'"id": "{exchange}-a"' in a["footer"][0]  # the thumbs buttons of this answer
    assert "thumbs up" in client.post("/chat/feedback", data={"id": f"{exchange}-a", "score": "1"}).text
    assert "thumbs down" in client.post("/chat/feedback", data={"id": f"{exchange}-b", "score": "-1"}).text
    summary = from_feedback(runs / ".studio" / "feedback", tmp_path / "pairs.jsonl")
    assert summary["rows"] == 1
    row = json.loads((tmp_path / "pairs.jsonl").read_text(encoding="utf-8"))
    assert row["prompt"] == [{"role": "user", "content": "Say something nice"}]
    assert row["chosen"] == [{"role": "assistant", "content": answer_a}]
    assert row["rejected"] == [{"role": "assistant", "content": answer_b}]
    assert row["feedback"]["chosen"]["variant"] == "tiny:llama"
    again = studio_client(runs)  # a restarted studio finds an earlier answer in the log
    assert "thumbs up" in again.post("/chat/feedback", data={"id": f"{exchange}-b", "score": "1"}).text
    assert "no answer with id" in again.post("/chat/feedback", data={"id": "nope-a", "score": "1"}).text
    refused = again.post("/chat/feedback", data={"id": f"{exchange}-b", "score": "5"}).text
    assert "score: 5 is not 1 (thumbs up) or -1 (thumbs down)" in refused


@pytest.mark.slow
def test_base_and_tuned_share_one_engine_and_the_adapter_answers(bot_runs):
    runs = bot_runs["yes-bot"].parent
    client = studio_client(runs)
    html = client.get("/chat").text
    assert 'value="base:no-bot"' in html or 'value="base:yes-bot"' in html  # one base entry: same base
    assert 'value="run:yes-bot"' in html and 'value="run:no-bot"' in html
    exchange = send(client, "run:yes-bot", "run:no-bot", "question 1", max_tokens="6")
    yes, no = text_of(stream(client, exchange, "a")), text_of(stream(client, exchange, "b"))
    assert "y" in yes and "o" in no and yes != no  # each adapter its own learned answer (as test_serve)
    exchange = send(client, "base:yes-bot", "run:yes-bot", "question 1", max_tokens="6")
    assert text_of(stream(client, exchange, "a")) != yes  # the base answers without the adapter
    cache = client.app.state.chat.models
    assert len(cache.engines) == 1  # base, yes-bot and no-bot: one engine, one copy of the weights
    assert set(next(iter(cache.engines.values())).adapters) == {"yes-bot", "no-bot"}


def test_readme_and_studio_doc_images_exist():
    """Every image the README and docs/studio.md show is a file in the checkout (`make studio-shots`)."""
    root = Path(__file__).parents[1]
    for doc in (root / "README.md", root / "docs" / "studio.md"):
        links = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", doc.read_text(encoding="utf-8"))
        assert links, f"{doc.name} shows no image"
        for link in links:
            assert (doc.parent / link).is_file(), f"{doc.name}: {link} does not exist"
    assert "docs/studio/chat.png" in (root / "README.md").read_text(encoding="utf-8")
