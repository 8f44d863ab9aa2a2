"""The deployment gate: thresholds from a recipe's ``eval.gate`` checked against an eval's results.

A model ships only if every threshold holds; a failing gate names each broken threshold with its
value and limit, so the failure is actionable from the CI log alone. A threshold on a metric the
eval did not produce is an error (listing what it did produce), never a silent pass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunelab.recipe import GateSection

GATE_FAILED_EXIT = 3


class GateError(ValueError):
    """The gate cannot be checked as written (unknown metric, no baseline for a delta, no gate found)."""


def load_gate(source: str | Path) -> GateSection:
    """``eval.gate`` of a recipe file, or of a run directory's ``recipe.yaml``."""
    from tunelab.recipe import load_recipe  # noqa: PLC0415

    path = Path(source)
    recipe_path = path / "recipe.yaml" if path.is_dir() else path
    if not recipe_path.is_file():
        raise GateError(f"--gate {source}: no recipe file there (give a recipe YAML or a run directory)")
    gate = load_recipe(recipe_path, check_files=False).eval.gate  # a gate needs no data files
    if not (gate.min or gate.max or gate.min_delta):
        raise GateError(f"--gate {source}: the recipe has no eval.gate thresholds (min, max or min_delta)")
    return gate


def with_limits(
    gate: GateSection | None,
    *,
    max_forgetting: float | None = None,
    extra_max: dict[str, float] | None = None,
) -> GateSection | None:
    """The gate plus thresholds given as command-line options (the tighter one wins on overlap)."""
    extra = dict(extra_max or {})
    if max_forgetting is not None:
        extra["forgetting"] = max_forgetting
    if not extra:
        return gate
    merged = gate.model_copy(deep=True) if gate is not None else GateSection()
    for name, limit in extra.items():
        merged.max[name] = min(limit, merged.max.get(name, limit))
    return merged


def gate_values(payload: dict[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
    """(metrics of the judged model, deltas tuned − base) from an eval payload.

    The judged model is the tuned one when comparing, else the only one. ``forgetting`` (the relative
    perplexity regression on general text) joins the metrics when it was measured."""
    models = payload["models"]
    subject = next((m for m in models if m["role"] == "tuned"), models[-1])
    values = {k: v for k, v in subject["metrics"].items() if isinstance(v, (int, float))}
    forgetting = payload.get("forgetting")
    if forgetting and "regression" in forgetting:
        values["forgetting"] = forgetting["regression"]
    base = next((m for m in models if m["role"] == "base"), None)
    deltas = {}
    if base is not None:
        deltas = {
            k: values[k] - v
            for k, v in base["metrics"].items()
            if k in values and isinstance(v, (int, float))
        }
    return values, deltas


def _unknown(names: list[str], available: dict[str, float], what: str) -> str | None:
    missing = sorted(set(names) - set(available))
    if not missing:
        return None
    have = ", ".join(sorted(available)) or "(none)"
    return f"gate {what}: unknown metric(s) {', '.join(missing)}; this eval produced: {have}"


def check_gate(
    gate: GateSection, values: dict[str, float], deltas: dict[str, float], *, compared: bool
) -> dict[str, Any]:
    """``{"passed", "failures", "thresholds"}``; raises :class:`GateError` for thresholds it cannot check."""
    if gate.min_delta and not compared:
        raise GateError("gate min_delta needs a baseline: run `tunelab eval --compare BASE TUNED ...`")
    problems = [
        p
        for p in (
            _unknown(list(gate.min), values, "min"),
            _unknown(list(gate.max), values, "max"),
            _unknown(list(gate.min_delta), deltas, "min_delta"),
        )
        if p
    ]
    if problems:
        raise GateError("\n".join(problems))
    failures = []
    for name, limit in gate.min.items():
        if not values[name] >= limit:  # NaN fails too
            failures.append(f"{name} = {values[name]:.4f} is below the minimum {limit:.4f}")
    for name, limit in gate.max.items():
        if not values[name] <= limit:
            failures.append(f"{name} = {values[name]:.4f} is above the maximum {limit:.4f}")
    for name, limit in gate.min_delta.items():
        if not deltas[name] >= limit:
            failures.append(
                f"Δ {name} (tuned − base) = {deltas[name]:+.4f} is below the minimum change {limit:+.4f}"
            )
    return {"passed": not failures, "failures": failures, "thresholds": gate.model_dump(mode="json")}
