"""Run and evaluation reports: ``report.json`` holds every number, ``report.html`` shows them.

The JSON is the record and the HTML a view of it: every number on the page is a value of the JSON
printed through :func:`fmt`, so the two cannot disagree (a test checks this). The page is one
self-contained file (inline CSS, plots as inline base64 PNGs, no scripts, no external URLs), so it
opens offline, as a mail attachment, or years later.

The HTML is built with ``html.escape`` and f-strings rather than a template engine: the pages are
small, and it keeps reports free of a dependency tunelab does not otherwise need.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from rich.console import Console

from tunelab.console import labelled, make_console
from tunelab.runs.atomic import atomic_write_json, atomic_write_text
from tunelab.runs.index import INDEX_FILE, refresh_index
from tunelab.runs.plots import Line, grouped_bars_png, interval_png, lines_png
from tunelab.runs.rundir import RunDir, live_status
from tunelab.runs.summary import duration_seconds, flatten, fmt, is_number, key_metric, split_metric_rows

REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
EVAL_DIR = "eval"  # a run's latest `tunelab eval` payload: <run>/eval/report.{json,html}
OPTIONAL_EVAL_SECTIONS = ("forgetting", "robustness", "probes")
_RUN_SUMMARY_KEYS = (
    "status",
    "model",
    "method",
    "objective",
    "steps",
    "seed",
    "started_at",
    "ended_at",
    "duration_s",
    "stopped_early",
    "git_sha",
    "error",
)
_MAX_EXTRA_CHARTS = 8


def _series(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Column view of metric rows: every numeric key → one list aligned with ``step`` (None where absent)."""
    keys = sorted({k for r in rows for k, v in r.items() if is_number(v)} - {"step"})
    return {"step": [r.get("step") for r in rows], **{k: [r.get(k) for r in rows] for k in keys}}


def _recipe_field(recipe: dict[str, Any], section: str, field: str) -> Any:
    value = recipe.get(section)
    return value.get(field) if isinstance(value, dict) else None


def build_run_report(run_dir: str | Path) -> dict[str, Any]:
    """Everything the run report shows, from the run directory alone (manifest, recipe, metrics)."""
    run = RunDir(run_dir)
    if not run.manifest_path.is_file():
        raise FileNotFoundError(
            f"{run.manifest_path} not found: {run.path} is not a tunelab run directory (it has no "
            "manifest.json). Point at a directory written by `tunelab train`."
        )
    manifest = run.read_manifest()
    recipe = run.read_recipe() if run.recipe_path.is_file() else {}
    train_rows, eval_rows = split_metric_rows(run.read_metrics())
    final_eval = manifest.get("final_eval") or {}
    final_train = {k: v for k, v in (train_rows[-1] if train_rows else {}).items() if k != "step"}
    name, value = key_metric(final_eval, final_train)
    status, died = live_status(run.path, manifest.get("status"))
    return {
        "kind": "run",
        "title": manifest.get("run_name") or run.name,
        "run": {
            "name": manifest.get("run_name") or run.name,
            "path": str(run.path.resolve()),
            "status": status,
            "model": _recipe_field(recipe, "model", "name_or_path"),
            "method": _recipe_field(recipe, "method", "name"),
            "objective": _recipe_field(recipe, "objective", "name"),
            "steps": manifest.get("steps"),
            "seed": manifest.get("seed"),
            "started_at": manifest.get("started_at"),
            "ended_at": manifest.get("ended_at"),
            "duration_s": duration_seconds(manifest.get("started_at"), manifest.get("ended_at")),
            "stopped_early": manifest.get("stopped_early"),
            "git_sha": (manifest.get("git") or {}).get("sha"),
            "error": manifest.get("error") or died or None,
        },
        "key_metric": {"name": name, "value": value},
        "final_eval": final_eval,
        "final_train": final_train,
        "recipe": recipe,
        "series": {"train": _series(train_rows), "eval": _series(eval_rows)},
    }


def write_run_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.html`` into the run directory; returns both paths."""
    report = build_run_report(run_dir)
    return _write_pair(Path(run_dir), report)


def write_eval_report(out_dir: str | Path, payload: dict[str, Any]) -> tuple[Path, Path]:
    """Write an evaluation's ``report.json`` (the payload as given) and ``report.html`` into ``out_dir``."""
    _check_eval_payload(payload)
    return _write_pair(Path(out_dir), payload)


def _write_pair(out_dir: Path, report: dict[str, Any]) -> tuple[Path, Path]:
    page = render_html(report)  # render first: a rendering error leaves no half-written pair
    json_path = atomic_write_json(out_dir / REPORT_JSON, report)
    html_path = atomic_write_text(out_dir / REPORT_HTML, page)
    return json_path, html_path


def _check_eval_payload(payload: dict[str, Any]) -> None:
    if payload.get("kind") != "eval":
        raise ValueError(f"eval report payload: 'kind' must be 'eval', got {payload.get('kind')!r}.")
    models = payload.get("models")
    if not isinstance(models, list) or not all(isinstance(m, dict) and "name" in m for m in models):
        raise ValueError(
            "eval report payload: 'models' must be a list of {'name', 'role', 'metrics'} objects."
        )


def publish_run_report(run_path: str | Path, console: Console | None = None) -> Path | None:
    """End-of-run hook: write the report and refresh the runs index if the runs root has one.

    Never raises: the run is complete whatever happens here, so a failure is a warning naming the
    problem, and the run's status and files stay as they are.
    """

    console = console or make_console(stderr=True)
    run_path = Path(run_path)
    try:
        html_path = write_run_report(run_path)[1]
    except Exception as err:  # noqa: BLE001  (a report must never fail a finished run)
        console.print(
            labelled(
                "warning",
                f"could not write the report of {run_path}: {type(err).__name__}: {err}. "
                "The run itself completed; retry with `tunelab runs show` after fixing the cause.",
            )
        )
        return None
    if (run_path.parent / INDEX_FILE).exists():
        try:
            refresh_index(run_path.parent)
        except Exception as err:  # noqa: BLE001
            console.print(
                labelled("warning", f"could not refresh the runs index of {run_path.parent}: {err}")
            )
    return html_path


# ---- HTML ---------------------------------------------------------------------------------------

_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d2330;
       margin: 0 auto; max-width: 1100px; padding: 24px; background: #fff; }
h1 { font-size: 24px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px;
     border-bottom: 1px solid #dde2ea; padding-bottom: 4px; }
.sub { color: #5b6577; margin-bottom: 16px; }
table { border-collapse: collapse; margin: 6px 0; }
th, td { padding: 4px 10px; border-bottom: 1px solid #eef1f5; text-align: left; vertical-align: top; }
th { background: #f5f7fa; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.badge { display: inline-block; padding: 2px 10px; border-radius: 10px; font-weight: 600; color: #fff; }
.ok { background: #2e8b57; } .bad { background: #c0392b; } .other { background: #7f8c8d; }
img { max-width: 100%; border: 1px solid #eef1f5; }
.grid { display: grid; grid-template-columns: 1fr 1fr; gap: 12px; }
details summary { cursor: pointer; color: #34507a; }
.heat td { text-align: center; min-width: 48px; }
"""


def render_html(report: dict[str, Any]) -> str:
    """One self-contained HTML page for a run report (``kind: run``) or an eval report (``kind: eval``)."""
    kind = report.get("kind")
    if kind == "run":
        body = _run_body(report)
    elif kind == "eval":
        body = _eval_body(report)
    else:
        raise ValueError(f"report: unknown 'kind' {kind!r}; expected 'run' or 'eval'.")
    title = _esc(report.get("title") or kind)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{title}</title><style>{_CSS}</style></head>\n<body>\n{body}\n</body></html>\n"
    )


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _cell(value: Any) -> str:
    """A value as table-cell HTML; numbers only ever through :func:`fmt`."""
    if isinstance(value, list):
        return ", ".join(_cell(v) for v in value)
    if isinstance(value, dict):
        return "; ".join(f"{_esc(k)}: {_cell(v)}" for k, v in flatten(value).items())
    return _esc(fmt(value))


def _td(value: Any) -> str:
    css = ' class="num"' if is_number(value) else ""
    return f"<td{css}>{_cell(value)}</td>"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(_td(v) for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _kv_table(mapping: dict[str, Any], header: tuple[str, str] = ("field", "value")) -> str:
    if not mapping:
        return '<p class="sub">none</p>'
    return _table(list(header), [[k, v] for k, v in flatten(mapping).items()])


def _section(title: str, content: str) -> str:
    return f"<section><h2>{_esc(title)}</h2>\n{content}\n</section>"


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{_esc(alt)}" src="data:image/png;base64,{data}">'


def _badge(status: Any) -> str:
    css = {"completed": "ok", "passed": "ok", "failed": "bad", "interrupted": "bad"}.get(str(status), "other")
    return f'<span class="badge {css}">{_esc(fmt(status))}</span>'


def _run_body(report: dict[str, Any]) -> str:
    run = report["run"]
    summary = {k: run.get(k) for k in _RUN_SUMMARY_KEYS if run.get(k) is not None}
    key = report.get("key_metric") or {}
    headline = f"{_esc(key['name'])} = {_esc(fmt(key['value']))}" if key.get("name") else "no metrics logged"
    parts = [
        f"<h1>{_esc(report['title'])} {_badge(run.get('status'))}</h1>",
        f'<div class="sub">{_esc(run.get("path"))} · {headline}</div>',
        _section("Summary", _kv_table(summary)),
        _section("Final evaluation", _kv_table(report.get("final_eval") or {}, ("metric", "value"))),
        _section("Last training step", _kv_table(report.get("final_train") or {}, ("metric", "value"))),
        *_run_charts(report["series"]),
        _section(
            "Recipe",
            f"<details><summary>fully resolved recipe</summary>{_kv_table(report.get('recipe') or {})}</details>",
        ),
    ]
    return "\n".join(parts)


def _run_charts(series: dict[str, dict[str, list[Any]]]) -> list[str]:
    train, evals = series.get("train") or {}, series.get("eval") or {}
    sections = []
    loss_lines = [Line("train loss", train.get("step", []), train["loss"])] if "loss" in train else []
    if "eval_loss" in evals:
        loss_lines.append(Line("eval loss", evals["step"], evals["eval_loss"], "o-"))
    if loss_lines:
        chart = lines_png(loss_lines, xlabel="optimizer step", ylabel="loss")
        sections.append(_section("Loss: train vs eval", _img(chart, "train and eval loss per step")))
    if "lr" in train:
        chart = lines_png(
            [Line("learning rate", train["step"], train["lr"])], xlabel="optimizer step", ylabel="lr"
        )
        sections.append(_section("Learning rate", _img(chart, "learning rate per step")))
    extra = [(k, train) for k in train if k not in {"step", "loss", "lr"}]
    extra += [(k, evals) for k in evals if k not in {"step", "eval_loss"}]
    charts = [
        _img(
            lines_png(
                [Line(k, cols["step"], cols[k], "-" if cols is train else "o-")], xlabel="step", ylabel=k
            ),
            k,
        )
        for k, cols in extra[:_MAX_EXTRA_CHARTS]
    ]
    if charts:
        sections.append(_section("Other series", f'<div class="grid">{"".join(charts)}</div>'))
    return sections


def _eval_body(report: dict[str, Any]) -> str:
    models = report.get("models") or []
    subtitle = " · ".join(
        f"{label} {_esc(fmt(report[key]))}"
        for key, label in (("data", "data"), ("n", "examples"), ("main_metric", "main metric"))
        if report.get(key) is not None
    )
    parts = [f"<h1>{_esc(report.get('title') or 'evaluation')}</h1>", f'<div class="sub">{subtitle}</div>']
    if report.get("comparison"):  # the headline first: the main metric's change and its CI
        parts.append(_section("Base vs tuned", _comparison(report["comparison"])))
    if report.get("gate"):
        parts.append(_section("Gate", _gate(report["gate"])))
    parts.append(_section("Metrics per model", _models_table(models)))
    for name, matrix in (report.get("confusion_matrices") or {}).items():
        parts.append(_section(f"Confusion matrix: {name}", _heat_table(matrix)))
    for key in OPTIONAL_EVAL_SECTIONS:
        if report.get(key):
            parts.append(_section(key.capitalize(), _kv_table(report[key])))
    parts += _bars_section(models)
    return "\n".join(parts)


def _model_label(model: dict[str, Any]) -> str:
    role = model.get("role")
    return f"{model['name']} ({role})" if role else str(model["name"])


def _models_table(models: list[dict[str, Any]]) -> str:
    metrics = list(dict.fromkeys(k for m in models for k in (m.get("metrics") or {})))
    rows = [[metric, *[(m.get("metrics") or {}).get(metric) for m in models]] for metric in metrics]
    return _table(["metric", *[_model_label(m) for m in models]], rows)


def _bars_section(models: list[dict[str, Any]]) -> list[str]:
    """Before/after bars for the metrics every model has (only meaningful with two or more models)."""
    if len(models) < 2:
        return []
    per_model = {_model_label(m): m.get("metrics") or {} for m in models}
    shared = [
        k for k in next(iter(per_model.values())) if all(is_number(v.get(k)) for v in per_model.values())
    ]
    if not shared:
        return []
    chart = grouped_bars_png(shared, list(per_model), per_model)
    return [_section("Before / after", _img(chart, "metric per model"))]


def _comparison(comparison: dict[str, Any]) -> str:
    low, high = (comparison.get("ci95") or [None, None])[:2]
    table = _kv_table(comparison)
    if not all(is_number(v) for v in (comparison.get("delta"), low, high)):
        return table
    verdict = (
        "excludes zero: the difference is unlikely to be noise"
        if low > 0 or high < 0
        else ("includes zero: this difference may be noise")
    )
    chart = interval_png(f"tuned − base ({comparison.get('metric')})", comparison["delta"], low, high)
    return (
        f"{table}<p>The bootstrap confidence interval {verdict}.</p>{_img(chart, 'difference with its CI')}"
    )


def _heat_table(confusion: dict[str, Any]) -> str:
    """A confusion matrix as a table whose cell shading follows the count (rows: gold, columns: predicted)."""
    labels, matrix = confusion.get("labels") or [], confusion.get("matrix") or []
    columns = confusion.get("columns") or labels  # predicted side may add an "<other>" column
    peak = max((v for row in matrix for v in row), default=0) or 1
    head = "<th>gold \\ predicted</th>" + "".join(f"<th>{_esc(label)}</th>" for label in columns)
    rows = []
    for label, row in zip(labels, matrix):
        cells = "".join(
            f'<td style="background: rgba(52, 101, 164, {v / peak:.3f}); color: {"#fff" if v / peak > 0.5 else "#1d2330"}">'
            f"{_esc(fmt(v))}</td>"
            for v in row
        )
        rows.append(f"<tr><th>{_esc(label)}</th>{cells}</tr>")
    return f'<table class="heat"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _gate(gate: dict[str, Any]) -> str:
    passed = gate.get("passed")
    badge = _badge("passed" if passed else "failed")
    failures = "".join(f"<li>{_esc(f)}</li>" for f in gate.get("failures") or [])
    thresholds = _kv_table(gate.get("thresholds") or {}, ("threshold", "value"))
    rest = {k: v for k, v in gate.items() if k not in {"passed", "failures", "thresholds"}}
    extra = _kv_table(rest) if rest else ""
    return f"<p>{badge}</p>" + (f"<ul>{failures}</ul>" if failures else "") + thresholds + extra
