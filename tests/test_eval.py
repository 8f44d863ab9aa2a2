"""Evaluation: the one-prefill readouts equal the straightforward computations they replace."""

from __future__ import annotations

import pytest
import torch

from tunelab.data.templates import encode_prompt, split_prompt_answer
from tunelab.evaluate.lm import evaluate_conversations, score_labels, split_items
from tunelab.evaluate.metrics import exact_match, normalise_answer
from tunelab.evaluate.run import infer_labels, load_for_eval
from tunelab.models.tiny import build_tiny_llama, build_tiny_tokenizer
from tunelab.objectives.sft import SftConfig, SftObjective, pad_causal_batch
from tunelab.train.loop import evaluate_loss
from tunelab.train.run import train

LABELS = ["positive", "negative"]


def conversations() -> list[list[dict[str, str]]]:
    reviews = [
        "a fine film",
        "dull and far too long, I left early",
        "great",
        "bad acting, bad plot, bad music",
        "I loved every minute of it",
        "no",
    ]
    return [
        [{"role": "user", "content": f"Sentiment of: {r}"}, {"role": "assistant", "content": LABELS[i % 2]}]
        for i, r in enumerate(reviews)
    ]


class _Data:
    max_length = 128


def test_answer_loss_equals_plain_teacher_forcing():
    tok = build_tiny_tokenizer()
    model = build_tiny_llama(tok, seed=1).eval()
    convs = conversations()
    got = evaluate_conversations(model, tok, convs, labels=LABELS, max_new_tokens=3, batch_size=4)
    objective = SftObjective(SftConfig(train_on="last_assistant"), tok, _Data)
    features = [objective.encode(i, {"messages": c}) for i, c in enumerate(convs)]
    reference = evaluate_loss(model, objective, features, batch_size=1, device="cpu")["eval_loss"]
    assert got.loss == pytest.approx(reference, rel=1e-5)


def test_label_choice_equals_full_scoring_and_generation_equals_generate():
    tok = build_tiny_tokenizer()
    model = build_tiny_llama(tok, seed=2).eval()
    convs = conversations()
    got = evaluate_conversations(model, tok, convs, labels=LABELS, max_new_tokens=3, batch_size=4)
    prompts = [it.prompt for it in split_items(tok, convs)]
    scores = score_labels(model, tok, prompts, LABELS, batch_size=3)
    assert got.label_predictions == [LABELS[max(range(2), key=s.__getitem__)] for s in scores]
    for conv, generated in zip(convs, got.generations):
        ids = torch.tensor([encode_prompt(tok, split_prompt_answer(conv)[0])])
        out = model.generate(
            ids,
            max_new_tokens=3,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        assert generated == tok.decode(out[0, ids.size(1) :], skip_special_tokens=True).strip()


def test_multi_token_labels_are_scored_over_all_their_tokens():
    tok = build_tiny_tokenizer()
    model = build_tiny_llama(tok, seed=3).eval()
    labels = ["very positive indeed", "negative"]
    convs = [[c[0], {"role": "assistant", "content": labels[i % 2]}] for i, c in enumerate(conversations())]
    got = evaluate_conversations(model, tok, convs, labels=labels, max_new_tokens=2, batch_size=4)
    prompts = [it.prompt for it in split_items(tok, convs)]
    scores = score_labels(model, tok, prompts, labels, batch_size=4)
    assert got.label_predictions == [labels[max(range(2), key=s.__getitem__)] for s in scores]


def test_left_padded_windowed_loss_equals_full_right_padded_loss():
    tok = build_tiny_tokenizer()
    model = build_tiny_llama(tok, seed=4).eval()
    objective = SftObjective(SftConfig(), tok, _Data)
    features = [objective.encode(i, {"messages": c}) for i, c in enumerate(conversations())]
    windowed = objective.loss(model, objective.collate(features))
    plain = pad_causal_batch(features, tok.pad_token_id, side="right")
    logits = model(input_ids=plain["input_ids"], attention_mask=plain["attention_mask"]).logits
    from tunelab.objectives.losses import causal_lm_loss_sum

    ref_sum, ref_count = causal_lm_loss_sum(logits, plain["labels"])
    assert int(windowed.n_units) == int(ref_count)
    assert float(windowed.loss_sum) == pytest.approx(float(ref_sum), rel=1e-5)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_trained_run_loads_back_with_identical_logits(tiny_recipe, method):
    from tunelab.runs.rundir import RunDir
    from tunelab.train.loop import Trainer

    recipe = tiny_recipe(method, training__max_steps=3)
    run = RunDir.create(recipe.output.dir, recipe.output.name)
    run.write_recipe(recipe.resolved())
    trainer = Trainer(recipe, run)
    trainer.fit()
    trainer.save_final()
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    trained = trainer.accelerator.unwrap_model(trainer.model).eval()
    loaded, tokenizer = load_for_eval(str(run.path))
    torch.testing.assert_close(loaded.eval()(ids).logits, trained(ids).logits)
    assert tokenizer.chat_template == trainer.tokenizer.chat_template


def test_normalisation_and_exact_match():
    assert normalise_answer("  The Positive. ") == "positive"
    assert exact_match("Positive!", "positive")
    assert not exact_match("positive review", "positive")


def test_label_set_is_inferred_only_for_label_style_answers():
    assert infer_labels(["a", "b", "a", "b"]) == ["a", "b"]
    assert infer_labels(["one answer", "another", "a third"]) is None


def test_eval_of_untrained_and_trained_tiny_run_improves(tiny_recipe, tmp_path):
    """Overfitting the training answers must raise exact match on those same answers."""
    from tunelab.evaluate.run import run_eval

    recipe = tiny_recipe(
        "full", training__max_steps=150, training__learning_rate=5e-3, training__batch_size=6
    )
    result = train(recipe)
    before = run_eval("tiny:llama", recipe.data.train, max_new_tokens=6)
    after = run_eval(str(result.run_dir), recipe.data.train, max_new_tokens=6)
    assert after.exact_match > before.exact_match
    assert after.loss < before.loss
