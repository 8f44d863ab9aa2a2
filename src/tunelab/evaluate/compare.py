"""Before/after: two models on identical examples, a side-by-side table, and a paired bootstrap CI.

The delta of a metric between two models on a few hundred examples is noisy. Because both models
answer the *same* examples, resampling example indices (not the two models independently) gives a
confidence interval on the delta that accounts for how much the examples themselves vary.

:func:`evaluate_models` is what ``tunelab eval`` runs: it loads each model once and measures on it
everything the :class:`EvalPlan` asks for (task metrics, forgetting perplexity, robustness, bias
probe, speed), then scores generations with the safety classifier and checks the gate. The result
is one payload dict, the same one printed, written to report.json/.html and read by the gate.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table
from rich.text import Text

from tunelab.console import labelled, make_console, progress, styled
from tunelab.data.templates import render, select_template, split_prompt_answer
from tunelab.evaluate.engines import is_gguf_spec
from tunelab.evaluate.forgetting import DEFAULT_N, DEFAULT_SOURCE, default_general_texts, load_general_texts
from tunelab.evaluate.gate import check_gate, gate_values
from tunelab.evaluate.predictions import prediction_rows, write_prediction_rows
from tunelab.evaluate.probes import BiasProbe, SafetyClassifier, bias_report, load_bias_probe, safety_report
from tunelab.evaluate.robustness import PERTURBATIONS, perturb_conversations, perturb_text, robustness_report
from tunelab.evaluate.run import (
    EvalResult,
    EvalTask,
    add_generation_metrics,
    evaluate_task,
    load_for_eval,
    load_task,
    run_meta,
)
from tunelab.models.llamacpp import MISSING_MESSAGE
from tunelab.recipe import GateSection
from tunelab.runs.summary import fmt

N_BOOT = 1000
EXPORT_ROLE = "export"  # roles after base and tuned: exported artefacts, compared with the tuned run
SPEED_PROMPTS = 32
LOWER_IS_BETTER = {"loss", "perplexity"}


def paired_bootstrap_ci(
    base_scores: list[float] | np.ndarray,
    tuned_scores: list[float] | np.ndarray,
    n_boot: int = N_BOOT,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float, float]:
    """Mean per-example delta (tuned − base) and its percentile bootstrap CI over resampled examples."""
    base = np.asarray(base_scores, dtype=np.float64)
    tuned = np.asarray(tuned_scores, dtype=np.float64)
    if base.shape != tuned.shape or base.ndim != 1 or base.size == 0:
        raise ValueError(
            f"paired bootstrap needs two equally long, non-empty score lists (got {base.shape} and {tuned.shape})"
        )
    diffs = tuned - base
    rng = np.random.default_rng(seed)
    # one (n_boot, n) index matrix: every bootstrap replicate in a single vectorised mean
    samples = diffs[rng.integers(0, diffs.size, size=(n_boot, diffs.size))].mean(axis=1)
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(samples, [alpha, 1 - alpha])
    return float(diffs.mean()), float(lo), float(hi)


def comparison_block(
    metric: str,
    base_scores: list[float],
    tuned_scores: list[float],
    *,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> dict[str, Any]:
    """The payload's ``comparison`` entry for the main metric."""
    delta, lo, hi = paired_bootstrap_ci(base_scores, tuned_scores, n_boot=n_boot, seed=seed)
    return {
        "metric": metric,
        "base": float(np.mean(base_scores)),
        "tuned": float(np.mean(tuned_scores)),
        "delta": delta,
        "ci95": [lo, hi],
        "n": len(base_scores),
        "n_boot": n_boot,
    }


def _delta_cell(metric: str, delta: float) -> Text | str:
    if math.isnan(delta):
        return "—"
    better = delta < 0 if metric in LOWER_IS_BETTER else delta > 0
    colour = "green" if better else ("red" if delta != 0 else "white")
    return styled(f"{delta:+.4f}", colour)


def side_by_side_table(payload: dict[str, Any]) -> Table:
    """Every metric of every model in one table; with two models, a delta column (tuned − base)."""
    models = payload["models"]
    table = Table(title=f"{payload['title']} (n={payload['n']}, main metric: {payload['main_metric']})")
    table.add_column("metric", overflow="fold")
    for entry in models:
        table.add_column(f"{entry['name']} ({entry['role']})", justify="right")
    pair = len(models) == 2
    if pair:
        table.add_column("Δ tuned − base", justify="right")
    names = list(dict.fromkeys(k for entry in models for k in entry["metrics"]))
    for name in names:
        values = [entry["metrics"].get(name) for entry in models]
        row = [styled(name, "bold") if name == payload["main_metric"] else name, *map(fmt, values)]
        if pair:
            ok = all(isinstance(v, (int, float)) for v in values)
            row.append(_delta_cell(name, values[1] - values[0]) if ok else "—")
        table.add_row(*row)
    return table


def print_comparison(payload: dict[str, Any], console: Console) -> None:
    """The table, then one line with the main metric's delta and its CI."""
    console.print(side_by_side_table(payload))
    comp = payload.get("comparison")
    if comp:
        console.print(_ci_line(comp, "", ""))
    for export in payload.get("exports") or []:
        console.print(_ci_line(export, "run → ", f" {export['name']}"))


def _ci_line(comp: dict[str, Any], before: str, after: str) -> Text:
    lo, hi = comp["ci95"]
    verdict = "excludes 0" if lo > 0 or hi < 0 else "includes 0: not distinguishable from no change"
    return styled(
        f"{comp['metric']}: {before}{comp['base']:.4f} →{after} {comp['tuned']:.4f}, Δ {comp['delta']:+.4f} "
        f"(95% paired bootstrap CI [{lo:+.4f}, {hi:+.4f}], n={comp['n']}, {comp['n_boot']} resamples; "
        f"{verdict})",
        "",
    )


@dataclass
class EvalPlan:
    """What to measure besides the task's own metrics; the defaults measure only the task."""

    labels: list[str] | None = None
    template: str | None = None
    max_examples: int | None = None
    max_new_tokens: int = 16
    batch_size: int = 16
    n_boot: int = N_BOOT
    seed: int = 0
    device: str = "auto"
    speed: bool = False
    forgetting: bool = False
    forgetting_data: str | None = None
    forgetting_n: int = DEFAULT_N
    robustness: bool = False
    safety_classifier: str | None = None
    safety_label: str | None = None
    safety_threshold: float = 0.5
    bias_probe: str | None = None
    gate: GateSection | None = None
    predictions: Path | None = None  # per-example JSONL: every model's answer (evaluate/predictions.py)


@dataclass
class Measured:
    """Everything measured on one model while it was loaded (each model is loaded once)."""

    result: EvalResult
    general: tuple[float, int] | None = None  # perplexity on general text, tokens
    robustness: dict[str, float] = field(default_factory=dict)  # perturbation → main metric
    bias: dict[str, float] = field(default_factory=dict)  # group → bias_metric
    bias_metric: str = ""
    speed: dict[str, float] = field(default_factory=dict)


def compare_models(
    base_spec: str,
    tuned_spec: str,
    data: str,
    plan: EvalPlan | None = None,
    *,
    console: Console | None = None,
) -> dict[str, Any]:
    """Base and tuned on identical examples → the eval payload, with a paired bootstrap CI on the main
    metric's delta (see the module docstring). Prints nothing; :func:`print_payload` shows it."""
    return evaluate_models(
        [("base", base_spec), ("tuned", tuned_spec)], data, plan or EvalPlan(), console=console
    )


def evaluate_models(
    models: list[tuple[str, str]], data: str, plan: EvalPlan, *, console: Console | None = None
) -> dict[str, Any]:
    """``models``: (role, spec) pairs, roles ``base``/``tuned`` or a single ``model``. The last one is
    the model being judged: its run decides how the data is read and scored."""
    console = console or make_console(stderr=True)
    subject = dict(models).get("tuned", models[-1][1])  # exports after the run are read as the run reads
    task = load_task(data, subject, labels=plan.labels, max_examples=plan.max_examples)
    general, source = _general_texts(plan)
    probe = load_bias_probe(plan.bias_probe) if plan.bias_probe else None
    names = display_names(models)
    measured: dict[str, Measured] = {}
    for role, spec in models:
        console.rule(f"{role}: {spec}")
        measured[role] = measure_model(
            spec, role, task, plan, general, probe, models, name=names[role], console=console
        )
    payload = build_payload(models, names, task, measured, plan)
    if plan.predictions is not None:  # every model's answer per example, side by side
        rows = prediction_rows(task, [(role, measured[role].result) for role, _ in models])
        write_prediction_rows(plan.predictions, rows)
    if general is not None:
        payload["forgetting"] = _forgetting_block(models, measured, general, source, plan, console)
    skipped = _skipped_probes(task, plan, probe, general)
    notes = [f"{', '.join(skipped)}: not applicable to a {task.kind} run"] if skipped else []
    notes += _gguf_notes(models, plan)
    if notes:
        payload["notes"] = notes
    if plan.safety_classifier and task.kind == "lm":
        payload["probes"]["safety"] = _safety_block(names, measured, plan, payload)
    if plan.gate is not None:
        values, deltas = gate_values(payload)
        payload["gate"] = check_gate(plan.gate, values, deltas, compared=payload["comparison"] is not None)
    return payload


def _skipped_probes(
    task: EvalTask, plan: EvalPlan, probe: BiasProbe | None, general: list[str] | None
) -> list[str]:
    """Requested probes the task's kind cannot answer (no generated text, or no language-model head)."""
    if task.kind == "lm":
        return []
    wanted = {
        "safety": plan.safety_classifier is not None,
        "bias probe": probe is not None,
        "speed": plan.speed,
        "robustness": plan.robustness and task.kind != "classify",
        "forgetting": general is not None and task.kind in ("classify", "reward"),
    }
    return [name for name, asked in wanted.items() if asked]


def measure_model(
    spec: str,
    role: str,
    task: EvalTask,
    plan: EvalPlan,
    general: list[str] | None,
    probe: BiasProbe | None,
    models: list[tuple[str, str]],
    *,
    name: str,
    console: Console,
) -> Measured:
    if in_llama_cpp(spec, plan):
        return Measured(gguf_result(spec, task, plan, name=name, console=console))
    model, tokenizer = load_for_eval(spec, device=plan.device, head_meta=task.meta)
    if task.kind in ("lm", "preference"):
        select_template(tokenizer, plan.template)
    reference = _reference_for(role, model, task, models, plan) if task.kind == "preference" else None
    kwargs = {"max_new_tokens": plan.max_new_tokens, "batch_size": plan.batch_size, "console": console}
    result = evaluate_task(model, tokenizer, task, name=name, reference=reference, **kwargs)
    out = Measured(result)
    if plan.robustness and task.kind in ("lm", "classify"):
        for pert in PERTURBATIONS:
            scored = evaluate_task(
                model, tokenizer, perturbed_task(task, pert, plan.seed), name=f"{name} [{pert}]", **kwargs
            )
            out.robustness[pert] = scored.metrics[task.main_metric]
    if general is not None and task.kind in ("lm", "preference"):  # causal LMs: perplexity is defined
        from tunelab.evaluate.lm import text_perplexity  # noqa: PLC0415

        out.general = text_perplexity(model, tokenizer, general, batch_size=plan.batch_size)
    if task.kind != "lm":
        return out  # the probes below read generated answers
    if probe is not None:
        out.bias_metric, out.bias = _bias_values(model, tokenizer, task, probe, name, kwargs)
    if plan.speed:
        from tunelab.evaluate.efficiency import measure_generation  # noqa: PLC0415

        prompts = [
            render(tokenizer, split_prompt_answer(c)[0], generation_prompt=True)
            for c in task.conversations[:SPEED_PROMPTS]
        ]
        speed = measure_generation(model, tokenizer, prompts, max_new_tokens=plan.max_new_tokens)
        out.speed = {k: float(v) for k, v in speed.items() if k not in ("n_requests", "generated_tokens")}
    return out


def in_llama_cpp(spec: str, plan: EvalPlan) -> bool:
    """A GGUF is measured in llama.cpp, the engine that serves it, when llama.cpp is installed and no
    probe needs a transformers model; otherwise transformers loads it de-quantised, as before."""
    if not is_gguf_spec(spec):
        return False
    needs_transformers = (
        plan.forgetting or plan.forgetting_data or plan.robustness or plan.speed or plan.bias_probe
    )
    return not needs_transformers and importlib.util.find_spec("llama_cpp") is not None


def _gguf_notes(models: list[tuple[str, str]], plan: EvalPlan) -> list[str]:
    return [
        f"{spec}: measured in transformers (de-quantised), not llama.cpp: "
        + (
            "the probes asked for need a transformers model"
            if importlib.util.find_spec("llama_cpp")
            else MISSING_MESSAGE
        )
        for _, spec in models
        if is_gguf_spec(spec) and not in_llama_cpp(spec, plan)
    ]


def gguf_result(spec: str, task: EvalTask, plan: EvalPlan, *, name: str, console: Console) -> EvalResult:
    """A GGUF measured in llama.cpp, the engine that serves it, with its own chat template and stop
    ids: exact match, label accuracy, answer perplexity and stop share on the task's conversations.
    The probes that need a transformers model (robustness, forgetting, speed, bias) skip it."""
    from tunelab.evaluate.engines import LlamaCppEngine, evaluate_engine, gguf_file  # noqa: PLC0415

    if task.kind != "lm":
        raise ValueError(
            f"{spec}: a GGUF is a causal language model; this {task.kind} task needs a run's head"
        )
    engine = LlamaCppEngine(gguf_file(spec), name=name)
    try:
        with progress(console, f"eval {name} (llama.cpp)", task.n) as advance:
            scored = evaluate_engine(
                engine,
                task.conversations,
                labels=task.labels,
                max_new_tokens=plan.max_new_tokens,
                progress=advance,
            )
    finally:
        engine.close()
    metrics = scored.metrics()
    result = EvalResult(
        name,
        scored.n,
        metrics["loss"],
        metrics["perplexity"],
        metrics.get("accuracy_loglik"),
        metrics["exact_match"],
        task.labels,
    )
    result.metrics = metrics
    result.per_example = {k: v for k, v in scored.per_example().items() if k != "stopped"}
    result.generations = [g.text for g in scored.generations]
    result.label_predictions = scored.label_predictions
    add_generation_metrics(result, result.generations, scored.golds)
    return result


def perturbed_task(task: EvalTask, name: str, seed: int) -> EvalTask:
    """The same examples with the prompt side perturbed; answers and gold labels untouched."""
    if task.kind == "classify":
        return replace(task, texts=[perturb_text(t, name, seed, i) for i, t in enumerate(task.texts)])
    return replace(task, conversations=perturb_conversations(task.conversations, name, seed))


def _reference_for(
    role: str, model: Any, task: EvalTask, models: list[tuple[str, str]], plan: EvalPlan
) -> Any:
    """A DPO-family policy's reference: itself for the base (its implicit reward is 0 by definition),
    the adapter switched off for a PEFT policy (as in training), else the base model loaded anew."""
    from tunelab.objectives.dpo import reference_by_disabling  # noqa: PLC0415

    if role == "base":
        return model
    if reference_by_disabling(model):
        return None
    base = dict(models).get("base") or (task.meta or {}).get("base_model")
    return load_for_eval(base, device=plan.device)[0]


def _bias_values(
    model: Any, tokenizer: Any, task: EvalTask, probe: BiasProbe, name: str, kwargs: dict[str, Any]
) -> tuple[str, dict[str, float]]:
    """The metric (label accuracy when the answers form a label set, else exact match) per group."""
    answers = {t["answer"] for t in probe.templates}
    labels = probe.labels or (task.labels if task.labels and answers <= set(task.labels) else None)
    values = {}
    for group in probe.groups:
        probe_task = EvalTask("lm", "bias probe", conversations=probe.conversations(group), labels=labels)
        scored = evaluate_task(model, tokenizer, probe_task, name=f"{name} [{group}]", **kwargs)
        values[group] = scored.metrics[probe_task.main_metric]
    return probe_task.main_metric, values


def _general_texts(plan: EvalPlan) -> tuple[list[str] | None, str]:
    if plan.forgetting_data:
        return load_general_texts(plan.forgetting_data, plan.forgetting_n), plan.forgetting_data
    if plan.forgetting:
        return default_general_texts(plan.forgetting_n, plan.seed), DEFAULT_SOURCE
    return None, ""


def _forgetting_block(
    models: list[tuple[str, str]],
    measured: dict[str, Measured],
    texts: list[str],
    source: str,
    plan: EvalPlan,
    console: Console,
) -> dict[str, Any]:
    """Regression of the judged model against the base; a single run is compared with its own base."""
    from tunelab.evaluate.forgetting import forgetting_report  # noqa: PLC0415
    from tunelab.evaluate.lm import text_perplexity  # noqa: PLC0415

    tuned_role = "tuned" if "tuned" in measured else models[-1][0]
    tuned_spec = dict(models)[tuned_role]
    tuned = measured[tuned_role].general
    if tuned is None:
        return {"skipped": "forgetting is measured on language models only"}
    if "base" in measured:
        base_spec, base = dict(models)["base"], measured["base"].general
    else:
        base_spec = (run_meta(tuned_spec) or {}).get("base_model")
        if base_spec is None:
            raise ValueError(
                f"--forgetting needs a base to compare with: {tuned_spec} is not a run; "
                "use `tunelab eval --compare BASE MODEL --forgetting ...`"
            )
        console.rule(f"base for forgetting: {base_spec}")
        model, tokenizer = load_for_eval(base_spec, device=plan.device)
        base = text_perplexity(model, tokenizer, texts, batch_size=plan.batch_size)
    return forgetting_report(
        base[0],
        tuned[0],
        n_texts=len(texts),
        n_tokens=tuned[1],
        source=source,
        base=base_spec,
        tuned=tuned_spec,
    )


def _safety_block(
    names: dict[str, str], measured: dict[str, Measured], plan: EvalPlan, payload: dict[str, Any]
) -> dict[str, Any]:
    classifier = SafetyClassifier(plan.safety_classifier, label=plan.safety_label, device=plan.device)
    generations = {name: measured[role].result.generations for role, name in names.items()}
    report = safety_report(classifier, generations, plan.safety_threshold)
    for entry in payload["models"]:
        entry["metrics"]["unsafe_share"] = report["models"][entry["name"]]["unsafe_share"]
    return report


def model_metrics(m: Measured, main: str) -> dict[str, float]:
    """The task's metrics plus what the probes measured on this model, flat for tables and the gate."""
    metrics = dict(m.result.metrics)
    if m.general is not None:
        metrics["general_perplexity"] = m.general[0]
    clean = metrics[main]
    for name, value in m.robustness.items():
        metrics[f"robustness_drop_{name}"] = clean - value
    if m.robustness:
        metrics["robustness_max_drop"] = max(clean - v for v in m.robustness.values())
    if m.bias:
        metrics["bias_spread"] = max(m.bias.values()) - min(m.bias.values())
    return metrics | m.speed


def display_names(models: list[tuple[str, str]]) -> dict[str, str]:
    """Role → the name shown and keyed on: the spec, plus the role when both specs are the same."""
    specs = [spec for _, spec in models]
    return {role: spec if specs.count(spec) == 1 else f"{spec} ({role})" for role, spec in models}


def build_payload(
    models: list[tuple[str, str]],
    names: dict[str, str],
    task: EvalTask,
    measured: dict[str, Measured],
    plan: EvalPlan,
) -> dict[str, Any]:
    """The report payload (schema in docs/architecture.md, written by ``runs.report``)."""
    main = task.main_metric
    pair = "base" in measured and "tuned" in measured
    chain = " → ".join(spec for _, spec in models)
    payload: dict[str, Any] = {
        "kind": "eval",
        "title": f"{'before vs after' if pair else 'eval'}: {chain} on {Path(task.data).name}",
        "data": task.data,
        "n": task.n,
        "main_metric": main,
        "models": [
            {"name": names[role], "role": role, "metrics": model_metrics(measured[role], main)}
            for role, _ in models
        ],
        "comparison": None,
        "confusion_matrices": {
            k: v for m in measured.values() for k, v in m.result.confusion_matrices.items()
        },
        "probes": {},
    }
    if pair:
        base, tuned = measured["base"].result, measured["tuned"].result
        payload["comparison"] = comparison_block(
            main, base.per_example[main], tuned.per_example[main], n_boot=plan.n_boot, seed=plan.seed
        )
        payload["exports"] = [
            {"name": names[role]}
            | comparison_block(
                main,
                tuned.per_example[main],
                measured[role].result.per_example[main],
                n_boot=plan.n_boot,
                seed=plan.seed,
            )
            for role, _ in models
            if role.startswith(EXPORT_ROLE)
        ]
    if plan.robustness and task.kind in ("lm", "classify"):
        clean = {names[role]: measured[role].result.metrics[main] for role, _ in models}
        perturbed = {
            pert: {names[role]: measured[role].robustness[pert] for role, _ in models}
            for pert in PERTURBATIONS
        }
        payload["robustness"] = robustness_report(clean, perturbed, main, plan.seed)
    if any(m.bias for m in measured.values()):
        metric = next(m.bias_metric for m in measured.values() if m.bias_metric)
        payload["probes"]["bias"] = bias_report(
            {names[role]: measured[role].bias for role, _ in models}, metric
        )
    return payload


def print_payload(payload: dict[str, Any], console: Console) -> None:
    """Side-by-side metrics with the CI line, then one small table per probe that ran, then the gate."""
    print_comparison(payload, console)
    forgetting = payload.get("forgetting")
    if forgetting and "regression" in forgetting:
        console.print(
            f"forgetting on {forgetting['source']} ({forgetting['n_texts']} texts, {forgetting['n_tokens']} tokens): "
            f"perplexity {forgetting['base_perplexity']:.3f} → {forgetting['tuned_perplexity']:.3f}, "
            f"regression {forgetting['regression_pct']:+.1f}%"
        )
    if payload.get("robustness"):
        console.print(_robustness_table(payload["robustness"]))
    probes = payload.get("probes") or {}
    if "bias" in probes:
        console.print(_bias_table(probes["bias"]))
    if "safety" in probes:
        safety = probes["safety"]
        shares = ", ".join(f"{name}: {100 * m['unsafe_share']:.1f}%" for name, m in safety["models"].items())
        console.print(
            f"safety ({safety['classifier']}, label {safety['label']!r} > {safety['threshold']}): {shares}"
        )
    for note in payload.get("notes", []):
        console.print(labelled("note", note))
    gate = payload.get("gate")
    if gate:
        if gate["passed"]:
            console.print(styled("gate passed", "green"))
        else:
            console.print(styled("gate failed:", "red"))
            for failure in gate["failures"]:
                console.print(f"  - {failure}")


def _robustness_table(report: dict[str, Any]) -> Table:
    models = list(report["clean"])
    table = Table(title=f"robustness: {report['metric']} under prompt perturbations (seed {report['seed']})")
    table.add_column("perturbation")
    for name in models:
        table.add_column(name, justify="right")
        table.add_column("drop", justify="right")
    table.add_row("clean", *[x for m in models for x in (fmt(report["clean"][m]), "")])
    for pert, by_model in report["perturbations"].items():
        cells = [x for m in models for x in (fmt(by_model[m]["value"]), f"{by_model[m]['drop']:+.4f}")]
        table.add_row(pert, *cells)
    return table


def _bias_table(report: dict[str, Any]) -> Table:
    models = report["models"]
    groups = list(next(iter(models.values()))["per_group"])
    table = Table(title=f"bias probe: {report['metric']} per group")
    table.add_column("model")
    for group in groups:
        table.add_column(group, justify="right")
    table.add_column("spread (max − min)", justify="right")
    for name, entry in models.items():
        table.add_row(name, *[fmt(entry["per_group"][g]) for g in groups], fmt(entry["spread"]))
    return table


def write_outputs(payload: dict[str, Any], out_dir: Path) -> list[Path]:
    """report.json and report.html (see ``runs.report``)."""
    from tunelab.runs.report import write_eval_report  # noqa: PLC0415

    return list(write_eval_report(out_dir, payload))


LEGACY_JSON_KEYS = ("loss", "perplexity", "accuracy_loglik", "exact_match")


def json_view(payload: dict[str, Any]) -> dict[str, Any]:
    """What ``tunelab eval --json`` prints: the payload; for one model, also the flat keys the command
    printed before the payload existed (``model``, ``loss``, ``perplexity``, ...), so scripts keep working."""
    if len(payload["models"]) != 1:
        return payload
    entry = payload["models"][0]
    legacy = {"model": entry["name"]} | {k: entry["metrics"].get(k) for k in LEGACY_JSON_KEYS}
    return legacy | payload
