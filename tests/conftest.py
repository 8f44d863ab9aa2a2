"""Shared fixtures: tiny models and data written to tmp dirs; nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from repo_state import REPO, checkout_state, describe_change

_CHECKOUT = pytest.StashKey[dict[str, str] | None]()


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_CHECKOUT] = checkout_state(REPO)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Tests write only under tmp dirs: fail the session if the checkout changed while it ran
    (e.g. a tracker's default store such as ./mlflow.db landing in the working directory)."""
    before = session.config.stash.get(_CHECKOUT, None)
    after = checkout_state(REPO) if before is not None else None
    if before is None or after is None or before == after:
        return
    message = f"the test session changed the checkout (git status): {describe_change(before, after)}"
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"ERROR: {message}", red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def qa_rows() -> list[dict]:
    """A handful of instruction rows a tiny model can memorise."""
    pairs = [
        ("Say hi", "hi there"),
        ("Count to three", "one two three"),
        ("Name a colour", "blue"),
        ("Name an animal", "a cat"),
        ("What is two plus two", "four"),
        ("Say bye", "goodbye"),
    ]
    return [{"instruction": q, "output": a} for q, a in pairs]


@pytest.fixture
def tiny_recipe(tmp_path: Path, qa_rows: list[dict]):
    """A recipe factory on the tiny model with data in tmp_path; keyword overrides as dotted paths."""
    from tunelab.recipe import parse_recipe

    train = write_jsonl(tmp_path / "train.jsonl", qa_rows)
    evaluation = write_jsonl(tmp_path / "eval.jsonl", qa_rows[:3])

    def make(method: str = "lora", **overrides: object):
        raw = {
            "seed": 0,
            "model": {"name_or_path": "tiny:llama"},
            "data": {"train": str(train), "eval": str(evaluation), "max_length": 64},
            "method": {"name": method},
            "training": {"max_steps": 6, "batch_size": 3, "learning_rate": 1e-2, "warmup_steps": 0},
            "output": {"dir": str(tmp_path / "runs"), "name": f"t-{method}"},
        }
        return parse_recipe(raw, overrides=[f"{k.replace('__', '.')}={v}" for k, v in overrides.items()])

    return make


@pytest.fixture(scope="module")
def review_files(tmp_path_factory: pytest.TempPathFactory):
    """The demo's real review data (small split) for slow tests on SmolLM2; skips if not fetched."""
    from tunelab.assets import AssetMissingError, asset_path
    from tunelab.demo import build_demo_data

    try:
        asset_path("smollm2-135m-instruct")
        asset_path("rotten-tomatoes")
    except AssetMissingError:
        pytest.skip("SmolLM2 / reviews not fetched; run `tunelab assets fetch`")
    return build_demo_data(tmp_path_factory.mktemp("reviews"), n_eval=32, n_train=48, seed=1)


@pytest.fixture(scope="module")
def bot_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two LoRA runs on the same tiny base that learned different answers (the serve tests' adapters)."""
    from tunelab.recipe import parse_recipe
    from tunelab.train.run import train

    root = tmp_path_factory.mktemp("bots")
    made = {}
    for name, answer in (("yes-bot", "yes yes yes"), ("no-bot", "no no no")):
        data = write_jsonl(
            root / f"{name}.jsonl", [{"instruction": f"question {i}", "output": answer} for i in range(6)]
        )
        raw = {
            "seed": 0,
            "model": {"name_or_path": "tiny:llama"},
            "data": {"train": str(data), "max_length": 64},
            "method": {"name": "lora", "r": 4, "alpha": 8},
            "training": {"max_steps": 4, "batch_size": 3, "learning_rate": 5e-2, "warmup_steps": 0},
            "output": {"dir": str(root / "runs"), "name": name},
        }
        made[name] = train(parse_recipe(raw)).run_dir
    return made
