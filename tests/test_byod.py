"""Bring your own data (issue 15): files in the peers' documented shapes go through audit, `data
show` and training with the same rows and the same loss masks.

Each file below is written in the shape its tool documents (LLaMA-Factory's alpaca/sharegpt
README, OpenAI's fine-tuning guide, TRL's dataset-format page). For every (file, objective) pair:
the audit accepts every row, `data show` (the objective's own encode) marks exactly the tokens whose
labels are not -100 in the trainer's collated batch, and a two-step run on `tiny:llama` uses every
row. Hostile rows are refused per row, with file:line and reason, the same way by audit and training.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunelab.data.audit import audit
from tunelab.data.loaders import DataError
from tunelab.data.show import DataShowConfig, feature_sequences, preview_examples
from tunelab.data.templates import IGNORE_INDEX, select_template
from tunelab.models.tiny import build_tiny_tokenizer
from tunelab.objectives import OBJECTIVES
from tunelab.recipe import parse_recipe
from tunelab.train.data import prepare_split
from tunelab.train.run import train

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current temperature of a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
CITIES = ["Paris", "Oslo", "Lima", "Cairo"]


def _call(city: str) -> dict:
    return {"name": "get_weather", "arguments": {"city": city}}


def alpaca(i: int, city: str) -> dict:
    return {
        "instruction": f"Describe {city}.",
        "input": "Keep it short.",
        "output": f"{city} is a city number {i}.",
        "system": "You are a geographer.",
        "history": [[f"Where is {city}?", f"{city} is on a map."]],
    }


def sharegpt_tools(i: int, city: str) -> dict:
    return {
        "conversations": [
            {"from": "human", "value": f"How warm is it in {city}?"},
            {"from": "function_call", "value": json.dumps(_call(city))},
            {"from": "observation", "value": json.dumps({"temperature": 20 + i})},
            {"from": "gpt", "value": f"It is {20 + i} degrees in {city}."},
        ],
        "system": "You can look up the weather.",
        "tools": json.dumps([t["function"] for t in TOOLS]),
    }


def openai_chat(i: int, city: str) -> dict:
    return {
        "messages": [
            {"role": "system", "content": "You can look up the weather."},
            {"role": "user", "content": f"Hi, I am in {city}."},
            {"role": "assistant", "content": "Hello there, traveller.", "weight": 0},
            {"role": "user", "content": [{"type": "text", "text": f"How warm is it in {city}?"}]},
            {
                "role": "assistant",
                "tool_calls": [
                    {
                        "id": f"call_{i}",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": json.dumps({"city": city})},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": f"call_{i}", "content": str(20 + i)},
            {"role": "assistant", "content": f"It is {20 + i} degrees in {city}.", "weight": 1},
        ],
        "tools": TOOLS,
    }


def trl_text(i: int, city: str) -> dict:
    return {"text": f"{city} lies on a river and has {i} bridges."}


def trl_messages(i: int, city: str) -> dict:
    return {
        "messages": [
            {"role": "user", "content": f"Name a sight in {city}."},
            {"role": "assistant", "content": f"The old town of {city}."},
        ]
    }


def trl_prompt_completion(i: int, city: str) -> dict:
    if i % 2:
        return {"prompt": f"The capital of nowhere is {city} and", "completion": f" it has {i} parks."}
    return {
        "prompt": [{"role": "user", "content": f"What is {city} known for?"}],
        "completion": [{"role": "assistant", "content": f"{city} is known for food."}],
    }


def reasoning(i: int, city: str) -> dict:
    return {
        "messages": [
            {"role": "user", "content": f"Is {city} north of the equator?"},
            {"role": "assistant", "reasoning_content": f"{city} has latitude {i} north.", "content": "Yes."},
        ]
    }


def trl_preference_explicit(i: int, city: str) -> dict:
    return {
        "prompt": [{"role": "user", "content": f"Where is {city}?"}],
        "chosen": [{"role": "assistant", "content": f"{city} is in country {i}."}],
        "rejected": [{"role": "assistant", "content": "No idea."}],
    }


def trl_preference_implicit(i: int, city: str) -> dict:
    user = {"role": "user", "content": f"Spell {city}."}
    return {
        "chosen": [user, {"role": "assistant", "content": " ".join(city)}],
        "rejected": [user, {"role": "assistant", "content": "I cannot."}],
    }


def sharegpt_preference(i: int, city: str) -> dict:
    return {
        "conversations": [{"from": "human", "value": f"Recommend a museum in {city}."}],
        "chosen": {"from": "gpt", "value": f"The {city} city museum, room {i}."},
        "rejected": {"from": "gpt", "value": "Museums are boring."},
    }


def openai_preference(i: int, city: str) -> dict:
    return {
        "input": {
            "messages": [{"role": "user", "content": f"Is {city} big?"}],
            "tools": [],
            "parallel_tool_calls": True,
        },
        "preferred_output": [{"role": "assistant", "content": f"{city} has {i} million people."}],
        "non_preferred_output": [{"role": "assistant", "content": "Yes."}],
    }


def chosen_rejected_messages(i: int, city: str) -> dict:
    user = {"role": "user", "content": f"Translate {city}."}
    return {
        "chosen_messages": [user, {"role": "assistant", "content": f"{city} stays {city}."}],
        "rejected_messages": [user, {"role": "assistant", "content": "Cannot translate."}],
    }


def trl_unpaired(i: int, city: str) -> dict:
    return {
        "prompt": [{"role": "user", "content": f"Is {city} safe?"}],
        "completion": [{"role": "assistant", "content": "Mostly, yes." if i % 2 else "Never go."}],
        "label": bool(i % 2),
    }


def messages_label(i: int, city: str) -> dict:
    return {
        "messages": [
            {"role": "user", "content": f"Best season for {city}?"},
            {"role": "assistant", "content": "Spring." if i % 2 else "Whenever, who cares."},
        ],
        "label": bool(i % 2),
    }


def classification(i: int, city: str) -> dict:
    return {"text": f"{city} is lovely in spring, number {i}.", "label": "pos" if i % 2 else "neg"}


PREFERENCE = ("dpo", "simpo", "orpo", "kto", "reward")
CASES = {
    alpaca: ("sft",),
    sharegpt_tools: ("sft",),
    openai_chat: ("sft",),
    trl_text: ("sft",),
    trl_messages: ("sft",),
    trl_prompt_completion: ("sft",),
    reasoning: ("sft",),
    trl_preference_explicit: PREFERENCE,
    trl_preference_implicit: ("dpo", "kto", "reward"),
    sharegpt_preference: ("dpo", "reward"),
    openai_preference: ("dpo", "kto"),
    chosen_rejected_messages: ("dpo", "reward"),
    trl_unpaired: ("kto",),
    messages_label: ("kto",),
    classification: ("classify",),
}
PAIRS = [(shape, objective) for shape, objectives in CASES.items() for objective in objectives]


def write_shape(tmp_path: Path, shape) -> Path:
    rows = [shape(i, city) for i, city in enumerate(CITIES)]
    path = tmp_path / f"{shape.__name__}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def data_config(path: Path, **extra):
    raw = {
        "seed": 0,
        "model": {"name_or_path": "tiny:llama"},
        "method": {"name": "lora"},
        "data": {"train": str(path), "max_length": 1024, "template": "chatml", **extra},
        "training": {"max_steps": 2, "batch_size": 2, "learning_rate": 1e-3, "warmup_steps": 0},
        "output": {"dir": str(path.parent / "runs"), "name": path.stem},
    }
    return raw


def trainer_masks(path: Path, objective_name: str) -> list[list[bool]]:
    """Loss masks of the sequences in the trainer's collated batch, padding removed, in
    ``feature_sequences`` order."""
    tokenizer = build_tiny_tokenizer()
    select_template(tokenizer, "chatml")
    recipe = parse_recipe(data_config(path) | {"objective": {"name": objective_name}})
    objective = OBJECTIVES.get(objective_name).impl(recipe.objective, tokenizer, recipe.data)
    split = prepare_split(str(path), objective, recipe.data)
    masks = []
    for feature in split.features:
        for _, ids, labels, _ in feature_sequences(copy.deepcopy(feature)):
            if labels is None:
                masks.append([i == len(ids) - 1 for i in range(len(ids))])
                continue
            # the collated batch holds exactly these labels, padded with IGNORE_INDEX
            masks.append([label != IGNORE_INDEX for label in labels])
    batch = objective.collate(split.features)
    if batch.get("labels") is not None and batch["labels"].dim() == 2:  # per-token labels
        batch_masks = [
            [bool(lab != IGNORE_INDEX) for lab, on in zip(row.tolist(), att.tolist()) if on]
            for row, att in zip(batch["labels"], batch["attention_mask"])
        ]
        assert sorted(map(tuple, batch_masks)) == sorted(map(tuple, masks))
    return masks


@pytest.mark.parametrize(("shape", "objective"), PAIRS, ids=[f"{s.__name__}-{o}" for s, o in PAIRS])
def test_audit_show_and_training_agree(tmp_path: Path, shape, objective: str) -> None:
    path = write_shape(tmp_path, shape)
    report = audit(path)
    assert report["rows"] == len(CITIES) and report["format_errors"]["rows"] == 0

    tokenizer = build_tiny_tokenizer()
    config = OBJECTIVES.get(objective).config_cls()
    previews, _ = preview_examples(
        str(path),
        tokenizer,
        n=len(CITIES),
        template="chatml",
        objective=config,
        data=DataShowConfig(max_length=1024),
    )
    assert not [p.dropped for p in previews if p.dropped]
    assert {p.row for p in previews} == {1, 2, 3, 4}
    assert [p.loss_mask for p in previews] == trainer_masks(path, objective)

    result = train(parse_recipe(data_config(path) | {"objective": {"name": objective}}))
    assert result.steps == 2
    assert result.data_summary["train"]["rows_used"] == report["rows"] - report["rows_rejected"]


def loss_text(preview) -> str:
    return "".join(p for p, on in zip(preview.pieces, preview.loss_mask) if on)


def test_tool_calls_and_answers_carry_loss_tool_results_and_system_do_not(tmp_path: Path) -> None:
    path = write_shape(tmp_path, openai_chat)
    (preview, *_), _ = preview_examples(str(path), build_tiny_tokenizer(), n=1, template="chatml")
    trained = loss_text(preview)
    assert '"name": "get_weather"' in trained and '"city": "Paris"' in trained
    assert "It is 20 degrees in Paris." in trained
    for untrained in ("You can look up the weather.", "How warm is it", "Hello there, traveller.", "20<"):
        assert untrained not in trained
    tags = dict(zip(preview.pieces, preview.tags))
    assert "call" in preview.tags and "tool" in preview.tags
    assert all(not on for on, tag in zip(preview.loss_mask, preview.tags) if tag == "tool")
    assert tags  # the preview carries one tag per token


def test_reasoning_is_trained_unless_switched_off(tmp_path: Path) -> None:
    path = write_shape(tmp_path, reasoning)
    tok = build_tiny_tokenizer()
    (on, *_), _ = preview_examples(str(path), tok, n=1, template="qwen3")
    (off, *_), _ = preview_examples(
        str(path),
        build_tiny_tokenizer(),
        n=1,
        template="qwen3",
        data=DataShowConfig(train_on_reasoning=False),
    )
    assert "Paris has latitude 0 north." in loss_text(on) and "Yes." in loss_text(on)
    assert "latitude" not in loss_text(off) and "Yes." in loss_text(off)


HOSTILE = {
    "unknown role": {
        "messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    },
    "invalid JSON arguments": {
        "messages": [
            {"role": "user", "content": "weather?"},
            {
                "role": "assistant",
                "tool_calls": [
                    {"type": "function", "function": {"name": "get_weather", "arguments": "{city: Paris"}}
                ],
            },
            {"role": "tool", "content": "20"},
            {"role": "assistant", "content": "20 degrees."},
        ]
    },
    "tool result with no call": {
        "messages": [
            {"role": "user", "content": "weather?"},
            {"role": "tool", "content": "20"},
            {"role": "assistant", "content": "20 degrees."},
        ]
    },
    "empty assistant turn": {
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]
    },
}
IDENTICAL_PAIR = {
    "prompt": [{"role": "user", "content": "hi"}],
    "chosen": [{"role": "assistant", "content": "same"}],
    "rejected": [{"role": "assistant", "content": "same"}],
}


def _with_hostile(tmp_path: Path, good_rows: list[dict], bad: dict) -> Path:
    rows = [good_rows[0], bad, *good_rows[1:]]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


HOSTILE_CASES = [(name, row, trl_messages) for name, row in HOSTILE.items()]
HOSTILE_CASES.append(("identical chosen and rejected", IDENTICAL_PAIR, trl_preference_explicit))


@pytest.mark.parametrize(("name", "bad", "shape"), HOSTILE_CASES, ids=[c[0] for c in HOSTILE_CASES])
def test_hostile_rows_are_refused_alike_by_audit_and_training(tmp_path: Path, name, bad, shape) -> None:
    good = [shape(i, c) for i, c in enumerate(CITIES)]
    path = _with_hostile(tmp_path, good, bad)
    objective = "dpo" if shape is trl_preference_explicit else "sft"
    recipe = parse_recipe(data_config(path) | {"objective": {"name": objective}})
    # the audit lists the row (and goes on) with the reason training stops at it with
    report = audit(path)
    (listed,) = report["format_errors"]["examples"]
    with pytest.raises(DataError) as train_error:
        train(recipe)
    assert listed["row"] == 2 and str(train_error.value).startswith(f"{path}:2: {listed['error']}")
    assert report["rows_rejected"] == 1

    # with skip_bad the row is counted, written to the rejects file with its reason, and the rest trains
    recipe = parse_recipe(
        data_config(path, skip_bad=True)
        | {"objective": {"name": objective}, "output": {"dir": str(tmp_path / "r"), "name": "skip"}}
    )
    result = train(recipe)
    assert result.data_summary["train"]["rows_rejected_malformed"] == 1
    assert result.data_summary["train"]["rows_used"] == len(good)
    (reject,) = [json.loads(line) for line in (result.run_dir / "rejects.jsonl").read_text().splitlines()]
    assert reject["line"] == 2 and reject["file"] == str(path)
    assert reject["reason"] == listed["error"]


def test_unused_columns_are_reported_not_dropped_silently(tmp_path: Path) -> None:
    rows = [{**trl_messages(i, c), "source": "web", "id": i} for i, c in enumerate(CITIES)]
    path = tmp_path / "extra.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert audit(path)["unused_columns"] == {"id": 4, "source": 4}
    result = train(parse_recipe(data_config(path)))
    assert result.data_summary["train"]["unused_columns"] == {"id": 4, "source": 4}


messages_strategy = st.lists(
    st.tuples(
        st.sampled_from(["user", "assistant", "system"]),
        st.text(alphabet="abc xyz<>|\n{}", min_size=1, max_size=12).filter(lambda t: t.strip()),
        st.sampled_from([0, 1, None]),
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(turns=messages_strategy)
def test_show_marks_exactly_the_tokens_the_trainer_labels(tmp_path: Path, turns) -> None:
    """For random conversations, `data show`'s loss mask equals labels != -100 in the trainer batch."""
    messages = [{"role": "user", "content": "start"}]
    for role, text, weight in turns:
        message = {"role": role, "content": text}
        if role == "assistant" and weight is not None:
            message["weight"] = weight
        messages.append(message)
    messages.append({"role": "assistant", "content": "end"})
    path = tmp_path / "random.jsonl"
    path.write_text(json.dumps({"messages": messages}) + "\n" + json.dumps({"messages": messages}) + "\n")
    previews, _ = preview_examples(str(path), build_tiny_tokenizer(), n=2, template="chatml")
    assert [p.loss_mask for p in previews] == trainer_masks(path, "sft")


def test_base_gguf_without_template_trains_with_plain_and_final_carries_it(
    tmp_path: Path, monkeypatch
) -> None:
    from transformers import AutoTokenizer

    from tunelab.data.templates import BUILTIN_TEMPLATES, TemplateError
    from tunelab.models.gguf_write import write_llama_gguf
    from tunelab.models.tiny import build_tiny_llama

    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path / "home"))  # the converted copy stays in tmp
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_llama(tokenizer, seed=0)
    tokenizer.chat_template = None  # a base model: no chat template in the file
    gguf = write_llama_gguf(model, tokenizer, tmp_path / "base.gguf")
    raw = data_config(write_shape(tmp_path, trl_prompt_completion))
    raw["model"]["name_or_path"] = str(gguf)
    raw["data"].pop("template")
    with pytest.raises(TemplateError, match="plain"):
        train(parse_recipe(raw))
    raw["data"]["template"] = "plain"
    result = train(parse_recipe(raw))
    saved = AutoTokenizer.from_pretrained(result.run_dir / "final")
    assert saved.chat_template == BUILTIN_TEMPLATES["plain"]
    text = saved.apply_chat_template(
        [{"role": "user", "content": "The sky is"}, {"role": "assistant", "content": " blue."}],
        tokenize=False,
    )
    assert text == (saved.bos_token or "") + "The sky is blue." + saved.eos_token
