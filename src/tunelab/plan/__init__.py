"""Planning a run before it starts: recommended settings, and the memory and time it will need."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from tunelab.plan.gpus import GPUS
from tunelab.plan.recommend import (
    Recommendation,
    apply_recommendations,
    count_params,
    recommend,
    recommend_cmd,
)


def plan_cmd(
    recipe: Annotated[Path, typer.Argument(help="recipe YAML")],
    gpu: Annotated[
        str | None,
        typer.Option("--gpu", help=f"plan for this GPU: {', '.join(GPUS)}; default: the visible device"),
    ] = None,
    batch: Annotated[
        int | None, typer.Option("--batch", min=1, help="micro-batch to plan; default: training.batch_size")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override, e.g. training.gradient_checkpointing=true")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the plan as JSON")] = False,
) -> None:
    """Predict peak memory (weights, gradients, optimizer, activations, logits) and step time, and the
    largest micro-batch that fits."""
    from tunelab.console import fail, labelled, make_console  # noqa: PLC0415
    from tunelab.plan.memory import plan_report, plan_table  # noqa: PLC0415  (torch; keep --help fast)
    from tunelab.recipe import RecipeError, load_recipe  # noqa: PLC0415

    console = make_console()
    try:
        # The plan reads shapes from the recipe, never the data: it works before the data exists.
        loaded = load_recipe(recipe, overrides=set_, check_files=False)
        plan, largest = plan_report(loaded, gpu, batch)
    except (RecipeError, OSError, ValueError) as e:
        fail(make_console(stderr=True), str(e))
    if as_json:
        console.print_json(json.dumps(plan.as_dict() | {"largest_micro_batch": largest}))
        return
    console.print(plan_table(plan, largest))
    for note in plan.notes:
        console.print(labelled("note", note))


__all__ = [
    "Recommendation",
    "apply_recommendations",
    "count_params",
    "plan_cmd",
    "recommend",
    "recommend_cmd",
]
