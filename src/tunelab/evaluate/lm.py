"""Model-side evaluation: answer loss, label choice by log-likelihood, greedy generation.

On a CPU every forward pass over the prompts counts, so each batch of prompts is run through the
model once and its key/value cache serves three readouts:
1. the gold answer, teacher-forced after the prompt: answer loss (→ perplexity) and, at its first
   position, the log-likelihood of every single-token label (label choice);
2. greedy generation with ``transformers``' ``generate`` from a copy of the same cache (exact
   match: what a user of the chat model sees).
Labels of several tokens are scored with an extra batched pass over prompt + label.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from tunelab.data.templates import IGNORE_INDEX, encode_chat, encode_prompt, split_prompt_answer
from tunelab.evaluate.efficiency import stop_token_ids
from tunelab.objectives.losses import causal_lm_loss_sum
from tunelab.objectives.sft import causal_lm_forward, pad_causal_batch, prepends_virtual_tokens

Progress = Callable[[int], None]


@dataclass
class LMEval:
    n: int
    loss: float
    perplexity: float
    label_predictions: list[str] = field(default_factory=list)
    generations: list[str] = field(default_factory=list)


@dataclass
class Item:
    """One example split at the answer: prompt tokens and the gold answer tokens that carry loss."""

    prompt: list[int]
    answer: list[int]


def _by_length(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Batches of indices with similar lengths: less padding, same results."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def split_items(tokenizer: PreTrainedTokenizerBase, conversations: list[list[dict[str, str]]]) -> list[Item]:
    """Tokenize each conversation once; the prompt is what generation would see."""
    items = []
    for conv in conversations:
        enc = encode_chat(tokenizer, conv, train_on="last_assistant")
        prompt = encode_prompt(tokenizer, split_prompt_answer(conv)[0])
        if enc.input_ids[: len(prompt)] != prompt:
            raise ValueError("the chat template tokenizes the prompt differently with and without its answer")
        items.append(Item(prompt, [t for t in enc.labels[len(prompt) :] if t != IGNORE_INDEX]))
    return items


def label_token_ids(
    tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int], labels: list[str]
) -> list[list[int]]:
    """Token ids of each label as tokenized right after the prompt (BPE merges depend on context)."""
    prompt_text = tokenizer.decode(prompt_ids)
    out = []
    for label in labels:
        ids = tokenizer(prompt_text + label, add_special_tokens=False)["input_ids"]
        if ids[: len(prompt_ids)] != prompt_ids:
            ids = prompt_ids + tokenizer(label, add_special_tokens=False)["input_ids"]
        out.append(ids[len(prompt_ids) :])
    return out


def left_padded(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` with every sequence right-aligned (its next token in the last column)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(seqs):
        ids[row, width - len(seq) :] = torch.tensor(seq)
        mask[row, width - len(seq) :] = 1
    return ids, mask


@dataclass
class BatchReadout:
    loss_sum: float
    count: int
    first_logprobs: torch.Tensor  # [batch, vocab] log-probs of the answer's first token
    generations: list[str]


@torch.no_grad()
def read_batch(
    model: Any, tokenizer: PreTrainedTokenizerBase, items: list[Item], *, max_new_tokens: int
) -> BatchReadout:
    """Prefill the prompts once (all but their last token), then answer loss and generation from the cache."""
    device = next(model.parameters()).device
    ids, mask = (t.to(device) for t in left_padded([it.prompt for it in items], tokenizer.pad_token_id))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    prefill = model(
        input_ids=ids[:, :-1],
        attention_mask=mask[:, :-1],
        position_ids=positions[:, :-1],
        use_cache=True,
        logits_to_keep=1,
    )
    cache = prefill.cache  # transformers 5 names the cache `cache` (`past_key_values` is deprecated)

    generated = model.generate(
        input_ids=ids,
        attention_mask=mask,
        cache=copy.deepcopy(cache),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=stop_token_ids(model, tokenizer) or None,
    )
    texts = [tokenizer.decode(row[ids.size(1) :], skip_special_tokens=True).strip() for row in generated]

    # Teacher-force the gold answers: feed the prompt's last token then the answer, right-padded.
    feats = [{"input_ids": [it.prompt[-1], *it.answer[:-1]], "labels": it.answer} for it in items]
    answer = {k: v.to(device) for k, v in pad_causal_batch(feats, tokenizer.pad_token_id).items()}
    steps = answer["input_ids"].size(1)
    logits = model(
        input_ids=answer["input_ids"],
        attention_mask=torch.cat([mask[:, :-1], answer["attention_mask"]], dim=1),
        position_ids=positions[:, -1:] + torch.arange(steps, device=device),
        cache=cache,
        use_cache=True,
    ).logits
    # labels are aligned with the *next* position here, so prepend a dummy column for the shift inside
    shifted = torch.cat([torch.full_like(answer["labels"][:, :1], IGNORE_INDEX), answer["labels"]], dim=1)
    loss_sum, count = causal_lm_loss_sum(torch.cat([logits, logits[:, :1]], dim=1), shifted)
    return BatchReadout(float(loss_sum), int(count), logits[:, 0].float().log_softmax(-1).cpu(), texts)


def is_prompt_learning(model: Any) -> bool:
    config = getattr(model, "active_peft_config", None)
    return bool(config is not None and getattr(config, "is_prompt_learning", False))


@torch.no_grad()
def read_batch_plain(
    model: Any, tokenizer: PreTrainedTokenizerBase, items: list[Item], *, max_new_tokens: int
) -> BatchReadout:
    """The same readouts without sharing a cache, for PEFT prompt-learning models: they inject their
    virtual tokens or prefix on every forward call, so a prefilled cache cannot be continued by hand."""
    device = next(model.parameters()).device
    feats = [
        {"input_ids": it.prompt + it.answer, "labels": [IGNORE_INDEX] * len(it.prompt) + it.answer}
        for it in items
    ]
    side = "right" if prepends_virtual_tokens(model) else "left"
    batch = {k: v.to(device) for k, v in pad_causal_batch(feats, tokenizer.pad_token_id, side=side).items()}
    logits, labels = causal_lm_forward(model, batch)
    loss_sum, count = causal_lm_loss_sum(logits, labels)
    first = (labels != IGNORE_INDEX).int().argmax(dim=1) - 1
    first_logprobs = logits[torch.arange(len(items)), first].float().log_softmax(-1).cpu()
    ids, mask = (t.to(device) for t in left_padded([it.prompt for it in items], tokenizer.pad_token_id))
    generated = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=stop_token_ids(model, tokenizer) or None,
    )
    texts = [tokenizer.decode(row[ids.size(1) :], skip_special_tokens=True).strip() for row in generated]
    return BatchReadout(float(loss_sum), int(count), first_logprobs, texts)


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
            {
                "input_ids": prompts[p] + label_ids[li],
                "labels": [IGNORE_INDEX] * len(prompts[p]) + label_ids[li],
            }
            for p, li in chunk
        ]
        batch = {k: v.to(device) for k, v in pad_causal_batch(feats, tokenizer.pad_token_id).items()}
        logp = (
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            .logits.float()
            .log_softmax(-1)
        )
        targets = batch["labels"][:, 1:]
        gathered = logp[:, :-1].gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        per_row = (gathered * (targets != IGNORE_INDEX)).sum(-1)
        for (p, li), value in zip(chunk, per_row.tolist()):
            scores[p][li] = value
    return scores


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
    """Answer loss/perplexity, label choice by log-likelihood (when ``labels``) and greedy generations."""
    model.eval()
    items = split_items(tokenizer, conversations)
    label_ids = label_token_ids(tokenizer, items[0].prompt, labels) if labels else None
    single = [ids[0] for ids in label_ids] if label_ids and all(len(ids) == 1 for ids in label_ids) else None
    loss_sum, count = 0.0, 0
    generations = [""] * len(items)
    scores: list[list[float]] = [[] for _ in items]
    for batch_ix in _by_length([len(it.prompt) for it in items], batch_size):
        reader = read_batch_plain if is_prompt_learning(model) else read_batch
        readout = reader(model, tokenizer, [items[i] for i in batch_ix], max_new_tokens=max_new_tokens)
        loss_sum, count = loss_sum + readout.loss_sum, count + readout.count
        for row, i in enumerate(batch_ix):
            generations[i] = readout.generations[row]
            if single:
                scores[i] = readout.first_logprobs[row, single].tolist()
        if progress:
            progress(len(batch_ix))
    if labels and single is None:
        scores = score_labels(model, tokenizer, [it.prompt for it in items], labels, batch_size=batch_size)
    predictions = [labels[max(range(len(labels)), key=s.__getitem__)] for s in scores] if labels else []
    loss = loss_sum / max(count, 1)
    return LMEval(len(items), loss, math.exp(min(loss, 50.0)), predictions, generations)


@torch.no_grad()
def text_perplexity(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    *,
    batch_size: int = 8,
    max_length: int = 512,
    progress: Progress | None = None,
) -> tuple[float, int]:
    """Token-weighted perplexity of plain text (no chat template) and the number of predicted tokens.

    Uses the SFT objective's own forward (:func:`causal_lm_forward`), so prompt-learning adapters
    and left padding are handled exactly as in training."""
    model.eval()
    encoded = [
        ids
        for ids in tokenizer(texts, add_special_tokens=True, truncation=True, max_length=max_length)[
            "input_ids"
        ]
        if len(ids) > 1
    ]
    if not encoded:
        raise ValueError("no text of two or more tokens to measure perplexity on")
    device = next(model.parameters()).device
    side = "right" if prepends_virtual_tokens(model) else "left"
    loss_sum, count = 0.0, 0
    for batch_ix in _by_length([len(ids) for ids in encoded], batch_size):
        # the first token has no context to be predicted from (left padding would otherwise supply one)
        feats = [{"input_ids": encoded[i], "labels": [IGNORE_INDEX, *encoded[i][1:]]} for i in batch_ix]
        batch = {
            k: v.to(device) for k, v in pad_causal_batch(feats, tokenizer.pad_token_id, side=side).items()
        }
        logits, labels = causal_lm_forward(model, batch)
        batch_sum, batch_count = causal_lm_loss_sum(logits, labels)
        loss_sum, count = loss_sum + float(batch_sum), count + int(batch_count)
        if progress:
            progress(len(batch_ix))
    return math.exp(min(loss_sum / count, 50.0)), count
