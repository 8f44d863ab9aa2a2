"""The Recipe page: the schema-generated form, checked as the user types, its YAML and memory plan.

Checking calls :func:`tunelab.recipe.parse_recipe` and :func:`tunelab.recipe.missing_files` (what
``recipe check`` runs, so the messages are the same, each ``bad SOURCE: problem``); the YAML is
:func:`tunelab.recipe.dump_yaml` (``recipe show``) and the plan :func:`tunelab.plan.memory.plan_report`
(``tunelab plan``). Saving writes the YAML into the runs directory, never over an existing file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool

from tunelab.recipe import Recipe, RecipeError, dump_yaml, load_recipe, missing_files, parse_recipe
from tunelab.studio.forms import form_fields
from tunelab.studio.render import page
from tunelab.studio.roots import OutsideRoots, Roots
from tunelab.studio.schema import DEFAULT_METHOD, DEFAULT_OBJECTIVE, form_values, raw_recipe, recipe_form

SOURCE = "studio form"  # names the recipe in its problems, as recipe check names the file


def check_recipe(values: dict[str, str]) -> dict[str, Any]:
    """The form's recipe checked as ``recipe check`` checks a file: problems, or the resolved YAML."""
    sections = recipe_form(
        values.get("method.name", DEFAULT_METHOD), values.get("objective.name", DEFAULT_OBJECTIVE)
    )
    try:
        recipe = parse_recipe(raw_recipe(sections, values), source=SOURCE)
    except RecipeError as e:
        return {"problems": e.problems, "source": e.source, "recipe": None, "yaml": ""}
    problems = missing_files(recipe)
    return {"problems": problems, "source": SOURCE, "recipe": recipe, "yaml": dump_yaml(recipe)}


def memory_plan(recipe: Any, gpu: str | None) -> dict[str, Any]:
    """``tunelab plan``'s numbers for the recipe: components, peak, whether it fits, the largest batch."""
    from tunelab.plan.memory import plan_report

    plan, largest = plan_report(recipe, gpu or None, None)
    return {"plan": plan.as_dict(), "largest": largest}


def recommendations(values: dict[str, str]) -> dict[str, Any]:
    """``tunelab recommend --model M --method X``: each suggested field, value and rule, and whether
    the form has that field (the rest apply through the YAML, not this form)."""
    from tunelab.plan.recommend import count_params, human_params, recommend

    model = values.get("model.name_or_path", "").strip()
    if not model:
        raise ValueError("model.name_or_path: give a model first; the suggestions depend on its size")
    method = values.get("method.name", DEFAULT_METHOD)
    params = count_params(model)
    sections = recipe_form(method, values.get("objective.name", DEFAULT_OBJECTIVE))
    shown = {f.name for top in sections for s in top.walk() for f in s.fields}
    recs = [
        {"field": r.field, "value": _text(r.value), "rule": r.rule, "in_form": r.field in shown}
        for r in recommend(params, method)
    ]
    apply = {r["field"]: r["value"] for r in recs if r["in_form"]}
    return {"model": model, "method": method, "params": human_params(params), "recs": recs, "apply": apply}


def _text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def save_recipe(runs_dir: Path, name: str, text: str) -> Path:
    """Write ``text`` as ``runs_dir/recipes/NAME.yaml``; an existing file gets a numbered sibling."""
    folder = runs_dir / "recipes"
    folder.mkdir(parents=True, exist_ok=True)
    stem = "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip(".") or "recipe"
    path, k = folder / f"{stem}.yaml", 1
    while path.exists():
        k += 1
        path = folder / f"{stem}-{k}.yaml"
    path.write_text(text, encoding="utf-8")
    return path


RECIPE_SUFFIXES = (".yaml", ".yml")


def load_checked(roots: Roots, path: str, *, check_files: bool = True) -> Recipe:
    """The recipe at ``path`` as ``recipe check`` loads it, if the studio may read it: only a ``.yaml``
    file under its roots. A file that is no recipe at all (no recipe section at its top) is refused
    without a word of its content: its lines would otherwise come back as "unknown key"s."""
    try:
        roots.check(path)
    except OutsideRoots as e:
        raise RecipeError([str(e)], source=path) from None
    if Path(path).suffix.lower() not in RECIPE_SUFFIXES:
        raise RecipeError(["a recipe is a .yaml file"], source=path)
    try:
        return load_recipe(Path(path), check_files=check_files)
    except RecipeError:
        if not _has_recipe_sections(Path(path)):
            sections = ", ".join(Recipe.model_fields)
            raise RecipeError([f"not a recipe (none of {sections} at its top)"], source=path) from None
        raise


def _has_recipe_sections(path: Path) -> bool:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return False
    return isinstance(raw, dict) and any(key in Recipe.model_fields for key in raw)


def _form_page(values: dict[str, str], template: str = "recipe.html"):
    from tunelab.plan.gpus import GPUS

    sections = recipe_form(
        values.get("method.name", DEFAULT_METHOD), values.get("objective.name", DEFAULT_OBJECTIVE)
    )
    return page(
        template, active="/recipe", sections=sections, values=values, gpus=list(GPUS), **check_recipe(values)
    )


def _plan_view(values: dict[str, str]):
    checked = check_recipe(values)
    if checked["recipe"] is None:
        return page("_recipe_check.html", **checked)
    try:
        return page("_plan.html", **memory_plan(checked["recipe"], values.get("gpu")))
    except (OSError, ValueError) as e:
        return page("_error.html", message=" ".join(str(e).split()))


def _recommend_view(values: dict[str, str]):
    try:
        return page("_recommend.html", **recommendations(values))
    except (OSError, ValueError) as e:
        return page("_error.html", message=" ".join(str(e).split()))


def register(app: FastAPI) -> None:
    """The Recipe page's routes."""

    @app.get("/recipe")
    def recipe(request: Request):
        values = dict(request.query_params)
        if values.get("load"):  # a recipe file into the form: every setting, nested ones included
            try:
                loaded = load_checked(request.app.state.roots, values["load"], check_files=False).resolved()
            except (RecipeError, OSError, ValueError) as e:
                message = f"bad {e.source}: {'; '.join(e.problems)}" if isinstance(e, RecipeError) else str(e)
                return page("error.html", status_code=400, message=" ".join(message.split()))
            values = form_values(loaded) | {"load": values["load"]}
        return _form_page(values)

    @app.post("/recipe/form")  # method or objective changed: their fields change
    async def recipe_form_fragment(request: Request):
        return await run_in_threadpool(_form_page, await form_fields(request), "_recipe_form.html")

    @app.post("/recipe/check")
    async def recipe_check(request: Request):
        checked = await run_in_threadpool(check_recipe, await form_fields(request))
        return page("_recipe_check.html", **checked)

    @app.post("/recipe/plan")
    async def recipe_plan(request: Request):
        return await run_in_threadpool(_plan_view, await form_fields(request))

    @app.post("/recipe/recommend")
    async def recipe_recommend(request: Request):
        return await run_in_threadpool(_recommend_view, await form_fields(request))

    @app.post("/recipe/save")
    async def recipe_save(request: Request):
        checked = await run_in_threadpool(check_recipe, await form_fields(request))
        if checked["recipe"] is not None:  # a saved recipe is one the studio may train: its files are ours
            checked["problems"] += request.app.state.roots.recipe_problems(checked["recipe"])
        if checked["problems"]:
            return page("_recipe_check.html", **checked)
        name = checked["recipe"].output.name or checked["recipe"].model.name_or_path.split("/")[-1]
        path = save_recipe(request.app.state.runs_dir, name.replace(":", "-"), checked["yaml"])
        return page("_saved.html", path=str(path))
