"""Loss masks: exactly the assistant tokens carry loss, for any prompt-stable template."""

from __future__ import annotations

import pytest

from tunelab.data.templates import (
    BUILTIN_TEMPLATES,
    IGNORE_INDEX,
    TemplateError,
    encode_chat,
    encode_prompt,
    select_template,
)
from tunelab.models.tiny import build_tiny_tokenizer

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name a colour"},
    {"role": "assistant", "content": "blue"},
    {"role": "user", "content": "Another one"},
    {"role": "assistant", "content": "dark green"},
]


def loss_text(tokenizer, enc) -> str:
    return tokenizer.decode([t for t, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX])


def test_prompt_tokens_are_masked_and_answer_tokens_are_not():
    tok = build_tiny_tokenizer()
    enc = encode_chat(tok, CHAT[:3])
    prompt_ids = encode_prompt(tok, CHAT[:2])
    # every prompt token is masked, everything after it is the answer and carries loss
    assert enc.input_ids[: len(prompt_ids)] == prompt_ids
    assert all(lab == IGNORE_INDEX for lab in enc.labels[: len(prompt_ids)])
    assert enc.labels[len(prompt_ids) :] == enc.input_ids[len(prompt_ids) :]
    assert loss_text(tok, enc) == "blue<|im_end|>\n"


def test_every_assistant_turn_by_default_and_last_only_on_request():
    tok = build_tiny_tokenizer()
    assert loss_text(tok, encode_chat(tok, CHAT)) == "blue<|im_end|>\ndark green<|im_end|>\n"
    assert loss_text(tok, encode_chat(tok, CHAT, train_on="last_assistant")) == "dark green<|im_end|>\n"


def test_completion_only_off_trains_on_everything():
    tok = build_tiny_tokenizer()
    enc = encode_chat(tok, CHAT, completion_only=False)
    # every token but the first (which nothing predicts) carries loss
    assert enc.labels[0] == IGNORE_INDEX and enc.labels[1:] == enc.input_ids[1:]


def test_truncation_is_reported_and_can_cut_all_loss_tokens():
    tok = build_tiny_tokenizer()
    full = encode_chat(tok, CHAT[:3])
    cut = encode_chat(tok, CHAT[:3], max_length=5)
    assert cut.truncated and cut.full_length == len(full.input_ids)
    assert len(cut.input_ids) == 5 and cut.n_loss_tokens == 0


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
def test_builtin_templates_mask_only_the_answer(name):
    tok = build_tiny_tokenizer()
    tok.chat_template = None
    select_template(tok, name)
    text = loss_text(tok, encode_chat(tok, CHAT[1:3]))
    assert "blue" in text and "Name a colour" not in text


def test_template_choice_errors_and_warning():
    tok = build_tiny_tokenizer()
    with pytest.raises(TemplateError, match="unknown template"):
        select_template(tok, "vicuna-9")
    notes = select_template(tok, "alpaca")
    assert notes and "differs from the tokenizer's own chat template" in notes[0]
    tok.chat_template = None
    with pytest.raises(TemplateError, match="no chat template"):
        select_template(tok, None)


def test_conversation_without_assistant_is_an_error():
    tok = build_tiny_tokenizer()
    with pytest.raises(TemplateError, match="no assistant turn"):
        encode_chat(tok, CHAT[:2])


def test_data_show_preview_is_what_the_trainer_trains_on(tiny_recipe):
    from tunelab.data.show import DataShowConfig, preview_examples
    from tunelab.runs.rundir import RunDir
    from tunelab.train.loop import Trainer

    recipe = tiny_recipe("lora")
    trainer = Trainer(recipe, RunDir.create(recipe.output.dir, recipe.output.name))
    previews, notes = preview_examples(
        recipe.data.train, build_tiny_tokenizer(), n=4, data=DataShowConfig(max_length=recipe.data.max_length)
    )
    assert notes == [] and len(previews) == 4
    for preview, feature in zip(previews, trainer.train_split.features):
        assert preview.input_ids == feature["input_ids"]
        assert preview.loss_mask == [lab != IGNORE_INDEX for lab in feature["labels"]]
        assert preview.warnings == []


def test_data_show_cli_json(tmp_path, qa_rows):
    import json

    from typer.testing import CliRunner

    from tunelab.cli import app

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in qa_rows))
    result = CliRunner().invoke(
        app, ["data", "show", str(data), "--model", "tiny:llama", "-n", "2", "--json"]
    )
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)["examples"]
    assert len(shown) == 2
    tok = build_tiny_tokenizer()
    loss_ids = [i for i, m in zip(shown[0]["input_ids"], shown[0]["loss_mask"]) if m]
    assert tok.decode(loss_ids) == qa_rows[0]["output"] + "<|im_end|>\n"
