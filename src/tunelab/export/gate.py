"""The export parity gate: an export is finished only when the engine that will serve it reproduces the
run's own numbers on held-out examples.

:func:`verify_export` runs the run itself (transformers/PEFT, its own template) and the exported
artefact (llama.cpp for a GGUF, transformers for a merged directory, PEFT for an adapter, each with
the template and stop ids *the artefact* carries) on the same sampled examples, and compares: the
main metric with a paired bootstrap CI on the difference, greedy-token agreement on the first 32
generated tokens, answer perplexity and stop behaviour. The limits per precision come from the run
recipe's ``export.gate`` (defaults in :data:`tunelab.recipe.DEFAULT_EXPORT_GATES`). The verdict is
written into the export's ``tunelab_export.json`` as ``verification``; a failed gate keeps the files.

:func:`export_and_verify` is what ``tunelab export`` runs: :func:`tunelab.export.run.export_run`,
then the gate. Heavy imports (torch, transformers, llama.cpp) happen inside the functions.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from tunelab.console import labelled, make_console, progress, styled
from tunelab.export.run import EXPORT_META, check_out_path, export_run, final_dir, read_final_meta, run_dir_of
from tunelab.runs.atomic import atomic_write_json
from tunelab.runs.summary import fmt

if TYPE_CHECKING:  # the recipe module imports torch (via the method registry); `tunelab --help` must not
    from tunelab.recipe import ExportSection

GATE_FAILED_EXIT = 3
# = tunelab.export.merge.QLORA_MERGES; repeated because merge imports torch and this module stays light
QLORA_MERGES = ("base16", "dequantized")
# the run's side of the gate, cached per run (see _run_side); bump the version when its measure changes
GATE_CACHE = "export_gate_cache"
GATE_CACHE_VERSION = 1


class NoHeldOutData(ValueError):
    """The run has no held-out file to verify on and none was given."""


def export_and_verify(
    run: str | Path,
    out: str | Path,
    *,
    kind: str,
    verify: bool = True,
    verify_data: str | Path | None = None,
    verify_n: int | None = None,
    qlora_merge: str = "base16",
    console: Console | None = None,
    **export_options: Any,
) -> tuple[Path, dict[str, Any] | None]:
    """Export ``run`` to ``out`` (options as :func:`export_run`), then verify it unless ``verify`` is
    off. Returns the export folder and the verification (None when skipped). The held-out data is
    found before anything is written, so a run with nothing to verify on exports nothing."""
    from tunelab.export.merge import qlora_merge_mode  # noqa: PLC0415

    if qlora_merge not in QLORA_MERGES:
        raise ValueError(f"--qlora-merge {qlora_merge!r}: choose one of {', '.join(QLORA_MERGES)}")
    check_out_path(out)
    final = final_dir(run)
    data = held_out_data(final, verify_data) if verify else None
    if data is not None:
        check_held_out(final, data[0])
    if verify and kind == "gguf" and importlib.util.find_spec("llama_cpp") is None:
        from tunelab.models.llamacpp import MISSING_MESSAGE  # noqa: PLC0415

        raise ValueError(
            f"{MISSING_MESSAGE}; the parity gate runs the GGUF in it (--no-verify skips the gate)"
        )
    with qlora_merge_mode(qlora_merge):
        path = export_run(run, out, kind=kind, **export_options)  # type: ignore[arg-type]
    merges = _method(final) == "qlora" and kind != "adapter"  # an adapter export is not merged
    _record(path, {"qlora_merge": qlora_merge} if merges else {})
    if not verify:
        _record(path, {"verification": {"skipped": "--no-verify"}})
        return path, None
    choice = qlora_merge if merges else None
    return path, verify_export(final, path, data=data, n=verify_n, console=console, qlora_merge=choice)


def _is_causal(final: Path) -> bool:
    return read_final_meta(final).get("model_kind", "causal_lm") == "causal_lm"


def _method(final: Path) -> str | None:
    return read_final_meta(final).get("method")


def held_out_data(final: Path, given: str | Path | None = None) -> tuple[str, str]:
    """(file, role): ``--verify-data``, else the run's ``data.eval``, else the validation file its
    ``data.split`` wrote; a run with no held-out data is checked on its training file (parity of the
    export with the run does not need unseen examples, only the same ones on both sides)."""
    if given is not None:
        if not Path(given).is_file():
            raise FileNotFoundError(f"--verify-data {given}: no such file")
        return str(given), "given"
    run = run_dir_of(final)
    data = _recipe(run).get("data") or {}
    candidates = [
        (_path_in(run, data.get("eval")), "held-out"),
        (run / "data" / "validation.jsonl", "held-out"),
        (run / "data" / "eval_mixture.jsonl", "held-out"),
        (run / "data" / "train.jsonl", "train"),
        (_path_in(run, data.get("train")), "train"),
    ]
    for candidate, role in candidates:
        if candidate is not None and candidate.is_file():
            return str(candidate), role
    raise NoHeldOutData(
        f"{run}: no data to verify the export on (its recipe.yaml names no data.eval or data.train file "
        "that exists here); pass --verify-data FILE, or --no-verify to export unchecked"
    )


def check_held_out(final: Path, data: str) -> None:
    """Read the held-out data as the gate will, before anything is written: an unreadable file is
    refused while no export exists yet, instead of after a complete export that then blocks the rerun."""
    from tunelab.evaluate.run import load_conversations, load_task  # noqa: PLC0415

    try:
        load_conversations(data) if _is_causal(final) else load_task(data, str(final))
    except OSError as err:
        raise ValueError(
            f"{data}: cannot be read ({err.strerror or err}); the parity gate needs it"
        ) from None


def _path_in(run: Path, value: Any) -> Path | None:
    if not isinstance(value, str) or not value:
        return None
    path = Path(value)
    return path if path.is_absolute() else run / path


def _recipe(run: Path) -> dict[str, Any]:
    import yaml  # noqa: PLC0415

    path = run / "recipe.yaml"
    return (yaml.safe_load(path.read_text(encoding="utf-8")) or {}) if path.is_file() else {}


def export_section(run: Path) -> ExportSection:
    """The run recipe's ``export`` section (defaults for runs recorded before it existed)."""
    from tunelab.recipe import ExportSection  # noqa: PLC0415

    return ExportSection.model_validate(_recipe(run).get("export") or {})


def sample_conversations(data: str, n: int, seed: int) -> list[list[dict[str, Any]]]:
    """``n`` examples of ``data`` drawn with ``seed``, in file order (all of them when fewer)."""
    from tunelab.evaluate.run import load_conversations  # noqa: PLC0415

    conversations = load_conversations(data)
    if len(conversations) <= n:
        return conversations
    keep = sorted(random.Random(seed).sample(range(len(conversations)), n))
    return [conversations[i] for i in keep]


def precision_of(provenance: dict[str, Any]) -> str:
    """The key of ``export.gate`` that applies: the GGUF type, or ``merged`` / ``adapter``."""
    return str(provenance.get("gguf_type") or provenance.get("kind") or "merged").lower()


def verify_export(
    final: Path,
    export_dir: Path,
    *,
    data: tuple[str, str] | None = None,
    n: int | None = None,
    console: Console | None = None,
    qlora_merge: str | None = None,
) -> dict[str, Any]:
    """Run and export side by side on held-out examples; the verdict goes into ``tunelab_export.json``."""
    console = console or make_console(stderr=True)
    section = export_section(run_dir_of(final))
    provenance = json.loads((export_dir / EXPORT_META).read_text(encoding="utf-8"))
    precision = precision_of(provenance)
    data, role = data or held_out_data(final)
    limits = section.thresholds(precision)
    if not _is_causal(final):
        verification = verify_head(final, export_dir, data, n or section.verify_n, section, limits, console)
    else:
        conversations = sample_conversations(data, n or section.verify_n, section.verify_seed)
        run_eval, export_eval, how = _measure_both(final, export_dir, conversations, section, console)
        verification = compare_evals(run_eval, export_eval, limits, seed=section.verify_seed) | how
    verification |= {
        "precision": precision,
        "data": data,
        "data_role": role,
        "seed": section.verify_seed,
    }
    if qlora_merge and _method(final) == "qlora" and _is_causal(final):
        verification["qlora_merge"] = _qlora_alternative(
            final, conversations, run_eval, section, qlora_merge, console
        )
    _record(export_dir, {"verification": verification})
    return verification


def _measure_both(
    final: Path, export_dir: Path, conversations: list[Any], section: ExportSection, console: Console
) -> tuple[Any, Any, dict[str, Any]]:
    """The run's side (from the cache when this run was gated on these examples before) and the
    export's side; and how each was had (engine, seconds, cache)."""
    from tunelab.data.templates import split_prompt_answer  # noqa: PLC0415
    from tunelab.evaluate.engines import LlamaCppEngine, engine_for  # noqa: PLC0415
    from tunelab.evaluate.run import infer_labels  # noqa: PLC0415

    labels = infer_labels([split_prompt_answer(c)[1] for c in conversations])
    started = time.perf_counter()
    run_eval, cache = _run_side(final, conversations, labels, section, console)
    run_seconds = time.perf_counter() - started
    engine = engine_for(str(export_dir), name="export")
    started = time.perf_counter()
    # a bar on a terminal, plain progress lines in a log (minutes on a CPU)
    with progress(console, "parity gate: export", len(conversations)) as advance:
        export_eval = _evaluate(engine, conversations, labels, section.max_new_tokens, advance)
    kind = "llama.cpp" if isinstance(engine, LlamaCppEngine) else "transformers"
    engine.close()
    if kind == "transformers" and (export_dir / "adapter_config.json").is_file():
        kind = "peft"
    how = {
        "engine": kind,
        "run_side": cache,
        "seconds": {"run": run_seconds, "export": time.perf_counter() - started},
    }
    return run_eval, export_eval, how


def _run_side(
    final: Path, conversations: list[Any], labels: list[str] | None, section: ExportSection, console: Console
) -> tuple[Any, dict[str, Any]]:
    """The run evaluated on ``conversations`` (transformers, batched), cached in the run directory
    under a digest of its final weights, tokenizer and metadata, the examples, the labels and the
    generation budget: any change to those measures it again."""
    from tunelab.evaluate.engines import (  # noqa: PLC0415
        TransformersEngine,
        engine_eval_from_json,
        engine_eval_to_json,
    )

    key = run_side_key(final, conversations, labels, section.max_new_tokens)
    path = run_dir_of(final) / GATE_CACHE / f"run-{key[:32]}.json"
    if path.is_file():
        try:
            cached = json.loads(path.read_text(encoding="utf-8"))
            if cached.get("key") == key:
                return engine_eval_from_json(cached["eval"]), {"cache": str(path), "reused": True}
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a damaged cache entry is measured again and rewritten
    engine = TransformersEngine.load(str(final), name="run")
    with progress(console, "parity gate: run", len(conversations)) as advance:
        result = _evaluate(engine, conversations, labels, section.max_new_tokens, advance)
    engine.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"key": key, "version": GATE_CACHE_VERSION, "eval": engine_eval_to_json(result)})
    return result, {"cache": str(path), "reused": False}


def run_side_key(final: Path, conversations: list[Any], labels: list[str] | None, budget: int) -> str:
    """sha256 of everything the run's side of the gate depends on (every file of ``final/``)."""
    from tunelab.runs.manifest import file_sha256  # noqa: PLC0415

    files = sorted(p for p in final.rglob("*") if p.is_file())
    payload = {
        "version": GATE_CACHE_VERSION,
        "files": [[p.relative_to(final).as_posix(), file_sha256(p)] for p in files],
        "conversations": conversations,
        "labels": labels,
        "max_new_tokens": budget,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def verify_head(
    final: Path,
    export_dir: Path,
    data: str,
    n: int,
    section: ExportSection,
    limits: dict[str, Any],
    console: Console,
) -> dict[str, Any]:
    """A classification or reward head: the task's main metric (as ``tunelab eval``) with its paired CI,
    and the share of examples on which the export predicts what the run predicts."""
    from dataclasses import replace  # noqa: PLC0415

    from tunelab.evaluate.compare import paired_bootstrap_ci  # noqa: PLC0415
    from tunelab.evaluate.run import evaluate_task, load_for_eval, load_task  # noqa: PLC0415

    task = load_task(data, str(final))
    keep = sorted(random.Random(section.verify_seed).sample(range(task.n), min(n, task.n)))
    task = replace(
        task, texts=_pick(task.texts, keep), golds=_pick(task.golds, keep), pairs=_pick(task.pairs, keep)
    )
    results = []
    for name, spec in (("run", str(final)), ("export", str(export_dir))):
        with console.status(f"parity gate: {name} on {task.n} held-out examples"):
            model, tokenizer = load_for_eval(spec, device="cpu", dtype="float32", head_meta=task.meta)
            results.append(evaluate_task(model, tokenizer, task, name=name))
    run, export = results
    main = task.main_metric
    delta, lo, hi = paired_bootstrap_ci(
        run.per_example[main], export.per_example[main], seed=section.verify_seed
    )
    # classifiers: the predicted labels; reward models: whether each pair is ranked the same way
    a, b = (r.generations or r.per_example[main] for r in (run, export))
    export_metrics = dict(export.metrics) | {
        "prediction_agreement": sum(x == y for x, y in zip(a, b)) / len(a)
    }
    checks = [
        _main_check(main, delta, lo, hi, limits.get("max_drop")),
        _check("prediction_agreement", export_metrics["prediction_agreement"], ">=", limits["min_agreement"]),
    ]
    failed = [c["name"] for c in checks if not c["passed"]]
    return {
        "passed": not failed,
        "failed_checks": failed,
        "failures": [c["message"] for c in checks if not c["passed"]],
        "n": task.n,
        "main_metric": main,
        "run": dict(run.metrics),
        "export": export_metrics,
        "comparison": {"metric": main, "delta": delta, "ci95": [lo, hi], "n_boot": 1000},
        "checks": checks,
        "thresholds": limits,
        "engine": "peft" if (export_dir / "adapter_config.json").is_file() else "transformers",
    }


def _pick(values: list[Any], keep: list[int]) -> list[Any]:
    return [values[i] for i in keep] if values else values


def _evaluate(
    engine: Any, conversations: list[Any], labels: list[str] | None, budget: int, advance: Any = None
) -> Any:
    from tunelab.evaluate.engines import evaluate_engine  # noqa: PLC0415

    return evaluate_engine(engine, conversations, labels=labels, max_new_tokens=budget, progress=advance)


def compare_evals(
    run: Any, export: Any, limits: dict[str, float | None], *, seed: int = 0, n_boot: int = 1000
) -> dict[str, Any]:
    """Every check of the gate from two :class:`EngineEval` on the same examples."""
    from tunelab.evaluate.compare import paired_bootstrap_ci  # noqa: PLC0415
    from tunelab.evaluate.engines import token_agreement  # noqa: PLC0415

    main = "accuracy_loglik" if run.labels else "exact_match"
    run_scores, export_scores = run.per_example()[main], export.per_example()[main]
    delta, lo, hi = paired_bootstrap_ci(run_scores, export_scores, n_boot=n_boot, seed=seed)
    agreement = [
        token_agreement(a.token_ids, b.token_ids) for a, b in zip(run.generations, export.generations)
    ]
    run_m, export_m = run.metrics(), export.metrics()
    export_m["token_agreement"] = sum(agreement) / len(agreement)
    checks = [
        _main_check(main, delta, lo, hi, limits.get("max_drop")),
        _check("token_agreement", export_m["token_agreement"], ">=", limits["min_agreement"]),
        _check(
            "perplexity", export_m["perplexity"] / run_m["perplexity"], "<=", limits["max_perplexity_ratio"]
        ),
        _check("stop_share", run_m["stop_share"] - export_m["stop_share"], "<=", limits["max_stop_drop"]),
    ]
    failed = [c["name"] for c in checks if not c["passed"]]
    return {
        "passed": not failed,
        "failed_checks": failed,
        "failures": [c["message"] for c in checks if not c["passed"]],
        "n": run.n,
        "main_metric": main,
        "run": run_m,
        "export": export_m,
        "comparison": {"metric": main, "delta": delta, "ci95": [lo, hi], "n_boot": n_boot},
        "checks": checks,
        "thresholds": limits,
    }


def _main_check(metric: str, delta: float, lo: float, hi: float, max_drop: float | None) -> dict[str, Any]:
    """No significant drop (the CI of export − run reaches 0), or a drop of at most ``max_drop``.
    The message says what happened: a pass reads as a pass."""
    ci = f"Δ {delta:+.4f}, 95% CI [{lo:+.4f}, {hi:+.4f}]"
    if max_drop is None:
        passed = hi >= 0
        message = (
            f"{metric}: no significant drop ({ci} reaches 0)"
            if passed
            else f"{metric} dropped significantly: {ci} excludes 0"
        )
        return {
            "name": metric,
            "value": delta,
            "limit": "no significant drop",
            "passed": passed,
            "message": message,
        }
    passed = -delta <= max_drop + 1e-12
    if passed:
        change = f"rose by {delta:.4f}" if delta > 0 else f"dropped by {-delta:.4f}" if delta < 0 else "held"
        message = f"{metric} {change} ({ci}), within the {max_drop:.4f} drop allowed"
    else:
        message = f"{metric} dropped by {-delta:.4f} ({ci}), more than the {max_drop:.4f} allowed"
    return {"name": metric, "value": delta, "limit": -max_drop, "passed": passed, "message": message}


def _check(name: str, value: float, op: str, limit: float | None) -> dict[str, Any]:
    what = {
        "token_agreement": "greedy-token agreement with the run",
        "prediction_agreement": "share of examples where the export predicts what the run predicts",
        "perplexity": "answer perplexity export/run ratio",
        "stop_share": "drop in the share of answers that stop by EOS/end-of-turn",
    }[name]
    if limit is None:
        return {
            "name": name,
            "value": value,
            "limit": None,
            "passed": True,
            "message": f"{name}: {what} is {value:.4f} (no limit)",
        }
    passed = bool(value >= limit if op == ">=" else value <= limit)
    if passed:
        bound = "at or above the minimum" if op == ">=" else "at or below the maximum"
    else:
        bound = "below the minimum" if op == ">=" else "above the maximum"
    message = f"{name}: {what} is {value:.4f}, {bound} {limit:.4f}"
    return {"name": name, "value": value, "limit": limit, "passed": passed, "message": message}


def _qlora_alternative(
    final: Path,
    conversations: list[Any],
    run_eval: Any,
    section: ExportSection,
    used: str,
    console: Console,
) -> dict[str, Any]:
    """The other QLoRA merge measured on the same examples (in transformers), so the choice is informed."""
    from tunelab.evaluate.compare import paired_bootstrap_ci  # noqa: PLC0415
    from tunelab.evaluate.engines import TransformersEngine  # noqa: PLC0415
    from tunelab.export.merge import merged_model  # noqa: PLC0415

    other = next(m for m in QLORA_MERGES if m != used)
    scores = {}
    for choice in QLORA_MERGES:
        with console.status(f"parity gate: QLoRA merged into {choice} base"):
            model, tokenizer = merged_model(final, qlora_merge=choice)
            engine = TransformersEngine(model, tokenizer, name=choice)
            scores[choice] = _evaluate(engine, conversations, run_eval.labels, section.max_new_tokens)
    main = "accuracy_loglik" if run_eval.labels else "exact_match"
    per = {k: v.per_example()[main] for k, v in scores.items()}
    delta, lo, hi = paired_bootstrap_ci(per[other], per[used], seed=section.verify_seed)
    return {
        "used": used,
        "alternative": other,
        "metric": main,
        "run": run_eval.metrics()[main],
        **{
            choice: {"metric": ev.metrics()[main], "perplexity": ev.perplexity}
            for choice, ev in scores.items()
        },
        "delta_used_minus_alternative": delta,
        "ci95": [lo, hi],
    }


def _record(export_dir: Path, fields: dict[str, Any]) -> None:
    """Add ``fields`` to the export's provenance file (rewritten atomically)."""
    if not fields:
        return
    meta_path = export_dir / EXPORT_META
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    atomic_write_json(meta_path, meta | fields)


def verification_table(verification: dict[str, Any], title: str) -> Table:
    """Run vs export: main metric with the CI of the difference, agreement, perplexity, stop share."""
    run, export = verification["run"], verification["export"]
    main = verification["main_metric"]
    lo, hi = verification["comparison"]["ci95"]
    table = Table(
        title=f"{title} (n={verification['n']}, {verification['engine']}, {verification['precision']})"
    )
    for column in ("check", "run", "export", "Δ export − run", "95% CI of Δ", "limit", ""):
        table.add_column(column, justify="left" if column in ("check", "") else "right")
    by_name = {c["name"]: c for c in verification["checks"]}
    rows = [(main, run[main], export[main], export[main] - run[main], f"[{lo:+.4f}, {hi:+.4f}]")]
    for name in by_name:
        if name.endswith("_agreement"):
            rows.append((name, None, export[name], None, ""))
        elif name != main:
            rows.append((name, run[name], export[name], export[name] - run[name], ""))
    for name, a, b, delta, ci in rows:
        check = by_name[name]
        verdict = styled("ok", "green") if check["passed"] else styled("FAILED", "bold red")
        limit = check["limit"] if isinstance(check["limit"], str) else _limit_text(name, check["limit"])
        table.add_row(name, fmt(a), fmt(b), "—" if delta is None else f"{delta:+.4f}", ci, limit, verdict)
    return table


def _limit_text(name: str, limit: float | None) -> str:
    if limit is None:
        return "—"
    return {
        "token_agreement": f"≥ {limit:.2f}",
        "prediction_agreement": f"≥ {limit:.2f}",
        "perplexity": f"ratio ≤ {limit:.3f}",
        "stop_share": f"drop ≤ {limit:.2f}",
    }.get(name, f"drop ≤ {-limit:.3f}")


def print_verification(verification: dict[str, Any], console: Console) -> None:
    """The table, the QLoRA merge comparison when measured, and the verdict."""
    if "skipped" in verification:
        console.print(f"parity gate skipped: {verification['skipped']}")
        return
    console.print(verification_table(verification, "export parity gate: run vs export"))
    if verification.get("data_role") == "train":
        console.print(
            labelled("note", f"the run has no held-out data: parity checked on {verification['data']}")
        )
    alt = verification.get("qlora_merge")
    if alt:
        used, other = alt["used"], alt["alternative"]
        lo, hi = alt["ci95"]
        console.print(
            f"QLoRA merge ({alt['metric']}): run {alt['run']:.4f}; into {used} base {alt[used]['metric']:.4f}, "
            f"into {other} base {alt[other]['metric']:.4f}; Δ {used} − {other} "
            f"{alt['delta_used_minus_alternative']:+.4f} (95% CI [{lo:+.4f}, {hi:+.4f}]); "
            f"choose with --qlora-merge {'|'.join(QLORA_MERGES)}"
        )
    if verification["passed"]:
        console.print(styled("export parity gate passed", "green"))
