"""The search space of a sweep: dotted recipe field → distribution, checked before any trial runs.

A space file is a flat mapping, e.g.::

    training.learning_rate: {type: float, low: 1.0e-5, high: 1.0e-2, log: true}
    method.r: {type: int, low: 4, high: 64, step: 4}
    method.name: {type: categorical, choices: [lora, dora]}
    training.batch_size: [4, 8]          # a plain list is shorthand for categorical

Fields are validated against the recipe schema (a field must exist for at least one method or
objective the sweep can pick) and every edge value is pushed through the real recipe validator, so
a range the recipe would reject fails here, all problems at once, instead of as trial 17's crash.
Trials sample define-by-run: ``method.name``/``objective.name`` first, then only the fields the
chosen method or objective has.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import random
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from tunelab.methods import METHODS
from tunelab.objectives import OBJECTIVES
from tunelab.recipe import Recipe, RecipeError, parse_recipe, problems_line, set_override
from tunelab.registry import did_you_mean

# Sections whose fields depend on the chosen `name` (discriminated unions in the recipe).
TAGGED = {"method": METHODS, "objective": OBJECTIVES}
Scalar = Union[str, int, float, bool, None]  # noqa: UP007 - what optuna's storage can hold


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FloatRange(_Spec):
    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    step: float | None = Field(None, gt=0, description="discretise; also makes the range usable by grid")

    @model_validator(mode="after")
    def _sane(self) -> FloatRange:
        _check_range(self.low, self.high, self.log, self.step)
        return self

    def edges(self) -> list[Any]:
        return [self.low, self.high]

    def grid(self) -> list[Any] | None:
        if self.step is None:
            return None
        count = int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1
        return [round(self.low + i * self.step, 12) for i in range(count)]


class IntRange(_Spec):
    type: Literal["int"]
    low: int
    high: int
    step: int = Field(1, ge=1)
    log: bool = False

    @model_validator(mode="after")
    def _sane(self) -> IntRange:
        _check_range(self.low, self.high, self.log, None if self.step == 1 else self.step)
        return self

    def edges(self) -> list[Any]:
        return [self.low, self.high]

    def grid(self) -> list[Any]:
        return list(range(self.low, self.high + 1, self.step))


class Categorical(_Spec):
    type: Literal["categorical"]
    choices: list[Scalar] = Field(min_length=1)

    def edges(self) -> list[Any]:
        return list(self.choices)

    def grid(self) -> list[Any]:
        return list(self.choices)


def _check_range(low: float, high: float, log: bool, step: float | None) -> None:
    if low >= high:
        raise ValueError(f"low ({low}) must be below high ({high})")
    if log and low <= 0:
        raise ValueError(f"log: true needs low > 0 (got {low}); the range is sampled on a log scale")
    if log and step is not None:
        raise ValueError("give log or step, not both (optuna samples a log range continuously)")


Distribution = Annotated[Union[FloatRange, IntRange, Categorical], Field(discriminator="type")]  # noqa: UP007
_DISTRIBUTION = TypeAdapter(Distribution)


class SpaceError(ValueError):
    """Every problem of a space file, each naming the field and the fix."""

    def __init__(self, problems: list[str], source: str = "space") -> None:
        self.problems = problems
        super().__init__(f"{source}: {problems_line(problems)}")


def parse_space(raw: Any, source: str = "space") -> dict[str, Any]:
    """Validate the distributions' own shape (types, ranges); returns field → distribution."""
    if not isinstance(raw, dict) or not raw:
        raise SpaceError(
            [
                "expected a mapping of dotted recipe fields to distributions, e.g. "
                "training.learning_rate: {type: float, low: 1.0e-5, high: 1.0e-2, log: true}"
            ],
            source,
        )
    space, problems = {}, []
    for field, spec in raw.items():
        if isinstance(spec, list):
            spec = {"type": "categorical", "choices": spec}
        try:
            space[str(field)] = _DISTRIBUTION.validate_python(spec)
        except ValidationError as err:
            problems += [_describe_spec_error(str(field), e) for e in err.errors()]
    if problems:
        raise SpaceError(problems, source)
    return space


def _describe_spec_error(field: str, err: dict[str, Any]) -> str:
    loc = [str(p) for p in err["loc"] if str(p) not in ("float", "int", "categorical")]
    where = ".".join([field, *loc])
    if err["type"] == "union_tag_invalid" or err["type"] == "union_tag_not_found":
        return f"{where}: type must be float, int or categorical, e.g. {{type: float, low: 1e-5, high: 1e-2}}"
    if err["type"] == "extra_forbidden":
        hint = did_you_mean(loc[-1], ["type", "low", "high", "log", "step", "choices"])
        return f"{where}: unknown key.{hint}".rstrip(".")
    if err["type"] == "missing":
        return f"{where}: required field is missing"
    if err["type"] == "model_type":
        return f"{where}: expected {{type: ..., ...}} or a list of choices"
    return f"{where}: {err['msg'].removeprefix('Value error, ')}"


def load_space(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise SpaceError([f"file not found: {path}"], str(path))
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise SpaceError([f"not valid YAML: {err}"], str(path)) from None
    return parse_space(raw, str(path))


def sweep_base(recipe: Recipe) -> dict[str, Any]:
    """The recipe every trial starts from: resolved, except that ``method``/``objective`` keep only
    what the user set, so a trial that switches ``method.name`` carries the user's shared settings
    over but not the old method's defaults (LoRA's ``init`` means something else to prompt tuning)."""
    raw = recipe.resolved()
    for section in TAGGED:
        config = getattr(recipe, section)
        raw[section] = {"name": config.name} | config.model_dump(
            mode="json", by_alias=True, exclude_unset=True
        )
    return raw


def dump_space(space: dict[str, Any]) -> dict[str, Any]:
    """Plain dict of a parsed space (stored in the sweep dir, compared on resume)."""
    return {field: dist.model_dump(mode="json", exclude_none=True) for field, dist in space.items()}


def tag_names(space: dict[str, Any], base: dict[str, Any], section: str) -> list[str]:
    """The method (or objective) names trials can have: the space's choices, else the base recipe's."""
    key = f"{section}.name"
    if key in space and isinstance(space[key], Categorical):
        return [str(c) for c in space[key].choices]
    return [str(base.get(section, {}).get("name"))]


def field_problem(field: str, names: dict[str, list[str]]) -> str | None:
    """Why ``field`` is not a recipe field for any of ``names`` (per tagged section), or None."""
    parts = field.split(".")
    models: list[type[BaseModel]] = [Recipe]
    for depth, part in enumerate(parts):
        owners = [m for m in models if _field_of(m, part) is not None]
        if not owners:
            known = sorted({k for m in models for k in m.model_fields})
            prefix = ".".join(parts[:depth]) or "the recipe"
            return f"{field}: '{part}' is not a field of {prefix}.{did_you_mean(part, known)}".rstrip(".")
        if depth == len(parts) - 1:
            return None
        if depth == 0 and part in TAGGED:
            registry = TAGGED[part]
            models = [registry.get(n).config_cls for n in names[part] if n in registry]
            continue
        annotations = [_field_of(m, part).annotation for m in owners]
        if any(_is_mapping(a) for a in annotations):
            return None  # free-form dict (e.g. training.lr_multipliers): keys are checked by the recipe
        models = [sub for a in annotations if (sub := _first_model(a)) is not None]
        if not models:
            return f"{field}: '{'.'.join(parts[: depth + 1])}' is a value, not a section"
    return None


def _field_of(model: type[BaseModel], name: str) -> Any:
    for key, info in model.model_fields.items():
        if name in (key, info.alias):
            return info
    return None


def _first_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        if (found := _first_model(arg)) is not None:
            return found
    return None


def _is_mapping(annotation: Any) -> bool:
    origin = getattr(annotation, "__origin__", None)
    return origin is dict or any(_is_mapping(a) for a in getattr(annotation, "__args__", ()))


def applies(field: str, values: dict[str, Any], base: dict[str, Any]) -> bool:
    """Whether ``field`` exists for the method/objective this trial has (``values`` sampled so far)."""
    names = {s: [str(values.get(f"{s}.name", base.get(s, {}).get("name")))] for s in TAGGED}
    return field_problem(field, names) is None


def sample_order(space: dict[str, Any]) -> list[str]:
    """Tags first, so every other field can ask whether it applies to the chosen method."""
    tags = [f"{s}.name" for s in TAGGED if f"{s}.name" in space]
    return tags + [f for f in space if f not in tags]


def apply_values(base: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of the resolved base recipe with the trial's values set through ``--set``'s code path.

    Switching ``method.name`` (or ``objective.name``) drops the base's fields the new one does not
    have (LoRA's ``r`` means nothing to IA3), keeping those it shares.
    """
    raw = copy.deepcopy(base)
    for section, registry in TAGGED.items():
        name = values.get(f"{section}.name")
        if name is not None and name != raw.get(section, {}).get("name") and name in registry:
            fields = registry.get(str(name)).config_cls.model_fields
            raw[section] = {k: v for k, v in raw.get(section, {}).items() if k in fields}
    for field in sample_order(values):
        # JSON is YAML, so set_override parses the value back to exactly this scalar
        set_override(raw, f"{field}={json.dumps(values[field])}")
    return raw


def validate_space(space: dict[str, Any], base: dict[str, Any], source: str = "space") -> None:
    """Every field exists for some choice and every edge value passes the recipe's own validation."""
    names = {s: tag_names(space, base, s) for s in TAGGED}
    problems = []
    for field, dist in space.items():
        problem = field_problem(field, names)
        if problem is not None:
            problems.append(f"{problem} (for {_names_text(field, names)}); fix the name or drop the field")
            continue
        problems += _value_problems(field, dist, base, names)
    if problems:
        raise SpaceError(problems, source)


def _names_text(field: str, names: dict[str, list[str]]) -> str:
    section = field.split(".")[0]
    if section in TAGGED:
        return f"{section}.name in {names[section]}"
    return "this recipe"


def _value_problems(field: str, dist: Any, base: dict[str, Any], names: dict[str, list[str]]) -> list[str]:
    context = _compatible_tags(field, names)
    problems = []
    for value in dist.edges():
        try:
            parse_recipe(apply_values(base, {**context, field: value}), source="trial")
        except RecipeError as err:
            relevant = [p for p in err.problems if p.startswith(field)] or err.problems
            problems.append(f"{field}={value!r}: the recipe rejects it: {'; '.join(relevant)}")
    return problems


def _compatible_tags(field: str, names: dict[str, list[str]]) -> dict[str, Any]:
    """A method/objective name for which ``field`` exists, to check its values in context."""
    context: dict[str, Any] = {}
    for section, choices in names.items():
        for name in choices:
            trial_names = {**names, section: [name]}
            if field_problem(field, trial_names) is None:
                context[f"{section}.name"] = name
                break
    return context


def grid_space(space: dict[str, Any]) -> dict[str, list[Any]]:
    """Optuna's GridSampler space; a continuous float range has no grid, so it is an error."""
    grid, problems = {}, []
    for field, dist in space.items():
        values = dist.grid()
        if values is None:
            problems.append(
                f"{field}: --sampler grid needs a finite set of values; give {{type: categorical, "
                f"choices: [...]}}, add step: to the float range, or use --sampler tpe/random"
            )
        else:
            grid[field] = values
    if problems:
        raise SpaceError(problems, "grid")
    return grid


def grid_points(space: dict[str, Any], base: dict[str, Any], seed: int) -> list[dict[str, Any]]:
    """Every combination of the grid once, in a seeded shuffled order. Fields the combination's
    method lacks are dropped, so ``[lora, ia3] x r`` does not run IA3 once per ``r``."""
    grid = grid_space(space)
    points: list[dict[str, Any]] = []
    for combo in itertools.product(*grid.values()):
        values = dict(zip(grid, combo))
        kept: dict[str, Any] = {}
        for field in sample_order(values):
            if applies(field, kept, base):
                kept[field] = values[field]
        if kept not in points:
            points.append(kept)
    random.Random(seed).shuffle(points)
    return points


def suggest(trial: Any, space: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """Sample this trial's values define-by-run; fields the chosen method lacks are not sampled."""
    values: dict[str, Any] = {}
    for field in sample_order(space):
        if not applies(field, values, base):
            continue
        dist = space[field]
        if isinstance(dist, Categorical):
            values[field] = trial.suggest_categorical(field, dist.choices)
        elif isinstance(dist, IntRange):
            values[field] = trial.suggest_int(field, dist.low, dist.high, step=dist.step, log=dist.log)
        else:
            values[field] = trial.suggest_float(field, dist.low, dist.high, step=dist.step, log=dist.log)
    return values
