"""The GRPO loss family (grpo, bnpo, dr_grpo, dapo, gspo, cispo) against TRL 1.16's GRPOTrainer on the
same tensors (values and gradients), written-out paper formulas, clip-higher, the soft overlong
penalty, truncated-completion masking and dynamic sampling."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import tunelab.objectives.grpo  # noqa: F401  (registers before the recipe schema is built)
from trl_reference import trl_grpo_loss
from tunelab.objectives.rl_losses import (
    GRPO_LOSS_TYPES,
    equal_reward_groups,
    group_advantages,
    grpo_loss,
    soft_overlong_penalty,
)
from tunelab.recipe import RecipeError, parse_recipe
from tunelab.train.rl import OnlineTrainer, Rollout, concat_rollouts


def _tensors(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    logp = -torch.rand(6, 5) * 3
    return {
        "logp": logp,
        "old_logp": logp + 0.3 * torch.randn(6, 5),
        "ref_logp": logp + 0.5 * torch.randn(6, 5),
        "mask": torch.tensor(
            [[1] * 5, [1] * 3 + [0] * 2, [1] * 5, [1, 0, 0, 0, 0], [1] * 4 + [0], [1] * 5]
        ).float(),
        "advantages": group_advantages(torch.randn(6), group_size=3),
    }


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
def test_every_loss_type_matches_trl_in_value_and_gradient(loss_type: str, beta: float) -> None:
    """Clip-higher on (ε_low 0.2, ε_high 0.28): both sides of the clip are exercised by the ratios."""
    ours_t, theirs_t = _tensors(), _tensors()
    ours_t["logp"].requires_grad_(True)
    theirs_t["logp"].requires_grad_(True)
    ours, _ = grpo_loss(
        ours_t["logp"],
        ours_t["old_logp"],
        ours_t["ref_logp"],
        ours_t["advantages"],
        ours_t["mask"],
        clip_low=0.2,
        clip_high=0.28,
        beta=beta,
        loss_type=loss_type,  # type: ignore[arg-type]
        max_completion_length=5,
    )
    theirs = trl_grpo_loss(loss_type, beta, 0.2, 0.28, theirs_t)
    torch.testing.assert_close(ours, theirs)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours_t["logp"].grad, theirs_t["logp"].grad)
    assert ours_t["logp"].grad.abs().sum() > 0


def test_gspo_and_cispo_by_the_papers_formulas() -> None:
    """GSPO (Zheng et al. 2025, eq. 5-7): s_i = (π/π_old)^(1/|y_i|) per sequence, loss
    −1/G Σ_i min(s_i A_i, clip(s_i, 1−ε, 1+ε) A_i). CISPO (MiniMax-M1, eq. 4): −Σ_i,t sg(min(r_it,
    1+ε_high)) A_i log π_it / Σ_i |y_i|."""
    t = _tensors(1)
    logp, old, mask, adv = t["logp"], t["old_logp"], t["mask"], t["advantages"]
    terms = []
    for i in range(6):
        n = int(mask[i].sum())
        s = math.exp(float((logp[i, :n] - old[i, :n]).sum()) / n)
        a = float(adv[i])
        terms.append(-min(s * a, min(max(s, 1 - 0.2), 1 + 0.2) * a))
    gspo, _ = grpo_loss(logp, old, None, adv, mask, beta=0.0, loss_type="gspo")
    assert gspo.item() == pytest.approx(sum(terms) / 6, rel=1e-5)

    total, tokens = 0.0, 0
    for i in range(6):
        for j in range(int(mask[i].sum())):
            weight = min(math.exp(float(logp[i, j] - old[i, j])), 1 + 0.5)
            total += -weight * float(adv[i]) * float(logp[i, j])
            tokens += 1
    cispo, _ = grpo_loss(logp, old, None, adv, mask, beta=0.0, clip_high=0.5, loss_type="cispo")
    assert cispo.item() == pytest.approx(total / tokens, rel=1e-5)


def test_dapo_normalises_by_the_tokens_it_is_given() -> None:
    t = _tensors(2)
    args = (t["logp"], t["old_logp"], None, t["advantages"], t["mask"])
    own, _ = grpo_loss(*args, beta=0.0, loss_type="dapo")
    bnpo, _ = grpo_loss(*args, beta=0.0, loss_type="bnpo")
    half, _ = grpo_loss(*args, beta=0.0, loss_type="dapo", num_items=t["mask"].sum() * 2)
    torch.testing.assert_close(own, bnpo)  # one minibatch, one process: the same normaliser
    torch.testing.assert_close(half, own / 2)
    with pytest.raises(ValueError, match="grpo, bnpo, dr_grpo, dapo, gspo, cispo"):
        grpo_loss(*args, loss_type="ppo")  # type: ignore[arg-type]


def test_clip_higher_lets_positive_advantages_go_further() -> None:
    logp, old = torch.log(torch.tensor([[0.5]])), torch.log(torch.tensor([[0.4]]))  # ratio 1.25
    mask, adv = torch.ones(1, 1), torch.tensor([1.0])
    symmetric, stats = grpo_loss(logp, old, None, adv, mask, clip_low=0.2, clip_high=0.2, beta=0.0)
    higher, higher_stats = grpo_loss(logp, old, None, adv, mask, clip_low=0.2, clip_high=0.28, beta=0.0)
    assert symmetric.item() == pytest.approx(-1.2) and stats["clip_frac"].item() == 1.0
    assert higher.item() == pytest.approx(-1.25) and higher_stats["clip_frac"].item() == 0.0


def test_soft_overlong_penalty_matches_trl() -> None:
    rewards = pytest.importorskip("trl.rewards")
    lengths = torch.tensor([10, 80, 81, 90, 100])
    trl = rewards.get_soft_overlong_punishment(max_completion_len=100, soft_punish_cache=20)
    expected = trl([[1] * int(n) for n in lengths])
    assert soft_overlong_penalty(lengths, 100, 20).tolist() == pytest.approx(expected)
    assert soft_overlong_penalty(lengths, 100, 20, factor=0.5).tolist() == pytest.approx(
        [0.5 * e for e in expected]
    )
    with pytest.raises(ValueError, match="overlong buffer"):
        soft_overlong_penalty(lengths, 100, 0)


def test_length_rules_mask_truncated_and_penalise_overlong() -> None:
    eos = 2
    completions = torch.tensor([[5, 2, 0, 0], [5, 5, 5, 5], [5, 5, 2, 0]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]]).float()
    cfg = SimpleNamespace(
        missing_eos_penalty=None,
        overlong_buffer=2,
        overlong_penalty=1.0,
        max_new_tokens=4,
        mask_truncated_completions=True,
    )
    fake = SimpleNamespace(cfg=cfg, tokenizer=SimpleNamespace(eos_token_id=eos))
    scores, new_mask = OnlineTrainer.length_rules(fake, completions, mask, torch.zeros(3))
    assert scores.tolist() == pytest.approx([0.0, -1.0, -0.5])  # 2 tokens: none; 4: all; 3: half
    assert new_mask.tolist() == [[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0]]  # the one without EOS is out
    cfg.mask_truncated_completions, cfg.overlong_buffer, cfg.missing_eos_penalty = False, None, 0.25
    scores, same = OnlineTrainer.length_rules(fake, completions, mask, torch.zeros(3))
    assert scores.tolist() == [0.0, -0.25, 0.0] and torch.equal(same, mask)


def test_equal_reward_groups_and_rollout_concatenation() -> None:
    assert equal_reward_groups(torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5]), 2).tolist() == [
        True,
        False,
        True,
    ]
    a = Rollout(
        prompt_ids=torch.tensor([[7, 8]]),
        prompt_mask=torch.ones(1, 2, dtype=torch.long),
        completion_ids=torch.tensor([[3]]),
        mask=torch.ones(1, 1),
        scores=torch.tensor([1.0]),
        old_logp=torch.tensor([[-1.0]]),
        entropy=torch.tensor([[0.5]]),
        reward_parts={"r": torch.tensor([1.0])},
    )
    b = Rollout(
        prompt_ids=torch.tensor([[9]]),
        prompt_mask=torch.ones(1, 1, dtype=torch.long),
        completion_ids=torch.tensor([[4, 5, 6]]),
        mask=torch.tensor([[1.0, 1.0, 0.0]]),
        scores=torch.tensor([2.0]),
        old_logp=torch.tensor([[-2.0, -3.0, 0.0]]),
        entropy=torch.tensor([[1.0, 1.0, 0.0]]),
        reward_parts={"r": torch.tensor([2.0])},
    )
    both = concat_rollouts([a, b], pad_id=0)
    assert both.prompt_ids.tolist() == [[7, 8], [0, 9]] and both.prompt_mask.tolist() == [[1, 1], [0, 1]]
    assert both.completion_ids.tolist() == [[3, 0, 0], [4, 5, 6]]
    assert both.mask.tolist() == [[1, 0, 0], [1, 1, 0]]
    assert both.old_logp.tolist() == [[-1, 0, 0], [-2, -3, 0]] and both.ref_logp is None
    assert both.select(torch.tensor([1])).reward_parts == {"r": torch.tensor([2.0])}


def test_recipe_checks_the_loss_family_settings() -> None:
    base = {"model": {"name_or_path": "tiny:llama"}, "data": {"train": "x.jsonl"}, "method": {"name": "full"}}
    objective = {"name": "grpo", "reward": "a.py:f"}
    for loss_type in GRPO_LOSS_TYPES:
        parse_recipe({**base, "objective": {**objective, "loss_type": loss_type}})
    with pytest.raises(RecipeError, match="loss_type"):
        parse_recipe({**base, "objective": {**objective, "loss_type": "sapo"}})
    with pytest.raises(RecipeError, match="overlong_buffer=65 is longer than max_new_tokens=64"):
        parse_recipe({**base, "objective": {**objective, "overlong_buffer": 65}})


def test_dynamic_sampling_drops_groups_without_signal_and_refills(tmp_path: Path) -> None:
    """Half the prompts get a constant reward (their groups carry no signal): each step draws more
    prompts until it has batch_size groups with signal, and trains on those only."""
    rows = [{"prompt": f"Say {w}", "constant": i % 2 == 0} for i, w in enumerate("abcdefgh")]
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    reward = tmp_path / "r.py"
    reward.write_text(
        "def score(prompts, completions, rows):\n"
        "    return [0.0 if r['constant'] else len(c) / 10 + i * 1e-3 for i, (c, r) in enumerate(zip(completions, rows))]\n"
    )
    recipe = parse_recipe(
        {
            "seed": 0,
            "model": {"name_or_path": "tiny:llama"},
            "data": {"train": str(data), "max_length": 64},
            "method": {"name": "full"},
            "objective": {
                "name": "grpo",
                "reward": f"{reward}:score",
                "num_generations": 2,
                "max_new_tokens": 4,
                "dynamic_sampling": True,
                "loss_type": "dapo",
                "clip_range_high": 0.28,
            },
            "training": {"max_steps": 2, "batch_size": 2, "learning_rate": 1e-3},
            "output": {"dir": str(tmp_path / "runs"), "name": "dyn"},
        }
    )
    from tunelab.train.run import train

    result = train(recipe)
    metrics = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2
    for m in metrics:
        assert 0.0 < m["groups_with_signal"] < 1.0 and m["refills"] >= 1
        assert m["reward_std"] > 0 and m["reward_mean"] > 0  # constant-reward groups were dropped


def test_each_online_objective_owns_its_algorithm() -> None:
    """PPO and GRPO carry their group size, passes, KL weight, advantages and minibatch loss; the
    loop in train/rl.py asks the objective and never branches on the algorithm's name."""
    from tunelab.objectives import OBJECTIVES
    from tunelab.objectives.online import OnlineObjective

    online = [name for name in OBJECTIVES.names() if getattr(OBJECTIVES.get(name).impl, "online", False)]
    assert {"ppo", "grpo"} <= set(online)
    for name in online:
        cls = OBJECTIVES.get(name).impl
        for member in ("passes", "kl_weight", "advantages", "minibatch_loss"):
            assert getattr(cls, member) is not getattr(OnlineObjective, member), (name, member)
    loop = (Path(__file__).resolve().parents[1] / "src" / "tunelab" / "train" / "rl.py").read_text()
    assert "is_ppo" not in loop and '== "ppo"' not in loop and '== "grpo"' not in loop

    grpo_cls, ppo_cls = OBJECTIVES.get("grpo").impl, OBJECTIVES.get("ppo").impl
    grpo = grpo_cls.__new__(grpo_cls)
    grpo.config = OBJECTIVES.get("grpo").config_cls(reward="a.py:f", num_generations=3, beta=0.0)
    t = _tensors(4)
    batch = SimpleNamespace(scores=torch.randn(6), mask=t["mask"], old_logp=t["old_logp"], ref_logp=None)
    adv, returns, _ = grpo.advantages(batch, 0.0)
    torch.testing.assert_close(adv, group_advantages(batch.scores, 3))
    assert returns is None
    loss, _ = grpo.minibatch_loss(t["logp"], None, batch, adv, None, None)
    torch.testing.assert_close(loss, grpo_loss(t["logp"], t["old_logp"], None, adv, t["mask"], beta=0.0)[0])
    ppo = ppo_cls.__new__(ppo_cls)
    ppo.config = OBJECTIVES.get("ppo").config_cls(reward="a.py:f", target_kl=0.01, kl_horizon=10)
    assert (ppo.group, ppo.passes, ppo.value_head, grpo.group, grpo.value_head) == (1, 4, True, 3, False)
    assert (
        ppo.next_kl_coef(0.1, 0.02, 6) == pytest.approx(0.1 * 1.12) and grpo.next_kl_coef(0.1, 9.0, 6) == 0.1
    )
