"""Real-model chain (slow): SFT → reward model → PPO on SmolLM2-135M-Instruct, a short CPU budget,
with the PPO run's logged reward rising. Skipped when the embedded model has not been fetched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tunelab.objectives.grpo  # noqa: F401  (registers before the recipe schema is built)
import tunelab.objectives.ppo  # noqa: F401
from tunelab.assets import AssetMissingError, asset_path

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "recipes" / "data"


@pytest.fixture(scope="module", autouse=True)
def _smollm2() -> None:
    try:
        asset_path("smollm2-135m-instruct")
    except AssetMissingError:
        pytest.skip("SmolLM2 not fetched; run `tunelab assets fetch`")


def _train(tmp_path: Path, name: str, **sections: object) -> Path:
    from tunelab.recipe import parse_recipe
    from tunelab.train.run import train

    raw = {"seed": 0, "output": {"dir": str(tmp_path), "name": name}, **sections}
    return train(parse_recipe(raw)).run_dir


def test_sft_reward_ppo_chain_raises_reward(tmp_path: Path) -> None:
    smollm2 = "asset:smollm2-135m-instruct"
    sft = _train(
        tmp_path,
        "sft",
        model={"name_or_path": smollm2},
        data={"train": str(DATA / "tiny_train.jsonl"), "max_length": 96},
        method={"name": "full"},
        training={"max_steps": 4, "batch_size": 8, "learning_rate": 1e-5, "warmup_steps": 0},
    )
    reward = _train(
        tmp_path,
        "reward",
        model={"name_or_path": smollm2},
        data={"train": str(DATA / "tiny_pref_train.jsonl"), "max_length": 96},
        method={"name": "full"},
        objective={"name": "reward"},
        training={"max_steps": 10, "batch_size": 8, "learning_rate": 5e-5, "warmup_steps": 0},
    )
    ppo = _train(
        tmp_path,
        "ppo",
        model={"name_or_path": str(sft / "final")},
        data={"train": str(DATA / "tiny_train.jsonl"), "max_length": 128},
        method={"name": "lora", "r": 16, "alpha": 32},
        objective={
            "name": "ppo",
            "reward": str(reward),
            "max_new_tokens": 24,
            "ppo_epochs": 2,
            "lam": 1.0,
            "kl_coef": 0.02,
        },
        training={
            "max_steps": 10,
            "batch_size": 8,
            "learning_rate": 5e-4,
            "lr_scheduler": "constant",
            "warmup_steps": 0,
        },
    )
    rows = [json.loads(line) for line in (ppo / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rewards = [r["reward_mean"] for r in rows]
    print("ppo reward per step:", [round(r, 3) for r in rewards], "kl:", [round(r["kl"], 2) for r in rows])
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3
    assert max(r["kl"] for r in rows) < 24 * 2.0


def test_sft_then_dpo_chain_prefers_chosen_answers(tmp_path: Path) -> None:
    """SFT → DPO (LoRA, reference = adapters disabled) on SmolLM2: the DPO run's logged pairwise
    reward accuracy and margin rise and its held-out DPO loss ends below the log 2 it starts at."""
    smollm2 = "asset:smollm2-135m-instruct"
    sft = _train(
        tmp_path,
        "sft-for-dpo",
        model={"name_or_path": smollm2},
        data={"train": str(DATA / "tiny_train.jsonl"), "max_length": 96},
        method={"name": "full"},
        training={"max_steps": 3, "batch_size": 8, "learning_rate": 1e-5, "warmup_steps": 0},
    )
    dpo = _train(
        tmp_path,
        "dpo",
        model={"name_or_path": str(sft / "final")},
        data={
            "train": str(DATA / "tiny_pref_train.jsonl"),
            "eval": str(DATA / "tiny_pref_eval.jsonl"),
            "max_length": 128,
        },
        method={"name": "lora", "r": 8},
        objective={"name": "dpo", "beta": 0.1},
        training={"max_steps": 8, "batch_size": 4, "learning_rate": 5e-4, "warmup_steps": 0, "eval_every": 8},
    )
    rows = [json.loads(line) for line in (dpo / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "rewards/margins" in r]
    assert len(steps) == 8
    first, last = steps[0], steps[-2:]
    assert sum(r["rewards/margins"] for r in last) / 2 > first["rewards/margins"]
    final = [r for r in rows if "eval_loss" in r][-1]
    assert final["eval_loss"] < 0.6931
