"""The recipe form, generated from the recipe's pydantic schema.

Each section's plain fields (text, numbers, booleans, fixed choices) become one input each, with the
field's default, its description as help and, for ``method.name`` / ``objective.name``, the registries'
names as choices. A field that is itself a section model becomes a sub-fieldset: an optional one
(``training.early_stopping``, ``data.split``, ``training.ewc``: ``Model | None``) has an *enable*
checkbox and is left out of the recipe while unticked; one with a default (``training.distributed``
and its ``fsdp``) is always there. Lists and mappings (``data.columns``, ``training.report_to``,
``eval.gate.min``...) are not inputs: a recipe loaded into the form carries them unchanged (the
hidden ``yaml_only`` field), so loading then saving a recipe writes the same YAML. What a user types
is sent as written and validated by :func:`tunelab.recipe.parse_recipe`, so the form can never
accept what ``recipe check`` refuses, and its messages are that command's.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from tunelab.methods import METHODS
from tunelab.objectives import OBJECTIVES
from tunelab.recipe import (
    DataSection,
    EvalSection,
    ExportSection,
    ModelSection,
    OutputSection,
    Recipe,
    TrainingSection,
)

SCALARS = (str, int, float)
DEFAULT_METHOD, DEFAULT_OBJECTIVE = "lora", "sft"
ENABLE = "enable."  # form key prefix of an optional sub-section's checkbox: enable.training.ewc = on
YAML_ONLY = "yaml_only"  # form key of the JSON {dotted path: value} of settings that have no input
TOP_LEVEL = ("seed", "recommended_defaults")  # the recipe's own plain fields, shown as section "recipe"


@dataclass
class FormField:
    """One input: ``name`` is the dotted recipe path it sets (``training.learning_rate``)."""

    name: str
    default: str
    help: str = ""
    choices: list[str] = field(default_factory=list)
    required: bool = False
    numeric: bool = False
    typed: dict[str, Any] = field(default_factory=dict)  # choice text -> the schema's value (Literal[2, 3])

    @property
    def id(self) -> str:
        return "f-" + self.name.replace(".", "-")


@dataclass
class FormSection:
    """A fieldset: ``name`` is its dotted path; ``optional`` sections are in the recipe only when enabled."""

    name: str
    fields: list[FormField]
    subsections: list[FormSection] = field(default_factory=list)
    optional: bool = False
    help: str = ""

    @property
    def id(self) -> str:
        return "section-" + self.name.replace(".", "-")

    @property
    def enable_key(self) -> str:
        return ENABLE + self.name

    def walk(self) -> typing.Iterator[FormSection]:
        """This section and every sub-section below it."""
        yield self
        for sub in self.subsections:
            yield from sub.walk()


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
    if plain == [bool]:  # with literals too, e.g. data.packing: auto | true | false
        spec.choices = [*(str(v) for v in literals), "true", "false"]
        spec.typed = {"true": True, "false": False}  # a YAML boolean, as the file would have it
    elif not plain and literals:
        spec.choices = [str(v) for v in literals]
        spec.typed = {str(v): v for v in literals if not isinstance(v, str)}
    elif plain and all(m in SCALARS for m in plain):
        spec.numeric = all(m in (int, float) for m in plain)
        if literals:  # e.g. batch_size: an integer or "auto"
            spec.help = (spec.help + f" (or {', '.join(map(str, literals))})").strip()
    else:
        return None
    return spec


def _section_model(info: Any) -> type[BaseModel] | None:
    """The section model a field holds (``EarlyStopping | None`` -> EarlyStopping), else None."""
    models = [m for m in _members(info.annotation) if isinstance(m, type) and issubclass(m, BaseModel)]
    return models[0] if len(models) == 1 and len(_members(info.annotation)) == 1 else None


def build_section(
    prefix: str, model: type[BaseModel], skip: tuple[str, ...] = (), *, optional: bool = False, help: str = ""
) -> FormSection:
    """Inputs for every plain field of a section model, in schema order, and a sub-section for each
    field that is itself a section model (recursively)."""
    section = FormSection(prefix, [], optional=optional, help=help)
    for key, info in model.model_fields.items():
        if key in skip:
            continue
        path = f"{prefix}.{info.alias or key}"  # the name the YAML uses (ewc's lambda_ is `lambda`)
        spec = form_field(path, info)
        sub = _section_model(info) if spec is None else None
        if spec is not None:
            section.fields.append(spec)
        elif sub is not None:
            optional_sub = info.default is None and info.default_factory is None
            section.subsections.append(
                build_section(path, sub, optional=optional_sub, help=info.description or "")
            )
    return section


def section_fields(prefix: str, model: type[BaseModel], skip: tuple[str, ...] = ()) -> list[FormField]:
    """Inputs for every plain field of one section model (sub-sections left out)."""
    return build_section(prefix, model, skip).fields


def registry_section(prefix: str, registry: Any, chosen: str) -> FormSection:
    """``method`` / ``objective``: the name as a choice of the registry, then the chosen one's fields."""
    name = FormField(f"{prefix}.name", chosen, f"one of the {prefix}s tunelab registers", registry.names())
    section = build_section(prefix, registry.get(chosen).config_cls, skip=("name",))
    section.fields.insert(0, name)
    return section


def recipe_form(method: str = DEFAULT_METHOD, objective: str = DEFAULT_OBJECTIVE) -> list[FormSection]:
    """The whole form for a recipe training ``method`` on ``objective`` (unknown names: the defaults)."""
    method = method if method in METHODS else DEFAULT_METHOD
    objective = objective if objective in OBJECTIVES else DEFAULT_OBJECTIVE
    top = [spec for key in TOP_LEVEL if (spec := form_field(key, Recipe.model_fields[key])) is not None]
    return [
        build_section("model", ModelSection),
        build_section("data", DataSection),
        registry_section("method", METHODS, method),
        registry_section("objective", OBJECTIVES, objective),
        build_section("training", TrainingSection),
        build_section("eval", EvalSection),
        build_section("export", ExportSection),
        build_section("output", OutputSection),
        FormSection("recipe", top, help="the recipe's own settings"),
    ]


def _set(raw: dict[str, Any], path: str, value: Any) -> None:
    *parents, key = path.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
    node[key] = value


def _included(section: FormSection, values: dict[str, str], parent_on: bool) -> bool:
    return parent_on and (not section.optional or values.get(section.enable_key) == "on")


def _fill(raw: dict[str, Any], section: FormSection, values: dict[str, str], on: bool) -> None:
    """Each non-empty input of an included section at its dotted path, as typed."""
    if not _included(section, values, on):
        return
    if section.optional:  # enabled: present even with every field blank (its defaults then apply)
        _set(raw, section.name, {})
    for spec in section.fields:
        value = values.get(spec.name, spec.default).strip()
        if value:
            _set(raw, spec.name, spec.typed.get(value, value))
    for sub in section.subsections:
        _fill(raw, sub, values, True)


def raw_recipe(sections: list[FormSection], values: dict[str, str]) -> dict[str, Any]:
    """The mapping the form describes: the carried YAML-only settings, then each input at its path."""
    raw: dict[str, Any] = {}
    try:
        carried = json.loads(values.get(YAML_ONLY) or "{}")
    except ValueError:
        carried = {}
    for path, value in (carried if isinstance(carried, dict) else {}).items():
        _set(raw, path, value)
    for section in sections:
        _fill(raw, section, values, True)
    return raw


def form_values(resolved: dict[str, Any]) -> dict[str, str]:
    """A recipe (``Recipe.resolved()``) as the form's values: every input's text, each present optional
    section enabled, and what has no input in ``yaml_only`` (so the form writes the recipe back)."""
    sections = recipe_form(resolved["method"]["name"], resolved["objective"]["name"])
    values: dict[str, str] = {}
    inputs: dict[str, FormField] = {}
    optional = {}
    for top in sections:
        for section in top.walk():
            inputs.update((spec.name, spec) for spec in section.fields)
            if section.optional:
                optional[section.name] = section
    carried: dict[str, Any] = {}

    def walk(node: Any, path: str) -> None:
        if path in optional and node is not None:
            values[optional[path].enable_key] = "on"
        if path in inputs:
            values[path] = _shown(node)
            if node is None and inputs[path].default:  # a blank input means the default: carry the null
                carried[path] = None
        elif isinstance(node, dict) and node and (path in optional or _is_section(path, sections)):
            for key, value in node.items():
                walk(value, f"{path}.{key}" if path else key)
        elif node not in (None, {}, []):
            carried[path] = node

    walk(resolved, "")
    values[YAML_ONLY] = json.dumps(carried) if carried else ""
    return values


def _is_section(path: str, sections: list[FormSection]) -> bool:
    return path == "" or any(s.name == path for top in sections for s in top.walk())
