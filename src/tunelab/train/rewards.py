"""Reward sources for online RL: one callable ``reward(prompts, completions, messages, rows) -> scores``,
and :class:`Rewards`, the weighted sum of the recipe's sources with each one's scores kept for the logs.

A spec is one of
- a tunelab run directory (or its ``final/``) trained with a sequence-classification head, e.g. by
  the ``reward`` objective;
- any sequence-classification model spec ``load_model`` accepts (hub id, local dir, ``asset:``);
  the score is the model's single output logit;
- a Python function ``package.module:function`` or ``path/to/file.py:function`` called as
  ``function(prompts, completions, rows) -> list[float]``, where ``rows`` are the data rows the
  prompts came from with every column (``answer``, ``tests``, ...); a function that takes only
  ``(prompts, completions)`` is called that way, and one with a ``rows`` keyword (or ``**kwargs``)
  gets ``rows=``. A recipe's ``args`` are passed as keyword arguments;
- a built-in verifier ``builtin:NAME`` (:mod:`tunelab.train.verifiers`: math answers, formats,
  length, code tests, reasoning-gym scoring), a Python function like the above;
- an LLM judge, ``{judge: MODEL_OR_ENDPOINT, rubric: ...}`` in the recipe (a
  :class:`~tunelab.objectives.online.JudgeReward`): the judge's 1-10 rating of each completion.

``prompts`` are the prompt text as the policy saw it (for chat data the rendered template,
generation prompt included); ``completions`` are the decoded completions without special tokens.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunelab.train.verifiers import BUILTIN_REWARDS

RewardFn = Callable[..., list[float]]
"""``reward(prompts, completions, messages=(), rows=None) -> one float per completion``."""
_MODEL_PREFIXES = ("asset", "tiny")
BUILTIN = "builtin:"


def load_reward(
    spec: str | Any,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 16,
    args: dict[str, Any] | None = None,
) -> RewardFn:
    """Turn a reward spec into a callable; errors say which kind of spec was expected."""
    from tunelab.evaluate.run import final_dir_of  # noqa: PLC0415  (evaluate imports train modules)

    if isinstance(spec, str) and spec.startswith(BUILTIN):
        name = spec[len(BUILTIN) :]
        if name not in BUILTIN_REWARDS:
            known = ", ".join(sorted(BUILTIN_REWARDS))
            raise ValueError(f"objective.reward: {spec!r}: no built-in reward {name!r}; built in: {known}")
        return _calling(spec, BUILTIN_REWARDS[name], args or {})
    target = _function_target(spec) if isinstance(spec, str) else None
    if target is not None and final_dir_of(spec) is None:
        return _python_reward(spec, *target, args or {})
    if args:
        raise ValueError(f"objective.rewards: {spec!r}: args are for Python and built-in reward functions")
    reward = judge_reward(spec, device=device) if not isinstance(spec, str) else None
    reward = reward or RewardModel(spec, device=device, batch_size=batch_size)

    def without_rows(
        prompts: list[str], completions: list[str], messages: Sequence[Any] = (), rows: Any = None
    ):
        return reward(prompts, completions, messages)

    return without_rows


@dataclass
class RewardTerm:
    name: str
    weight: float
    fn: RewardFn


class Rewards:
    """The recipe's reward sources: ``objective.reward`` alone, or ``objective.rewards`` summed with
    their weights. Calling it returns the summed scores and, per source, its own scores."""

    def __init__(self, terms: list[RewardTerm]) -> None:
        self.terms = terms

    @classmethod
    def from_config(cls, cfg: Any, *, device: str | torch.device = "cpu") -> Rewards:
        if cfg.rewards is None:
            return cls([RewardTerm("reward", 1.0, load_reward(cfg.reward, device=device))])
        terms: list[RewardTerm] = []
        for entry in cfg.rewards:
            name = entry.name or _term_name(entry.fn)
            while any(t.name == name for t in terms):
                name += "_"
            terms.append(
                RewardTerm(name, entry.weight, load_reward(entry.fn, device=device, args=entry.args))
            )
        return cls(terms)

    @property
    def several(self) -> bool:
        return len(self.terms) > 1 or self.terms[0].name != "reward"

    def __call__(
        self,
        prompts: list[str],
        completions: list[str],
        messages: Sequence[Any],
        rows: list[dict[str, Any]],
    ) -> tuple[list[float], dict[str, list[float]]]:
        parts = {t.name: t.fn(prompts, completions, messages, rows) for t in self.terms}
        total = [sum(t.weight * parts[t.name][i] for t in self.terms) for i in range(len(completions))]
        return total, parts


def _term_name(spec: Any) -> str:
    """A reward's name in the logs: the function's name, a model's folder name, or ``judge``."""
    if not isinstance(spec, str):
        return "judge"
    where, sep, name = spec.rpartition(":")
    if sep and name.isidentifier() and where not in _MODEL_PREFIXES:
        return name
    return Path(spec.rstrip("/")).name or spec


def judge_reward(config: Any, *, device: str | torch.device = "cpu") -> RewardFn:
    """An LLM judge's rating as the reward (``config`` is the recipe's ``{judge: ..., rubric: ...}``)."""
    # synth (the data-making commands) sits above train; it is loaded only when a recipe asks for it.
    from tunelab.synth.judge import JudgeReward  # noqa: PLC0415

    return JudgeReward.from_config(config, device=str(device))


def _function_target(spec: str) -> tuple[str, str] | None:
    """``(module or file, function)`` when ``spec`` names a Python function, else None."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name.isidentifier() or where in _MODEL_PREFIXES:
        return None
    if where.endswith(".py"):
        return where, name
    if all(part.isidentifier() for part in where.split(".")) and importlib.util.find_spec(
        where.split(".")[0]
    ):
        return where, name
    return None


def _python_reward(spec: str, where: str, name: str, args: dict[str, Any]) -> RewardFn:
    if where.endswith(".py"):
        path = Path(where).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"objective.reward: {spec!r}: no file {path}")
        module_spec = importlib.util.spec_from_file_location(f"tunelab_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)  # type: ignore[union-attr]
    else:
        module = importlib.import_module(where)
    function = getattr(module, name, None)
    if not callable(function):
        raise ValueError(f"objective.reward: {spec!r}: {where} has no function {name!r}")
    return _calling(spec, function, args)


def _calling(spec: str, function: Callable[..., Any], args: dict[str, Any]) -> RewardFn:
    """``function`` called the way its signature asks: ``(prompts, completions, rows, **args)``,
    ``(prompts, completions, rows=rows, **args)`` or the original ``(prompts, completions, **args)``."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # a builtin without a signature: the original two arguments
        signature = None

    def binds(*a: Any, **k: Any) -> bool:
        try:
            return signature is None or bool(signature.bind(*a, **k))
        except TypeError:
            return False

    probe = ([], [], [])
    if binds(*probe, **args):
        mode = "positional"
    elif binds(*probe[:2], rows=[], **args):
        mode = "keyword"
    elif binds(*probe[:2], **args):
        mode = "without"
    else:
        raise ValueError(
            f"objective.reward: {spec!r} must take (prompts, completions[, rows])"
            + (f" and accept {', '.join(args)}" if args else "")
        )

    def reward(
        prompts: list[str], completions: list[str], messages: Sequence[Any] = (), rows: Any = None
    ) -> list[float]:
        rows = rows if rows is not None else [{} for _ in completions]
        if mode == "positional":
            out = function(prompts, completions, rows, **args)
        elif mode == "keyword":
            out = function(prompts, completions, rows=rows, **args)
        else:
            out = function(prompts, completions, **args)
        scores = [float(s) for s in out]
        if len(scores) != len(completions):
            raise ValueError(
                f"reward function {spec} returned {len(scores)} scores for {len(completions)} completions"
            )
        return scores

    return reward


class RewardModel:
    """A sequence-classification model with one output; scores prompt + completion.

    Chat prompts are rendered with the reward model's own chat template with the completion as the
    assistant turn (the text a tunelab reward model was trained on); plain prompts are concatenated.
    """

    def __init__(self, spec: str, *, device: str | torch.device = "cpu", batch_size: int = 16) -> None:
        from tunelab.evaluate.run import final_dir_of, load_for_eval  # noqa: PLC0415
        from tunelab.models.load import MODEL_CLASSES, load_model  # noqa: PLC0415

        if final_dir_of(spec) is not None:
            model, tokenizer = load_for_eval(spec, device=str(device))
        else:
            model, tokenizer = load_model(
                spec, device=str(device), model_cls=MODEL_CLASSES["sequence_classification"]
            )
        labels = getattr(model.config, "num_labels", None)
        if labels != 1:
            raise ValueError(
                f"objective.reward: {spec!r} has {labels} outputs; a reward model has exactly one "
                "(train one with objective.name: reward)"
            )
        self.model = model.eval().requires_grad_(False)
        # right padding, as the reward objective trains: the head reads the last non-pad token
        tokenizer.padding_side = "right"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.batch_size = batch_size

    def texts(
        self, prompts: list[str], completions: list[str], messages: Sequence[list[dict[str, Any]] | None]
    ) -> list[str]:
        out = []
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):
            conversation = messages[i] if i < len(messages) else None
            if conversation is not None and self.tokenizer.chat_template:
                turns = [*conversation, {"role": "assistant", "content": completion}]
                out.append(self.tokenizer.apply_chat_template(turns, tokenize=False))
            else:
                out.append(prompt + completion)
        return out

    @torch.no_grad()
    def __call__(
        self, prompts: list[str], completions: list[str], messages: Sequence[list[dict[str, Any]] | None] = ()
    ) -> list[float]:
        texts = self.texts(prompts, completions, messages)
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[start : start + self.batch_size],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
            ).to(self.device)
            logits = self.model(**enc).logits
            scores += logits[:, 0].float().tolist()
        return scores
