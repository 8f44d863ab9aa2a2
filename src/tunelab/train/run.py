"""The training engine: one readable loop that runs any method × objective pair on accelerate.

Order of a run: run directory → tokenizer and objective → data (encoded by the objective, checked
by the pre-flight audit) → model with the head the objective asks for → method (which parameters
learn) → optimizer and schedule → loop (accumulate, clip, step, log, evaluate, early-stop,
checkpoint) → final model. Online objectives (PPO, GRPO) go to ``train/rl.py`` instead. A killed run resumes from its last complete checkpoint and
continues with exactly the same batches, learning rates and random numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

from tunelab.console import make_console
from tunelab.data.mixing import load_task, mix_tasks, tag_row, write_mixture
from tunelab.objectives import OBJECTIVES
from tunelab.recipe import Recipe, parse_recipe
from tunelab.runs.manifest import build_manifest
from tunelab.runs.rundir import RunDir, check_resumable
from tunelab.train import distributed
from tunelab.train.common import TrainResult
from tunelab.train.lifecycle import Outcome, run_lifecycle
from tunelab.train.loop import Trainer
from tunelab.train.preflight import materialise_split
from tunelab.train.rl import run_online


def train(
    recipe: Recipe,
    *,
    overwrite: bool = False,
    console: Console | None = None,
    on_eval: Callable[[int, dict[str, float], bool], None] | None = None,
) -> TrainResult:
    """Start a new run from a recipe (fails if the run exists, unless ``overwrite``); ``on_eval(step,
    metrics, last)`` is called after each evaluation and may raise to stop the run (a sweep's pruner).

    The run directory is locked while this process trains it; if the run fails before training
    starts (bad data, pre-flight, model, method), the directory is removed again."""
    run = distributed.open_run_dir(
        recipe.output.dir, recipe.output.name or "run", device=recipe.model.device, overwrite=overwrite
    )
    try:
        try:
            run.write_recipe(recipe.resolved())
        except BaseException:
            run.discard()
            raise
        return _execute(recipe, run, console=console, resume=False, on_eval=on_eval)
    finally:
        run.release()


def resume(run_path: str | Path, *, console: Console | None = None) -> TrainResult:
    """Continue a run from its last complete checkpoint, with the recipe it was started with."""
    path = Path(run_path)
    check_resumable(path)
    run = distributed.open_run_dir(path.parent, path.name, device=distributed.saved_device(path), resume=True)
    try:
        recipe = parse_recipe(run.read_recipe(), source=str(run.recipe_path))
        return _execute(recipe, run, console=console, resume=True)
    finally:
        run.release()


def materialise_tasks(recipe: Recipe, run_path: Path) -> tuple[Recipe, list[Any]]:
    """``data.tasks``: mix the tasks into one training file (and one eval file for the overall
    eval loss) inside the run directory; return the recipe pointing at them and the per-task evals."""
    recipe = recipe.model_copy(deep=True)
    data, mixing = recipe.data, recipe.data.mixing
    fmt = data.format
    tasks = [load_task(t.name, t.train, t.weight, fmt, data.columns or None) for t in data.tasks]
    mixed = mix_tasks(
        tasks, temperature=mixing.temperature, total=mixing.total, seed=recipe.seed, tag_template=mixing.tag
    )
    data.train = str(write_mixture(mixed, run_path / "data" / "mixture.jsonl")[0])
    eval_tasks = [load_task(t.name, t.eval, 1.0, fmt, data.columns or None) for t in data.tasks if t.eval]
    if eval_tasks:
        tagged = [
            (t.name, tag_row(r, mixing.tag.format(task=t.name)) if mixing.tag else r)
            for t in eval_tasks
            for r in t.rows
        ]
        data.eval = str(write_mixture(tagged, run_path / "data" / "eval_mixture.jsonl")[0])
    data.format, data.columns, data.tasks = "auto", {}, None  # the written rows are canonical
    return recipe, eval_tasks


def _execute(
    recipe: Recipe, run: RunDir, *, console: Console | None, resume: bool, on_eval: Any = None
) -> TrainResult:
    console = console or make_console(stderr=True)
    data_files = [Path(p) for p in (recipe.data.train, recipe.data.eval) if p and Path(p).exists()]
    if not resume or not run.manifest_path.exists():
        run.write_manifest(
            build_manifest(
                recipe=recipe.resolved(), data_files=data_files, seed=recipe.seed, run_name=run.name
            )
        )
    if OBJECTIVES.get(recipe.objective.name).impl.online:
        return run_online(recipe, run, console, resume=resume)
    trainer, outcome = run_lifecycle(
        run,
        setup=lambda: _set_up(recipe, run, console, resume=resume, on_eval=on_eval),
        body=_train_and_save,
        fresh=not resume,
    )
    return TrainResult(
        run.path,
        outcome.steps,
        outcome.losses,
        outcome.final_eval,
        outcome.stopped_early,
        outcome.data_summary,
    )


def _set_up(recipe: Recipe, run: RunDir, console: Console, *, resume: bool, on_eval: Any) -> Trainer:
    """Everything before the first step: data (split, mixed), trainer, resume point."""
    if recipe.data.split is not None:
        recipe = recipe.model_copy(deep=True)
        with distributed.main_process_first():  # rank 0 writes the split; the others find it
            recipe.data.train, recipe.data.eval = materialise_split(recipe.data, run.path)
        recipe.data.split = None
    eval_tasks = None
    if recipe.data.tasks:
        recipe, eval_tasks = materialise_tasks(recipe, run.path)
    trainer = Trainer(recipe, run, console, eval_tasks=eval_tasks)
    trainer.on_eval = on_eval
    checkpoint = run.latest_checkpoint() if resume else None
    if checkpoint is not None:
        trainer.resume_from(checkpoint)
    share = 100 * trainer.trainable / max(trainer.total_params, 1)
    trainer.console.print(
        Text(
            f"run {run.path}: {trainer.trainable:,} of {trainer.total_params:,} parameters train "
            f"({share:.2f}%), {trainer.steps} steps"
        )
    )
    return trainer


def _train_and_save(trainer: Trainer) -> Outcome:
    losses = trainer.fit()
    final_eval = trainer.maybe_evaluate(final=True) or {}
    trainer.maybe_checkpoint(force=True)
    trainer.save_final()
    summary = {"train": trainer.train_split.summary()}
    if trainer.eval_split is not None:
        summary["eval"] = trainer.eval_split.summary()
    return Outcome(trainer.state.step, losses, final_eval, trainer.state.stopped_early, summary)
