"""What online objectives (ppo, grpo) share: rollout settings and prompt encoding.

Online objectives read *prompts* only. A prompt comes from any row the data loader understands:
chat or instruction rows give the conversation before their last assistant turn (the answer, if
any, is not shown to the policy; a chat row may simply end with the user's turn), preference rows give their
``prompt``, and text rows are used verbatim without a chat template (a file with a plain
``prompt`` column reads as text with ``data.columns: {text: prompt}``). Each feature keeps its row
number, so reward functions receive the whole row (``answer``, ``tests``, ...: docs/objectives.md). The training loop is
:func:`tunelab.train.rl.run_online`; the engine routes there when the class says ``online = True``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from tunelab.data.templates import render
from tunelab.objectives.base import BaseObjective, Dropped, ObjectiveConfig

if TYPE_CHECKING:  # the config classes are part of the recipe schema, which loads without the ML stack
    from transformers import PreTrainedTokenizerBase


class JudgeReward(BaseModel):
    """``objective.reward: {judge: MODEL_OR_ENDPOINT, rubric: ...}``: an LLM rates each completion 1-10."""

    model_config = ConfigDict(extra="forbid")
    judge: str = Field(
        description="the judge: a model spec (hub id, dir, asset:, run dir) or an OpenAI-compatible "
        "endpoint URL, with the served model after '#' (http://host:8000/v1#name)"
    )
    rubric: str | None = Field(None, description="what the judge rates against; default: tunelab's rubric")
    max_tokens: int = Field(256, ge=1, description="the judge's budget for its reasoning and rating")
    unparsed_score: float = Field(
        5.5, description="score of a completion whose rating cannot be read (5.5: the scale's middle)"
    )
    concurrency: int = Field(4, ge=1, description="endpoint requests in flight at once")

    @model_validator(mode="after")
    def _judge_given(self) -> JudgeReward:
        if not self.judge.strip():
            raise ValueError("judge: give a model spec or an endpoint URL")
        return self


# The two shapes of ``reward``, told apart by type (a mapping is a judge), so a mistake in one is
# reported against that shape alone; tunelab.recipe drops these tags from the field paths it prints.
REWARD_TAGS = ("reward_spec", "judge_reward")


def _reward_shape(value: Any) -> str:
    return REWARD_TAGS[1] if isinstance(value, dict | JudgeReward) else REWARD_TAGS[0]


RewardSource = Annotated[
    Annotated[str, Tag(REWARD_TAGS[0])] | Annotated[JudgeReward, Tag(REWARD_TAGS[1])],
    Discriminator(_reward_shape),
]


class WeightedReward(BaseModel):
    """One entry of ``objective.rewards``: a reward source, its weight in the sum, and its log name."""

    model_config = ConfigDict(extra="forbid")
    fn: RewardSource = Field(
        description="a reward source, as objective.reward takes it, or a built-in 'builtin:NAME' "
        "(math_answer, answer_format, think_format, length_penalty, code_tests, gym_score)"
    )
    weight: float = Field(1.0, description="weight of this reward in the summed score")
    name: str | None = Field(None, description="name in the metrics (reward/NAME); default: the function's")
    args: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments for a Python or built-in reward function"
    )


class RolloutConfig(ObjectiveConfig):
    """Settings every online objective has: where rewards come from and how completions are sampled."""

    reward: RewardSource | None = Field(
        None,
        description="reward source: a tunelab reward run dir, a sequence-classification model spec "
        "(score = its single logit), a Python function 'module:function' / 'path/file.py:function' "
        "called as f(prompts, completions[, rows]) -> list[float], a built-in 'builtin:NAME', or "
        "{judge: MODEL_OR_ENDPOINT, rubric: ...} for an LLM judge's 1-10 rating",
    )
    rewards: list[WeightedReward] | None = Field(
        None,
        description="several reward sources [{fn, weight, name, args}], summed with their weights and "
        "each logged as reward/NAME; give this or reward, not both",
    )
    max_new_tokens: int = Field(64, ge=1, description="completion budget per rollout")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the rollouts")
    top_p: float = Field(1.0, gt=0, le=1)
    num_minibatches: int = Field(1, ge=1, description="optimizer steps per pass over one rollout batch")

    @model_validator(mode="after")
    def _reward_given(self) -> RolloutConfig:
        if self.reward is not None and self.rewards is not None:
            raise ValueError("give objective.reward or objective.rewards, not both")
        if self.reward is None and not self.rewards:
            raise ValueError(
                "reward: required field is missing; give a reward run dir, a model spec, 'module:function', "
                "'builtin:NAME' or {judge: ...} (or a list in objective.rewards)"
            )
        sources = [self.reward] if self.rewards is None else [r.fn for r in self.rewards]
        if any(isinstance(s, str) and not s.strip() for s in sources):
            raise ValueError("reward: give a reward run dir, a model spec, 'module:function' or {judge: ...}")
        return self


def prompt_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation up to (not including) its last assistant turn; all of it if there is none."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
    return messages[:last]


class OnlineObjective(BaseObjective):
    """Encodes prompts for generation and owns the algorithm: group size, passes per rollout,
    advantages and the minibatch loss. :func:`tunelab.train.rl.run_online` runs rollout → score →
    update around these. ``batch`` is the loop's rollout (``scores``, ``mask``, ``old_logp``,
    ``ref_logp``, ``values``: completion-token tensors, see :mod:`tunelab.objectives.rl_losses`)."""

    data_kinds = ("text", "chat", "preference", "unpaired", "prompt")

    online = True
    value_head = False
    """The policy carries a value head, trained with it and saved beside it (PPO)."""
    adapts_kl = False
    """The KL coefficient moves between steps (logged as ``kl_coef``)."""

    def __init__(self, cfg: RolloutConfig, tokenizer: PreTrainedTokenizerBase, data_cfg: Any) -> None:
        self.config = cfg
        self.tokenizer = tokenizer
        max_length = getattr(data_cfg, "max_length", 1024)
        self.max_prompt_tokens = max_length - cfg.max_new_tokens
        if self.max_prompt_tokens < 1:
            raise ValueError(
                f"data.max_length={max_length} leaves no room for prompts after "
                f"objective.max_new_tokens={cfg.max_new_tokens}; raise data.max_length"
            )

    def encode(self, row: int, example: dict[str, Any]) -> dict[str, Any] | Dropped:
        messages = example.get("messages") or example.get("prompt")
        if messages:
            messages = prompt_messages(messages)
            if not messages:
                return Dropped(row, "no prompt: the conversation starts with the assistant")
            text = render(self.tokenizer, messages, generation_prompt=True, tools=example.get("tools"))
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        elif "text" in example and "label" not in example:
            messages, text = None, example["text"]
            ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        else:
            return Dropped(
                row, f"{self.config.name} needs prompts (chat, instruction, preference or text rows)"
            )
        if len(ids) > self.max_prompt_tokens:
            return Dropped(
                row,
                f"prompt has {len(ids)} tokens; data.max_length - objective.max_new_tokens allows "
                f"{self.max_prompt_tokens}",
            )
        # ``row`` finds the data row again, so a reward can read its other columns (answer, tests, ...)
        return {"prompt_ids": list(ids), "prompt_text": text, "messages": messages, "row": row}

    def units(self, batch: dict[str, Any]) -> int:
        return len(batch.get("prompt_ids", []))

    @property
    def group(self) -> int:
        """Completions sampled per prompt."""
        return 1

    @property
    def passes(self) -> int:
        """Passes over each rollout batch."""
        raise NotImplementedError

    @property
    def kl_weight(self) -> float:
        """The KL penalty's (initial) weight; 0 = no reference needed."""
        raise NotImplementedError

    def advantages(self, batch: Any, kl_coef: float) -> tuple[Any, Any, dict[str, float]]:
        """``(advantages, returns or None, extra metrics)`` of a scored rollout batch."""
        raise NotImplementedError

    def minibatch_loss(
        self, logp: Any, values: Any, batch: Any, advantages: Any, returns: Any, num_items: Any
    ) -> tuple[Any, dict[str, Any]]:
        """The loss of one minibatch from the policy's fresh log-probs (and values)."""
        raise NotImplementedError

    def next_kl_coef(self, kl_coef: float, kl: float, n: int) -> float:
        """The KL coefficient for the next step, after one with measured ``kl`` over ``n`` completions."""
        return kl_coef
