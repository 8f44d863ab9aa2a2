"""Online RL (ppo, grpo): loss formulas by hand and against TRL, reward sources, and short runs on the
tiny model whose reward rises while the KL to the reference stays bounded."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

import tunelab.objectives.grpo  # noqa: F401  (registers before the recipe schema is built)
import tunelab.objectives.ppo  # noqa: F401
from trl_reference import trl_grpo_loss
from tunelab.objectives.rl_losses import (
    adaptive_kl,
    entropy_from_logits,
    gae,
    group_advantages,
    grpo_loss,
    kl_estimate,
    masked_mean,
    ppo_policy_loss,
    ppo_value_loss,
    token_logprobs,
    whiten,
)
from tunelab.recipe import parse_recipe
from tunelab.train.rewards import load_reward
from tunelab.train.rl import completion_mask
from tunelab.train.run import resume, train

REPO = Path(__file__).resolve().parents[1]
REWARDS = REPO / "recipes" / "rewards.py"


# -- formulas by hand ----------------------------------------------------------------------------


def test_kl_estimators_by_hand() -> None:
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert kl_estimate(logp, ref, "k1").item() == pytest.approx(math.log(2))
    # k3 = q/p - log(q/p) - 1 with q/p = 0.5
    assert kl_estimate(logp, ref, "k3").item() == pytest.approx(0.5 - math.log(0.5) - 1)
    assert kl_estimate(ref, ref, "k3").item() == 0.0
    with pytest.raises(ValueError, match="k2"):
        kl_estimate(logp, ref, "k2")  # type: ignore[arg-type]


def test_whiten_ignores_padding() -> None:
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    out = whiten(values, mask)
    assert out[0, :3].tolist() == pytest.approx([-1.0, 0.0, 1.0], abs=1e-6)  # unbiased std of 1,2,3 is 1
    assert out[0, 3] == 0
    kept = whiten(values, mask, shift_mean=False)
    assert kept[0, :3].tolist() == pytest.approx([1.0, 2.0, 3.0], abs=1e-6)
    assert masked_mean(values, mask).item() == pytest.approx(2.0)


def test_gae_by_hand() -> None:
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 9.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [0.5, 0.6, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # row 0: δ2 = 1 - .7 = .3; δ1 = .7 - .6 = .1, A1 = .1 + .5·.3 = .25; δ0 = .1, A0 = .1 + .5·.25 = .225
    assert adv[0].tolist() == pytest.approx([0.225, 0.25, 0.3])
    assert ret[0].tolist() == pytest.approx([0.725, 0.85, 1.0])
    # row 1 ends at t=1: δ1 = 2 - .6 = 1.4 (no value after the end); δ0 = .6 - .5 = .1, A0 = .1 + .7 = .8
    assert adv[1].tolist() == pytest.approx([0.8, 1.4, 0.0])
    adv_g, _ = gae(rewards[:1], values[:1], mask[:1], gamma=0.9, lam=1.0)
    assert adv_g[0, 0].item() == pytest.approx(0.81 * 1.0 - 0.5)  # λ=1: discounted return minus V


def test_ppo_policy_loss_by_hand() -> None:
    old = torch.zeros(1, 2)
    logp = torch.full((1, 2), math.log(1.5))
    advantages = torch.tensor([[1.0, -1.0]])
    loss, stats = ppo_policy_loss(logp, old, advantages, torch.ones(1, 2), clip=0.2)
    # A=+1: max(-1.5, -1.2) = -1.2 (clipped); A=-1: max(1.5, 1.2) = 1.5 (not clipped)
    assert loss.item() == pytest.approx((-1.2 + 1.5) / 2)
    assert stats["clip_frac"].item() == pytest.approx(0.5)
    assert stats["approx_kl"].item() == pytest.approx(1 / 1.5 + math.log(1.5) - 1)
    same, same_stats = ppo_policy_loss(old, old, advantages, torch.ones(1, 2))
    assert same.item() == 0.0 and same_stats["clip_frac"].item() == 0.0


def test_ppo_value_loss_by_hand() -> None:
    values, old, returns = torch.tensor([[1.0, 0.55]]), torch.tensor([[0.5, 0.5]]), torch.tensor([[2.0, 0.5]])
    loss, clip_frac = ppo_value_loss(values, old, returns, torch.ones(1, 2), clip=0.2)
    # token 0: V_clip = 0.7, max((1-2)², (0.7-2)²) = 1.69; token 1: within the clip, (0.55-0.5)² = .0025
    assert loss.item() == pytest.approx(0.5 * (1.69 + 0.0025) / 2)
    assert clip_frac.item() == pytest.approx(0.5)


def test_group_advantages_by_hand() -> None:
    rewards = torch.tensor([1.0, 3.0, 5.0, 5.0])
    adv = group_advantages(rewards, group_size=2)
    std = math.sqrt(2.0)  # unbiased std of (1, 3)
    assert adv.tolist() == pytest.approx([-1 / (std + 1e-4), 1 / (std + 1e-4), 0.0, 0.0])
    assert group_advantages(rewards, 2, scale=False).tolist() == [-1.0, 1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(rewards, 3)


def test_grpo_loss_by_hand() -> None:
    logp = torch.log(torch.tensor([[0.5, 0.5], [0.5, 0.5]]))
    old = torch.log(torch.tensor([[0.25, 0.5], [0.5, 0.5]]))  # ratio 2 on token (0,0)
    ref = torch.log(torch.tensor([[0.5, 0.25], [0.5, 0.5]]))
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, stats = grpo_loss(logp, old, ref, adv, mask, beta=0.1, clip_low=0.2, clip_high=0.2)
    k3 = 0.5 - math.log(0.5) - 1  # q/p = 0.5 on token (0,1)
    seq0 = (-1.2 + (-1.0 + 0.1 * k3)) / 2  # clipped ratio 1.2 on the first token
    seq1 = 1.0
    assert loss.item() == pytest.approx((seq0 + seq1) / 2)
    assert stats["clip_frac"].item() == pytest.approx(1 / 3)
    bnpo, _ = grpo_loss(logp, old, ref, adv, mask, beta=0.1, loss_type="bnpo")
    assert bnpo.item() == pytest.approx((-1.2 - 1.0 + 0.1 * k3 + 1.0) / 3)
    dr, _ = grpo_loss(logp, old, ref, adv, mask, beta=0.1, loss_type="dr_grpo", max_completion_length=4)
    assert dr.item() == pytest.approx((-1.2 - 1.0 + 0.1 * k3 + 1.0) / (2 * 4))


def test_completion_mask_keeps_the_first_eos() -> None:
    ids = torch.tensor([[5, 6, 2, 7, 2], [5, 5, 5, 5, 5]])
    assert completion_mask(ids, eos_id=2).tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]


# -- against TRL on identical tensors -------------------------------------------------------------


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
def test_grpo_loss_matches_trl(loss_type: str) -> None:
    torch.manual_seed(0)
    logp = -torch.rand(6, 5) * 3
    old = logp + 0.3 * torch.randn(6, 5)
    ref = logp + 0.5 * torch.randn(6, 5)
    mask = torch.tensor(
        [[1] * 5, [1] * 3 + [0] * 2, [1] * 5, [1, 0, 0, 0, 0], [1] * 4 + [0], [1] * 5]
    ).float()
    rewards = torch.randn(6)
    advantages = group_advantages(rewards, group_size=3)
    ours, _ = grpo_loss(
        logp, old, ref, advantages, mask, beta=0.04, loss_type=loss_type, max_completion_length=5
    )
    theirs = trl_grpo_loss(
        loss_type,
        0.04,
        0.2,
        0.2,
        dict(logp=logp, old_logp=old, ref_logp=ref, mask=mask, advantages=advantages),
    )
    torch.testing.assert_close(ours, theirs)


def test_group_advantages_match_trl_formula() -> None:
    utils = pytest.importorskip("trl.trainer.utils")
    rewards = torch.tensor([0.1, 0.9, 0.4, 2.0, 2.0, -1.0])
    grouped = rewards.view(-1, 3)
    mean = grouped.mean(1).repeat_interleave(3)
    std = utils.nanstd(grouped, dim=1).repeat_interleave(3)
    torch.testing.assert_close(group_advantages(rewards, 3), (rewards - mean) / (std + 1e-4))


def test_logprobs_and_entropy_match_trl() -> None:
    utils = pytest.importorskip("trl.trainer.utils")
    torch.manual_seed(0)
    logits, tokens = torch.randn(2, 4, 11), torch.randint(0, 11, (2, 4))
    torch.testing.assert_close(token_logprobs(logits, tokens), utils.selective_log_softmax(logits, tokens))
    torch.testing.assert_close(entropy_from_logits(logits), utils.entropy_from_logits(logits))


# -- reward sources -------------------------------------------------------------------------------


def test_reward_from_file_and_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    by_file = load_reward(f"{REWARDS}:letter_share")
    assert by_file(["p", "p"], ["eee", "ab"], [None, None]) == [1.0, 0.0]
    (tmp_path / "my_rewards.py").write_text(
        "def length(prompts, completions):\n    return [len(c) for c in completions]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_reward("my_rewards:length")(["x"], ["four"], [None]) == [4.0]
    with pytest.raises(ValueError, match="no function 'nope'"):
        load_reward(f"{REWARDS}:nope")
    sys.modules.pop("my_rewards", None)


def test_reward_model_scores_one_logit(tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    from tunelab.models.load import load_model

    model, tokenizer = load_model(
        "tiny:llama", model_cls=AutoModelForSequenceClassification, model_kwargs={"num_labels": 1}
    )
    model.save_pretrained(tmp_path / "rm", safe_serialization=True)
    tokenizer.save_pretrained(tmp_path / "rm")
    reward = load_reward(str(tmp_path / "rm"))
    conversation = [{"role": "user", "content": "Say hi"}]
    scores = reward(["Say hi", "Say hi"], ["hi there", "blue"], [conversation, conversation])
    enc = tokenizer(
        tokenizer.apply_chat_template(
            [*conversation, {"role": "assistant", "content": "hi there"}], tokenize=False
        ),
        return_tensors="pt",
        add_special_tokens=False,
    )
    with torch.no_grad():
        expected = model.eval()(**enc).logits[0, 0].item()
    assert scores[0] == pytest.approx(expected, abs=1e-5)
    assert scores[0] != scores[1]
    model2, _ = load_model(
        "tiny:llama", model_cls=AutoModelForSequenceClassification, model_kwargs={"num_labels": 3}
    )
    model2.save_pretrained(tmp_path / "cls", safe_serialization=True)
    tokenizer.save_pretrained(tmp_path / "cls")
    with pytest.raises(ValueError, match="exactly one"):
        load_reward(str(tmp_path / "cls"))


# -- short runs on the tiny model -----------------------------------------------------------------


def _rl_recipe(
    tmp_path: Path,
    qa_rows: list[dict],
    objective: dict,
    name: str,
    method: dict | None = None,
    **training: object,
):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in qa_rows))
    raw = {
        "seed": 0,
        "model": {"name_or_path": "tiny:llama"},
        "data": {"train": str(data), "max_length": 64},
        "method": method or {"name": "full"},
        "objective": {"reward": f"{REWARDS}:letter_share", "max_new_tokens": 16, **objective},
        "training": {"learning_rate": 1e-2, "warmup_steps": 0, "lr_scheduler": "constant", **training},
        "output": {"dir": str(tmp_path / "runs"), "name": name},
    }
    return parse_recipe(raw)


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _rises(rows: list[dict], k: int = 3) -> tuple[float, float]:
    rewards = [r["reward_mean"] for r in rows]
    return sum(rewards[:k]) / k, sum(rewards[-k:]) / k


def test_grpo_raises_reward_with_bounded_kl(tmp_path: Path, qa_rows: list[dict]) -> None:
    recipe = _rl_recipe(
        tmp_path,
        qa_rows,
        {"name": "grpo", "num_generations": 4, "beta": 0.04},
        "grpo",
        max_steps=15,
        batch_size=6,
    )
    result = train(recipe)
    rows = _rows(result.run_dir)
    assert [r["step"] for r in rows] == list(range(1, 16))
    assert {"reward_mean", "kl", "entropy", "clip_frac", "loss", "lr"} <= set(rows[-1])
    first, last = _rises(rows)
    assert last > first + 0.05, (first, last)
    assert max(r["kl"] for r in rows) < 16 * 2.0  # per-token KL stays below 2 nats over 16 tokens
    final = result.run_dir / "final"
    meta = json.loads((final / "tunelab.json").read_text())
    assert meta["objective"] == "grpo" and meta["model_kind"] == "causal_lm" and meta["step"] == 15
    assert json.loads((result.run_dir / "manifest.json").read_text())["status"] == "completed"


def test_ppo_raises_reward_with_bounded_kl(tmp_path: Path, qa_rows: list[dict]) -> None:
    objective = {"name": "ppo", "ppo_epochs": 2, "lam": 1.0, "kl_coef": 0.02}
    recipe = _rl_recipe(
        tmp_path, qa_rows * 4, objective, "ppo", max_steps=15, batch_size=24, learning_rate=5e-3
    )
    result = train(recipe)
    rows = _rows(result.run_dir)
    assert {"reward_mean", "kl", "entropy", "clip_frac", "value_loss", "kl_coef"} <= set(rows[-1])
    first, last = _rises(rows)
    assert last > first + 0.02, (first, last)
    assert max(r["kl"] for r in rows) < 16 * 2.0
    assert (result.run_dir / "final" / "value_head.safetensors").exists()


def test_adaptive_kl_controller_by_hand() -> None:
    # error = clip(kl / target - 1, ±0.2); β ← β (1 + error · n / horizon)
    assert adaptive_kl(0.1, kl=0.02, target=0.01, n=6, horizon=10) == pytest.approx(0.1 * (1 + 0.2 * 0.6))
    assert adaptive_kl(0.1, kl=0.0, target=0.01, n=6, horizon=10) == pytest.approx(0.1 * (1 - 0.2 * 0.6))
    assert adaptive_kl(0.1, kl=0.011, target=0.01, n=10, horizon=10) == pytest.approx(0.1 * 1.1)


def test_ppo_adaptive_kl_coefficient_moves(tmp_path: Path, qa_rows: list[dict]) -> None:
    """Each step β moves towards the target: up when the step's KL is above it, down when below, by
    exactly the controller's amount (the row logs the β the step used, then β is updated)."""
    objective = {"name": "ppo", "kl_coef": 0.1, "target_kl": 0.01, "kl_horizon": 10, "ppo_epochs": 1}
    recipe = _rl_recipe(tmp_path, qa_rows, objective, "ppo-adaptive", max_steps=3, batch_size=6)
    rows = _rows(train(recipe).run_dir)
    coefs = [r["kl_coef"] for r in rows]
    assert coefs[0] == 0.1 and len(rows) == 3
    for row, after in zip(rows, coefs[1:]):
        assert after == pytest.approx(adaptive_kl(row["kl_coef"], row["kl"], 0.01, 6, 10), rel=1e-9)
        direction = math.copysign(1.0, row["kl"] - 0.01)
        assert math.copysign(1.0, after - row["kl_coef"]) == direction, (row["kl"], row["kl_coef"], after)
    # the first step samples from the reference itself (KL 0 < target), so β must fall first
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6) and coefs[1] < coefs[0]


def test_grpo_lora_resume_continues_identically(tmp_path: Path, qa_rows: list[dict]) -> None:
    """A run resumed from its step-2 checkpoint samples and learns exactly as the uninterrupted run."""
    objective = {"name": "grpo", "num_generations": 2, "num_minibatches": 2, "max_new_tokens": 8}
    lora = {"name": "lora", "r": 4}
    recipe = _rl_recipe(
        tmp_path, qa_rows, objective, "grpo-lora", lora, max_steps=4, batch_size=3, save_every=2
    )
    full = _rows(train(recipe).run_dir)
    run = tmp_path / "runs" / "grpo-lora"
    shutil.rmtree(run / "final")
    shutil.rmtree(run / "checkpoints" / "step-4")
    result = resume(run)
    again = _rows(run)
    assert result.steps == 4
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    for a, b in zip(full, again):
        assert a["reward_mean"] == pytest.approx(b["reward_mean"], abs=1e-6)
        assert a["kl"] == pytest.approx(b["kl"], abs=1e-5)
    from tunelab.evaluate.run import load_for_eval

    model, _ = load_for_eval(str(run))
    assert type(model).__name__.startswith("Peft")


def test_online_rejects_offline_only_settings(tmp_path: Path, qa_rows: list[dict]) -> None:
    recipe = _rl_recipe(tmp_path, qa_rows, {"name": "grpo"}, "bad", max_steps=1, grad_accum=2)
    with pytest.raises(ValueError, match="grad_accum"):
        train(recipe)


@pytest.mark.parametrize("name", ["tiny-grpo", "tiny-ppo"])
def test_shipped_recipe_trains(tmp_path: Path, name: str) -> None:
    """The example recipes run as shipped (two steps here), reward path resolved next to the recipe."""
    from tunelab.recipe import load_recipe

    recipe = load_recipe(
        REPO / "recipes" / f"{name}.yaml", overrides=["training.max_steps=2", f"output.dir={tmp_path}"]
    )
    assert Path(recipe.objective.reward.rpartition(":")[0]) == REWARDS
    result = train(recipe)
    assert result.steps == 2 and (result.run_dir / "final" / "tunelab.json").exists()
