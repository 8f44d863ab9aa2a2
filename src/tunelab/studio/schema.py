"""The recipe form, generated from the recipe's pydantic schema.

Each section's plain fields (text, numbers, booleans, fixed choices) become one input each, with the
field's default, its description as help and, for ``method.name`` / ``objective.name``, the registries'
names as choices. Nested settings (lists, mappings, sub-sections) are left out of the form: they keep
their defaults and appear in the YAML. What a user types is sent as written and validated by
:func:`tunelab.recipe.parse_recipe`, so the form can never accept what ``recipe check`` refuses.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from tunelab.methods import METHODS
from tunelab.objectives import OBJECTIVES
from tunelab.recipe import DataSection, ModelSection, OutputSection, TrainingSection

SCALARS = (str, int, float)
DEFAULT_METHOD, DEFAULT_OBJECTIVE = "lora", "sft"


@dataclass
class FormField:
    """One input: ``name`` is the dotted recipe path it sets (``training.learning_rate``)."""

    name: str
    default: str
    help: str = ""
    choices: list[str] = field(default_factory=list)
    required: bool = False
    numeric: bool = False

    @property
    def id(self) -> str:
        return "f-" + self.name.replace(".", "-")


@dataclass
class FormSection:
    name: str
    fields: list[FormField]


def _members(annotation: Any) -> list[Any]:
    """The types a field accepts, None dropped (``int | None`` -> [int])."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return [m for a in typing.get_args(annotation) for m in _members(a)]
    return [] if annotation is type(None) else [annotation]


def _shown(value: Any) -> str:
    if value is None or value is PydanticUndefined:
        return ""
    return str(value).lower() if isinstance(value, bool) else str(value)


def form_field(name: str, info: Any) -> FormField | None:
    """The input for one pydantic field, or None when the field is not a plain value."""
    members = _members(info.annotation)
    literals = [v for m in members if typing.get_origin(m) is Literal for v in typing.get_args(m)]
    plain = [m for m in members if typing.get_origin(m) is not Literal]
    default = None if info.default_factory is not None else info.default
    spec = FormField(name, _shown(default), info.description or "", required=info.is_required())
    if plain == [bool]:
        spec.choices = ["true", "false"]
    elif not plain and literals:
        spec.choices = [str(v) for v in literals]
    elif plain and all(m in SCALARS for m in plain):
        spec.numeric = all(m in (int, float) for m in plain)
        if literals:  # e.g. batch_size: an integer or "auto"
            spec.help = (spec.help + f" (or {', '.join(map(str, literals))})").strip()
    else:
        return None
    return spec


def section_fields(prefix: str, model: type[BaseModel], skip: tuple[str, ...] = ()) -> list[FormField]:
    """Inputs for every plain field of one section model, in schema order."""
    fields = []
    for key, info in model.model_fields.items():
        spec = None if key in skip else form_field(f"{prefix}.{key}", info)
        if spec is not None:
            fields.append(spec)
    return fields


def registry_section(prefix: str, registry: Any, chosen: str) -> FormSection:
    """``method`` / ``objective``: the name as a choice of the registry, then the chosen one's fields."""
    name = FormField(f"{prefix}.name", chosen, f"one of the {prefix}s tunelab registers", registry.names())
    config = registry.get(chosen).config_cls
    return FormSection(prefix, [name, *section_fields(prefix, config, skip=("name",))])


def recipe_form(method: str = DEFAULT_METHOD, objective: str = DEFAULT_OBJECTIVE) -> list[FormSection]:
    """The whole form for a recipe training ``method`` on ``objective`` (unknown names: the defaults)."""
    method = method if method in METHODS else DEFAULT_METHOD
    objective = objective if objective in OBJECTIVES else DEFAULT_OBJECTIVE
    return [
        FormSection("model", section_fields("model", ModelSection)),
        FormSection("data", section_fields("data", DataSection)),
        registry_section("method", METHODS, method),
        registry_section("objective", OBJECTIVES, objective),
        FormSection("training", section_fields("training", TrainingSection)),
        FormSection("output", section_fields("output", OutputSection)),
    ]


def raw_recipe(sections: list[FormSection], values: dict[str, str]) -> dict[str, Any]:
    """The mapping the form describes: each non-empty input at its dotted path, as typed."""
    raw: dict[str, Any] = {}
    for section in sections:
        for spec in section.fields:
            value = values.get(spec.name, spec.default).strip()
            if value:
                raw.setdefault(section.name, {})[spec.name.split(".", 1)[1]] = value
    return raw
