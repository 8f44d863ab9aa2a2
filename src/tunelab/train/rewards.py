"""Reward sources for online RL: one callable ``reward(prompts, completions, messages) -> scores``.

A spec is one of
- a tunelab run directory (or its ``final/``) trained with a sequence-classification head, e.g. by
  the ``reward`` objective;
- any sequence-classification model spec ``load_model`` accepts (hub id, local dir, ``asset:``);
  the score is the model's single output logit;
- a Python function ``package.module:function`` or ``path/to/file.py:function`` called as
  ``function(prompts: list[str], completions: list[str]) -> list[float]``;
- an LLM judge, ``{judge: MODEL_OR_ENDPOINT, rubric: ...}`` in the recipe (a
  :class:`~tunelab.objectives.online.JudgeReward`): the judge's 1-10 rating of each completion.

``prompts`` are the prompt text as the policy saw it (for chat data the rendered template,
generation prompt included); ``completions`` are the decoded completions without special tokens.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

RewardFn = Callable[[list[str], list[str], Sequence[list[dict[str, Any]] | None]], list[float]]
_MODEL_PREFIXES = ("asset", "tiny")


def load_reward(spec: str | Any, *, device: str | torch.device = "cpu", batch_size: int = 16) -> RewardFn:
    """Turn a reward spec into a callable; errors say which kind of spec was expected."""
    from tunelab.evaluate.run import final_dir_of  # noqa: PLC0415  (evaluate imports train modules)

    if not isinstance(spec, str):
        return judge_reward(spec, device=device)

    target = _function_target(spec)
    if target is not None and final_dir_of(spec) is None:
        return _python_reward(spec, *target)
    return RewardModel(spec, device=device, batch_size=batch_size)


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


def _python_reward(spec: str, where: str, name: str) -> RewardFn:
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

    def reward(prompts: list[str], completions: list[str], messages: Sequence[Any] = ()) -> list[float]:
        scores = [float(s) for s in function(prompts, completions)]
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
