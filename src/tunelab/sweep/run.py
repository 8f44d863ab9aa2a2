"""`tunelab sweep`: an Optuna study over any recipe fields, each trial an ordinary training run.

Layout::

    runs/<sweep>/
      sweep.json          settings (metric, direction, sampler, pruner, seed) and the space
      base_recipe.yaml    the resolved recipe every trial starts from
      study.db            the Optuna study (SQLite): what makes an interrupted sweep resumable
      trial-000/ ...      one run directory per trial (recipe.yaml with the trial's values, metrics, final/)
      results.csv, results.json, sweep.png, best_recipe.yaml

Rerunning the same command (or ``--resume runs/<sweep>``) continues the study: ``--trials`` is the
total, and trials that were cut off by a kill or Ctrl-C do not count and are run again with the
values they would have had. The sampler is re-seeded per trial from (seed, trial index), so a sweep
interrupted and resumed proposes exactly what an uninterrupted one would have.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import TrialState
from rich.console import Console
from rich.text import Text

from tunelab.console import make_console, styled
from tunelab.recipe import Recipe, parse_recipe
from tunelab.registry import did_you_mean
from tunelab.runs.atomic import atomic_write_json, atomic_write_text, remove_tree
from tunelab.runs.manifest import utc_now
from tunelab.runs.rundir import RunDir
from tunelab.runs.summary import fmt
from tunelab.sweep.report import SweepReport, trial_state, write_report
from tunelab.sweep.space import apply_values, dump_space, grid_points, suggest, sweep_base, validate_space

SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "none")
COUNTED = ("complete", "pruned", "failed")  # states that count towards --trials
DIRECTIONS = ("minimize", "maximize")
# TPE models the history only after this many random trials; Optuna's 10 would make a typical
# 6-20 trial fine-tuning sweep almost all random.
TPE_STARTUP_TRIALS = 5
# The median pruner compares a trial with this many finished ones before it prunes anything.
PRUNER_STARTUP_TRIALS = 3

OnEval = Callable[[int, dict[str, float], bool], None]
TrainFn = Callable[[Recipe, OnEval], dict[str, float]]


class SweepError(ValueError):
    """A sweep that cannot start or go on (settings, metric, existing directory); names the fix."""


class TrialFailed(RuntimeError):
    """One trial's training raised; the trial is recorded as failed and the sweep goes on."""


@dataclass(frozen=True)
class SweepSettings:
    trials: int
    metric: str = "eval_loss"
    direction: str | None = None
    sampler: str = "tpe"
    pruner: str = "median"
    seed: int = 0
    name: str | None = None

    def checked(self) -> SweepSettings:
        """Settings with the direction filled in; every bad option reported at once."""
        problems = [
            f"--{flag} {value!r}: expected one of {', '.join(options)}"
            for flag, value, options in (
                ("sampler", self.sampler, SAMPLERS),
                ("pruner", self.pruner, PRUNERS),
                ("direction", self.direction or "minimize", DIRECTIONS),
            )
            if value not in options
        ]
        if self.trials < 1:
            problems.append(f"--trials {self.trials}: give at least 1")
        if problems:
            raise SweepError("; ".join(problems))
        return replace(self, direction=self.direction or infer_direction(self.metric))

    def stored(self) -> dict[str, Any]:
        """What must match when a sweep is continued (the trial count may grow)."""
        return {k: v for k, v in asdict(self).items() if k not in ("trials", "name")}


def infer_direction(metric: str) -> str:
    """Losses go down and accuracies up; anything else must be said, not guessed."""
    lowered = metric.lower()
    if any(word in lowered for word in ("loss", "perplexity", "error")):
        return "minimize"
    if any(word in lowered for word in ("accuracy", "f1", "exact_match", "reward", "margin")):
        return "maximize"
    raise SweepError(
        f"--direction: cannot tell whether {metric!r} should go down or up; pass --direction minimize "
        "or --direction maximize"
    )


@dataclass
class SweepResult:
    sweep_dir: Path
    report: SweepReport
    ran: int = 0
    notes: list[str] = field(default_factory=list)


def default_train_fn(console: Console | None) -> TrainFn:
    """Real training through the engine; the returned metrics are the run's final evaluation."""

    def train_trial(recipe: Recipe, on_eval: OnEval) -> dict[str, float]:
        from tunelab.train.run import train  # noqa: PLC0415  (torch and friends only when training)

        return train(recipe, console=console, on_eval=on_eval).final_eval

    return train_trial


def sweep_dir_for(base: Recipe, name: str | None) -> Path:
    return Path(base.output.dir) / (name or f"{base.output.name or 'run'}-sweep")


def run_sweep(
    base: Recipe,
    space: dict[str, Any],
    settings: SweepSettings,
    *,
    sweep_dir: Path | None = None,
    overwrite: bool = False,
    train_fn: TrainFn | None = None,
    console: Console | None = None,
) -> SweepResult:
    """Run (or continue) a sweep until ``settings.trials`` trials have finished; write the report.

    ``train_fn(recipe, on_eval)`` trains one trial and returns its final metrics; it must call
    ``on_eval(step, metrics, last)`` after each evaluation so the pruner can stop a poor trial early.
    Tests inject a planted objective here; the default trains through the engine.
    """
    console = console or make_console(stderr=True)
    settings = settings.checked()
    base_raw = sweep_base(base)
    _require_eval_data(base)
    validate_space(space, base_raw)
    grid = grid_points(space, base_raw, settings.seed) if settings.sampler == "grid" else None
    sweep_dir = sweep_dir or sweep_dir_for(base, settings.name)
    _prepare_dir(sweep_dir, base_raw, space, settings, overwrite, console)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own per-trial lines replace its INFO logs
    study = optuna.create_study(
        study_name=sweep_dir.name,
        storage=f"sqlite:///{(sweep_dir / 'study.db').resolve()}",
        direction=settings.direction,
        pruner=_make_pruner(settings.pruner),
        load_if_exists=True,
    )
    notes = _close_stale_trials(study)
    done = counted_trials(study)
    to_run = _trials_to_run(settings, grid, done)
    if done:
        console.print(f"continuing sweep {sweep_dir}: {done} trial(s) done, {to_run} to run")
    trial_fn = train_fn or default_train_fn(console)
    objective = _objective(space, base_raw, settings, sweep_dir, trial_fn, console)
    _prepare_next_trial(study, settings, grid)
    try:
        if to_run > 0:
            study.optimize(
                objective,
                n_trials=to_run,
                catch=(TrialFailed,),
                callbacks=[_after_trial(settings, grid, console)],
            )
    finally:
        report = write_report(study, space, base_raw, settings, sweep_dir, console)
    return SweepResult(sweep_dir, report, ran=max(counted_trials(study) - done, 0), notes=notes)


def resume_sweep(
    sweep_dir: Path, trials: int, *, train_fn: TrainFn | None = None, console: Console | None = None
) -> SweepResult:
    """Continue ``runs/<sweep>`` with its saved base recipe, space and settings up to ``trials``."""
    from tunelab.sweep.space import parse_space  # noqa: PLC0415

    meta_path = sweep_dir / "sweep.json"
    if not meta_path.is_file():
        raise SweepError(f"--resume {sweep_dir}: no sweep.json there; is this a sweep directory?")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    base = parse_recipe(
        yaml.safe_load((sweep_dir / "base_recipe.yaml").read_text(encoding="utf-8")),
        source=str(sweep_dir / "base_recipe.yaml"),
    )
    settings = SweepSettings(trials=trials, name=sweep_dir.name, **meta["settings"])
    space = parse_space(meta["space"], str(meta_path))
    return run_sweep(base, space, settings, sweep_dir=sweep_dir, train_fn=train_fn, console=console)


def _require_eval_data(base: Recipe) -> None:
    data = base.data
    if data.eval or data.split or any(t.eval for t in data.tasks or []):
        return
    raise SweepError(
        "the sweep compares trials on held-out data, and this recipe has none: set data.eval, "
        "data.split, or an eval file per task"
    )


def _prepare_dir(
    sweep_dir: Path,
    base_raw: dict[str, Any],
    space: dict[str, Any],
    settings: SweepSettings,
    overwrite: bool,
    console: Console,
) -> None:
    """New sweep: write its settings. Existing one: refuse to continue it with different settings."""
    meta_path = sweep_dir / "sweep.json"
    exists = sweep_dir.exists() and any(sweep_dir.iterdir())
    if exists and not meta_path.is_file():
        raise SweepError(f"{sweep_dir} exists and is not a sweep directory; pick another --name")
    if exists and overwrite:
        console.print(f"--overwrite: deleting sweep {sweep_dir}")
        remove_tree(sweep_dir)
        exists = False
    meta = {"settings": settings.stored(), "space": dump_space(space)}
    if exists:
        _check_same_sweep(sweep_dir, json.loads(meta_path.read_text(encoding="utf-8")), meta, base_raw)
        return
    sweep_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(sweep_dir / "base_recipe.yaml", yaml.safe_dump(base_raw, sort_keys=False))
    atomic_write_json(meta_path, {**meta, "created_at": utc_now()})


def _check_same_sweep(
    sweep_dir: Path, saved: dict[str, Any], meta: dict[str, Any], base_raw: dict[str, Any]
) -> None:
    saved_base = yaml.safe_load((sweep_dir / "base_recipe.yaml").read_text(encoding="utf-8"))
    changed = [k for k in meta["settings"] if saved["settings"].get(k) != meta["settings"][k]]
    changed += ["space"] if saved["space"] != meta["space"] else []
    changed += ["recipe"] if saved_base != base_raw else []
    if changed:
        raise SweepError(
            f"sweep {sweep_dir} exists with a different {', '.join(changed)}; continuing it would mix "
            "two experiments. Pass --name for a new sweep, --overwrite to start this one again, or "
            f"--resume {sweep_dir} to continue with its saved settings"
        )


def _make_pruner(kind: str) -> optuna.pruners.BasePruner:
    if kind == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS)


def _prepare_next_trial(
    study: optuna.Study, settings: SweepSettings, grid: list[dict[str, Any]] | None
) -> None:
    """Seed the sampler by (seed, trial index), so a resumed sweep proposes what an uninterrupted one
    would; for a grid, queue the next point instead (its values arrive fixed, the sampler is idle)."""
    index = counted_trials(study)
    seed = settings.seed * 100_003 + index
    if settings.sampler == "tpe":
        study.sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=TPE_STARTUP_TRIALS)
    else:
        study.sampler = optuna.samplers.RandomSampler(seed=seed)
    if grid is not None and index < settings.trials:
        _queue_next_grid_point(study, grid)


def _queue_next_grid_point(study: optuna.Study, grid: list[dict[str, Any]]) -> None:
    """Queue the first grid point no counted trial has run yet, so a cut-off point is run next.

    Why not optuna's GridSampler: it counts a cut-off trial's point as visited (never re-run), fails
    on re-queued trials, and would run IA3 once per LoRA rank in a conditional space.
    """
    if study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        return
    done = [t.params for t in study.trials if trial_state(t) in COUNTED]
    for point in grid:
        if point not in done:
            study.enqueue_trial(point)
            return


def _trials_to_run(settings: SweepSettings, grid: list[dict[str, Any]] | None, done: int) -> int:
    remaining = settings.trials - done
    if grid is not None:
        remaining = min(remaining, len(grid) - done)
    return max(remaining, 0)


def counted_trials(study: optuna.Study) -> int:
    """Trials that count towards --trials: finished ones, and failures of the training itself.
    A trial cut off by Ctrl-C or a kill does not count; it is run again."""
    return sum(1 for t in study.trials if trial_state(t) in COUNTED)


def _close_stale_trials(study: optuna.Study) -> list[str]:
    """A trial still RUNNING in the database belongs to a process that was killed: close it."""
    notes = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(trial.number, state=TrialState.FAIL)
        run = RunDir(trial.user_attrs.get("run_dir", "")) if trial.user_attrs.get("run_dir") else None
        if run is not None and run.manifest_path.is_file() and run.read_manifest().get("status") == "running":
            run.set_status("interrupted")
        notes.append(f"trial {trial.number} was cut off; it does not count and its values are tried again")
    return notes


def _objective(
    space: dict[str, Any],
    base_raw: dict[str, Any],
    settings: SweepSettings,
    sweep_dir: Path,
    train_fn: TrainFn,
    console: Console,
) -> Callable[[optuna.Trial], float]:
    def objective(trial: optuna.Trial) -> float:
        values = suggest(trial, space, base_raw)
        run_name = f"trial-{trial.number:03d}"
        trial.set_user_attr("run_dir", str(sweep_dir / run_name))
        recipe = parse_recipe(_trial_raw(base_raw, values, sweep_dir, run_name), source=run_name)
        shown = "  ".join(f"{k}={fmt(v)}" for k, v in values.items())
        console.rule(styled(run_name, "bold") + f"  {shown}", align="left")
        reporter = PruningReporter(trial, settings.metric)
        try:
            final = train_fn(recipe, reporter)
        except optuna.TrialPruned:
            reporter.mark_run_pruned(sweep_dir / run_name)
            raise
        except (SweepError, KeyboardInterrupt):
            raise
        except Exception as err:  # any training failure is this trial's, not the sweep's
            trial.set_user_attr("error", f"{type(err).__name__}: {err}"[:1000])
            raise TrialFailed(f"{run_name}: {type(err).__name__}: {err}") from err
        value = metric_value(final, settings.metric)
        if math.isnan(value):
            trial.set_user_attr("error", f"{settings.metric} is NaN (training diverged?)")
            raise TrialFailed(f"{run_name}: {settings.metric} is NaN")
        return value

    return objective


def _trial_raw(base_raw: dict[str, Any], values: dict[str, Any], sweep_dir: Path, run_name: str) -> dict:
    raw = apply_values(base_raw, values)
    raw["output"] = {**raw.get("output", {}), "dir": str(sweep_dir), "name": run_name}
    return raw


class PruningReporter:
    """``on_eval`` for one trial: reports each evaluation to Optuna and raises TrialPruned when the
    pruner says so (the engine marks the run failed as it unwinds; the sweep then relabels it)."""

    def __init__(self, trial: optuna.Trial, metric: str) -> None:
        self.trial, self.metric = trial, metric
        self.last: tuple[int, float] | None = None

    def __call__(self, step: int, metrics: dict[str, float], last: bool = False) -> None:
        value = metric_value(metrics, self.metric)
        self.last = (step, value)
        self.trial.report(value, step)
        # pruning after the last step saves nothing and would throw away a finished run
        if not last and self.trial.should_prune():
            raise optuna.TrialPruned(f"{self.metric} {value:.4g} at step {step} is worse than the median")

    def mark_run_pruned(self, run_dir: Path) -> None:
        """A pruned run is not a failure: status ``interrupted`` with ``pruned: true``."""
        if not (run_dir / "manifest.json").is_file() or self.last is None:
            return  # an injected train_fn may write no run directory
        step, value = self.last
        RunDir(run_dir).set_status(
            "interrupted", pruned=True, pruned_at_step=step, error=f"pruned: {self.metric} {value:.4g}"
        )


def metric_value(metrics: dict[str, float], metric: str) -> float:
    if metric not in metrics:
        hint = did_you_mean(metric, list(metrics))
        raise SweepError(
            f"--metric {metric!r} is not computed by this recipe's evaluation.{hint} "
            f"Computed: {', '.join(sorted(metrics)) or 'nothing'}"
        )
    return float(metrics[metric])


def _after_trial(
    settings: SweepSettings, grid: list[dict[str, Any]] | None, console: Console
) -> Callable[[optuna.Study, optuna.trial.FrozenTrial], None]:
    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        state = trial_state(trial)
        value = trial.value if trial.value is not None else _last_reported(trial)
        text = f"{settings.metric} {value:.4f}" if value is not None else trial.user_attrs.get("error", "")
        best = _best_text(study, settings.metric)
        console.print(Text.assemble(f"trial {trial.number}: ", (state, "bold"), f"  {text}{best}"))
        _prepare_next_trial(study, settings, grid)

    return callback


def _last_reported(trial: optuna.trial.FrozenTrial) -> float | None:
    steps = trial.intermediate_values
    return steps[max(steps)] if steps else None


def _best_text(study: optuna.Study, metric: str) -> str:
    if not any(t.state == TrialState.COMPLETE for t in study.trials):
        return ""
    return f"   (best so far: trial {study.best_trial.number}, {metric} {study.best_value:.4f})"
