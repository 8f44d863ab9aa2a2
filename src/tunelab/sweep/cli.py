"""`tunelab sweep`: the command; the work is in :mod:`tunelab.sweep.run`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tunelab.console import fail, labelled, make_console, styled

err = make_console(stderr=True)


def sweep_cmd(
    recipe: Annotated[Path | None, typer.Argument(help="base recipe YAML (omit with --resume)")] = None,
    space: Annotated[
        Path | None, typer.Option("--space", help="YAML: dotted recipe field -> distribution")
    ] = None,
    trials: Annotated[int, typer.Option("--trials", min=1, help="total trials, counting earlier ones")] = 10,
    sampler: Annotated[str | None, typer.Option(help="tpe (default, seeded), random, or grid")] = None,
    metric: Annotated[
        str | None, typer.Option(help="final eval metric to optimise (default eval_loss)")
    ] = None,
    direction: Annotated[
        str | None, typer.Option(help="minimize or maximize (default: from the metric name)")
    ] = None,
    pruner: Annotated[str | None, typer.Option(help="median (default) or none")] = None,
    name: Annotated[
        str | None, typer.Option(help="sweep directory name (default: <recipe name>-sweep)")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="sampler seed (default 0)")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override the base recipe, e.g. training.max_steps=20")
    ] = None,
    resume: Annotated[
        Path | None, typer.Option(help="continue runs/<sweep> with its saved recipe, space and settings")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="delete an existing sweep of this name first")] = False,
) -> None:
    """Search hyperparameters with Optuna: each trial trains runs/<sweep>/trial-NNN/; rerun to continue."""
    from tunelab.recipe import RecipeError, load_recipe  # noqa: PLC0415  (keep --help fast)
    from tunelab.sweep.run import SweepError, SweepSettings, resume_sweep, run_sweep  # noqa: PLC0415
    from tunelab.sweep.space import SpaceError, load_space  # noqa: PLC0415

    options = {"sampler": sampler, "metric": metric, "direction": direction, "pruner": pruner, "seed": seed}
    try:
        if resume is not None:
            extra = [f"--{k}" for k, v in options.items() if v is not None]
            extra += [
                flag
                for flag, v in (
                    ("RECIPE", recipe),
                    ("--space", space),
                    ("--set", set_),
                    ("--name", name),
                    ("--overwrite", overwrite),
                )
                if v
            ]
            if extra:
                raise SweepError(
                    "--resume continues a sweep with its saved recipe, space and settings; pass only "
                    f"--trials (got {', '.join(extra)})"
                )
            result = resume_sweep(resume, trials, console=err)
        else:
            if recipe is None or space is None:
                raise SweepError("give a recipe and --space space.yaml, or --resume runs/<sweep>")
            settings = SweepSettings(
                trials=trials, name=name, **{k: v for k, v in options.items() if v is not None}
            )
            result = run_sweep(
                load_recipe(recipe, overrides=set_),
                load_space(space),
                settings,
                overwrite=overwrite,
                console=err,
            )
    except (RecipeError, SpaceError, SweepError) as e:
        fail(err, str(e))
    except KeyboardInterrupt:
        err.print(labelled("interrupted", "rerun the same command (or use --resume) to continue the sweep"))
        raise typer.Exit(130) from None
    for note in result.notes:
        err.print(labelled("note", note))
    if result.report.best is None:
        err.print(styled("no trial completed", "red") + "; see the errors in results.json")
        raise typer.Exit(1)
