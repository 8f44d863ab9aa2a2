"""The `tunelab` command: one thin subcommand per stage, each calling one plain function."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from tunelab import __version__
from tunelab.adapters import app as adapters_app
from tunelab.assets import app as assets_app
from tunelab.data.cli import app as data_app
from tunelab.plan import recommend_cmd

app = typer.Typer(
    help="tunelab: audit data, fine-tune, evaluate, export and serve language models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
recipe_app = typer.Typer(help="Validate and show run recipes.", no_args_is_help=True)
app.add_typer(assets_app, name="assets")
app.add_typer(data_app, name="data")
app.add_typer(recipe_app, name="recipe")
app.add_typer(adapters_app, name="adapters")
app.command("recommend")(recommend_cmd)

out = Console()
err = Console(stderr=True)


def _fail(message: str, code: int = 2) -> None:
    err.print(f"[red]error:[/] {message}")
    raise typer.Exit(code)


def _version(value: bool) -> None:
    if value:
        out.print(f"tunelab {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """tunelab: from raw data to a deployed fine-tuned language model."""


@recipe_app.command("show")
def recipe_show(
    path: Annotated[Path, typer.Argument(help="recipe YAML")],
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override, e.g. training.learning_rate=1e-4")
    ] = None,
) -> None:
    """Print the fully resolved recipe (every default filled in), or every problem in it."""
    from tunelab.recipe import RecipeError, dump_yaml, load_recipe

    try:
        recipe = load_recipe(path, overrides=set_)
    except RecipeError as e:
        _fail(str(e))
    out.print(dump_yaml(recipe), end="", highlight=False, markup=False)


@recipe_app.command("check")
def recipe_check(paths: Annotated[list[Path], typer.Argument(help="recipe YAML files")]) -> None:
    """Validate recipes; exits non-zero if any has a problem."""
    from tunelab.recipe import RecipeError, load_recipe

    failed = 0
    for path in paths:
        try:
            load_recipe(path)
            out.print(f"[green]ok[/]  {path}")
        except RecipeError as e:
            failed += 1
            err.print(f"[red]bad[/] {e}")
    if failed:
        raise typer.Exit(1)


@app.command()
def train(
    recipe: Annotated[Path | None, typer.Argument(help="recipe YAML (omit with --resume)")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override, e.g. training.learning_rate=1e-4")
    ] = None,
    resume: Annotated[Path | None, typer.Option(help="continue runs/<name> from its last checkpoint")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing run of the same name")] = False,
) -> None:
    """Train a model as the recipe says; writes runs/<name>/ (recipe, manifest, metrics, checkpoints, final)."""
    from tunelab.recipe import RecipeError, load_recipe
    from tunelab.runs.rundir import RunExistsError
    from tunelab.train import engine

    try:
        if resume is not None:
            if recipe is not None or set_:
                _fail("--resume continues a run with its saved recipe; do not pass a recipe or --set")
            result = engine.resume(resume, console=err)
        else:
            if recipe is None:
                _fail("give a recipe file, or --resume runs/<name>")
            result = engine.train(load_recipe(recipe, overrides=set_), overwrite=overwrite, console=err)
    except (RecipeError, RunExistsError, FileNotFoundError, ValueError) as e:
        _fail(str(e))
    out.print(f"done: {result.steps} steps; final model in {result.run_dir / 'final'}")
    if result.final_eval:
        out.print("  ".join(f"{k} {v:.4f}" for k, v in result.final_eval.items()))


@app.command("eval")
def eval_(
    model: Annotated[
        str, typer.Argument(help="hub id, local dir, .gguf, tiny:llama, asset:NAME, or a run dir")
    ],
    data: Annotated[str, typer.Option("--data", help="instruction/chat data with reference answers")],
    labels: Annotated[str | None, typer.Option(help="comma-separated answer set for label accuracy")] = None,
    template: Annotated[
        str | None, typer.Option(help="built-in chat template if the tokenizer has none")
    ] = None,
    max_examples: Annotated[int | None, typer.Option(help="evaluate only the first N examples")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="generation budget for exact match")] = 16,
    batch_size: Annotated[int, typer.Option()] = 16,
    predictions: Annotated[Path | None, typer.Option(help="write per-example predictions (JSONL)")] = None,
    json_: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Loss, perplexity, label accuracy by log-likelihood and exact match of generated answers."""
    import json

    from tunelab.evaluate.run import results_table, run_eval

    label_list = [x.strip() for x in labels.split(",")] if labels else None
    try:
        result = run_eval(
            model,
            data,
            labels=label_list,
            template=template,
            max_examples=max_examples,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            predictions_path=predictions,
            console=err,
        )
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    if json_:
        out.print_json(json.dumps(result.as_row()))
    else:
        out.print(results_table([result]))


@app.command()
def demo(
    runs_dir: Annotated[str, typer.Option(help="where the run goes")] = "runs",
    n_train: Annotated[int, typer.Option(help="training reviews")] = 480,
    n_eval: Annotated[int, typer.Option(help="held-out reviews")] = 300,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override the demo recipe")] = None,
) -> None:
    """Fine-tune SmolLM2-135M-Instruct on movie-review sentiment and show before/after."""
    from tunelab.demo import run_demo

    run_demo(runs_dir=runs_dir, n_train=n_train, n_eval=n_eval, overrides=set_, console=out)
