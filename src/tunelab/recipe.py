"""The run recipe: one YAML file, validated strictly, all errors reported at once.

Sections: model, data, method, objective, training, eval, export, output. Unknown keys are errors with a
"did you mean" hint (a typo silently ignored is a run silently wrong). ``method`` and
``objective`` are discriminated by ``name``; their fields come from whatever is registered, so a
new method adds its config class and nothing here changes.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tunelab.data.formats import FORMATS, KIND, REQUIRED, detect_file_format
from tunelab.data.loaders import iter_records
from tunelab.methods import METHODS
from tunelab.objectives import OBJECTIVES
from tunelab.objectives.online import REWARD_TAGS
from tunelab.registry import did_you_mean
from tunelab.runs.atomic import blocking_file

if TYPE_CHECKING:
    from tunelab.models.attention import FastPath, Machine

# Keys that were renamed: the loader says so forever instead of calling the old one unknown.
RENAMED: dict[str, str] = {
    "training.lr": "training.learning_rate",
    "training.gradient_accumulation_steps": "training.grad_accum",
    "training.per_device_batch_size": "training.batch_size",
    "method.lora_alpha": "method.alpha",
    "method.lora_dropout": "method.dropout",
}


class Section(BaseModel):
    # NaN and infinity are no setting (`learning_rate: 1e999` reads as inf and trained to a NaN loss)
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)


class ModelSection(Section):
    name_or_path: str = Field(description="hub id, local HF directory, .gguf file, or tiny:llama")
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    attention: Literal["auto", "sdpa", "eager", "varlen", "flex_attention", "flash_attention_2"] = Field(
        "auto",
        description="attention kernel; auto: the model's default off CUDA, on CUDA flash_attention_2 if "
        "flash-attn is installed, else varlen (PyTorch's own FlashAttention varlen kernel) when the run "
        "packs, else sdpa",
    )


class SplitSpec(Section):
    eval_ratio: float = Field(0.1, gt=0, lt=1)
    by: Literal["random", "stratified", "group", "time"] = "random"
    key: str | None = Field(None, description="label, group or timestamp column for by=stratified/group/time")
    seed: int = 0


class TaskSection(Section):
    name: str
    train: str
    eval: str | None = None
    weight: float = Field(1.0, ge=0)


class MixingSection(Section):
    temperature: float | None = Field(
        None, gt=0, description="sample tasks with p ∝ rows^(1/T) instead of weights"
    )
    total: int | None = Field(None, ge=1, description="rows in the mixture; default: the sum of all tasks")
    tag: str | None = Field(None, description="task tag put before each prompt, e.g. '[{task}] '")


class ReplaySection(Section):
    path: str = Field(description="earlier task's training data to mix back in")
    fraction: float = Field(gt=0, lt=1, description="share of the training mixture taken from `path`")


class DataSection(Section):
    train: str | None = None
    eval: str | None = None
    tasks: list[TaskSection] | None = Field(None, description="several datasets mixed into one run")
    mixing: MixingSection = Field(default_factory=MixingSection)
    replay: ReplaySection | None = None
    format: Literal[
        "auto",
        "text",
        "instruction",
        "chat",
        "prompt_completion",
        "preference",
        "unpaired",
        "prompt",
        "classification",
    ] = "auto"
    columns: dict[str, str] = Field(default_factory=dict)
    template: str | None = Field(
        None,
        description="a built-in chat template (chatml, qwen3, llama-3, gemma, mistral, phi, alpaca, plain) "
        "instead of the tokenizer's own; needed when the model has none",
    )
    train_on_reasoning: bool = Field(
        True, description="loss on assistant reasoning (reasoning_content, <think>…</think>); false masks it"
    )
    max_length: int = Field(1024, ge=8)
    packing: bool | Literal["auto"] = Field(
        "auto",
        description="pack short examples into max_length sequences, attention kept per example; auto: "
        "pack for token-level objectives when the attention is varlen, flash_attention_2 or flex_attention",
    )
    split: SplitSpec | None = Field(None, description="split data.train into train/eval on the fly")
    skip_bad: bool = False
    strict: bool = Field(False, description="fail (instead of warn) on leakage, truncation and empty targets")

    @model_validator(mode="after")
    def _eval_or_split(self) -> DataSection:
        if self.eval is not None and self.split is not None:
            raise ValueError("give data.eval or data.split, not both. Choose one.")
        if (self.train is None) == (self.tasks is None):
            raise ValueError("give data.train (one dataset) or data.tasks (several), exactly one of them")
        if self.tasks and self.split is not None:
            raise ValueError("data.split works on data.train; give each task its own eval file instead")
        return self


class EarlyStopping(Section):
    metric: str = "eval_loss"
    mode: Literal["min", "max"] = "min"
    patience: int = Field(3, ge=1)
    min_delta: float = Field(0.0, ge=0.0)


class EwcSection(Section):
    model_config = ConfigDict(extra="forbid", validate_default=True, populate_by_name=True)
    previous_data: str = Field(description="the previous task's data: Fisher information is estimated on it")
    lambda_: float = Field(alias="lambda", gt=0, description="penalty weight")
    batches: int | None = Field(None, ge=1, description="Fisher batches; default all")
    batch_size: int = Field(1, ge=1, description="1 = per-example Fisher (the textbook estimate)")


class FsdpSection(Section):
    sharding: Literal["full", "grad_op"] = Field(
        "full",
        description="full: parameters re-sharded after forward (ZeRO-3-like, least memory); "
        "grad_op: kept gathered until backward ends (ZeRO-2-like, less communication)",
    )
    auto_wrap: Literal["transformer_blocks", "none"] = Field(
        "transformer_blocks", description="shard each transformer block as its own unit, or only the root"
    )
    cpu_offload: bool = Field(False, description="keep sharded parameters and optimizer state in CPU RAM")


class DeepSpeedSection(Section):
    zero_stage: Literal[2, 3] = 2
    offload_optimizer: bool = False
    offload_params: bool = Field(False, description="ZeRO-3 only")

    @model_validator(mode="after")
    def _offload_params_needs_stage3(self) -> DeepSpeedSection:
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage: 3 (ZeRO-2 does not partition parameters)")
        return self


class DistributedSection(Section):
    strategy: Literal["none", "ddp", "fsdp", "deepspeed"] = Field(
        "none", description="with more than one process, none means ddp"
    )
    nproc: int | None = Field(
        None, ge=1, description="processes on this machine; `tunelab train --nproc N` overrides"
    )
    fsdp: FsdpSection = Field(default_factory=FsdpSection)
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection)


class TrainingSection(Section):
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs")
    batch_size: int | Literal["auto"] = Field(
        8,
        description="examples per micro-batch, or auto: the largest the memory plan fits on this device, "
        "checked by a probe step on CUDA (the choice is recorded in manifest.json)",
    )
    grad_accum: int = Field(1, ge=1)
    learning_rate: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    lr_scheduler: Literal["linear", "cosine", "constant"] = "linear"
    warmup_ratio: float | None = Field(None, ge=0, lt=1)
    warmup_steps: int | None = Field(None, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool = False
    checkpoint_every: int | None = Field(
        None,
        ge=1,
        description="with gradient_checkpointing: checkpoint one decoder layer in k (layers 0, k, 2k, ...), "
        "the others keep their activations; default every layer",
    )
    offload_activations: bool = Field(
        False,
        description="with gradient_checkpointing: keep the checkpointed layers' inputs in host memory "
        "instead of on the GPU (copied out in forward, back in backward)",
    )
    compile: bool = Field(
        False,
        description="regional torch.compile: each decoder layer compiled in place after the method and "
        "checkpointing (one compile per layer type); the first step's extra time is reported",
    )
    kernels: Literal["auto", "liger", "none"] = Field(
        "auto",
        description="Liger's Triton kernels (RMSNorm, SwiGLU, RoPE, fused linear cross-entropy): auto = "
        "liger when liger-kernel is installed, the device is CUDA and the model type is supported",
    )
    log_every: int = Field(1, ge=1)
    eval_every: int | None = Field(
        None, ge=1, description="optimizer steps between evals; default once per epoch"
    )
    save_every: int | None = Field(
        None, ge=1, description="optimizer steps between checkpoints; default = eval_every"
    )
    keep_checkpoints: int = Field(2, ge=1)
    early_stopping: EarlyStopping | None = None
    layerwise_lr_decay: float | None = Field(
        None,
        gt=0,
        le=1,
        description="LR multiplier per block counted from the top (top block ×1, next ×d, ...)",
    )
    lr_multipliers: dict[Literal["embeddings", "head", "norm"], float] = Field(
        default_factory=dict, description="per-group LR multipliers, e.g. {embeddings: 0.1}"
    )
    ewc: EwcSection | None = Field(None, description="elastic weight consolidation against a previous task")
    gradual_unfreeze_every: int | None = Field(
        None, ge=1, description="start with the top block trainable; unfreeze one more block every N steps"
    )
    distributed: DistributedSection = Field(
        default_factory=DistributedSection, description="several processes: ddp, fsdp or deepspeed"
    )
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list, description="experiment trackers, logged offline inside the run directory"
    )

    @field_validator("batch_size", mode="before")
    @classmethod
    def _positive_or_auto(cls, value: Any) -> Any:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        if isinstance(value, str) and value.strip().isdigit() and int(value) >= 1:
            return int(value)
        raise ValueError(f"give a positive integer or auto, got {value!r}")

    @model_validator(mode="after")
    def _one_warmup(self) -> TrainingSection:
        if self.warmup_ratio is not None and self.warmup_steps is not None:
            raise ValueError("give warmup_ratio or warmup_steps, not both. Choose one.")
        return self

    @model_validator(mode="after")
    def _activation_memory_needs_checkpointing(self) -> TrainingSection:
        # they shape what checkpointing keeps; turning checkpointing on behind the user's back would
        # make `gradient_checkpointing: false` mean two things
        given = self._activation_settings()
        if given and not self.gradient_checkpointing:
            name, value = next(iter(given.items()))
            raise ValueError(
                f"{name}: {value} changes what gradient checkpointing keeps, but gradient_checkpointing "
                "is false; set training.gradient_checkpointing: true"
            )
        return self

    def _activation_settings(self) -> dict[str, Any]:
        """checkpoint_every / offload_activations as given (empty when left at their defaults)."""
        found: dict[str, Any] = {}
        if self.checkpoint_every is not None:
            found["checkpoint_every"] = self.checkpoint_every
        if self.offload_activations:
            found["offload_activations"] = "true"
        return found


class GateSection(Section):
    """Deployment gate read by `tunelab eval --gate`: every threshold must hold or eval exits with 3."""

    min: dict[str, float] = Field(default_factory=dict, description="metric >= value, e.g. {accuracy: 0.8}")
    max: dict[str, float] = Field(default_factory=dict, description="metric <= value, e.g. {forgetting: 0.1}")
    min_delta: dict[str, float] = Field(
        default_factory=dict, description="tuned − base >= value (needs --compare), e.g. {accuracy: 0}"
    )


class EvalSection(Section):
    labels: list[str] | None = Field(None, description="answer set for label accuracy; inferred when small")
    max_new_tokens: int = Field(16, ge=1)
    batch_size: int = Field(16, ge=1)
    max_examples: int | None = Field(None, ge=1)
    before: bool = Field(False, description="also evaluate the base model before training")
    gate: GateSection = Field(default_factory=GateSection)


# What an export can be: a merged directory, an adapter, or a GGUF of one of these types.
EXPORT_PRECISIONS = ("merged", "adapter", "f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m")
# Per precision: max_drop None = the drop of the main metric must not be significant (the 95% paired
# bootstrap CI of export − run reaches 0); a number = the largest allowed drop (0..1 scale). Greedy
# decodes part ways at the first differing token, so agreement floors fall with the bit width.
DEFAULT_EXPORT_GATES: dict[str, dict[str, float | None]] = {
    "merged": {"max_drop": None, "min_agreement": 0.9, "max_perplexity_ratio": 1.02, "max_stop_drop": 0.05},
    "adapter": {"max_drop": None, "min_agreement": 0.9, "max_perplexity_ratio": 1.02, "max_stop_drop": 0.05},
    "f32": {"max_drop": None, "min_agreement": 0.9, "max_perplexity_ratio": 1.02, "max_stop_drop": 0.05},
    "f16": {"max_drop": None, "min_agreement": 0.8, "max_perplexity_ratio": 1.02, "max_stop_drop": 0.05},
    "bf16": {"max_drop": None, "min_agreement": 0.8, "max_perplexity_ratio": 1.03, "max_stop_drop": 0.05},
    "q8_0": {"max_drop": None, "min_agreement": 0.75, "max_perplexity_ratio": 1.05, "max_stop_drop": 0.05},
    "q6_k": {"max_drop": 0.01, "min_agreement": 0.7, "max_perplexity_ratio": 1.08, "max_stop_drop": 0.05},
    "q5_k_m": {"max_drop": 0.015, "min_agreement": 0.65, "max_perplexity_ratio": 1.1, "max_stop_drop": 0.05},
    "q4_k_m": {"max_drop": 0.02, "min_agreement": 0.5, "max_perplexity_ratio": 1.15, "max_stop_drop": 0.05},
}


class PrecisionGate(Section):
    """Parity limits for one export precision; an omitted field keeps that precision's default."""

    max_drop: float | None = Field(
        None, ge=0, le=1, description="largest drop of the main metric (run − export, 0..1) allowed"
    )
    min_agreement: float | None = Field(
        None, ge=0, le=1, description="mean greedy-token agreement with the run on the first 32 tokens"
    )
    max_perplexity_ratio: float | None = Field(
        None, ge=1, description="export answer perplexity / run answer perplexity at most this"
    )
    max_stop_drop: float | None = Field(
        None, ge=0, le=1, description="share of answers that stop by EOS/end-of-turn may fall this much"
    )


class ExportSection(Section):
    """`tunelab export`'s parity gate: the export against the run on held-out examples."""

    verify_n: int = Field(64, ge=1, description="held-out examples the gate samples (seeded)")
    verify_seed: int = 0
    max_new_tokens: int = Field(32, ge=1, description="generation budget of the gate's greedy answers")
    gate: dict[str, PrecisionGate] = Field(
        default_factory=dict,
        description=f"per precision ({', '.join(EXPORT_PRECISIONS)}): limits overriding the defaults",
    )

    @field_validator("gate")
    @classmethod
    def _known_precisions(cls, value: dict[str, PrecisionGate]) -> dict[str, PrecisionGate]:
        unknown = sorted(set(value) - set(EXPORT_PRECISIONS))
        if unknown:
            raise ValueError(
                f"unknown export precision(s) {', '.join(unknown)}; choose from {', '.join(EXPORT_PRECISIONS)}"
            )
        return value

    def thresholds(self, precision: str) -> dict[str, float | None]:
        """The default limits of ``precision`` with this recipe's overrides applied."""
        limits = dict(DEFAULT_EXPORT_GATES.get(precision, DEFAULT_EXPORT_GATES["q4_k_m"]))
        override = self.gate.get(precision)
        if override is not None:
            limits |= override.model_dump(exclude_none=True)
        return limits


class OutputSection(Section):
    dir: str = "runs"
    name: str | None = None


def _tagged_union(registry: Any) -> Any:
    classes = tuple(registry.config_classes())
    return Annotated[Union[classes], Field(discriminator="name")]  # noqa: UP007 - dynamic union


class Recipe(Section):
    seed: int = 0
    recommended_defaults: bool = Field(
        False,
        description="fill omitted training/method settings from `tunelab recommend` (model size × method)",
    )
    model: ModelSection
    data: DataSection
    method: _tagged_union(METHODS)  # type: ignore[valid-type]
    objective: _tagged_union(OBJECTIVES) = Field(default_factory=lambda: {"name": "sft"})  # type: ignore[valid-type]
    training: TrainingSection = Field(default_factory=TrainingSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    export: ExportSection = Field(default_factory=ExportSection)
    output: OutputSection = Field(default_factory=OutputSection)

    @model_validator(mode="after")
    def _auto_batch_offline(self) -> Recipe:
        if self.training.batch_size == "auto" and OBJECTIVES.get(self.objective.name).impl.online:
            raise ValueError(
                f"training.batch_size: auto sizes offline micro-batches; objective {self.objective.name} "
                "batches rollouts, so give an integer"
            )
        return self

    @model_validator(mode="after")
    def _activation_memory_offline(self) -> Recipe:
        given = self.training._activation_settings()
        if given and OBJECTIVES.get(self.objective.name).impl.online:
            name = next(iter(given))
            raise ValueError(
                f"training.{name}: objective {self.objective.name} runs its own rollout loop, which does not "
                f"checkpoint activations; remove training.{name}"
            )
        return self

    @model_validator(mode="after")
    def _method_fits_objective(self) -> Recipe:
        method, objective = self.method.name, self.objective.name
        spec = METHODS.get(method).impl
        kind = OBJECTIVES.get(objective).impl.model_kind
        if not spec.trains(kind):
            able = [n for n in METHODS.names() if METHODS.get(n).impl.trains(kind)]
            raise ValueError(
                f"method {method} cannot train objective {objective}: {spec.limitation}. "
                f"Use one of: {', '.join(able)}"
            )
        return self

    @model_validator(mode="after")
    def _packing_needs_a_token_objective(self) -> Recipe:
        if self.data.packing is True and not OBJECTIVES.get(self.objective.name).impl.packs:
            raise ValueError(
                f"data.packing: objective {self.objective.name} trains on whole examples (pairs, labelled "
                "sequences or prompts), which packing would cut apart; set data.packing: false"
            )
        return self

    def fast_path(self, device_type: str, config: Any = None, machine: Machine | None = None) -> FastPath:
        """The attention in effect on ``device_type`` (None: the model's default) and whether
        training packs, with auto's reasons: the one place ``model.attention`` and ``data.packing``
        are resolved, for the loop, the plan and anything else that must agree with them.

        Decided from the model's ``config`` (loaded from ``model.name_or_path`` when not given) and
        the ``machine``'s facts (probed when not given); given both, the decision is pure. Raises
        :class:`~tunelab.models.attention.AttentionUnavailable` for a kernel that cannot run here or
        cannot compute this model's attention, and
        :class:`~tunelab.data.packing.PackingUnsupported` for ``data.packing: true`` on a model
        whose layers would mix packed examples."""
        # the resolvers import torch; the schema (recipe check/show) does not
        from tunelab.data.packing import PackingUnsupported, packing_in_effect  # noqa: PLC0415
        from tunelab.models.attention import (  # noqa: PLC0415
            FastPath,
            Machine,
            ModelAttention,
            decide_attention,
            packing_refusal,
        )

        if config is None:
            from tunelab.models.load import load_config  # noqa: PLC0415  (transformers loads lazily)

            config = load_config(self.model.name_or_path, trust_remote_code=self.model.trust_remote_code)
        model = ModelAttention.from_config(config)
        packs = OBJECTIVES.get(self.objective.name).impl.packs
        setting, max_length = self.data.packing, self.data.max_length
        refusal = packing_refusal(model, max_length) if packs and setting is not False else None
        if refusal and setting is True:
            raise PackingUnsupported(f"data.packing: {refusal}; set data.packing: false")
        attention = decide_attention(
            self.model.attention,
            machine or Machine.probe(device_type),
            model,
            packing=packs and setting is not False and refusal is None,
            fp32=self.model.dtype.strip().lower().removeprefix("torch.") in ("float32", "fp32"),
            max_length=max_length,
        )
        return FastPath(
            attention.name,
            refusal is None and packing_in_effect(setting, packs, attention.name),
            attention.why,
            f"refused: {refusal}" if refusal else "",
        )

    @model_validator(mode="after")
    def _fast_path_fits(self) -> Recipe:
        training, online = self.training, OBJECTIVES.get(self.objective.name).impl.online
        asked = [
            f"training.{k}"
            for k, on in (
                ("compile: true", training.compile),
                ("kernels: liger", training.kernels == "liger"),
            )
            if on
        ]
        if asked and online:
            raise ValueError(
                f"{' and '.join(asked)}: objective {self.objective.name} generates rollouts, and the fast path "
                "covers offline training only; remove the setting"
            )
        strategy = training.distributed.strategy
        if training.compile and strategy in ("fsdp", "deepspeed"):
            raise ValueError(
                f"training.compile: not supported with distributed strategy {strategy} yet (the layers would "
                "be compiled before sharding); set training.compile: false or use ddp"
            )
        return self

    def resolved(self) -> dict[str, Any]:
        """Plain dict with every default filled in, as written to the run directory."""
        return self.model_dump(mode="json", by_alias=True)


def problems_line(problems: list[str]) -> str:
    """Several problems as one line ("2 problems: a; b"), so each error stays one line on stderr."""
    return problems[0] if len(problems) == 1 else f"{len(problems)} problems: " + "; ".join(problems)


class RecipeError(ValueError):
    """Every problem of a recipe, each line naming the field path and the fix."""

    def __init__(self, problems: list[str], source: str = "recipe") -> None:
        self.problems = problems
        self.source = source
        # `recipe check` prints one line a problem; everywhere else the error is one line.
        super().__init__(f"{source}: {problems_line(problems)}")


def _model_at(path: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the field at ``path`` (for "did you mean" on unknown keys)."""
    model: type[BaseModel] | None = Recipe
    for part in path:
        if model is None:
            return None
        field = model.model_fields.get(str(part))
        if field is None:
            if model is Recipe or not isinstance(part, str):
                return None
            continue  # a union tag such as "lora" in ("method", "lora", "rank")
        annotation = field.annotation
        model = _first_model(annotation)
    return model


def _first_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _first_model(arg)
        if found is not None:
            return found
    return None


def _union_member(section: str, raw: dict[str, Any]) -> type[BaseModel] | None:
    registry = {"method": METHODS, "objective": OBJECTIVES}.get(section)
    name = raw.get(section, {}).get("name") if isinstance(raw.get(section), dict) else None
    if registry is None or name not in registry:
        return None
    return registry.get(name).config_cls


def _without_union_tag(loc: tuple[Any, ...]) -> list[Any]:
    """The field path as the user wrote it: pydantic puts the discriminator's value after the section
    (``("objective", "ppo", "reward")``); only that one segment goes. Any other segment is a field
    name, even one that equals a registered name (PPO's ``reward`` field vs the ``reward`` objective)."""
    registry = {"method": METHODS, "objective": OBJECTIVES}.get(loc[0]) if loc else None
    if registry is not None and len(loc) > 1 and isinstance(loc[1], str) and loc[1] in registry:
        loc = (loc[0], *loc[2:])
    # objective.reward (and each rewards[i].fn) is a string or a {judge: ...} mapping; the shape's
    # tag is no field either
    return [p for i, p in enumerate(loc) if not (p in REWARD_TAGS and i and loc[i - 1] in ("reward", "fn"))]


def _describe(err: dict[str, Any], raw: dict[str, Any]) -> str:
    loc = _without_union_tag(tuple(err["loc"]))
    path = ".".join(str(p) for p in loc) or "(top level)"
    kind = err["type"]
    if kind == "extra_forbidden":
        key = str(loc[-1])
        if path in RENAMED:
            return f"{path}: was renamed to '{RENAMED[path]}'"
        owner = _union_member(str(loc[0]), raw) if len(loc) == 2 else None
        owner = owner or _model_at(tuple(loc[:-1]))
        hint = did_you_mean(key, list(owner.model_fields)) if owner else ""
        return f"{path}: unknown key.{hint}".rstrip(".") if hint else f"{path}: unknown key"
    if kind == "union_tag_invalid":
        registry = METHODS if loc and loc[0] == "method" else OBJECTIVES
        tag = err.get("input", {}).get("name") if isinstance(err.get("input"), dict) else None
        hint = did_you_mean(str(tag), registry.names()) if tag else ""
        return f"{path}.name: unknown {registry.kind} {tag!r}.{hint} Known: {', '.join(registry.names())}"
    if kind == "union_tag_not_found":
        return f"{path}.name: missing; say which one, e.g. name: {registry_hint(loc)}"
    if kind == "missing":
        return f"{path}: required field is missing"
    if kind == "finite_number":
        return f"{path}: {err.get('input')} is not a finite number (NaN and infinity are no setting); give a number"
    if err.get("input") is None and kind in ("model_type", "dict_type", "model_attributes_type"):
        return f"{path}: is empty (null); give its fields"
    message = err["msg"].removeprefix("Value error, ")
    # a section's rule that names one of its own fields ("reward: give ...") is that field's error
    head, sep, rest = message.partition(": ")
    owner = (_union_member(str(loc[0]), raw) if len(loc) == 1 else _model_at(tuple(loc))) if loc else None
    if sep and owner is not None and head in owner.model_fields:
        return f"{path}.{head}: {rest}"
    # a whole-recipe rule (loc is empty) names its own fields; "(top level):" would add nothing
    return f"{path}: {message}" if loc else message


def registry_hint(loc: list[Any]) -> str:
    registry = METHODS if loc and loc[0] == "method" else OBJECTIVES
    return " | ".join(registry.names())


def set_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply ``a.b.c=value`` to a nested dict; the value is parsed as YAML (so 1e-4, true, [a, b] work)."""
    if "=" not in assignment:
        raise RecipeError([f"--set {assignment!r}: expected KEY=VALUE, e.g. training.learning_rate=1e-4"])
    key, value = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError([f"--set {key}: '{part}' is not a section"])
        node = child
    try:
        node[parts[-1]] = yaml.load(value, Loader=UniqueKeyLoader) if value.strip() else None
    except yaml.YAMLError as err:
        what = " ".join(str(getattr(err, "problem", None) or err).split())
        raise RecipeError(
            [f"--set {key}: {value!r} is not a YAML value ({what}); quote a text, e.g. {key}='...'"]
        ) from None


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error: YAML forbids it,
    and PyYAML would silently keep the last one (a recipe's second ``learning_rate`` would win unseen)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults` merges are meant to be overridden
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    problem=f"key '{key}' is given twice (also on line {seen[key]}); keep one",
                    problem_mark=key_node.start_mark,
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_recipe_file(path: Path) -> dict[str, Any]:
    """The YAML mapping of a recipe file, or a RecipeError naming the file, the line and the fix."""
    if not path.exists():
        raise RecipeError(["file not found"], str(path))
    if path.is_dir():
        raise RecipeError(["is a directory; give the recipe's YAML file"], str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise RecipeError(
            [f"not UTF-8 text (byte {err.start}); save the recipe as UTF-8 YAML"], str(path)
        ) from None
    except OSError as err:
        raise RecipeError([f"cannot be read: {err.strerror}"], str(path)) from None
    if not text.strip():
        raise RecipeError(["the file is empty; a recipe needs at least model, data and method"], str(path))
    try:
        raw = yaml.load(text, Loader=UniqueKeyLoader)
    except RecursionError:  # PyYAML composes nested collections recursively
        raise RecipeError(
            ["nested too deeply to be a recipe; a recipe is a few levels of sections"], str(path)
        ) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        what = " ".join(str(getattr(err, "problem", None) or err).split())
        raise RecipeError([f"{where}not valid YAML: {what}"], str(path)) from None
    return raw


def parse_recipe(raw: Any, *, source: str = "recipe", overrides: list[str] | None = None) -> Recipe:
    """Validate a raw mapping; raises :class:`RecipeError` listing every problem at once."""
    if not isinstance(raw, dict):
        raise RecipeError([f"expected a mapping of sections, got {type(raw).__name__}"], source)
    raw = copy.deepcopy(raw)  # overrides and defaults below edit it; the caller's mapping stays as given
    for assignment in overrides or []:
        try:
            set_override(raw, assignment)
        except RecipeError as err:
            raise RecipeError(err.problems, source) from None
    _default_objective_name(raw)
    problems = _renamed_problems(raw)
    if raw.get("recommended_defaults"):
        raw = _with_recommendations(raw, problems)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as err:
        problems += [_describe(e, raw) for e in err.errors()]
        raise RecipeError(sorted(set(problems), key=problems.index), source) from None
    if problems:
        raise RecipeError(problems, source)
    return recipe


def _default_objective_name(raw: dict[str, Any]) -> None:
    """An ``objective`` section without ``name`` whose keys are all SFT settings is SFT, the default
    objective (e.g. ``--set objective.completion_only=false``). Other keys keep the "name: missing"
    error, which lists the objectives, rather than a misleading "unknown key" of SFT."""
    section = raw.get("objective")
    if not isinstance(section, dict) or "name" in section:
        return
    sft_fields = set(OBJECTIVES.get("sft").config_cls.model_fields)
    if set(section) <= sft_fields:
        section["name"] = "sft"


def _with_recommendations(raw: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    """What the user wrote wins; only omitted fields are filled, each by a stated rule."""
    from tunelab.plan.recommend import apply_recommendations, count_params, recommend  # noqa: PLC0415

    model = (raw.get("model") or {}).get("name_or_path")
    method = (raw.get("method") or {}).get("name")
    if not model or not method:
        return raw  # the missing fields are reported by validation
    try:
        return apply_recommendations(raw, recommend(count_params(model), method))
    except (OSError, ValueError) as err:
        problems.append(f"recommended_defaults: cannot size {model!r} to recommend settings: {err}")
        return raw


def _renamed_problems(raw: dict[str, Any]) -> list[str]:
    found = []
    for old, new in RENAMED.items():
        section, key = old.split(".")
        if isinstance(raw.get(section), dict) and key in raw[section]:
            found.append(f"{old}: was renamed to '{new}'")
            raw[section].pop(key)  # reported above; do not also report it as unknown
    return found


def load_recipe(path: str | Path, overrides: list[str] | None = None, *, check_files: bool = True) -> Recipe:
    """Read and validate a YAML recipe; relative data paths are resolved against the recipe's folder.

    ``check_files``: the recipe is to be trained: every data file it names exists and holds rows its
    objective trains on, and ``output.dir`` can hold the run (a reader that only wants another section,
    such as ``eval.gate`` of a finished run whose data has moved, passes False)."""
    path = Path(path)
    recipe = parse_recipe(read_recipe_file(path), source=str(path), overrides=overrides)
    if recipe.output.name is None:
        recipe.output.name = path.stem
    _resolve_relative_paths(recipe, path.parent)
    problems = (
        (output_problems(recipe) + (missing_files(recipe) or data_kind_problems(recipe)))
        if check_files
        else []
    )
    if problems:
        raise RecipeError(problems, str(path))
    return recipe


def output_problems(recipe: Recipe) -> list[str]:
    """``output.dir`` (with the run's name) can become a run directory: no file stands in its way."""
    run = Path(recipe.output.dir) / (recipe.output.name or "run")
    blocker = blocking_file(run)
    if blocker is None:
        return []
    return [f"output.dir: {recipe.output.dir}: {blocker} is a file, not a folder; set output.dir to a folder"]


def data_kind_problems(recipe: Recipe) -> list[str]:
    """Each data file holds the kind of rows the objective trains on (read from its first row, or
    ``data.format``), so ``recipe check`` refuses what training would refuse after loading the model
    (``dpo`` on instruction data drops every row). A file that cannot be read is the loaders' to
    report, with its line, when the data is read."""
    kinds = OBJECTIVES.get(recipe.objective.name).impl.data_kinds
    problems = []
    for name, value in data_file_fields(recipe):
        fmt = (
            recipe.data.format
            if recipe.data.format != "auto"
            else _first_row_format(value, recipe.data.columns)
        )
        if not kinds or name == "training.ewc.previous_data" or fmt is None or KIND[fmt] in kinds:
            continue
        needs = [f"{f} ({', '.join(REQUIRED[f])})" for f in FORMATS if KIND[f] in kinds]
        able = [n for n in OBJECTIVES.names() if KIND[fmt] in OBJECTIVES.get(n).impl.data_kinds]
        problems.append(
            f"{name}: {value} holds {fmt} data, but objective {recipe.objective.name} trains on "
            f"{' or '.join(needs)} rows; give such a file, or an objective for {fmt} data: {', '.join(able)}"
        )
    return problems


def _first_row_format(path: str, columns: dict[str, str]) -> str | None:
    """The format of a local data file's first row; None for a hub id, a folder or an unreadable file."""
    if not Path(path).is_file():
        return None
    records = iter_records(path)
    try:
        row, record = next(records)
        return detect_file_format(path, row, record, columns or None)
    except (StopIteration, ValueError, OSError):  # DataError and FormatError are ValueErrors
        return None
    finally:
        records.close()


# A hub dataset id ("org/name" without a data-file suffix) is not a local file; the same test as
# tunelab.data.loaders.iter_records, which downloads such ids instead of opening them.
_HUB_DATASET = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet")


def data_file_fields(recipe: Recipe) -> list[tuple[str, str]]:
    """Every (field path, value) of the recipe that names a data file, in recipe order."""
    data = recipe.data
    fields = [("data.train", data.train), ("data.eval", data.eval)]
    for i, task in enumerate(data.tasks or []):
        fields += [(f"data.tasks.{i}.train", task.train), (f"data.tasks.{i}.eval", task.eval)]
    if data.replay is not None:
        fields.append(("data.replay.path", data.replay.path))
    if recipe.training.ewc is not None:
        fields.append(("training.ewc.previous_data", recipe.training.ewc.previous_data))
    return [(name, value) for name, value in fields if value]


def missing_files(recipe: Recipe) -> list[str]:
    """``field: value: file not found`` for each data file (and reward script) that does not exist.

    Checked after relative paths were resolved next to the recipe, so a value still relative was
    found neither there nor in the current directory. Hub dataset ids and model specs are not files.
    """
    problems = []
    for name, value in data_file_fields(recipe):
        is_hub_id = _HUB_DATASET.match(value) and Path(value).suffix.lower() not in _DATA_SUFFIXES
        if not Path(value).exists() and not is_hub_id:
            problems.append(f"{name}: {value}: file not found")
    for field, owner, attr in _reward_sources(recipe):
        reward = getattr(owner, attr)
        script, sep, _ = reward.rpartition(":") if isinstance(reward, str) else ("", "", "")
        if sep and script.endswith(".py") and not Path(script).expanduser().is_file():
            problems.append(f"{field}: {script}: file not found")
    return problems


def _reward_sources(recipe: Recipe) -> list[tuple[str, Any, str]]:
    """``(field, owner, attribute)`` of each reward source of an online objective."""
    objective = recipe.objective
    if getattr(objective, "reward", None):
        return [("objective.reward", objective, "reward")]
    entries = getattr(objective, "rewards", None) or []
    return [(f"objective.rewards[{i}].fn", entry, "fn") for i, entry in enumerate(entries)]


def _resolve_relative_paths(recipe: Recipe, base: Path) -> None:
    """Data files next to the recipe are found wherever the command runs from."""

    def resolve(owner: Any, attr: str) -> None:
        value = getattr(owner, attr, None) if owner is not None else None
        if value and not Path(value).is_absolute() and (base / value).exists():
            setattr(owner, attr, str((base / value).resolve()))

    for attr in ("train", "eval"):
        resolve(recipe.data, attr)
    for task in recipe.data.tasks or []:
        resolve(task, "train")
        resolve(task, "eval")
    resolve(recipe.data.replay, "path")
    resolve(recipe.training.ewc, "previous_data")
    resolve(recipe.model, "name_or_path")
    _resolve_reward(recipe, base, resolve)


def _resolve_reward(recipe: Recipe, base: Path, resolve: Any) -> None:
    """An online objective's rewards: ``file.py:function`` or a reward run dir next to the recipe."""
    for _, owner, attr in _reward_sources(recipe):
        reward = getattr(owner, attr)
        if not isinstance(reward, str):  # {judge: ...}: a judge model directory next to the recipe
            resolve(reward, "judge")
            continue
        file, sep, function = reward.rpartition(":")
        if sep and file.endswith(".py") and not Path(file).is_absolute() and (base / file).exists():
            setattr(owner, attr, f"{(base / file).resolve()}:{function}")
        else:
            resolve(owner, attr)


def dump_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.resolved(), sort_keys=False)
