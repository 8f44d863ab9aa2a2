"""The `tunelab` command: one thin subcommand per stage, each calling one plain function."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tunelab import __version__
from tunelab.adapters import app as adapters_app
from tunelab.assets import app as assets_app
from tunelab.console import fail, labelled, make_console, quiet_libraries
from tunelab.data.cli import app as data_app
from tunelab.evaluate.forgetting import DEFAULT_N as FORGETTING_N
from tunelab.export import export_cmd
from tunelab.plan import plan_cmd, recommend_cmd
from tunelab.runs.cli import app as runs_app
from tunelab.serve.cli import app as serve_app
from tunelab.studio.cli import studio_cmd
from tunelab.sweep import sweep_cmd
from tunelab.synth.cli_generate import augment_cmd, synth_cmd
from tunelab.synth.cli_judge import constitute_cmd, judge_cmd

app = typer.Typer(
    help="tunelab: audit data, fine-tune, evaluate, export and serve language models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
recipe_app = typer.Typer(help="Validate and show run recipes.", no_args_is_help=True)
app.add_typer(assets_app, name="assets")
app.add_typer(data_app, name="data")
data_app.command("synth")(synth_cmd)
data_app.command("augment")(augment_cmd)
app.add_typer(recipe_app, name="recipe")
app.add_typer(adapters_app, name="adapters")
app.add_typer(runs_app, name="runs")
app.command("recommend")(recommend_cmd)
app.command("plan")(plan_cmd)
app.add_typer(serve_app, name="serve")
app.command("sweep")(sweep_cmd)
app.command("export")(export_cmd)
data_app.command("judge")(judge_cmd)
data_app.command("constitute")(constitute_cmd)
app.command("studio")(studio_cmd)

out = make_console()
err = make_console(stderr=True)


def _fail(message: str, code: int = 2) -> None:
    fail(err, message, code)


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
    quiet_libraries()


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
    """Validate recipes: one line per problem, naming the file; exit code 2 if any recipe has one."""
    from tunelab.console import styled
    from tunelab.recipe import RecipeError, load_recipe

    failed = 0
    for path in paths:
        try:
            load_recipe(path)
            out.print(styled("ok", "green") + f"  {path}")
        except RecipeError as e:
            failed += 1
            for problem in e.problems:  # one self-contained line a problem, each naming the file
                err.print(styled("bad", "red") + f" {e.source}: {problem}")
    if failed:
        raise typer.Exit(2)


@app.command()
def train(
    recipe: Annotated[Path | None, typer.Argument(help="recipe YAML (omit with --resume)")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override, e.g. training.learning_rate=1e-4")
    ] = None,
    resume: Annotated[Path | None, typer.Option(help="continue runs/<name> from its last checkpoint")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing run of the same name")] = False,
    nproc: Annotated[
        int | None,
        typer.Option(
            min=1, help="processes on this machine, started by accelerate launch (see training.distributed)"
        ),
    ] = None,
) -> None:
    """Train a model as the recipe says; writes runs/<name>/ (recipe, manifest, metrics, checkpoints, final)."""
    from tunelab.console import make_console, styled
    from tunelab.recipe import load_recipe
    from tunelab.runs.rundir import RunLockedError
    from tunelab.train import distributed
    from tunelab.train.checkpoint import DiskFullError
    from tunelab.train.common import DIVERGED_EXIT, DivergedError
    from tunelab.train.run import resume as resume_run
    from tunelab.train.run import train as train_run

    progress = make_console(stderr=True)  # notes and progress lines: verbatim, never folded off a terminal

    try:
        if resume is not None:
            if recipe is not None or set_:
                _fail("--resume continues a run with its saved recipe; do not pass a recipe or --set")
            processes = distributed.processes_for(nproc, distributed.saved_nproc(resume))
            if processes > 1:
                args = distributed.worker_train_args(resume=resume)
                raise typer.Exit(distributed.launch(processes, args, resume, progress))
            with distributed.reporting_failures():
                result = resume_run(resume, console=progress)
        else:
            if recipe is None:
                _fail("give a recipe file, or --resume runs/<name>")
            loaded = load_recipe(recipe, overrides=set_)
            processes = distributed.processes_for(nproc, loaded.training.distributed.nproc)
            if processes > 1:
                args = distributed.worker_train_args(recipe=recipe, overrides=set_, overwrite=overwrite)
                run_path = Path(loaded.output.dir) / (loaded.output.name or "run")
                raise typer.Exit(distributed.launch(processes, args, run_path, progress))
            with distributed.reporting_failures():
                result = train_run(loaded, overwrite=overwrite, console=progress)
    except DivergedError as e:
        _fail(str(e), DIVERGED_EXIT)
    except (RunLockedError, DiskFullError, FileNotFoundError, FileExistsError, ValueError) as e:
        _fail(str(e))  # RecipeError is a ValueError, RunExistsError a FileExistsError
    if not distributed.is_rank_zero():
        return
    # Text, not a markup string: the run path is the user's and printed as written
    out.print(
        styled(f"done: {result.steps} steps; final model in {result.run_dir / 'final'}", ""), soft_wrap=True
    )
    if result.final_eval:
        out.print(styled("  ".join(f"{k} {v:.4f}" for k, v in result.final_eval.items()), ""), soft_wrap=True)


@app.command("eval")
def eval_(
    data: Annotated[str, typer.Option("--data", help="eval data with reference answers (labels, pairs)")],
    model: Annotated[
        list[str] | None,
        typer.Argument(
            help="hub id, local dir, .gguf, tiny:llama, asset:NAME, or a run dir (or use --compare); "
            "after --compare BASE TUNED: exported artefacts (.gguf, export folders) compared with TUNED"
        ),
    ] = None,
    compare: Annotated[
        tuple[str, str] | None,
        typer.Option(
            "--compare",
            metavar="BASE TUNED [EXPORT...]",
            help="evaluate models on identical examples: base → tuned run → exported artefacts",
        ),
    ] = None,
    labels: Annotated[str | None, typer.Option(help="comma-separated answer set for label accuracy")] = None,
    template: Annotated[
        str | None, typer.Option(help="built-in chat template if the tokenizer has none")
    ] = None,
    max_examples: Annotated[int | None, typer.Option(help="evaluate only the first N examples")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="generation budget for exact match")] = 16,
    batch_size: Annotated[int, typer.Option()] = 16,
    n_boot: Annotated[int, typer.Option(help="bootstrap resamples for the CI on the delta")] = 1000,
    seed: Annotated[int, typer.Option(help="seed of the bootstrap, perturbations and text sampling")] = 0,
    speed: Annotated[bool, typer.Option("--speed", help="also time generation (tokens/s, latency)")] = False,
    forgetting: Annotated[
        bool, typer.Option("--forgetting", help="perplexity regression on general text (built-in set)")
    ] = False,
    forgetting_data: Annotated[
        str | None, typer.Option(help="general text for --forgetting (.txt or any data file)")
    ] = None,
    forgetting_n: Annotated[
        int, typer.Option(min=1, help="general texts to score for --forgetting (more: tighter, slower)")
    ] = FORGETTING_N,
    max_forgetting: Annotated[
        float | None, typer.Option(help="fail (exit 3) when perplexity regresses more, e.g. 0.10")
    ] = None,
    robustness: Annotated[
        bool, typer.Option("--robustness", help="main metric under typos, casing, whitespace, distractors")
    ] = False,
    safety_classifier: Annotated[
        str | None, typer.Option(help="sequence-classification model that scores the generations")
    ] = None,
    safety_label: Annotated[str | None, typer.Option(help="its unsafe class (name or index)")] = None,
    safety_threshold: Annotated[float, typer.Option(help="probability above which a text counts")] = 0.5,
    bias_probe: Annotated[
        str | None, typer.Option(help="YAML/JSON: templates with a {group} slot, groups, answers")
    ] = None,
    gate: Annotated[
        str | None, typer.Option(help="recipe or run dir whose eval.gate must pass (else exit 3)")
    ] = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="write report.json/.html here (default: <run>/eval/)")
    ] = None,
    predictions: Annotated[Path | None, typer.Option(help="write per-example predictions (JSONL)")] = None,
    json_: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Evaluate one model, or compare a base and a tuned one (deltas with a paired bootstrap CI);
    optional forgetting, robustness, safety and bias probes, and a deployment gate."""
    import json

    from tunelab.evaluate.compare import EvalPlan, evaluate_models, json_view, print_payload, write_outputs
    from tunelab.evaluate.gate import GATE_FAILED_EXIT, GateError, load_gate, with_limits
    from tunelab.evaluate.run import run_dir_of
    from tunelab.recipe import RecipeError
    from tunelab.runs.report import EVAL_DIR

    if not (compare or (model and len(model) == 1)):
        _fail("give one MODEL, or --compare BASE TUNED [EXPORT...]")
    roles = [("model", model[0])] if not compare else [("base", compare[0]), ("tuned", compare[1])]
    if compare:
        roles += [(f"export {i}" if i > 1 else "export", spec) for i, spec in enumerate(model or [], 1)]
    try:
        plan = EvalPlan(
            labels=[x.strip() for x in labels.split(",")] if labels else None,
            template=template,
            max_examples=max_examples,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            n_boot=n_boot,
            seed=seed,
            speed=speed,
            forgetting=forgetting or max_forgetting is not None,
            forgetting_data=forgetting_data,
            forgetting_n=forgetting_n,
            robustness=robustness,
            safety_classifier=safety_classifier,
            safety_label=safety_label,
            safety_threshold=safety_threshold,
            bias_probe=bias_probe,
            gate=with_limits(load_gate(gate) if gate else None, max_forgetting=max_forgetting),
            predictions=predictions,
        )
        payload = evaluate_models(roles, data, plan, console=err)
    except (FileNotFoundError, ValueError, RecipeError, GateError) as e:
        _fail(str(e))
    if json_:
        out.print_json(json.dumps(json_view(payload)))
    else:
        print_payload(payload, out)
    run = run_dir_of(roles[-1][1])
    target = out_dir or (run / EVAL_DIR if run else None)
    if target is not None:
        written = write_outputs(payload, target)
        err.print("report: " + ", ".join(str(p) for p in written))
    if payload.get("gate") and not payload["gate"]["passed"]:
        err.print(labelled("gate failed", "; ".join(payload["gate"]["failures"])))
        raise typer.Exit(GATE_FAILED_EXIT)


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


def run(argv: list[str] | None = None) -> None:
    """The `tunelab` entry point: the typer app, with its usage errors (a bad option value, a missing
    argument) as one `error:` line on stderr and exit 2, like every other input error, instead of
    typer's multi-line usage box."""
    import sys

    try:
        code = app(args=argv, prog_name="tunelab", standalone_mode=False, **help_layout(sys.stdout))
    except typer.Abort:
        err.print("aborted")
        code = 130
    except Exception as e:
        # typer vendors click privately (typer._click), so its exception classes have no public name;
        # click's ClickException interface (format_message, exit_code, ctx) is the stable contract.
        if not (hasattr(e, "format_message") and hasattr(e, "exit_code")):
            raise
        code = _usage_error(e)
    sys.exit(code or 0)


def help_layout(stream) -> dict[str, int]:
    """How `--help` is laid out on ``stream``: typer's rich panels on a terminal; elsewhere (a pipe, a
    file, `| less`) click's plain text, one line per option at any length, because rich draws its
    panels at a fixed 80 columns there and cuts option names (`--prompts-per-ro…`). Returns the
    context settings for the app call; COLUMNS, where set, still gives the width."""
    import os

    from tunelab.console import UNLIMITED, is_terminal

    app.rich_markup_mode = "rich" if is_terminal(stream) else None
    if is_terminal(stream) or os.environ.get("COLUMNS"):
        return {}
    return {"terminal_width": UNLIMITED, "max_content_width": UNLIMITED}


def _usage_error(e: Exception) -> int:
    if type(e).__name__ == "NoArgsIsHelpError":  # `tunelab data`: typer has printed the group's help
        return 2
    ctx = getattr(e, "ctx", None)
    where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
    err.print(labelled("error", f"{e.format_message()}{where}"))
    return e.exit_code
