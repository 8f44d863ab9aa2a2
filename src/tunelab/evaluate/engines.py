"""Inference engines behind one interface, so a run and each of its exports are measured the same way.

An export is only as good as the engine that serves it: a GGUF runs in llama.cpp (Ollama, LM Studio,
llama-server), a merged directory in transformers, an adapter through PEFT. Each engine here renders
the prompt with the chat template *the artefact carries* (a GGUF's ``tokenizer.chat_template``, a
directory's tokenizer), stops at the end-of-sequence / end-of-turn ids *the artefact declares*, and
decodes greedily; so a wrong template or a missing stop token in an export shows up as a different
answer, not as a silent pass.

Every engine gives, per conversation, the greedy answer with its token ids and whether it stopped by
itself (:meth:`generate`), and the per-token log-probabilities of a given answer after the prompt
(:meth:`answer_logprobs`). :func:`evaluate_engine` turns those into the metrics ``tunelab eval``
reports for language-model tasks (exact match, label accuracy by log-likelihood, answer perplexity)
plus the per-example data the export gate compares.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.data.templates import split_prompt_answer
from tunelab.evaluate.metrics import exact_match
from tunelab.models.llamacpp import open_llama

AGREEMENT_TOKENS = 32


@dataclass
class Generation:
    """One greedy answer: its text, its token ids (the stop token included when it came) and whether
    the model ended it itself with an end-of-sequence / end-of-turn token within the budget."""

    text: str
    token_ids: list[int]
    stopped_by_eos: bool


class Engine:
    """Shared logic: prompt rendering, answer tokenisation and greedy scoring; subclasses supply the
    template renderer, the tokenizer and the forward pass of their runtime."""

    name: str = "engine"
    stop_ids: frozenset[int] = frozenset()
    eos_text: str = ""

    # -- what each runtime provides ---------------------------------------------------------------
    def render(self, messages: list[dict[str, Any]], *, generation_prompt: bool) -> str:
        raise NotImplementedError

    def tokenize(self, text: str) -> list[int]:
        raise NotImplementedError

    def greedy(self, prompt: list[int], max_new_tokens: int) -> list[int]:
        raise NotImplementedError

    def token_logprobs(self, ids: list[int], start: int) -> list[float]:
        """log p(ids[i] | ids[:i]) for i in [start, len(ids))."""
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    # -- the interface ------------------------------------------------------------------------------
    def generate(self, messages: list[dict[str, Any]], max_new_tokens: int) -> Generation:
        return self.generation(self.greedy(self.prompt_ids(messages), max_new_tokens))

    def prompt_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        return self.tokenize(self.render(messages, generation_prompt=True))

    def generation(self, ids: list[int]) -> Generation:
        """The answer to keep from greedy ids (cut at the first stop id, which is kept)."""
        stopped = bool(ids) and ids[-1] in self.stop_ids
        text = self.decode(ids[:-1] if stopped else ids).strip()
        return Generation(text, ids, stopped)

    def answer_ids(
        self, messages: list[dict[str, Any]], answer: str, *, with_stop: bool = True
    ) -> tuple[list[int], int]:
        """The prompt and ``answer`` as token ids, and where the answer starts; with ``with_stop``,
        the stop token the template puts after the answer (the token that makes the model stop) too."""
        prompt_text = self.render(messages, generation_prompt=True)
        target = answer
        if with_stop and self.eos_text:
            full = self.render([*messages, {"role": "assistant", "content": answer}], generation_prompt=False)
            rest = full[len(prompt_text) :] if full.startswith(prompt_text) else ""
            if rest.lstrip().startswith(answer + self.eos_text):
                target = rest[: rest.index(answer) + len(answer)] + self.eos_text
        prompt = self.tokenize(prompt_text)
        ids = self.tokenize(prompt_text + target)
        start = len(prompt) if ids[: len(prompt)] == prompt else _common_prefix(ids, prompt)
        return ids, max(start, 1)

    def answer_logprobs(
        self, messages: list[dict[str, Any]], answer: str, *, with_stop: bool = True
    ) -> list[float]:
        """Log-probs of ``answer``'s tokens after the prompt (see :meth:`answer_ids`)."""
        return self.token_logprobs(*self.answer_ids(messages, answer, with_stop=with_stop))

    # -- batches: one call per chunk of examples; runtimes that batch override these ---------------
    batch_size: int = 1

    def generate_many(self, prompts: list[list[dict[str, Any]]], max_new_tokens: int) -> list[Generation]:
        return [self.generate(prompt, max_new_tokens) for prompt in prompts]

    def logprobs_many(self, requests: list[tuple[list[int], int]]) -> list[list[float]]:
        """:meth:`token_logprobs` of each (ids, start)."""
        return [self.token_logprobs(ids, start) for ids, start in requests]

    def close(self) -> None:
        """Free the runtime's memory (a GGUF's context, a model's weights)."""


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


class TransformersEngine(Engine):
    """A transformers or PEFT model with its own tokenizer and chat template: a run's ``final/``, a
    merged directory, a base model, or a base with an exported adapter."""

    def __init__(self, model: Any, tokenizer: Any, *, name: str) -> None:
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        from tunelab.evaluate.efficiency import stop_token_ids  # noqa: PLC0415

        self.stop_ids = frozenset(stop_token_ids(model, tokenizer))
        self.eos_text = tokenizer.eos_token or ""

    @classmethod
    def load(cls, spec: str, *, name: str | None = None, device: str = "cpu") -> TransformersEngine:
        """A run (or its ``final/``), a merged/HF directory, a PEFT adapter directory, or any base spec."""
        model, tokenizer = load_transformers(spec, device=device)
        return cls(model, tokenizer, name=name or spec)

    def render(self, messages: list[dict[str, Any]], *, generation_prompt: bool) -> str:
        from tunelab.data.templates import render  # noqa: PLC0415

        return render(self.tokenizer, messages, generation_prompt=generation_prompt)

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def greedy(self, prompt: list[int], max_new_tokens: int) -> list[int]:
        import torch  # noqa: PLC0415

        device = next(self.model.parameters()).device
        ids = torch.tensor([prompt], device=device)
        with torch.no_grad():
            out = self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=sorted(self.stop_ids) or None,
            )
        new = out[0, len(prompt) :].tolist()
        return _cut_at_stop(new, self.stop_ids)

    def token_logprobs(self, ids: list[int], start: int) -> list[float]:
        import torch  # noqa: PLC0415

        device = next(self.model.parameters()).device
        tensor = torch.tensor([ids], device=device)
        with torch.no_grad():
            logits = self.model(input_ids=tensor, attention_mask=torch.ones_like(tensor)).logits[0]
        logp = logits[start - 1 : len(ids) - 1].float().log_softmax(-1)
        return logp.gather(-1, tensor[0, start:].unsqueeze(-1)).squeeze(-1).tolist()

    batch_size = 16  # as `tunelab eval`

    def generate_many(self, prompts: list[list[dict[str, Any]]], max_new_tokens: int) -> list[Generation]:
        """Greedy answers of a batch of prompts in one left-padded ``generate`` call."""
        import torch  # noqa: PLC0415

        from tunelab.evaluate.lm import left_padded  # noqa: PLC0415  (torch at import)

        pad = self._pad_id()
        ids, mask = left_padded([self.prompt_ids(prompt) for prompt in prompts], pad)
        width = ids.size(1)
        device = next(self.model.parameters()).device
        with torch.no_grad():
            out = self.model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=sorted(self.stop_ids) or None,
            )
        return [self.generation(_cut_at_stop(row[width:].tolist(), self.stop_ids)) for row in out]

    def logprobs_many(self, requests: list[tuple[list[int], int]]) -> list[list[float]]:
        """Right-padded forward passes over requests of similar length (at most ``batch_size`` rows)."""
        import torch  # noqa: PLC0415

        out: list[list[float]] = [[] for _ in requests]
        order = sorted(range(len(requests)), key=lambda i: len(requests[i][0]))
        device = next(self.model.parameters()).device
        for first in range(0, len(order), self.batch_size):
            rows = order[first : first + self.batch_size]
            width = max(len(requests[i][0]) for i in rows)
            ids = torch.full((len(rows), width), self._pad_id(), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, i in enumerate(rows):
                seq = requests[i][0]
                ids[row, : len(seq)], mask[row, : len(seq)] = torch.tensor(seq), 1
            with torch.no_grad():
                logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            for row, i in enumerate(rows):
                seq, start = requests[i]
                logp = logits[row, start - 1 : len(seq) - 1].float().log_softmax(-1)
                target = torch.tensor(seq[start:], device=logp.device).unsqueeze(-1)
                out[i] = logp.gather(-1, target).squeeze(-1).tolist()
        return out

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else min(self.stop_ids, default=0))

    def close(self) -> None:
        self.model = None


def _cut_at_stop(ids: list[int], stops: frozenset[int]) -> list[int]:
    for i, token in enumerate(ids):
        if token in stops:
            return ids[: i + 1]
    return ids


def load_transformers(spec: str, *, device: str = "cpu") -> tuple[Any, Any]:
    """A run, a merged directory, an exported adapter directory or any base spec, in fp32."""
    from tunelab.evaluate.run import load_for_eval  # noqa: PLC0415

    return load_for_eval(spec, device=device, dtype="float32")


class LlamaCppEngine(Engine):
    """A GGUF file in llama.cpp, the engine that serves it: the GGUF's own chat template (its
    ``tokenizer.chat_template``) and its own end-of-sequence / end-of-turn ids, greedy decoding from
    the logits, and log-probs from the same logits."""

    def __init__(
        self, path: str | Path, *, n_ctx: int = 1024, seed: int = 0, name: str | None = None
    ) -> None:
        self.path, self.name, self.n_ctx = Path(path), name or str(path), n_ctx
        if not self.path.is_file():
            raise FileNotFoundError(f"{path}: no such GGUF file")
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        self.llm = open_llama(
            self.path,
            n_ctx=n_ctx,
            logits_all=True,
            verbose=False,
            seed=seed,
            n_threads=threads,  # llama-cpp-python's default is half the cores; torch's side uses them all
            n_threads_batch=threads,
        )
        meta = dict(self.llm.metadata)
        self.chat_template = meta.get("tokenizer.chat_template")
        if not self.chat_template:
            raise ValueError(
                f"{path}: the GGUF has no tokenizer.chat_template, so a chat server would guess one; "
                "re-export it from a run whose tokenizer has the template it trained with"
            )
        self.stop_ids = frozenset(self._stop_ids(meta))
        self.bos_text = self._token_text(meta.get("tokenizer.ggml.bos_token_id"))
        self.eos_text = self._token_text(meta.get("tokenizer.ggml.eos_token_id"))
        self.add_bos = str(meta.get("tokenizer.ggml.add_bos_token", "false")).lower() == "true"

    def _stop_ids(self, meta: dict[str, str]) -> set[int]:
        keys = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
        ids = {int(meta[k]) for k in keys if meta.get(k) not in (None, "")}
        return ids | {int(self.llm.token_eos())} - {-1}

    def _token_text(self, token_id: str | None) -> str:
        if token_id in (None, ""):
            return ""
        return self.llm.detokenize([int(token_id)], special=True).decode("utf-8", errors="replace")

    def render(self, messages: list[dict[str, Any]], *, generation_prompt: bool) -> str:
        from transformers.utils.chat_template_utils import render_jinja_template  # noqa: PLC0415

        rendered, _ = render_jinja_template(
            [messages],
            chat_template=self.chat_template,
            add_generation_prompt=generation_prompt,
            bos_token=self.bos_text,
            eos_token=self.eos_text,
        )
        return rendered[0]

    def tokenize(self, text: str) -> list[int]:
        # llama-server adds BOS when the GGUF says so, unless the template already wrote it
        add_bos = self.add_bos and not (self.bos_text and text.startswith(self.bos_text))
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def decode(self, ids: list[int]) -> str:
        return self.llm.detokenize(ids).decode("utf-8", errors="replace")

    def _eval(self, ids: list[int]) -> None:
        if self.llm.n_tokens + len(ids) > self.n_ctx:
            raise ValueError(
                f"{self.path}: {self.llm.n_tokens + len(ids)} tokens do not fit llama.cpp's context of {self.n_ctx}"
            )
        self.llm.eval(ids)

    def _feed(self, ids: list[int]) -> None:
        """The context holds ``ids``: the longest prefix already evaluated is kept (its KV cache and,
        with ``logits_all``, its logits), the rest evaluated. One example's prompt is evaluated once
        for its greedy answer, its gold answer and every label."""
        keep = _common_prefix(self.llm.input_ids[: self.llm.n_tokens].tolist(), ids)
        self.llm.n_tokens = keep  # llama.eval drops the KV cache past n_tokens first
        self._eval(ids[keep:])

    def greedy(self, prompt: list[int], max_new_tokens: int) -> list[int]:
        self._feed(prompt)
        out: list[int] = []
        for _ in range(max_new_tokens):
            token = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            out.append(token)
            if token in self.stop_ids or self.llm.n_tokens >= self.n_ctx:
                break
            self._eval([token])
        return out

    def token_logprobs(self, ids: list[int], start: int) -> list[float]:
        self._feed(ids)
        logits = np.asarray(self.llm.scores[start - 1 : len(ids) - 1], dtype=np.float64)
        logp = logits - _logsumexp(logits)
        return [float(logp[i, t]) for i, t in enumerate(ids[start:])]

    def close(self) -> None:
        self.llm.close()


def _logsumexp(x: np.ndarray) -> np.ndarray:
    top = x.max(axis=-1, keepdims=True)
    return top + np.log(np.exp(x - top).sum(axis=-1, keepdims=True))


def gguf_file(spec: str) -> Path:
    """``spec`` itself when it names a ``.gguf``, else the one GGUF in the export folder ``spec``."""
    path = Path(spec)
    if path.suffix.lower() == ".gguf":
        return path
    found = sorted(path.glob("*.gguf")) if path.is_dir() else []
    if len(found) != 1:
        raise FileNotFoundError(
            f"{spec}: expected a .gguf file or a folder with exactly one (found {len(found)})"
        )
    return found[0]


def is_gguf_spec(spec: str) -> bool:
    """A ``.gguf`` file, or an export folder holding exactly one (``tunelab export --gguf``)."""
    path = Path(spec)
    return path.suffix.lower() == ".gguf" or (path.is_dir() and len(list(path.glob("*.gguf"))) == 1)


def engine_for(spec: str, *, name: str | None = None, device: str = "cpu") -> Engine:
    """The engine that serves ``spec``: llama.cpp for a GGUF (or an export folder holding one),
    transformers/PEFT for everything else."""
    if is_gguf_spec(spec):
        return LlamaCppEngine(gguf_file(spec), name=name or spec)
    return TransformersEngine.load(spec, name=name, device=device)


@dataclass
class EngineEval:
    """Per-example results of one engine on one set of conversations."""

    name: str
    golds: list[str]
    generations: list[Generation]
    answer_logprobs: list[list[float]]
    label_predictions: list[str] = field(default_factory=list)
    labels: list[str] | None = None

    @property
    def n(self) -> int:
        return len(self.golds)

    def per_example(self) -> dict[str, list[float]]:
        scores = {
            "exact_match": [float(exact_match(g.text, gold)) for g, gold in zip(self.generations, self.golds)]
        }
        if self.labels:
            scores["accuracy_loglik"] = [float(p == g) for p, g in zip(self.label_predictions, self.golds)]
        scores["stopped"] = [float(g.stopped_by_eos) for g in self.generations]
        return scores

    @property
    def perplexity(self) -> float:
        """Token-weighted perplexity of the gold answers (their stop token included)."""
        total = [lp for row in self.answer_logprobs for lp in row]
        return math.exp(min(-sum(total) / max(len(total), 1), 50.0))

    def metrics(self) -> dict[str, float]:
        out = {k: float(np.mean(v)) for k, v in self.per_example().items()}
        out["stop_share"] = out.pop("stopped")
        loss = math.log(self.perplexity)
        return {"loss": loss, "perplexity": self.perplexity, **out}


def evaluate_engine(
    engine: Engine,
    conversations: list[list[dict[str, Any]]],
    *,
    labels: list[str] | None = None,
    max_new_tokens: int = AGREEMENT_TOKENS,
    progress: Any = None,
) -> EngineEval:
    """Greedy answers, gold-answer log-probs and (with ``labels``) the label of highest likelihood, in
    chunks of ``engine.batch_size`` examples (a batched runtime answers each chunk in a few calls; one
    that is not scores an example's gold answer and labels right after its greedy answer, so its
    prompt stays in the cache)."""
    split = [split_prompt_answer(conv) for conv in conversations]
    golds = [gold for _, gold in split]
    generations: list[Generation] = []
    logprobs: list[list[float]] = []
    predictions: list[str] = []
    for first in range(0, len(split), engine.batch_size):
        chunk = split[first : first + engine.batch_size]
        generations += engine.generate_many([prompt for prompt, _ in chunk], max_new_tokens)
        requests = []
        for prompt, gold in chunk:
            requests.append(engine.answer_ids(prompt, gold))
            requests += [engine.answer_ids(prompt, label, with_stop=False) for label in labels or []]
        scores = engine.logprobs_many(requests)
        step = 1 + len(labels or [])
        for row in range(len(chunk)):
            logprobs.append(scores[row * step])
            if labels:
                sums = [sum(lp) for lp in scores[row * step + 1 : (row + 1) * step]]
                predictions.append(labels[int(np.argmax(sums))])
        if progress:
            progress(len(chunk))
    return EngineEval(engine.name, golds, generations, logprobs, predictions, labels)


def token_agreement(a: list[int], b: list[int], n: int = AGREEMENT_TOKENS) -> float:
    """Share of the first ``n`` generated tokens on which two greedy decodes agree: the common prefix
    over the longer of the two (greedy decodes that part ways never meet again in any useful sense)."""
    a, b = a[:n], b[:n]
    longest = max(len(a), len(b))
    return 1.0 if longest == 0 else _common_prefix(a, b) / longest


def engine_eval_to_json(result: EngineEval) -> dict[str, Any]:
    """An :class:`EngineEval` as plain JSON (the export gate caches the run's side)."""
    from dataclasses import asdict  # noqa: PLC0415

    return asdict(result)


def engine_eval_from_json(data: dict[str, Any]) -> EngineEval:
    return EngineEval(
        name=data["name"],
        golds=data["golds"],
        generations=[Generation(**g) for g in data["generations"]],
        answer_logprobs=data["answer_logprobs"],
        label_predictions=data["label_predictions"],
        labels=data["labels"],
    )
