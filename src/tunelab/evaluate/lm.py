"""Model-side evaluation: teacher-forced loss, label choice by log-likelihood, greedy generation.

Two passes per dataset and no more, because on a CPU every forward pass counts:
1. teacher-forced over prompt + gold answer: completion loss (→ perplexity) and, when every label
   is a single token, the label log-likelihoods at the answer's first position, all at once;
2. batched greedy generation for exact match (what a user of the chat model sees).
Labels of several tokens are scored with an extra batched pass over prompt + label.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from tunelab.data.templates import IGNORE_INDEX, encode_chat, encode_prompt, split_prompt_answer
from tunelab.objectives.losses import causal_lm_loss_sum
from tunelab.objectives.sft import pad_causal_batch

Progress = Callable[[int], None]


@dataclass
class LMEval:
    n: int
    loss: float
    perplexity: float
    label_predictions: list[str] = field(default_factory=list)
    generations: list[str] = field(default_factory=list)


def _by_length(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Batches of indices with similar lengths: less padding, same results."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def label_token_ids(tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int], labels: list[str]) -> list[list[int]]:
    """Token ids of each label as it is tokenized right after the prompt (not standalone: BPE merges
    depend on what comes before)."""
    prompt_text = tokenizer.decode(prompt_ids)
    out = []
    for label in labels:
        ids = tokenizer(prompt_text + label, add_special_tokens=False)["input_ids"]
        if ids[: len(prompt_ids)] != prompt_ids:
            ids = prompt_ids + tokenizer(label, add_special_tokens=False)["input_ids"]
        out.append(ids[len(prompt_ids) :])
    return out


@torch.no_grad()
def teacher_forced_pass(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[list[dict[str, str]]],
    *,
    single_token_labels: list[int] | None,
    batch_size: int,
    progress: Progress | None = None,
) -> tuple[float, int, list[list[float]]]:
    """Completion loss sum/count and, if given single-token label ids, their log-probs per example."""
    encoded = [encode_chat(tokenizer, conv, train_on="last_assistant") for conv in conversations]
    features = [{"input_ids": e.input_ids, "labels": e.labels} for e in encoded]
    scores: list[list[float]] = [[] for _ in features]
    loss_sum, count = 0.0, 0
    device = next(model.parameters()).device
    for batch_ix in _by_length([len(f["input_ids"]) for f in features], batch_size):
        batch = {k: v.to(device) for k, v in pad_causal_batch([features[i] for i in batch_ix], tokenizer.pad_token_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        s, c = causal_lm_loss_sum(logits, batch["labels"])
        loss_sum, count = loss_sum + float(s), count + int(c)
        if single_token_labels:
            first = (batch["labels"] != IGNORE_INDEX).int().argmax(dim=1) - 1
            at = logits[torch.arange(len(batch_ix)), first].float().log_softmax(-1)[:, single_token_labels]
            for row, i in enumerate(batch_ix):
                scores[i] = at[row].tolist()
        if progress:
            progress(len(batch_ix))
    return loss_sum, count, scores


@torch.no_grad()
def score_labels(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    labels: list[str],
    *,
    batch_size: int,
) -> list[list[float]]:
    """Sum of log-probs of every label's tokens after each prompt (for labels of several tokens)."""
    device = next(model.parameters()).device
    label_ids = label_token_ids(tokenizer, prompts[0], labels)
    pairs = [(p, li) for p in range(len(prompts)) for li in range(len(labels))]
    scores = [[0.0] * len(labels) for _ in prompts]
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        feats = [
            {"input_ids": prompts[p] + label_ids[li], "labels": [IGNORE_INDEX] * len(prompts[p]) + label_ids[li]}
            for p, li in chunk
        ]
        batch = {k: v.to(device) for k, v in pad_causal_batch(feats, tokenizer.pad_token_id).items()}
        logp = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float().log_softmax(-1)
        targets = batch["labels"][:, 1:]
        gathered = logp[:, :-1].gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        per_row = (gathered * (targets != IGNORE_INDEX)).sum(-1)
        for (p, li), value in zip(chunk, per_row.tolist()):
            scores[p][li] = value
    return scores


@torch.no_grad()
def generate_answers(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    batch_size: int,
    progress: Progress | None = None,
) -> list[str]:
    """Greedy answers, batched with left padding (decoder-only models generate from the right edge)."""
    device = next(model.parameters()).device
    answers = [""] * len(prompts)
    configured = getattr(model.generation_config, "eos_token_id", None)
    configured = configured if isinstance(configured, list) else [configured]
    stop_ids = sorted({tokenizer.eos_token_id, *configured} - {None})
    for batch_ix in _by_length([len(p) for p in prompts], batch_size):
        width = max(len(prompts[i]) for i in batch_ix)
        ids = torch.full((len(batch_ix), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(batch_ix):
            ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]) :] = 1
        out = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
            do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_ids or None,
        )
        for row, i in enumerate(batch_ix):
            answers[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True).strip()
        if progress:
            progress(len(batch_ix))
    return answers


def evaluate_conversations(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[list[dict[str, str]]],
    *,
    labels: list[str] | None,
    max_new_tokens: int,
    batch_size: int,
    progress: Progress | None = None,
) -> LMEval:
    """Loss/perplexity, label choice by log-likelihood (when ``labels``) and greedy generations."""
    model.eval()
    prompts = [encode_prompt(tokenizer, split_prompt_answer(c)[0]) for c in conversations]
    label_ids = label_token_ids(tokenizer, prompts[0], labels) if labels else None
    single = [ids[0] for ids in label_ids] if label_ids and all(len(ids) == 1 for ids in label_ids) else None
    loss_sum, count, scores = teacher_forced_pass(
        model, tokenizer, conversations, single_token_labels=single, batch_size=batch_size, progress=progress
    )
    if labels and single is None:
        scores = score_labels(model, tokenizer, prompts, labels, batch_size=batch_size)
    predictions = [labels[max(range(len(labels)), key=s.__getitem__)] for s in scores] if labels else []
    generations = generate_answers(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress
    )
    loss = loss_sum / max(count, 1)
    return LMEval(len(conversations), loss, math.exp(min(loss, 50.0)), predictions, generations)
